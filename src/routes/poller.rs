//! `GET|POST /api/latest/internal/external-db-sync/poller`: publishes queued sync
//! requests for a cron call. In `direct` mode the call waits for the syncs it started
//! before it answers, so with `stopWhenIdle=true` it returns once they are all done.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::cron::{run_repeatedly, RunLimits, StopReason};
use super::error::AppError;
use crate::auth::CronAuth;
use crate::poller::{InFlight, PolledBatch, PollerRun};
use crate::routes::AppState;

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
    let poller = &state.poller;
    let batch_size = poller.settings().batch_size;
    let in_flight = InFlight::default();
    let mut totals = PolledBatch::default();
    let summary = run_repeatedly(
        limits,
        &state.shutdown,
        in_flight.ended(),
        || poller.run_once(&in_flight),
        |run| {
            if let PollerRun::Batch(batch) = run {
                totals.add(batch);
            }
            run.outcome(batch_size)
        },
    )
    .await?;
    // Whatever ended the loop, the syncs this call started are waited for, so the
    // answer counts them and a cron caller knows they are done.
    totals.add(&poller.finish(&in_flight).await?);
    Ok(Json(PollerResponse {
        ok: true,
        iterations: summary.iterations,
        stop_reason: summary.stop_reason,
        duration_ms: summary.duration.as_millis() as u64,
        claimed: totals.claimed,
        published: totals.published,
        failed: totals.failed,
    }))
}
