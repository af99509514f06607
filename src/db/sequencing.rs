//! The sequencer's query: numbering changed rows and queueing their tenancies.
//!
//! The batch itself is the SQL function `external_db_sync_sequence_and_claim` (migration
//! 21; `external_db_sync_sequence_batch` before it), so that one batch is one round trip
//! and one transaction: it reads the fusebox, takes the sequencer's advisory lock,
//! numbers the flagged rows and queues their tenancies, in `direct` mode claiming some of
//! those requests for the caller's poller ([`sequence_batch_claiming`]). It also keeps
//! the lease by which an awake sequencer loop tells writers that they need not notify it
//! (migration 8, [`Wakefulness`]).

use std::time::Duration;

use sqlx::{FromRow, PgExecutor, Row};
use uuid::Uuid;

use super::queue::{ClaimedRequest, SYNC_ENGINE_PATH, SYNC_REQUEST_KEY_PREFIX};

/// How many rows one batch numbered, per table, and what it queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SequencedBatch {
    pub project_users: i64,
    pub contact_channels: i64,
    pub deleted_rows: i64,
    /// Tenancies with at least one newly numbered row and a tenant database: those a
    /// request is queued for (a tenancy without databases costs no sync).
    pub tenancies: i64,
    /// New `"OutgoingRequest"` rows, pending or claimed at their insert
    /// ([`sequence_batch_claiming`]); a tenancy that already had one pending gets no
    /// second one (the batch relies on that one).
    pub requests_enqueued: i64,
    /// The caller may sleep until notified: it asked to ([`Wakefulness::Sleepy`]), the
    /// batch found nothing, no writer was between checking the lease and committing,
    /// and no flagged row is left (not even one the batch skipped because it was
    /// locked). Or the sequencer is switched off. Writers notify from now on.
    pub sleeping: bool,
}

/// How the caller of [`sequence_batch`] stands towards the change notifications.
///
/// Notifying costs writers: PostgreSQL serializes the commits of notifying
/// transactions. So a sequencer loop that is awake, and will look again anyway, holds a
/// lease that keeps writers quiet, and gives it up only when it is safe to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakefulness {
    /// A caller that runs batches once (the cron route, tests): the lease is left alone.
    OneOff,
    /// A loop that will run another batch at once: it holds (renews) a lease this long.
    Awake { lease: Duration },
    /// A loop that found nothing last time and would like to sleep until notified; if it
    /// may not yet, it keeps the lease like [`Wakefulness::Awake`].
    Sleepy { lease: Duration },
}

impl Wakefulness {
    fn lease_ms(self) -> Option<i64> {
        match self {
            Wakefulness::OneOff => None,
            Wakefulness::Awake { lease } | Wakefulness::Sleepy { lease } => {
                Some(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct BatchRow {
    sequencer_enabled: bool,
    #[sqlx(flatten)]
    batch: SequencedBatch,
}

/// Numbers up to `batch_size` flagged rows of each source table, clears their flags, and
/// queues one `"OutgoingRequest"` for every tenancy concerned; `None` when the fusebox
/// has the sequencer switched off (then nothing is touched). `wakefulness` says what to
/// do with the lease that keeps writers from notifying.
///
/// The function holds the sequencer's advisory lock until the transaction it runs in
/// ends: that is what keeps the ordering invariant of DESIGN.md §4, since sequence
/// values are handed out outside of transactions. Run it on its own (the pool's
/// autocommit), or commit right after it: every other sequencer waits meanwhile.
/// Nothing else may call `nextval('global_seq_id')`.
pub async fn sequence_batch(
    executor: impl PgExecutor<'_>,
    batch_size: u32,
    wakefulness: Wakefulness,
) -> Result<Option<SequencedBatch>, sqlx::Error> {
    let claiming = sequence_batch_claiming(executor, batch_size, wakefulness, 0, &[]).await?;
    Ok(claiming.batch)
}

/// What [`sequence_batch_claiming`] did.
#[derive(Debug)]
pub struct ClaimingBatch {
    /// The batch, as [`sequence_batch`] answers it.
    pub batch: Option<SequencedBatch>,
    /// The requests it queued already claimed, as a claim answers them
    /// ([`super::queue::claim`]).
    pub claimed: Vec<ClaimedRequest>,
}

/// [`sequence_batch`], which also claims, as it queues them, the requests of up to
/// `claim_limit` tenancies for the caller to sync at once (`direct` mode; DESIGN.md §11),
/// and first deletes the requests `completed` (their syncs settled, left for the next
/// claim: see [`crate::completions`]).
///
/// A tenancy's request is claimed at its insert only when its queue has nothing else (no
/// request pending or claimed) and it has no failing database (whose attempts the
/// poller's claim reserves); none while the fusebox has the poller switched off. A
/// request claimed so is not announced to the pollers (migration 21): it has its
/// claimant. It holds a lease as a claim's does, kept by the same renewals, and a
/// process that dies leaves it to be taken over when that lease runs out.
pub async fn sequence_batch_claiming(
    executor: impl PgExecutor<'_>,
    batch_size: u32,
    wakefulness: Wakefulness,
    claim_limit: usize,
    completed: &[Uuid],
) -> Result<ClaimingBatch, sqlx::Error> {
    let rows = sqlx::query(
        "select * from external_db_sync_sequence_and_claim($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(i64::from(batch_size))
    .bind(SYNC_ENGINE_PATH)
    .bind(SYNC_REQUEST_KEY_PREFIX)
    .bind(wakefulness.lease_ms())
    .bind(matches!(wakefulness, Wakefulness::Sleepy { .. }))
    .bind(i64::try_from(claim_limit).unwrap_or(i64::MAX))
    .bind(completed)
    .fetch_all(executor)
    .await?;
    let Some(first) = rows.first() else {
        return Err(sqlx::Error::RowNotFound);
    };
    let counts = BatchRow::from_row(first)?;
    let mut claimed = Vec::new();
    for row in &rows {
        if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
            claimed.push(ClaimedRequest::from_row(row)?);
        }
    }
    Ok(ClaimingBatch {
        batch: counts.sequencer_enabled.then_some(counts.batch),
        claimed,
    })
}
