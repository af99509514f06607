//! `GET /metrics`: every metric of [`crate::instruments`] in the Prometheus text format.
//! Unauthenticated, like the health probes: it holds counts and durations, no tenant
//! identifier. The queue and lag gauges are read from the internal database at each
//! scrape (with a deadline); if it cannot answer, the rest is still served and
//! `external_db_sync_backlog_read_ok` says so.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::db;
use crate::instruments;
use crate::routes::AppState;

/// How long a scrape waits for the backlog figures.
const BACKLOG_DEADLINE: Duration = Duration::from_secs(5);

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let backlog = tokio::time::timeout(BACKLOG_DEADLINE, db::backlog::read(&state.pool)).await;
    match backlog {
        Ok(Ok(backlog)) => instruments::record_backlog(Some(&backlog)),
        Ok(Err(error)) => {
            tracing::warn!(error = %crate::error::error_chain(&error), "cannot read the backlog for /metrics");
            instruments::record_backlog(None);
        }
        Err(_) => {
            tracing::warn!("reading the backlog for /metrics took too long");
            instruments::record_backlog(None);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        instruments::handle().render(),
    )
}
