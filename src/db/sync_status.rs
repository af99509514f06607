//! `"ExternalDbSyncStatus"`: the outcome of the last sync of each tenant database.

use sqlx::PgExecutor;
use uuid::Uuid;

/// A tenant database synced successfully, whose status is still to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSuccess {
    pub database_id: String,
    pub last_synced_sequence_id: i64,
}

/// The successes of one sync of a tenancy, recorded when its request is completed
/// ([`super::queue::complete`]), in the same statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedTenancy {
    pub tenancy_id: Uuid,
    pub databases: Vec<SyncSuccess>,
}

/// Records successful syncs: `$1` the tenancy, `$2` the database ids, `$3` the sequence
/// ids they are synced through. `"lastSyncedSequenceId"` never moves back, even if an
/// older run finishes last.
pub(crate) const RECORD_SUCCESSES: &str = r#"
        insert into "ExternalDbSyncStatus" as status
            ("tenancyId", "databaseId", "lastSyncedSequenceId", "lastSuccessAt",
             "consecutiveFailures", "updatedAt")
        select $1, synced.database_id, synced.synced_through, current_timestamp, 0,
               current_timestamp
        from unnest($2::text[], $3::bigint[]) as synced(database_id, synced_through)
        on conflict ("tenancyId", "databaseId") do update set
            "lastSyncedSequenceId" =
                greatest(status."lastSyncedSequenceId", excluded."lastSyncedSequenceId"),
            "lastSuccessAt" = current_timestamp,
            "consecutiveFailures" = 0,
            "updatedAt" = current_timestamp
        "#;

/// The parameters of [`RECORD_SUCCESSES`] after the tenancy: ids and sequence ids.
pub(crate) fn success_columns(synced: &[SyncSuccess]) -> (Vec<&str>, Vec<i64>) {
    synced
        .iter()
        .map(|success| {
            (
                success.database_id.as_str(),
                success.last_synced_sequence_id,
            )
        })
        .unzip()
}

/// Records successful syncs of `synced`'s databases.
pub async fn record_successes(
    executor: impl PgExecutor<'_>,
    synced: &SyncedTenancy,
) -> Result<(), sqlx::Error> {
    let (database_ids, synced_through) = success_columns(&synced.databases);
    sqlx::query(RECORD_SUCCESSES)
        .bind(synced.tenancy_id)
        .bind(database_ids)
        .bind(synced_through)
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
