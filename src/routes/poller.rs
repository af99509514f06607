//! `GET|POST /api/latest/internal/external-db-sync/poller`: publishes queued sync
//! requests for a cron call. In `direct` mode each iteration waits for the syncs it
//! started, so with `stopWhenIdle=true` the call returns once they are all done.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::cron::{run_repeatedly, RunLimits, StopReason};
use crate::auth::CronAuth;
use crate::error::AppError;
use crate::poller::{self, PollerRun};
use crate::startup::AppState;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollerResponse {
    ok: bool,
    iterations: u64,
    stop_reason: StopReason,
    duration_ms: u64,
    claimed: u64,
    published: u64,
    failed: u64,
}

pub async fn run(
    _auth: CronAuth,
    State(state): State<AppState>,
    limits: RunLimits,
) -> Result<Json<PollerResponse>, AppError> {
    let settings = &state.config.poller;
    let (mut claimed, mut published, mut failed) = (0, 0, 0);
    let summary = run_repeatedly(
        limits,
        &state.shutdown,
        || poller::run_once(&state.pool, &state.publisher, settings),
        |run| {
            if let PollerRun::Batch(batch) = run {
                claimed += batch.claimed;
                published += batch.published;
                failed += batch.failed;
            }
            run.outcome(settings.batch_size)
        },
    )
    .await?;
    Ok(Json(PollerResponse {
        ok: true,
        iterations: summary.iterations,
        stop_reason: summary.stop_reason,
        duration_ms: summary.duration.as_millis() as u64,
        claimed,
        published,
        failed,
    }))
}
