//! The HTTP interface (DESIGN.md §7). Handlers are thin: they authenticate, extract,
//! call a plain function and shape the answer.

mod cron;
mod fusebox;
mod health;
mod poller;
mod sequencer;
mod sync_engine;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::error::AppError;
use crate::startup::AppState;

/// Common prefix of the service's internal routes, as in the platform this mirrors.
const PREFIX: &str = "/api/latest/internal/external-db-sync";

/// Path of the sync-engine webhook; also what QStash is asked to call and what the
/// signature's `sub` claim names (after `PUBLIC_URL`).
pub const SYNC_ENGINE_PATH: &str = "/api/latest/internal/external-db-sync/sync-engine";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            &format!("{PREFIX}/sequencer"),
            get(sequencer::run).post(sequencer::run),
        )
        .route(
            &format!("{PREFIX}/poller"),
            get(poller::run).post(poller::run),
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
