//! The sequencer (DESIGN.md §4): gives every changed row a global, gap-safe position in
//! the order of changes and queues one sync request per dirty tenancy.
//!
//! Triggers flag changed rows (`"shouldUpdateSequenceId" = true`). Each batch, in one
//! transaction and one round trip ([`db::sequencing::sequence_batch`]), takes the
//! sequencer lock, numbers flagged rows with `nextval('global_seq_id')`, clears their
//! flags and inserts the tenancies' `"OutgoingRequest"` rows. Because the queue rows commit with the numbering, a crash
//! can never leave numbered rows without a pending sync, nor a sync request for rows
//! that were never numbered.
//!
//! The loop in `serve` ([`Worker`]) is woken by the change notifications of writers
//! while it sleeps; while it is awake it holds a lease that keeps writers quiet, since
//! notifying makes their commits queue behind one another (migration 8).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::SequencerSettings;
use crate::db;
use crate::db::sequencing::{SequencedBatch, Wakefulness};
use crate::error::error_chain;
use crate::routes::SYNC_ENGINE_PATH;
use crate::workers::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error("sequencer database error")]
    Database(#[from] sqlx::Error),
}

/// What one call of [`run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequencerRun {
    /// The fusebox has the sequencer switched off; nothing was touched.
    Disabled,
    /// One batch ran (possibly numbering nothing).
    Batch(SequencedBatch),
}

impl SequencerRun {
    /// Reduces the run to what a loop needs to know: was there work, and was it all?
    pub fn outcome(&self, batch_size: u32) -> Outcome {
        match self {
            SequencerRun::Disabled => Outcome::Disabled,
            SequencerRun::Batch(batch) => {
                let numbered = batch.project_users + batch.contact_channels + batch.deleted_rows;
                if numbered == 0 {
                    Outcome::Idle
                } else {
                    let full = [
                        batch.project_users,
                        batch.contact_channels,
                        batch.deleted_rows,
                    ]
                    .into_iter()
                    .any(|count| count >= i64::from(batch_size));
                    Outcome::Worked {
                        n: numbered.unsigned_abs(),
                        more: full,
                    }
                }
            }
        }
    }
}

/// Runs one sequencer batch: at most `batch_size` rows of each source table.
///
/// Safe to call from any number of tasks, processes and replicas at once: batches
/// serialize on an advisory lock, so committed sequence ids always form a prefix of the
/// order in which they were assigned.
pub async fn run_once(
    pool: &PgPool,
    settings: &SequencerSettings,
) -> Result<SequencerRun, SequencerError> {
    run_batch(pool, settings, Wakefulness::OneOff).await
}

async fn run_batch(
    pool: &PgPool,
    settings: &SequencerSettings,
    wakefulness: Wakefulness,
) -> Result<SequencerRun, SequencerError> {
    let Some(batch) =
        db::sequencing::sequence_batch(pool, settings.batch_size, SYNC_ENGINE_PATH, wakefulness)
            .await?
    else {
        return Ok(SequencerRun::Disabled);
    };
    if batch.project_users + batch.contact_channels + batch.deleted_rows == 0 && prune_is_due() {
        prune_tombstones(pool).await;
    }
    if batch.tenancies > 0 {
        tracing::debug!(
            project_users = batch.project_users,
            contact_channels = batch.contact_channels,
            deleted_rows = batch.deleted_rows,
            tenancies = batch.tenancies,
            requests_enqueued = batch.requests_enqueued,
            "sequenced a batch"
        );
    }
    Ok(SequencerRun::Batch(batch))
}

/// How often a sequencer that found nothing to number prunes tombstones, at most (per
/// process).
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

static LAST_PRUNE: Mutex<Option<Instant>> = Mutex::new(None);

fn prune_is_due() -> bool {
    let mut last = LAST_PRUNE.lock().unwrap_or_else(PoisonError::into_inner);
    let due = last.map_or(true, |at| at.elapsed() >= PRUNE_INTERVAL);
    if due {
        *last = Some(Instant::now());
    }
    due
}

/// One bounded pass of [`db::tombstones::prune`]. A failure is logged, not returned:
/// the batch itself succeeded, and the next pass tries again.
async fn prune_tombstones(pool: &PgPool) {
    match db::tombstones::prune(
        pool,
        db::tombstones::PRUNE_BATCH,
        db::tombstones::PRUNE_TENANCIES,
    )
    .await
    {
        Ok(0) => {}
        Ok(pruned) => tracing::debug!(pruned, "pruned tombstones every database has synced past"),
        Err(error) => tracing::warn!(error = %error_chain(&error), "cannot prune tombstones"),
    }
}

/// How long the loop's lease keeps writers quiet. Renewed by every batch once half of it
/// passed, so it only matters when the loop stops without giving it up (the process
/// died): writers notify again this long after.
const WAKE_LEASE: Duration = Duration::from_secs(2);

/// The pauses of an awake loop after batches that found nothing, before it tries to
/// sleep (about 30 ms in all). Under a steady stream of writes the next change is
/// rarely further away than that; a loop that slept at the first empty batch would be
/// woken by the very next writer, who pays for the notification. A write that comes
/// during a pause waits for the pause's end, so they stay short.
const AWAKE_PAUSES_MS: [u64; 6] = [1, 2, 4, 8, 8, 8];
/// Once the loop tries to sleep, it may not while a writer that saw its lease has not
/// committed (a transaction left open after its write), or while a flagged row is held
/// locked by another transaction; it then looks again after pauses that double up to
/// this.
const REFUSED_PAUSE_LONGEST: Duration = Duration::from_millis(50);

/// The sequencer as a loop in `serve`: one [`Worker::step`] per batch. It sleeps
/// (waits for a change notification, or its timer) only once the database agreed that
/// writers notify again; until then it looks again after a short pause.
#[derive(Debug)]
pub struct Worker {
    /// Batches in a row that found nothing while awake. From `AWAKE_PAUSES_MS.len()`
    /// on, each batch tries to go to sleep; asleep, the count stays there, so that a
    /// wake-up with nothing to do goes back to sleep at once.
    empty_looks: usize,
}

impl Default for Worker {
    /// A new loop starts as if asleep: on an idle system its first batch goes to sleep.
    fn default() -> Self {
        Worker {
            empty_looks: AWAKE_PAUSES_MS.len(),
        }
    }
}

impl Worker {
    /// Runs one batch and tells the loop what to do next.
    pub async fn step(
        &mut self,
        pool: &PgPool,
        settings: &SequencerSettings,
    ) -> Result<Outcome, SequencerError> {
        let lease = WAKE_LEASE;
        let wakefulness = if self.empty_looks >= AWAKE_PAUSES_MS.len() {
            Wakefulness::Sleepy { lease }
        } else {
            Wakefulness::Awake { lease }
        };
        let run = run_batch(pool, settings, wakefulness).await?;
        Ok(self.after(run, settings.batch_size))
    }

    /// Gives the lease up as the loop ends, so that writers notify the other replicas at
    /// once instead of when the lease runs out. It keeps trying (a writer mid-commit, or
    /// work found) for as long as the lease would last anyway.
    pub async fn give_up_lease(&self, pool: &PgPool, settings: &SequencerSettings) {
        let deadline = tokio::time::Instant::now() + WAKE_LEASE;
        let sleepy = Wakefulness::Sleepy { lease: WAKE_LEASE };
        while tokio::time::Instant::now() < deadline {
            match run_batch(pool, settings, sleepy).await {
                Ok(SequencerRun::Batch(batch)) if !batch.sleeping => {
                    tokio::time::sleep(Duration::from_millis(AWAKE_PAUSES_MS[0])).await;
                }
                // Asleep, or switched off (which gives the lease up too).
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot give the sequencer's lease up; it runs out on its own");
                    return;
                }
            }
        }
    }

    fn after(&mut self, run: SequencerRun, batch_size: u32) -> Outcome {
        let outcome = run.outcome(batch_size);
        let sleeping = matches!(run, SequencerRun::Batch(batch) if batch.sleeping);
        match outcome {
            Outcome::Worked { .. } => self.empty_looks = 0,
            Outcome::Idle if !sleeping => {
                self.empty_looks = self.empty_looks.saturating_add(1);
                let pause = match AWAKE_PAUSES_MS.get(self.empty_looks - 1) {
                    Some(&ms) => Duration::from_millis(ms),
                    None => {
                        let refusals = (self.empty_looks - AWAKE_PAUSES_MS.len()).min(16) as u32;
                        let last = AWAKE_PAUSES_MS[AWAKE_PAUSES_MS.len() - 1];
                        Duration::from_millis(last << refusals).min(REFUSED_PAUSE_LONGEST)
                    }
                };
                return Outcome::Recheck(pause);
            }
            _ => self.empty_looks = AWAKE_PAUSES_MS.len(),
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(project_users: i64, contact_channels: i64, deleted_rows: i64) -> SequencerRun {
        SequencerRun::Batch(SequencedBatch {
            project_users,
            contact_channels,
            deleted_rows,
            ..SequencedBatch::default()
        })
    }

    #[test]
    fn the_worker_stays_awake_briefly_then_sleeps_only_when_the_batch_says_so() {
        let idle = |sleeping| {
            SequencerRun::Batch(SequencedBatch {
                sleeping,
                ..SequencedBatch::default()
            })
        };
        let recheck = |ms| Outcome::Recheck(Duration::from_millis(ms));
        let mut worker = Worker::default();
        assert_eq!(worker.empty_looks, AWAKE_PAUSES_MS.len(), "starts sleepy");

        assert_eq!(
            worker.after(batch(2, 0, 0), 10),
            Outcome::Worked { n: 2, more: false }
        );
        // Awake: short pauses, without trying to sleep...
        for ms in AWAKE_PAUSES_MS {
            assert!(worker.empty_looks < AWAKE_PAUSES_MS.len(), "stays awake");
            assert_eq!(worker.after(idle(false), 10), recheck(ms));
        }
        // ...then it tries at every look; refused, it looks again ever later.
        for ms in [16, 32, 50, 50] {
            assert!(
                worker.empty_looks >= AWAKE_PAUSES_MS.len(),
                "tries to sleep"
            );
            assert_eq!(worker.after(idle(false), 10), recheck(ms));
        }
        assert_eq!(worker.after(idle(true), 10), Outcome::Idle);
        assert!(
            worker.empty_looks >= AWAKE_PAUSES_MS.len(),
            "woken with nothing to do, it goes back to sleep"
        );
        assert_eq!(
            worker.after(batch(1, 0, 0), 10),
            Outcome::Worked { n: 1, more: false }
        );
        assert_eq!(worker.after(idle(false), 10), recheck(1), "short again");
        assert_eq!(worker.after(SequencerRun::Disabled, 10), Outcome::Disabled);
        assert!(worker.empty_looks >= AWAKE_PAUSES_MS.len());
    }

    #[test]
    fn outcome_tells_idle_partial_and_full_batches_apart() {
        assert_eq!(SequencerRun::Disabled.outcome(10), Outcome::Disabled);
        assert_eq!(batch(0, 0, 0).outcome(10), Outcome::Idle);
        assert_eq!(
            batch(3, 2, 1).outcome(10),
            Outcome::Worked { n: 6, more: false }
        );
        assert_eq!(
            batch(1, 10, 0).outcome(10),
            Outcome::Worked { n: 11, more: true }
        );
    }
}
