//! The sequencer (DESIGN.md §4): gives every changed row a global, gap-safe position in
//! the order of changes and queues one sync request per dirty tenancy.
//!
//! Triggers flag changed rows (`"shouldUpdateSequenceId" = true`). Each batch, in one
//! transaction and one round trip ([`db::sequencing::sequence_batch`]), takes the
//! sequencer lock, numbers flagged rows with `nextval('global_seq_id')`, clears their
//! flags and inserts the tenancies' `"OutgoingRequest"` rows. Because the queue rows commit with the numbering, a crash
//! can never leave numbered rows without a pending sync, nor a sync request for rows
//! that were never numbered.

use sqlx::PgPool;

use crate::config::SequencerSettings;
use crate::db;
use crate::db::sequencing::SequencedBatch;
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
    let Some(batch) =
        db::sequencing::sequence_batch(pool, settings.batch_size, SYNC_ENGINE_PATH).await?
    else {
        return Ok(SequencerRun::Disabled);
    };
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
