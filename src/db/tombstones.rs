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

/// Whether the database `database_id` of `tenancy_id`, whose watermark for `table`
/// (`"ProjectUser"` or `"ContactChannel"`) is `watermark`, missed tombstones that were
/// pruned since: some were pruned past its watermark, and no resync has applied every
/// deletion up to them.
pub async fn missed_pruned_deletions(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    table: &str,
    watermark: i64,
) -> Result<bool, sqlx::Error> {
    let missed: Option<bool> = sqlx::query_scalar(
        r#"select pruned."prunedThrough" > $4
                  and coalesce(status."deletionsCompleteThrough", -1) < pruned."prunedThrough"
           from "ExternalDbSyncPrunedTombstones" as pruned
           left join "ExternalDbSyncStatus" as status
               on status."tenancyId" = pruned."tenancyId" and status."databaseId" = $2
           where pruned."tenancyId" = $1 and pruned."tableName" = $3"#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(table)
    .bind(watermark)
    .fetch_optional(executor)
    .await?;
    Ok(missed.unwrap_or(false))
}

/// The highest sequence id handed out so far: every deletion numbered until now has at
/// most this id.
pub async fn latest_sequence_id(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select last_value from global_seq_id")
        .fetch_one(executor)
        .await
}

/// Records that `database_id` was brought back to the source exactly, with every
/// deletion through `complete_through` applied.
pub async fn record_resync(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    complete_through: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"insert into "ExternalDbSyncStatus" as status
               ("tenancyId", "databaseId", "deletionsCompleteThrough", "lastResyncAt",
                "resyncCount", "updatedAt")
           values ($1, $2, $3, current_timestamp, 1, current_timestamp)
           on conflict ("tenancyId", "databaseId") do update set
               "deletionsCompleteThrough" =
                   greatest(status."deletionsCompleteThrough", excluded."deletionsCompleteThrough"),
               "lastResyncAt" = current_timestamp,
               "resyncCount" = status."resyncCount" + 1,
               "updatedAt" = current_timestamp"#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(complete_through)
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
