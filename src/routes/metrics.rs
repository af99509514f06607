//! `GET /metrics`: every metric of [`crate::instruments`] in the Prometheus text format.
//! Unauthenticated, like the health probes: it holds counts and durations, no tenant
//! identifier. The queue and lag gauges are read from the internal database at each
//! scrape (with a deadline), at most once a second however often it is scraped; if it
//! cannot answer, the rest is still served and `external_db_sync_backlog_read_ok` says
//! so.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::db;
use crate::instruments;
use crate::routes::AppState;

/// How long a scrape waits for the backlog figures.
const BACKLOG_DEADLINE: Duration = Duration::from_secs(5);
/// Scrapes closer together than this share one reading of the backlog: an
/// unauthenticated route must not let anyone load the internal database at will.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// When the backlog was last read; held while it is read, so that scrapes take turns.
static LAST_READ: tokio::sync::Mutex<Option<Instant>> = tokio::sync::Mutex::const_new(None);

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut last_read = LAST_READ.lock().await;
    if last_read.map_or(true, |at| at.elapsed() >= BACKLOG_EVERY) {
        read_backlog(&state).await;
        *last_read = Some(Instant::now());
    }
    drop(last_read);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        instruments::handle().render(),
    )
}

/// Sets the backlog gauges from the internal database.
async fn read_backlog(state: &AppState) {
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
}
