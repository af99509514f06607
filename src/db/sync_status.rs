//! `"ExternalDbSyncStatus"`: the outcome of the last sync of each tenant database.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgExecutor, Postgres};
use uuid::Uuid;

/// A tenant database synced successfully, whose status is still to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSuccess {
    pub database_id: String,
    /// The lowest watermark of its mappings.
    pub last_synced_sequence_id: i64,
    /// The watermark of each mapping, by [`crate::mapping::Mapping::index`]:
    /// how far the tombstones of each source table are applied there.
    pub watermarks: [i64; 2],
}

/// The successes of one sync of a tenancy, recorded when its request is completed
/// ([`super::queue::complete`]), in the same statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedTenancy {
    pub tenancy_id: Uuid,
    pub databases: Vec<SyncSuccess>,
}

/// The successes bound by [`SuccessColumns::bind`], one row per database synced, as the
/// CTE `synced` of the statements that record them: `$1` its tenancy, `$2` its id, `$3`
/// the sequence id it is synced through, `$4` and `$5` its `users` and
/// `contact_channels` watermarks, `$6` how many rows the arrays hold.
///
/// `limit $6` changes no answer (it is the arrays' length); it is there for the plan
/// cache, as for the gathered read of changes ([`super::changes`]): planned for the values
/// bound, the completion was planned anew at every call (0.055 ms of the source's CPU a
/// call, nearly as much as running it), since a plan for any arrays estimates ten
/// databases where completions bring one to three; under a limit it cannot see, the
/// plan for any values estimates one, and the session keeps it.
pub(crate) const SYNCED: &str = r#"
        select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
            as synced(tenancy_id, database_id, synced_through, users, contact_channels)
        limit $6
        "#;

/// Records the successful syncs of the CTE `synced` ([`SYNCED`]). A database named more
/// than once (two syncs recorded together) is recorded once, with the furthest of each.
/// No recorded value ever moves back, even if an older run finishes last.
pub(crate) const RECORD_SUCCESSES: &str = r#"
        insert into "ExternalDbSyncStatus" as status
            ("tenancyId", "databaseId", "lastSyncedSequenceId", "usersSyncedThrough",
             "contactChannelsSyncedThrough", "lastSuccessAt", "consecutiveFailures",
             "updatedAt")
        select synced.tenancy_id, synced.database_id, max(synced.synced_through),
               max(synced.users), max(synced.contact_channels), current_timestamp, 0,
               current_timestamp
        from synced
        group by synced.tenancy_id, synced.database_id
        on conflict ("tenancyId", "databaseId") do update set
            "lastSyncedSequenceId" =
                greatest(status."lastSyncedSequenceId", excluded."lastSyncedSequenceId"),
            "usersSyncedThrough" =
                greatest(status."usersSyncedThrough", excluded."usersSyncedThrough"),
            "contactChannelsSyncedThrough" = greatest(
                status."contactChannelsSyncedThrough", excluded."contactChannelsSyncedThrough"),
            "lastSuccessAt" = current_timestamp,
            "consecutiveFailures" = 0,
            "nextAttemptAt" = null,
            "updatedAt" = current_timestamp
        "#;

/// Next to [`RECORD_SUCCESSES`], as a CTE of the same statement: a problem recorded for
/// a tenancy's configuration as a whole (database id `*`) is gone once a database of it
/// synced. `$1` the tenancies (as [`SYNCED`]; read from the array, so that the look-up
/// is by both columns of the key whatever the plan).
pub(crate) const CLEAR_CONFIGURATION_PROBLEM: &str = r#"
        delete from "ExternalDbSyncStatus"
        where "tenancyId" = any($1::uuid[]) and "databaseId" = '*'
        "#;

/// The successes of several syncs as the parameters `$1` to `$6` of [`SYNCED`]: one row
/// per database synced.
#[derive(Debug, Default)]
pub(crate) struct SuccessColumns {
    tenancies: Vec<Uuid>,
    databases: Vec<String>,
    synced_through: Vec<i64>,
    users: Vec<i64>,
    contact_channels: Vec<i64>,
}

impl SuccessColumns {
    pub(crate) fn add(&mut self, synced: &SyncedTenancy) {
        for success in &synced.databases {
            self.tenancies.push(synced.tenancy_id);
            self.databases.push(success.database_id.clone());
            self.synced_through.push(success.last_synced_sequence_id);
            self.users.push(success.watermarks[0]);
            self.contact_channels.push(success.watermarks[1]);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tenancies.is_empty()
    }

    /// Binds the parameters `$1` to `$6` of [`SYNCED`].
    pub(crate) fn bind<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.tenancies)
            .bind(&self.databases)
            .bind(&self.synced_through)
            .bind(&self.users)
            .bind(&self.contact_channels)
            .bind(self.tenancies.len() as i64)
    }
}

/// Records successful syncs of `synced`'s databases.
pub async fn record_successes(
    executor: impl PgExecutor<'_>,
    synced: &SyncedTenancy,
) -> Result<(), sqlx::Error> {
    static STATEMENT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "with synced as ({SYNCED}), cleared as ({CLEAR_CONFIGURATION_PROBLEM}) \
             {RECORD_SUCCESSES}"
        )
    });
    let mut columns = SuccessColumns::default();
    columns.add(synced);
    columns
        .bind(sqlx::query(&STATEMENT))
        .execute(executor)
        .await?;
    Ok(())
}

/// A success kept to be written later ([`crate::lazy_statuses`]): its database, how far,
/// and how long ago it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptSuccess {
    pub tenancy_id: Uuid,
    pub success: SyncSuccess,
    pub seconds_ago: f64,
}

/// Writes successes kept for later: each database's watermarks move forward and its
/// last success is dated when it happened, in one statement. Nothing else changes: a
/// failure or a configuration problem recorded since (by this process or another) is
/// left as it is, and a database whose status row is gone (removed from its tenancy's
/// configuration) gets none back.
pub async fn record_kept_successes(
    executor: impl PgExecutor<'_>,
    kept: &[KeptSuccess],
) -> Result<(), sqlx::Error> {
    if kept.is_empty() {
        return Ok(());
    }
    let mut tenancies = Vec::with_capacity(kept.len());
    let mut databases = Vec::with_capacity(kept.len());
    let (mut through, mut users, mut channels, mut ages) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for kept in kept {
        tenancies.push(kept.tenancy_id);
        databases.push(kept.success.database_id.clone());
        through.push(kept.success.last_synced_sequence_id);
        users.push(kept.success.watermarks[0]);
        channels.push(kept.success.watermarks[1]);
        ages.push(kept.seconds_ago);
    }
    // `limit $7` as in [`SYNCED`]: one plan for any number of rows.
    sqlx::query(
        r#"
        update "ExternalDbSyncStatus" as status set
            "lastSyncedSequenceId" = greatest(status."lastSyncedSequenceId", kept.synced_through),
            "usersSyncedThrough" = greatest(status."usersSyncedThrough", kept.users),
            "contactChannelsSyncedThrough" =
                greatest(status."contactChannelsSyncedThrough", kept.contact_channels),
            "lastSuccessAt" = greatest(
                status."lastSuccessAt",
                (current_timestamp - make_interval(secs => kept.seconds_ago))::timestamp(3)),
            "updatedAt" = current_timestamp
        from (select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[],
                                   $5::bigint[], $6::float8[])
                  as kept(tenancy_id, database_id, synced_through, users, contact_channels,
                          seconds_ago)
              limit $7) as kept
        where status."tenancyId" = kept.tenancy_id and status."databaseId" = kept.database_id
        "#,
    )
    .bind(tenancies)
    .bind(databases)
    .bind(through)
    .bind(users)
    .bind(channels)
    .bind(ages)
    .bind(kept.len() as i64)
    .execute(executor)
    .await?;
    Ok(())
}

/// How long a failing database waits before its next attempt: `first · 2^(n-1)` after
/// its `n`th failure in a row, capped at `max`, of which a random part up to half is
/// taken off (as [`crate::backoff::delay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

/// Failed attempts are retried after a [`Backoff`]: a short one for failures that can
/// pass by themselves (a timeout, a restart), a long one for failures that need someone
/// to change something (a read-only database, a missing privilege, a bad password).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    pub retryable: Backoff,
    pub permanent: Backoff,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self {
            retryable: Backoff {
                first: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            permanent: Backoff {
                first: Duration::from_secs(30),
                max: Duration::from_secs(3600),
            },
        }
    }
}

/// Whether a later attempt may succeed where a sync failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The network, the server, a lock, a timeout: trying again soon may help.
    Retryable,
    /// The configuration, a privilege, the tenant's schema: only a change helps.
    Permanent,
}

/// Records a failed sync of `database_id` and when it may be attempted again. `error`
/// must already be free of secrets.
pub async fn record_failure(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    error: &str,
    kind: FailureKind,
    schedule: &RetrySchedule,
) -> Result<(), sqlx::Error> {
    let (backoff, retryable) = match kind {
        FailureKind::Retryable => (schedule.retryable, true),
        FailureKind::Permanent => (schedule.permanent, false),
    };
    // The delay after failure number `n` in a row: $5 · 2^(n-1), at most $6, less a
    // random part up to half.
    let next_attempt = |n: &str| {
        format!(
            "current_timestamp + make_interval(secs => \
                least($6::float8, $5::float8 * 2 ^ least({n} - 1, 30)) * (1 - random() / 2))"
        )
    };
    sqlx::query(&format!(
        r#"
        insert into "ExternalDbSyncStatus" as status
            ("tenancyId", "databaseId", "lastError", "lastErrorAt", "lastErrorRetryable",
             "consecutiveFailures", "nextAttemptAt", "failedConfigDigest", "updatedAt")
        select $1, $2, $3, current_timestamp, $4, 1, {first}, {digest}, current_timestamp
        from "Tenancy" as tenancy where tenancy."id" = $1
        on conflict ("tenancyId", "databaseId") do update set
            "lastError" = excluded."lastError",
            "lastErrorAt" = current_timestamp,
            "lastErrorRetryable" = excluded."lastErrorRetryable",
            "consecutiveFailures" = status."consecutiveFailures" + 1,
            "nextAttemptAt" = {later},
            "failedConfigDigest" = excluded."failedConfigDigest",
            "updatedAt" = current_timestamp
        "#,
        first = next_attempt("1"),
        later = next_attempt(r#"(status."consecutiveFailures" + 1)"#),
        digest = config_digest("tenancy", "$2"),
    ))
    .bind(tenancy_id)
    .bind(database_id)
    .bind(error)
    .bind(retryable)
    .bind(backoff.first.as_secs_f64())
    .bind(backoff.max.as_secs_f64())
    .execute(executor)
    .await?;
    Ok(())
}

/// Prefix of the deduplication key of a tenancy's retry request: the request that
/// comes due when the first of its failing databases may be attempted again. Apart from
/// the tenancy's change requests ([`super::queue::SYNC_REQUEST_KEY_PREFIX`]), so that
/// a retry planned for later never holds back the sync of a new change.
pub const RETRY_REQUEST_KEY_PREFIX: &str = "external-db-sync-retry:";

/// Makes sure a retry request of `tenancy_id` is due no later than the earliest
/// `"nextAttemptAt"` among `database_ids`, if any of them has one.
pub async fn schedule_retry(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_ids: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions", "nextAttemptAt")
        select $1::text || $2::text,
               jsonb_build_object('url', $3::text, 'body', jsonb_build_object('tenancyId', $2)),
               min(status."nextAttemptAt")
        from "ExternalDbSyncStatus" as status
        where status."tenancyId" = $2 and status."databaseId" = any($4::text[])
        having min(status."nextAttemptAt") is not null
        on conflict ("deduplicationKey") where "startedFulfillingAt" is null
            do update set "nextAttemptAt" = excluded."nextAttemptAt"
            where excluded."nextAttemptAt" < "OutgoingRequest"."nextAttemptAt"
        "#,
    )
    .bind(RETRY_REQUEST_KEY_PREFIX)
    .bind(tenancy_id)
    .bind(super::queue::SYNC_ENGINE_PATH)
    .bind(database_ids)
    .execute(executor)
    .await?;
    Ok(())
}

/// How long a failing database that came due is reserved for the sync that took it:
/// no other sync attempts it meanwhile, so that concurrent syncs of its tenancy (a
/// change and a retry, a QStash redelivery) make one attempt, not several. The attempt
/// replaces the reservation with its outcome; a sync that died leaves it to run out.
pub const ATTEMPT_RESERVATION: Duration = Duration::from_secs(300);

/// A CTE, `reserved`, that takes the failing databases that are due among the
/// tenancies of `from` (a FROM item whose column `tenancy` is a tenancy id): their
/// `"nextAttemptAt"` moves [`ATTEMPT_RESERVATION`] ahead. A configured database whose
/// entry changed since it failed is due at once: its owner fixed it. Compared at the
/// queue's precision, so that a retry request made due at a database's
/// `"nextAttemptAt"` finds that database due. Databases no longer configured (and the
/// whole-configuration row `*`) are left alone.
pub(crate) fn reserve_due_databases(from: &str) -> String {
    format!(
        r#"reserved as (
            update "ExternalDbSyncStatus" as status
            set "nextAttemptAt" = current_timestamp + make_interval(secs => {reservation})
            from {from} join "Tenancy" as configured on configured."id" = tenancy
            where status."tenancyId" = tenancy
              and status."nextAttemptAt" is not null
              and configured."config" -> 'dbSync' -> 'externalDatabases' ? status."databaseId"
              and (status."nextAttemptAt" <= current_timestamp::timestamp(3)
                   or status."failedConfigDigest" is distinct from {digest})
            returning status."tenancyId", status."databaseId"
        )"#,
        reservation = ATTEMPT_RESERVATION.as_secs(),
        digest = config_digest("configured", r#"status."databaseId""#),
    )
}

/// The SQL expression for the digest of the configuration entry `database_id` of the
/// `"Tenancy"` row `tenancy` (both SQL expressions).
fn config_digest(tenancy: &str, database_id: &str) -> String {
    format!(
        r#"md5(coalesce({tenancy}."config" -> 'dbSync' -> 'externalDatabases' -> {database_id},
                        'null'::jsonb)::text)"#
    )
}

/// The SQL expression, next to [`reserve_due_databases`], that lists the databases of
/// the tenancy `tenancy` (an expression of the enclosing query) a sync must leave
/// alone: every failing one, unless the CTE reserved it and `owner` (an SQL condition)
/// holds: when one statement takes several requests of a tenancy, only one of them
/// may attempt what was reserved.
pub(crate) fn not_due_databases(tenancy: &str, owner: &str) -> String {
    format!(
        r#"array(select status."databaseId" from "ExternalDbSyncStatus" as status
                 where status."tenancyId" = {tenancy}
                   and status."nextAttemptAt" is not null
                   and not ({owner} and exists (
                       select from reserved
                       where reserved."tenancyId" = status."tenancyId"
                         and reserved."databaseId" = status."databaseId")))"#
    )
}

/// What a sync must know of a tenancy's databases besides their configuration, read
/// with it (the columns of [`not_due_databases`] and [`pruned_through_columns`]).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct DatabaseStates {
    /// The failing databases that this sync must leave alone: not due yet, or being
    /// attempted by another sync. The due ones were reserved for this one.
    #[sqlx(rename = "notDueDatabases")]
    pub not_due_databases: Vec<String>,
    /// How far the tenancy's user and contact-channel tombstones are pruned, if at all.
    #[sqlx(rename = "usersPrunedThrough")]
    pub users_pruned_through: Option<i64>,
    #[sqlx(rename = "channelsPrunedThrough")]
    pub channels_pruned_through: Option<i64>,
}

impl DatabaseStates {
    /// How far each mapping's tombstones are pruned, by
    /// [`crate::mapping::Mapping::index`].
    pub fn pruned_through(&self) -> [Option<i64>; 2] {
        [self.users_pruned_through, self.channels_pruned_through]
    }
}

/// The SQL expression, true when the tenancy `tenancy` (an expression of the enclosing
/// query) has a status that a success changes: a database failing, or waiting for its
/// next attempt, or a problem recorded for its configuration as a whole. A sync's
/// successes are then written at once, not lazily ([`crate::lazy_statuses`]).
pub(crate) fn statuses_failing(tenancy: &str) -> String {
    format!(
        r#"exists (select from "ExternalDbSyncStatus" as status
                   where status."tenancyId" = {tenancy}
                     and (status."consecutiveFailures" > 0
                          or status."nextAttemptAt" is not null))"#
    )
}

/// The SQL expressions of how far the tombstones of tenancy `tenancy` (an expression of
/// the enclosing query) are pruned: `"usersPrunedThrough"` and
/// `"channelsPrunedThrough"`, null where none were.
pub(crate) fn pruned_through_columns(tenancy: &str) -> String {
    let of = |table: &str| {
        format!(
            r#"(select pruned."prunedThrough" from "ExternalDbSyncPrunedTombstones" as pruned
                where pruned."tenancyId" = {tenancy} and pruned."tableName" = '{table}')"#
        )
    };
    format!(
        r#"{} as "usersPrunedThrough", {} as "channelsPrunedThrough""#,
        of("ProjectUser"),
        of("ContactChannel")
    )
}
