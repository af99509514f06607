//! Tenancies as the sync engine reads them.

use sqlx::PgExecutor;
use uuid::Uuid;

/// The tenancy's `config.dbSync.externalDatabases` (JSON `null` when absent), or `None`
/// when the tenancy does not exist.
pub async fn external_databases(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        select coalesce("config" -> 'dbSync' -> 'externalDatabases', 'null'::jsonb)
        from "Tenancy"
        where "id" = $1
        "#,
    )
    .bind(tenancy_id)
    .fetch_optional(executor)
    .await
}
