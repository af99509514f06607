//! What the cron-driven routes (`/sequencer`, `/poller`) share: the `maxDurationMs` and
//! `stopWhenIdle` parameters and the loop that repeats a step until one of them says stop.

use std::future::Future;
use std::time::Duration;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::AppError;
use crate::workers::Outcome;

/// Vercel's longest function duration is 800 s; an hour is generous for any scheduler.
const MAX_DURATION_LIMIT_MS: u64 = 3_600_000;
/// Pause between iterations that found nothing to do.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause while waiting for work the call started: its end wakes the call, so
/// this is only the safety net.
const WAITING_PAUSE: Duration = Duration::from_secs(1);

/// How long a cron call may keep iterating.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub max_duration: Duration,
    pub stop_when_idle: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunParams {
    max_duration_ms: Option<u64>,
    stop_when_idle: Option<bool>,
}

impl<S: Send + Sync> FromRequestParts<S> for RunLimits {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Query(params) = Query::<RunParams>::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                AppError::BadRequest(
                    "query parameters: maxDurationMs must be a whole number of milliseconds \
                     and stopWhenIdle true or false"
                        .to_owned(),
                )
            })?;
        let max_duration_ms = params.max_duration_ms.unwrap_or(180_000);
        if max_duration_ms > MAX_DURATION_LIMIT_MS {
            return Err(AppError::BadRequest(format!(
                "maxDurationMs must be at most {MAX_DURATION_LIMIT_MS}"
            )));
        }
        Ok(RunLimits {
            max_duration: Duration::from_millis(max_duration_ms),
            stop_when_idle: params.stop_when_idle.unwrap_or(false),
        })
    }
}

/// Why a cron call stopped iterating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    /// `stopWhenIdle=true` and an iteration found nothing to do.
    Idle,
    /// `maxDurationMs` has passed.
    Deadline,
    /// The fusebox switched this stage off.
    Disabled,
    /// The service is shutting down.
    Shutdown,
}

/// The summary of one cron call.
#[derive(Debug, Clone, Copy)]
pub struct RunSummary {
    pub iterations: u64,
    pub stop_reason: StopReason,
    pub duration: Duration,
}

/// Runs `step` repeatedly: at once while it reports work, every ~50 ms while idle, and
/// on `ended` (or every second) while it waits for work it started, until the limits,
/// the fusebox or a shutdown say stop. `record` sees every step's result, so the caller
/// can add up what was done. A failing step ends the call with its error; what earlier
/// steps did is committed and stays done.
pub async fn run_repeatedly<T, E, F, Fut>(
    limits: RunLimits,
    shutdown: &CancellationToken,
    ended: &Notify,
    mut step: F,
    mut record: impl FnMut(&T) -> Outcome,
) -> Result<RunSummary, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let deadline = started + limits.max_duration;
    let mut iterations = 0;
    let stop_reason = loop {
        let outcome = record(&step().await?);
        if outcome == Outcome::Disabled {
            break StopReason::Disabled;
        }
        iterations += 1;
        if limits.stop_when_idle && outcome.is_idle() {
            break StopReason::Idle;
        }
        let now = Instant::now();
        if now >= deadline {
            break StopReason::Deadline;
        }
        if shutdown.is_cancelled() {
            break StopReason::Shutdown;
        }
        let waiting = outcome == Outcome::Waiting;
        if outcome.waits() {
            let pause = match outcome {
                Outcome::Recheck(pause) => pause,
                Outcome::Waiting => WAITING_PAUSE,
                _ => IDLE_PAUSE,
            };
            tokio::select! {
                () = shutdown.cancelled() => break StopReason::Shutdown,
                () = ended.notified(), if waiting => {}
                () = tokio::time::sleep(pause.min(deadline - now)) => {}
            }
        }
    };
    Ok(RunSummary {
        iterations,
        stop_reason,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn limits(max_duration_ms: u64, stop_when_idle: bool) -> RunLimits {
        RunLimits {
            max_duration: Duration::from_millis(max_duration_ms),
            stop_when_idle,
        }
    }

    async fn run(limits: RunLimits, outcomes: &[Outcome]) -> (RunSummary, usize) {
        let mut script = outcomes.iter().copied().cycle();
        let mut calls = 0;
        let summary = run_repeatedly(
            limits,
            &CancellationToken::new(),
            &Notify::new(),
            || {
                calls += 1;
                let outcome = script.next().unwrap();
                async move { Ok::<_, Infallible>(outcome) }
            },
            |outcome| *outcome,
        )
        .await
        .unwrap();
        (summary, calls)
    }

    const WORK: Outcome = Outcome::Worked { n: 1, more: true };

    #[tokio::test]
    async fn zero_duration_runs_exactly_one_iteration() {
        let (summary, calls) = run(limits(0, false), &[WORK]).await;
        assert_eq!((summary.iterations, calls), (1, 1));
        assert_eq!(summary.stop_reason, StopReason::Deadline);
    }

    #[tokio::test]
    async fn stop_when_idle_returns_after_the_first_idle_iteration() {
        let outcomes = [WORK, WORK, Outcome::Idle, WORK];
        let (summary, calls) = run(limits(60_000, true), &outcomes).await;
        assert_eq!((summary.iterations, calls), (3, 3));
        assert_eq!(summary.stop_reason, StopReason::Idle);
    }

    #[tokio::test]
    async fn disabled_stops_without_counting_an_iteration() {
        let (summary, calls) = run(limits(60_000, false), &[Outcome::Disabled]).await;
        assert_eq!((summary.iterations, calls), (0, 1));
        assert_eq!(summary.stop_reason, StopReason::Disabled);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_iterations_repeat_until_the_deadline() {
        let (summary, calls) = run(limits(500, false), &[Outcome::Idle]).await;
        assert_eq!(summary.stop_reason, StopReason::Deadline);
        // One iteration at t=0, then one every 50 ms up to and including t=500.
        assert_eq!(calls, 11);
    }

    #[tokio::test]
    async fn shutdown_stops_the_loop() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let summary = run_repeatedly(
            limits(60_000, false),
            &shutdown,
            &Notify::new(),
            || async { Ok::<_, Infallible>(Outcome::Idle) },
            |outcome| *outcome,
        )
        .await
        .unwrap();
        assert_eq!(summary.stop_reason, StopReason::Shutdown);
        assert_eq!(summary.iterations, 1);
    }
}
