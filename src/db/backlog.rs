//! The queue and lag figures `/metrics` reports as gauges, read in one statement when
//! it is scraped.

use sqlx::PgExecutor;

/// The work waiting, and how stale the tenant databases are.
#[derive(Debug, Clone, Copy, Default, PartialEq, sqlx::FromRow)]
pub struct Backlog {
    /// Sync requests not claimed yet (new ones and ones given back for a retry).
    pub queue_depth: i64,
    /// Age of the oldest of them, in seconds; 0 when there is none.
    pub oldest_pending_seconds: f64,
    /// Of the databases that lack a change of their tenancy, the longest time since one
    /// last succeeded, in seconds; 0 when every database is current.
    pub worst_lag_seconds: f64,
    /// Databases whose last sync failed (a tenancy's unusable configuration counts as
    /// one).
    pub databases_failing: i64,
}

/// Reads the backlog. Costs a scan of the pending requests and, per recorded database
/// status, a few index lookups (none of them reads a table whole).
///
/// A database's lag is how long it has lacked a change: for a failing one, the time
/// since its last success; for a healthy one that is behind, the age of its tenancy's
/// oldest outstanding sync request (queued when the first change it lacks was
/// sequenced). A database that never synced has no lag here: it is counted as failing
/// once it fails.
pub async fn read(executor: impl PgExecutor<'_>) -> Result<Backlog, sqlx::Error> {
    sqlx::query_as(
        r#"
        with pending as (
            select count(*) as queue_depth,
                   coalesce(extract(epoch from
                       (current_timestamp::timestamp - min("createdAt"))), 0)::float8
                       as oldest_pending_seconds
            from "OutgoingRequest"
            where "startedFulfillingAt" is null
        ), databases as (
            select status."tenancyId", status."consecutiveFailures" > 0 as failing,
                   status."lastSuccessAt"
            from "ExternalDbSyncStatus" as status
            where status."databaseId" <> '*'
              and (external_db_sync_latest_change(status."tenancyId", 'ProjectUser')
                       > coalesce(status."usersSyncedThrough",
                                  status."lastSyncedSequenceId", -1)
                   or external_db_sync_latest_change(status."tenancyId", 'ContactChannel')
                       > coalesce(status."contactChannelsSyncedThrough",
                                  status."lastSyncedSequenceId", -1))
        ), lags as (
            -- The tenancy's oldest request, pending or in flight: each kind looked up
            -- through its own partial index on the key (no index covers both, and a
            -- condition on the key alone read the whole queue for each database).
            select case when failing then "lastSuccessAt"
                        else least(
                            (select min(request."createdAt") from "OutgoingRequest" as request
                             where request."deduplicationKey" = $1 || databases."tenancyId"
                               and request."startedFulfillingAt" is null),
                            (select min(request."createdAt") from "OutgoingRequest" as request
                             where request."deduplicationKey" = $1 || databases."tenancyId"
                               and request."startedFulfillingAt" is not null))
                   end as lacking_since
            from databases
        )
        select pending.queue_depth, pending.oldest_pending_seconds,
               coalesce((select max(extract(epoch from
                                    (current_timestamp::timestamp - lacking_since)))
                         from lags), 0)::float8 as worst_lag_seconds,
               (select count(*) from "ExternalDbSyncStatus"
                where "consecutiveFailures" > 0) as databases_failing
        from pending
        "#,
    )
    .bind(super::queue::SYNC_REQUEST_KEY_PREFIX)
    .fetch_one(executor)
    .await
}
