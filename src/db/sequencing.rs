//! The sequencer's query: numbering changed rows and queueing their tenancies.
//!
//! The batch itself is the SQL function `external_db_sync_sequence_batch` (see the
//! migrations), so that one batch is one round trip and one transaction: it reads the
//! fusebox, takes the sequencer's advisory lock, numbers the flagged rows and queues
//! their tenancies. It also keeps the lease by which an awake sequencer loop tells
//! writers that they need not notify it (migration 8, [`Wakefulness`]).

use std::time::Duration;

use sqlx::PgExecutor;

use super::queue::{SYNC_ENGINE_PATH, SYNC_REQUEST_KEY_PREFIX};
use super::REQUESTS_CHANNEL;

/// How many rows one batch numbered, per table, and what it queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SequencedBatch {
    pub project_users: i64,
    pub contact_channels: i64,
    pub deleted_rows: i64,
    /// Tenancies with at least one newly numbered row and a tenant database: those a
    /// request is queued for (a tenancy without databases costs no sync).
    pub tenancies: i64,
    /// New pending `"OutgoingRequest"` rows; a tenancy that already had one pending gets
    /// no second one (the batch relies on that one).
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
    // A tenancy that already had a pending request got no new one, so no insert
    // notified the pollers; but the batch locked that request until it commits, and a
    // poller that tried to claim it meanwhile skipped it and went to sleep. So the batch
    // notifies them itself, delivered at its commit: without it, such a request waited
    // for the pollers' timer (`POLLER_IDLE_INTERVAL_MS`, 5 s by default).
    let row = sqlx::query_as::<_, BatchRow>(
        "select batch.*, \
                (select count(*) from (select pg_notify($6, '') \
                 where batch.tenancies > batch.requests_enqueued) as relied) as announced \
         from external_db_sync_sequence_batch($1, $2, $3, $4, $5) as batch",
    )
    .bind(i64::from(batch_size))
    .bind(SYNC_ENGINE_PATH)
    .bind(SYNC_REQUEST_KEY_PREFIX)
    .bind(wakefulness.lease_ms())
    .bind(matches!(wakefulness, Wakefulness::Sleepy { .. }))
    .bind(REQUESTS_CHANNEL)
    .fetch_one(executor)
    .await?;
    Ok(row.sequencer_enabled.then_some(row.batch))
}
