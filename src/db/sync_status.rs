//! `"ExternalDbSyncStatus"`: the outcome of the last sync of each tenant database.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Records a successful sync of `database_id`; `last_synced_sequence_id` never moves
/// back, even if an older run finishes last.
pub async fn record_success(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    last_synced_sequence_id: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into "ExternalDbSyncStatus" as status
            ("tenancyId", "databaseId", "lastSyncedSequenceId", "lastSuccessAt",
             "consecutiveFailures", "updatedAt")
        values ($1, $2, $3, current_timestamp, 0, current_timestamp)
        on conflict ("tenancyId", "databaseId") do update set
            "lastSyncedSequenceId" =
                greatest(status."lastSyncedSequenceId", excluded."lastSyncedSequenceId"),
            "lastSuccessAt" = current_timestamp,
            "consecutiveFailures" = 0,
            "updatedAt" = current_timestamp
        "#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(last_synced_sequence_id)
    .execute(executor)
    .await?;
    Ok(())
}

/// Records a failed sync of `database_id`. `error` must already be free of secrets.
pub async fn record_failure(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
    database_id: &str,
    error: &str,
    retryable: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into "ExternalDbSyncStatus" as status
            ("tenancyId", "databaseId", "lastError", "lastErrorAt", "lastErrorRetryable",
             "consecutiveFailures", "updatedAt")
        values ($1, $2, $3, current_timestamp, $4, 1, current_timestamp)
        on conflict ("tenancyId", "databaseId") do update set
            "lastError" = excluded."lastError",
            "lastErrorAt" = current_timestamp,
            "lastErrorRetryable" = excluded."lastErrorRetryable",
            "consecutiveFailures" = status."consecutiveFailures" + 1,
            "updatedAt" = current_timestamp
        "#,
    )
    .bind(tenancy_id)
    .bind(database_id)
    .bind(error)
    .bind(retryable)
    .execute(executor)
    .await?;
    Ok(())
}
