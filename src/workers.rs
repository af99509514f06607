//! Background loops that `serve` runs in-process (`RUN_WORKERS=true`), so that one
//! process does the whole job without an external cron.
//!
//! A worker is a loop around a testable run-once function. It goes again at once while
//! there is work, sleeps only when idle (or switched off by the fusebox), backs off with
//! jitter after an error, and ends when the shutdown token is cancelled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::error::error_chain;

/// What one step of a worker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Switched off by the fusebox; nothing was done.
    Disabled,
    /// Nothing to do.
    Idle,
    /// `n` items processed; `more` when the step stopped at its batch limit, so more work
    /// is probably waiting.
    Worked { n: u64, more: bool },
    /// Nothing new to start, but work started by earlier steps is still running; its end
    /// wakes the loop, which may then find more (the poller's syncs).
    Waiting,
    /// Nothing to do now, but work may come that will not announce itself: look again
    /// after this pause (or a wake-up, if one comes first). The sequencer, while writers
    /// it asked to stay quiet are still committing.
    Recheck(Duration),
}

impl Outcome {
    pub fn is_idle(&self) -> bool {
        matches!(self, Outcome::Idle | Outcome::Disabled)
    }

    /// Whether the loop should wait for a wake-up (or its timer) before the next step.
    pub fn waits(&self) -> bool {
        matches!(
            self,
            Outcome::Idle | Outcome::Disabled | Outcome::Waiting | Outcome::Recheck(_)
        )
    }
}

/// How long a step that is under way when the process is asked to stop may still take.
/// A step is a statement or two against the internal database, done in milliseconds
/// when it answers (the poller's may first wait for a publish slot); when it does not
/// (it is down, and the pool waits for a connection for its acquire timeout), the step
/// is dropped, so that stopping is not held up. A dropped step leaves nothing half
/// done: each statement is its own transaction, and a request it may have claimed is
/// taken over when its lease runs out.
pub const STEP_GRACE_ON_SHUTDOWN: Duration = Duration::from_secs(2);

/// Runs `step` until `shutdown` is cancelled. Errors are logged and retried with
/// backoff; they never end the loop, because the next attempt may well succeed (the
/// database restarted, a lock timed out). When idle or waiting it waits for `wake` (work
/// was announced, or work it started ended) or `idle_interval`, whichever comes first.
/// A step under way at shutdown gets [`STEP_GRACE_ON_SHUTDOWN`] to end; returns whether
/// the last step was dropped for taking longer.
pub async fn run_loop<F, Fut, E>(
    name: &'static str,
    shutdown: CancellationToken,
    idle_interval: Duration,
    wake: Arc<Notify>,
    mut step: F,
) -> StepDropped
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Outcome, E>>,
    E: std::error::Error + 'static,
{
    tracing::info!(worker = name, "worker started");
    let mut consecutive_failures = 0u32;
    let stopped_a_while_ago = stopped_for(&shutdown, STEP_GRACE_ON_SHUTDOWN);
    tokio::pin!(stopped_a_while_ago);
    let mut dropped = StepDropped(false);
    while !shutdown.is_cancelled() {
        let stepped = tokio::select! {
            biased;
            stepped = step() => stepped,
            () = &mut stopped_a_while_ago => {
                tracing::warn!(worker = name, "stopping without the end of a step that outlasted the grace (the database does not answer, or no publish slot came free)");
                dropped = StepDropped(true);
                break;
            }
        };
        let (pause, wakeable) = match stepped {
            Ok(outcome) => {
                consecutive_failures = 0;
                match outcome {
                    Outcome::Recheck(pause) => (pause, true),
                    _ if outcome.waits() => (idle_interval, true),
                    _ => (Duration::ZERO, false),
                }
            }
            Err(error) => {
                consecutive_failures = consecutive_failures.saturating_add(1);
                let wait = backoff::delay(
                    consecutive_failures,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                );
                tracing::warn!(
                    worker = name,
                    error = %error_chain(&error),
                    consecutive_failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "worker step failed"
                );
                // After an error, only the backoff ends the wait.
                (wait, false)
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified(), if wakeable => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    tracing::info!(worker = name, "worker stopped");
    dropped
}

/// Ends `grace` after `shutdown` is cancelled: what work under way at shutdown may still
/// take.
pub async fn stopped_for(shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// Whether a worker's loop ended by dropping a step that outlasted the shutdown grace:
/// then the database is not answering, and what the worker does as it stops would wait
/// for it in vain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct StepDropped(pub bool);
