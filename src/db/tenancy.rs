//! Tenancies as the sync engine reads them.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::sync_status::{
    not_due_databases, pruned_through_columns, reserve_due_databases, DatabaseStates,
};

/// What a sync needs to know of a tenancy.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TenancyToSync {
    /// `config.dbSync.externalDatabases` (JSON `null` when absent).
    #[sqlx(rename = "externalDatabases")]
    pub external_databases: serde_json::Value,
    /// Which databases to leave alone and how far tombstones are pruned.
    #[sqlx(flatten)]
    pub databases: DatabaseStates,
}

/// `config.dbSync.externalDatabases` of `tenancy_id` (JSON `null` when absent), or
/// `None` when the tenancy does not exist. Reads only: nothing is reserved.
pub async fn external_databases(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(
        r#"select coalesce("config" -> 'dbSync' -> 'externalDatabases', 'null'::jsonb)
           from "Tenancy" where "id" = $1"#,
    )
    .bind(tenancy_id)
    .fetch_optional(executor)
    .await
}

/// The tenancy's databases and which of them to leave alone, or `None` when the
/// tenancy does not exist. Failing databases that are due are reserved for the caller.
pub async fn to_sync(
    executor: impl PgExecutor<'_>,
    tenancy_id: Uuid,
) -> Result<Option<TenancyToSync>, sqlx::Error> {
    sqlx::query_as(&format!(
        r#"
        with {}
        select coalesce("config" -> 'dbSync' -> 'externalDatabases', 'null'::jsonb)
                   as "externalDatabases",
               {} as "notDueDatabases",
               {}
        from "Tenancy"
        where "id" = $1
        "#,
        reserve_due_databases("(select $1::uuid as tenancy) as asked"),
        not_due_databases("$1", "true"),
        pruned_through_columns("$1")
    ))
    .bind(tenancy_id)
    .fetch_optional(executor)
    .await
}
