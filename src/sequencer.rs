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
//! The loop in `serve` ([`crate::wakeup::SequencerLoop`]) is woken by the change
//! notifications of writers while it sleeps; while it is awake it holds a lease that
//! keeps writers quiet ([`crate::wakeup`] explains the protocol).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::db;
use crate::db::sequencing::{SequencedBatch, Wakefulness};
use crate::db::warm::WarmConnections;
use crate::error::error_chain;
use crate::instruments;
use crate::poller::{InFlight, Poller};
use crate::workers::Outcome;

/// Tuning of the sequencer.
#[derive(Debug, Clone)]
pub struct SequencerSettings {
    /// Rows sequenced per table in one transaction (`SEQUENCER_BATCH_SIZE`).
    pub batch_size: u32,
    /// How long the in-process loop waits when it found nothing to do and no change
    /// notification arrives (`SEQUENCER_IDLE_INTERVAL_MS`): the safety net behind
    /// `LISTEN`.
    pub idle_interval: Duration,
    /// How long the in-process loop waits after a batch that numbered everything there
    /// was, before the next one (`SEQUENCER_GATHER_MS`): the changes of that moment are
    /// then numbered and queued together. Each batch costs the internal database about
    /// the same whatever its size, and so does each claim and sync that follows it: a
    /// longer pause costs the primary less per change, and a change waits about half of
    /// it longer (see README, "Benchmarks").
    pub gather_pause: Duration,
}

impl Default for SequencerSettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            idle_interval: Duration::from_secs(5),
            gather_pause: Duration::from_millis(5),
        }
    }
}

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
    let started = Instant::now();
    let batch =
        db::sequencing::sequence_batch(pool, settings.batch_size, Wakefulness::OneOff).await?;
    Ok(after_batch(pool, batch, started).await)
}

/// The poller of the process whose loop runs a batch, when the batch claims for it the
/// requests it queues (`direct` mode, DESIGN.md §11), and the caller's publishes that
/// those claims start in.
pub struct ClaimFor<'a> {
    pub poller: &'a Poller,
    pub in_flight: &'a InFlight,
}

/// [`run_once`] for the loop in `serve`, on a connection kept warm between its batches;
/// with `claim_for`, the batch claims what it queues for that poller's free slots
/// ([`db::sequencing::sequence_batch_claiming`]) and carries the completions left for a
/// claim.
pub(crate) async fn run_batch(
    connections: &WarmConnections,
    settings: &SequencerSettings,
    wakefulness: Wakefulness,
    claim_for: Option<&ClaimFor<'_>>,
) -> Result<SequencerRun, SequencerError> {
    let started = Instant::now();
    // What it carries is put back unless the batch commits.
    let (slots, carried) = match claim_for {
        Some(claim_for) => (
            claim_for.poller.slots_for_enqueue(),
            claim_for.poller.carried_if_free(),
        ),
        None => (Vec::new(), None),
    };
    let completed = carried
        .as_ref()
        .map_or(&[][..], |carried| carried.requests());
    let mut connection = connections.take().await?;
    let batched = db::sequencing::sequence_batch_claiming(
        &mut *connection,
        settings.batch_size,
        wakefulness,
        slots.len(),
        completed,
    )
    .await;
    let (batch, claimed) = match connection.settle(batched) {
        Ok(batched) => (Ok(batched.batch), batched.claimed),
        Err(error) => (Err(error), Vec::new()),
    };
    if let Some(ClaimFor { poller, in_flight }) = claim_for {
        poller.claimed_at_enqueue(in_flight, carried, batch.is_ok(), slots, claimed);
    }
    Ok(after_batch(connections.pool(), batch?, started).await)
}

/// What follows a batch that started at `started`: its measures, and tombstones pruned
/// when it found nothing and a prune is due.
async fn after_batch(
    pool: &PgPool,
    batch: Option<SequencedBatch>,
    started: Instant,
) -> SequencerRun {
    let Some(batch) = batch else {
        return SequencerRun::Disabled;
    };
    let sequenced = batch.project_users + batch.contact_channels + batch.deleted_rows;
    instruments::sequencer_batch(u64::try_from(sequenced).unwrap_or(0), started.elapsed());
    if sequenced == 0 && prune_is_due() {
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
    SequencerRun::Batch(batch)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A run that numbered this many rows of each table.
    pub(crate) fn batch(
        project_users: i64,
        contact_channels: i64,
        deleted_rows: i64,
    ) -> SequencerRun {
        SequencerRun::Batch(SequencedBatch {
            project_users,
            contact_channels,
            deleted_rows,
            ..SequencedBatch::default()
        })
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
