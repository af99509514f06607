//! Liveness and readiness probes.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::db;
use crate::routes::AppState;

/// The process is up and serving HTTP. Deliberately checks nothing else: a database
/// outage must not make an orchestrator restart every replica.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "ok": true }))
}

/// Ready for traffic: the internal database answers.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if db::is_reachable(&state.pool, Duration::from_secs(2)).await {
        (
            StatusCode::OK,
            Json(json!({ "ok": true, "database": "ok" })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ok": false, "database": "unreachable" })),
        )
    }
}
