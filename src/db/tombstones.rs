//! Tombstone retention: `"DeletedRow"` keeps a deleted row's key until every database of
//! its tenancy has synced past it (migration 11).

use sqlx::PgExecutor;
use uuid::Uuid;

/// Tombstones pruned in one pass, at most.
pub const PRUNE_BATCH: i32 = 5000;
/// Tenancies looked at in one pass, at most.
pub const PRUNE_TENANCIES: i32 = 50;

/// One bounded pruning pass (see `external_db_sync_prune_tombstones`); returns how many
/// tombstones went.
pub async fn prune(
    executor: impl PgExecutor<'_>,
    batch_size: i32,
    max_tenancies: i32,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select external_db_sync_prune_tombstones($1, $2)")
        .bind(batch_size)
        .bind(max_tenancies)
        .fetch_one(executor)
        .await
}

/// What the internal database says of a tenant database's watermark for one source
/// table: see [`check_watermark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkCheck {
    /// Tombstones were pruned past the watermark, and no resync has applied every
    /// deletion up to them: the database missed deletions.
    pub missed_pruned_deletions: bool,
    /// How far the service recorded the database as synced for that table, if ever.
    pub recorded_through: Option<i64>,
}

impl WatermarkCheck {
    /// Whether the watermark is behind what was recorded: it went back (the table was
    /// changed outside the sync, created again, or the database restored or replaced).
    pub fn went_back(&self, watermark: i64) -> bool {
        self.recorded_through
            .is_some_and(|recorded| watermark < recorded)
    }
}

/// Checks the watermark of the database `database_id` of `tenancy_id` for `table`
/// (`"ProjectUser"` or `"ContactChannel"`) against what the internal database knows.
pub async fn check_watermark(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    table: &str,
    watermark: i64,
) -> Result<WatermarkCheck, sqlx::Error> {
    let (missed, recorded): (Option<bool>, Option<i64>) = sqlx::query_as(
        r#"select (select pruned."prunedThrough" > $4
                          and coalesce(status."deletionsCompleteThrough", -1)
                              < pruned."prunedThrough"
                   from "ExternalDbSyncPrunedTombstones" as pruned
                   where pruned."tenancyId" = $1 and pruned."tableName" = $3),
                  case $3 when 'ProjectUser' then status."usersSyncedThrough"
                          else status."contactChannelsSyncedThrough" end
           from (select) as one
           left join "ExternalDbSyncStatus" as status
               on status."tenancyId" = $1 and status."databaseId" = $2"#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(table)
    .bind(watermark)
    .fetch_one(executor)
    .await?;
    Ok(WatermarkCheck {
        missed_pruned_deletions: missed.unwrap_or(false),
        recorded_through: recorded,
    })
}

/// Takes what is recorded of how far `database_id` is synced for `table` back to
/// `watermark` if it is further: its watermark went back, or a resync set it.
/// Tombstones after it are kept again, and status counts the changes it lacks.
pub async fn record_watermark_back(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    table: &str,
    watermark: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"update "ExternalDbSyncStatus" set
               "usersSyncedThrough" = case when $3 = 'ProjectUser'
                   then least("usersSyncedThrough", $4) else "usersSyncedThrough" end,
               "contactChannelsSyncedThrough" = case when $3 = 'ContactChannel'
                   then least("contactChannelsSyncedThrough", $4)
                   else "contactChannelsSyncedThrough" end,
               "lastSyncedSequenceId" = least("lastSyncedSequenceId", $4),
               "updatedAt" = current_timestamp
           where "tenancyId" = $1 and "databaseId" = $2"#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(table)
    .bind(watermark)
    .execute(executor)
    .await?;
    Ok(())
}

/// The highest sequence id handed out so far: every deletion numbered until now has at
/// most this id.
pub async fn latest_sequence_id(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select last_value from global_seq_id")
        .fetch_one(executor)
        .await
}

/// Records that `database_id` was brought back to the source exactly, with every
/// deletion through `complete_through` applied, and why (`reason`, shown by status).
pub async fn record_resync(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    complete_through: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"insert into "ExternalDbSyncStatus" as status
               ("tenancyId", "databaseId", "deletionsCompleteThrough", "lastResyncAt",
                "resyncCount", "lastRepair", "updatedAt")
           values ($1, $2, $3, current_timestamp, 1, $4, current_timestamp)
           on conflict ("tenancyId", "databaseId") do update set
               "deletionsCompleteThrough" =
                   greatest(status."deletionsCompleteThrough", excluded."deletionsCompleteThrough"),
               "lastResyncAt" = current_timestamp,
               "resyncCount" = status."resyncCount" + 1,
               "lastRepair" = excluded."lastRepair",
               "updatedAt" = current_timestamp"#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(complete_through)
    .bind(reason)
    .execute(executor)
    .await?;
    Ok(())
}

/// The ids of `tenancy_id`'s live rows of `table` after `after`, in id order, at most
/// `limit`: the source's side of a resync, read a page at a time.
pub async fn live_ids(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    table: &str,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    // Both constants: `table` only picks one of them.
    let sql = if table == "ProjectUser" {
        r#"select "projectUserId" from "ProjectUser"
           where "tenancyId" = $1 and ($2::uuid is null or "projectUserId" > $2)
           order by "projectUserId" limit $3"#
    } else {
        r#"select "id" from "ContactChannel"
           where "tenancyId" = $1 and ($2::uuid is null or "id" > $2)
           order by "id" limit $3"#
    };
    sqlx::query_scalar(sql)
        .bind(tenancy_id)
        .bind(after)
        .bind(limit)
        .fetch_all(executor)
        .await
}
