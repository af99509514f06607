//! How far behind each tenant database is: what `status` (the command and the route)
//! reports, read in one statement.

use chrono::NaiveDateTime;
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Changes behind are counted up to this many; more reads as "at least this many".
pub const CHANGES_BEHIND_CAP: i64 = 1_000_000;

/// One tenant database of a tenancy: configured now, or with a recorded status (a
/// database removed from the configuration keeps its row until its tenancy goes; the
/// whole configuration's problem is recorded under `*`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatus {
    pub tenancy_id: Uuid,
    pub database_id: String,
    /// Named in the tenancy's configuration now.
    pub configured: bool,
    /// The tenancy's latest change (live rows and tombstones of both tables); `None`
    /// when it has none.
    pub latest_sequence_id: Option<i64>,
    /// Every change up to this one is in the database; `None` before its first sync.
    pub synced_through: Option<i64>,
    /// Changes after each mapping's watermark, at most [`CHANGES_BEHIND_CAP`].
    pub changes_behind: i64,
    pub last_success_at: Option<NaiveDateTime>,
    /// Seconds since the last success, on the internal database's clock.
    pub seconds_since_success: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<NaiveDateTime>,
    pub consecutive_failures: i32,
    /// When a failing database is attempted again.
    pub next_attempt_at: Option<NaiveDateTime>,
    /// Times the database was brought back to the source (missed deletions, its
    /// watermark gone back after changes from outside the sync, operators' resyncs).
    pub repairs: i32,
    pub last_repair_at: Option<NaiveDateTime>,
    /// Seconds since the last repair, on the internal database's clock.
    pub seconds_since_repair: Option<f64>,
    /// Why the last repair was needed.
    pub last_repair: Option<String>,
}

impl DatabaseStatus {
    /// Its last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.consecutive_failures > 0
    }
}

/// What `status` answers: every database, and whether any is failing.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// No database is failing.
    pub ok: bool,
    /// How many databases are failing.
    pub failing: usize,
    pub databases: Vec<DatabaseStatus>,
}

impl StatusReport {
    pub fn new(databases: Vec<DatabaseStatus>) -> Self {
        let failing = databases
            .iter()
            .filter(|status| status.is_failing())
            .count();
        StatusReport {
            ok: failing == 0,
            failing,
            databases,
        }
    }
}

/// The status of every database of `tenancy` (of every tenancy when `None`), by
/// tenancy and database id.
pub async fn read(
    executor: impl PgExecutor<'_>,
    tenancy: Option<Uuid>,
) -> Result<Vec<DatabaseStatus>, sqlx::Error> {
    sqlx::query_as(STATUS)
        .bind(tenancy)
        .bind(CHANGES_BEHIND_CAP)
        .fetch_all(executor)
        .await
}

/// Configured databases (the keys of `dbSync.externalDatabases`, when it is an object)
/// joined with the recorded statuses. Changes behind are counted per mapping after its
/// own watermark, on the `(tenancyId, sequenceId)` indexes, each count bounded.
const STATUS: &str = r#"
with configured as (
    select tenancy."id" as tenancy_id, database.key as database_id
    from "Tenancy" as tenancy
    cross join lateral jsonb_object_keys(
        case when jsonb_typeof(tenancy."config" -> 'dbSync' -> 'externalDatabases') = 'object'
             then tenancy."config" -> 'dbSync' -> 'externalDatabases'
             else '{}'::jsonb end) as database(key)
    where $1::uuid is null or tenancy."id" = $1
), recorded as (
    select * from "ExternalDbSyncStatus" where $1::uuid is null or "tenancyId" = $1
), databases as (
    select coalesce(configured.tenancy_id, recorded."tenancyId") as tenancy_id,
           coalesce(configured.database_id, recorded."databaseId") as database_id,
           configured.database_id is not null as configured,
           recorded."tenancyId" is not null and recorded."lastSuccessAt" is not null as synced,
           coalesce(recorded."usersSyncedThrough", recorded."lastSyncedSequenceId", -1)
               as users_watermark,
           coalesce(recorded."contactChannelsSyncedThrough", recorded."lastSyncedSequenceId", -1)
               as channels_watermark,
           recorded."lastSuccessAt", recorded."lastError", recorded."lastErrorAt",
           coalesce(recorded."consecutiveFailures", 0) as consecutive_failures,
           recorded."nextAttemptAt",
           coalesce(recorded."resyncCount", 0) as repairs,
           recorded."lastResyncAt", recorded."lastRepair"
    from configured
    full join recorded on recorded."tenancyId" = configured.tenancy_id
                      and recorded."databaseId" = configured.database_id
), lag as (
    select databases.*,
           greatest(external_db_sync_latest_change(databases.tenancy_id, 'ProjectUser'),
                    external_db_sync_latest_change(databases.tenancy_id, 'ContactChannel'))
               as latest_sequence_id,
           case when databases.database_id = '*' then 0 else
               (select count(*) from (
                   select from "ProjectUser" as row
                   where row."tenancyId" = databases.tenancy_id
                     and row."sequenceId" > databases.users_watermark
                   limit $2) as behind)
             + (select count(*) from (
                   select from "DeletedRow" as row
                   where row."tenancyId" = databases.tenancy_id
                     and row."tableName" = 'ProjectUser'
                     and row."sequenceId" > databases.users_watermark
                   limit $2) as behind)
           end as users_behind,
           case when databases.database_id = '*' then 0 else
               (select count(*) from (
                   select from "ContactChannel" as row
                   where row."tenancyId" = databases.tenancy_id
                     and row."sequenceId" > databases.channels_watermark
                   limit $2) as behind)
             + (select count(*) from (
                   select from "DeletedRow" as row
                   where row."tenancyId" = databases.tenancy_id
                     and row."tableName" = 'ContactChannel'
                     and row."sequenceId" > databases.channels_watermark
                   limit $2) as behind)
           end as channels_behind
    from databases
)
select lag.tenancy_id,
       lag.database_id,
       lag.configured,
       lag.latest_sequence_id,
       -- Every change up to the oldest watermark of a mapping with changes after it; all
       -- of them when none has.
       case when not lag.synced then null
            when lag.users_behind = 0 and lag.channels_behind = 0
                then coalesce(lag.latest_sequence_id, -1)
            else least(case when lag.users_behind > 0 then lag.users_watermark end,
                       case when lag.channels_behind > 0 then lag.channels_watermark end)
       end as synced_through,
       least($2, lag.users_behind + lag.channels_behind) as changes_behind,
       lag."lastSuccessAt" as last_success_at,
       extract(epoch from (current_timestamp::timestamp - lag."lastSuccessAt"))::float8
           as seconds_since_success,
       lag."lastError" as last_error,
       lag."lastErrorAt" as last_error_at,
       lag.consecutive_failures,
       lag."nextAttemptAt" as next_attempt_at,
       lag.repairs,
       lag."lastResyncAt" as last_repair_at,
       extract(epoch from (current_timestamp::timestamp - lag."lastResyncAt"))::float8
           as seconds_since_repair,
       lag."lastRepair" as last_repair
from lag
order by lag.tenancy_id, lag.database_id
"#;
