//! The HTTP interface (DESIGN.md §7). Handlers are thin: they authenticate, extract,
//! call a plain function and shape the answer.

mod cron;
mod error;
mod fusebox;
mod health;
mod metrics;
mod poller;
mod sequencer;
mod status;
mod sync_engine;
mod tenancies;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::db::queue::SYNC_ENGINE_PATH;
use std::sync::Arc;

use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::qstash::Verifier;
use crate::poller::Poller;
use crate::sequencer::SequencerSettings;
use crate::sync::SyncEngine;
pub use error::AppError;

/// Common prefix of the service's internal routes, as in the platform this mirrors.
const PREFIX: &str = "/api/latest/internal/external-db-sync";

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// The bearer token `/sequencer`, `/poller` and `/fusebox` expect (`CRON_SECRET`).
    pub cron_secret: Arc<SecretString>,
    /// How `/sequencer` runs its batches.
    pub sequencer: SequencerSettings,
    pub engine: Arc<SyncEngine>,
    /// Claims sync requests and publishes them where `SYNC_QUEUE` says.
    pub poller: Arc<Poller>,
    /// Checks `/sync-engine` signatures; `None` when no signing key is configured.
    pub verifier: Option<Arc<Verifier>>,
    /// Cancelled when the service shuts down; long-running handlers stop early on it.
    pub shutdown: CancellationToken,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::render))
        .route(
            &format!("{PREFIX}/sequencer"),
            get(sequencer::run).post(sequencer::run),
        )
        .route(
            &format!("{PREFIX}/poller"),
            get(poller::run).post(poller::run),
        )
        .route(&format!("{PREFIX}/status"), get(status::read))
        .route(
            &format!("{PREFIX}/tenancies/{{id}}/sync"),
            post(tenancies::sync),
        )
        .route(
            &format!("{PREFIX}/tenancies/{{id}}/verify"),
            post(tenancies::verify),
        )
        .route(
            &format!("{PREFIX}/tenancies/{{id}}/resync"),
            post(tenancies::resync),
        )
        .route(
            &format!("{PREFIX}/fusebox"),
            get(fusebox::read).post(fusebox::write),
        )
        .route(
            SYNC_ENGINE_PATH,
            post(sync_engine::run).layer(DefaultBodyLimit::max(sync_engine::BODY_LIMIT)),
        )
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        // The path only: a query string is the caller's and is never logged.
        .layer(TraceLayer::new_for_http().make_span_with(
            |request: &axum::http::Request<axum::body::Body>| {
                tracing::debug_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path()
                )
            },
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_engine_path_is_under_the_prefix() {
        assert_eq!(SYNC_ENGINE_PATH, format!("{PREFIX}/sync-engine"));
    }
}
