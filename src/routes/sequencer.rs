//! `GET|POST /api/latest/internal/external-db-sync/sequencer`: runs sequencer batches
//! for a cron call.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use tokio::sync::Notify;

use super::cron::{run_repeatedly, RunLimits, StopReason};
use super::error::AppError;
use crate::auth::CronAuth;
use crate::routes::AppState;
use crate::sequencer::{self, SequencerRun};

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Sequenced {
    project_users: i64,
    contact_channels: i64,
    deleted_rows: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SequencerResponse {
    ok: bool,
    iterations: u64,
    stop_reason: StopReason,
    duration_ms: u64,
    sequenced: Sequenced,
    requests_enqueued: i64,
}

pub async fn run(
    _auth: CronAuth,
    State(state): State<AppState>,
    limits: RunLimits,
) -> Result<Json<SequencerResponse>, AppError> {
    let settings = &state.sequencer;
    let mut sequenced = Sequenced::default();
    let mut requests_enqueued = 0;
    let summary = run_repeatedly(
        limits,
        &state.shutdown,
        // The sequencer never waits for work it started.
        &Notify::new(),
        || sequencer::run_once(&state.pool, settings),
        |run| {
            if let SequencerRun::Batch(batch) = run {
                sequenced.project_users += batch.project_users;
                sequenced.contact_channels += batch.contact_channels;
                sequenced.deleted_rows += batch.deleted_rows;
                requests_enqueued += batch.requests_enqueued;
            }
            run.outcome(settings.batch_size)
        },
    )
    .await?;
    Ok(Json(SequencerResponse {
        ok: true,
        iterations: summary.iterations,
        stop_reason: summary.stop_reason,
        duration_ms: summary.duration.as_millis() as u64,
        sequenced,
        requests_enqueued,
    }))
}
