//! The sequencer's queries: numbering changed rows and queueing their tenancies.

use sqlx::{PgConnection, PgExecutor};

use super::queue::SYNC_REQUEST_KEY_PREFIX;

/// Key of the transaction-scoped advisory lock that serializes sequencer batches across
/// every process and replica. Arbitrary but fixed: it is the ASCII of "extdbseq".
const SEQUENCER_LOCK_KEY: i64 = 0x6578_7464_6273_6571;

/// How many rows one batch numbered, per table, and what it queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SequencedBatch {
    pub project_users: i64,
    pub contact_channels: i64,
    pub deleted_rows: i64,
    /// Tenancies with at least one newly numbered row.
    pub tenancies: i64,
    /// New pending `"OutgoingRequest"` rows; a tenancy that already had one pending gets
    /// no second one.
    pub requests_enqueued: i64,
}

/// Waits for the sequencer lock; it is held until the surrounding transaction ends.
///
/// This is what keeps the ordering invariant of DESIGN.md §4: sequence values are handed
/// out outside of transactions, so two overlapping batches could otherwise commit out of
/// order, and a reader could see id 200 committed while id 150 is still in flight. With
/// the lock, a batch only starts numbering after the previous one committed (PostgreSQL
/// releases locks after the commit became visible).
///
/// It also marks the transaction as the sequencer's, so that its own updates do not send
/// change notifications that would only wake the sequencer again.
pub async fn lock_sequencer(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select pg_advisory_xact_lock($1), set_config('external_db_sync.sequencing', 'on', true)",
    )
    .bind(SEQUENCER_LOCK_KEY)
    .execute(connection)
    .await?;
    Ok(())
}

/// Numbers up to `batch_size` flagged rows of each source table, clears their flags, and
/// queues one `"OutgoingRequest"` for every tenancy concerned, all in one statement (one
/// snapshot, one round trip). Rows locked by an open application transaction are
/// skipped and picked up by a later batch, after that transaction ended.
///
/// Must run inside a transaction that holds [`lock_sequencer`]; nothing else may call
/// `nextval('global_seq_id')`.
pub async fn sequence_batch(
    executor: impl PgExecutor<'_>,
    batch_size: u32,
    sync_engine_path: &str,
) -> Result<SequencedBatch, sqlx::Error> {
    sqlx::query_as::<_, SequencedBatch>(
        r#"
        with picked_users as (
            select "tenancyId", "projectUserId" from "ProjectUser"
            where "shouldUpdateSequenceId" = true
            limit $1
            for update skip locked
        ), sequenced_users as (
            update "ProjectUser" as target
            set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
            from picked_users as picked
            where target."tenancyId" = picked."tenancyId"
              and target."projectUserId" = picked."projectUserId"
            returning target."tenancyId"
        ), picked_channels as (
            select "tenancyId", "projectUserId", "id" from "ContactChannel"
            where "shouldUpdateSequenceId" = true
            limit $1
            for update skip locked
        ), sequenced_channels as (
            update "ContactChannel" as target
            set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
            from picked_channels as picked
            where target."tenancyId" = picked."tenancyId"
              and target."projectUserId" = picked."projectUserId"
              and target."id" = picked."id"
            returning target."tenancyId"
        ), picked_tombstones as (
            select "id" from "DeletedRow"
            where "shouldUpdateSequenceId" = true
            limit $1
            for update skip locked
        ), sequenced_tombstones as (
            update "DeletedRow" as target
            set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
            from picked_tombstones as picked
            where target."id" = picked."id"
            returning target."tenancyId"
        ), dirty_tenancies as (
            select "tenancyId" from sequenced_users
            union
            select "tenancyId" from sequenced_channels
            union
            select "tenancyId" from sequenced_tombstones
        ), enqueued as (
            insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
            select
                $3::text || "tenancyId"::text,
                jsonb_build_object(
                    'url', $2::text,
                    'body', jsonb_build_object('tenancyId', "tenancyId"))
            from dirty_tenancies
            -- A tenancy that has a pending request gets no second one, but that request
            -- is locked until this batch commits ("where false" writes nothing, yet
            -- locks): a poller skips it meanwhile, so the sync it starts sees this
            -- batch. Claimed and synced before the commit, it would be gone, and the
            -- batch's changes left with no request.
            on conflict ("deduplicationKey") where "startedFulfillingAt" is null
                do update set "attempts" = "OutgoingRequest"."attempts" where false
            returning 1
        )
        select
            (select count(*) from sequenced_users) as project_users,
            (select count(*) from sequenced_channels) as contact_channels,
            (select count(*) from sequenced_tombstones) as deleted_rows,
            (select count(*) from dirty_tenancies) as tenancies,
            (select count(*) from enqueued) as requests_enqueued
        "#,
    )
    .bind(i64::from(batch_size))
    .bind(sync_engine_path)
    .bind(SYNC_REQUEST_KEY_PREFIX)
    .fetch_one(executor)
    .await
}
