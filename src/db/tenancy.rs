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

/// A tenancy as an operator lists it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenancyListed {
    pub id: Uuid,
    #[sqlx(rename = "projectId")]
    pub project_id: String,
    #[sqlx(rename = "branchId")]
    pub branch_id: String,
    /// How many entries `dbSync.externalDatabases` has.
    pub databases: i64,
    #[sqlx(rename = "createdAt")]
    pub created_at: chrono::NaiveDateTime,
}

/// Creates a tenancy of `project_id` (branch `main`, no databases) and returns its id.
pub async fn create(executor: impl PgExecutor<'_>, project_id: &str) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        r#"insert into "Tenancy" ("id", "projectId") values ($1, $2) returning "id""#,
    )
    .bind(Uuid::new_v4())
    .bind(project_id)
    .fetch_one(executor)
    .await
}

/// Every tenancy (or only `only`), oldest first.
pub async fn list(
    executor: impl PgExecutor<'_>,
    only: Option<Uuid>,
) -> Result<Vec<TenancyListed>, sqlx::Error> {
    sqlx::query_as(
        r#"select "id", "projectId", "branchId", "createdAt",
                  (select count(*) from jsonb_object_keys(
                       case jsonb_typeof("config" -> 'dbSync' -> 'externalDatabases')
                       when 'object' then "config" -> 'dbSync' -> 'externalDatabases'
                       else '{}'::jsonb end)) as "databases"
           from "Tenancy"
           where $1::uuid is null or "id" = $1
           order by "createdAt", "id""#,
    )
    .bind(only)
    .fetch_all(executor)
    .await
}

/// Deletes a tenancy with its users and contact channels (their foreign keys cascade),
/// and the tombstones that deleting them wrote: no tenant database will be synced for
/// it again. Returns whether it existed. Tenant databases are the tenants' and are not
/// touched.
pub async fn delete(pool: &sqlx::PgPool, tenancy_id: Uuid) -> Result<bool, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let deleted = sqlx::query(r#"delete from "Tenancy" where "id" = $1"#)
        .bind(tenancy_id)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
    sqlx::query(r#"delete from "DeletedRow" where "tenancyId" = $1"#)
        .bind(tenancy_id)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(deleted > 0)
}

/// What became of a change to a tenancy's databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseChange {
    Done,
    UnknownTenancy,
    /// `add`: the id is taken. `remove`: there is no such database.
    Conflict,
    /// `add`: the tenancy already has the most databases allowed.
    TooMany,
}

/// Adds `entry` (already validated) as database `database_id` of the tenancy. A trigger
/// on `"Tenancy"` (migration 12) queues a sync of the tenancy in the same transaction,
/// so that the new database is filled. The tenancy's row
/// is locked while its configuration is read and written: concurrent changes take
/// turns.
pub async fn add_database(
    pool: &sqlx::PgPool,
    tenancy_id: Uuid,
    database_id: &str,
    entry: &serde_json::Value,
    max_databases: usize,
) -> Result<DatabaseChange, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let Some(databases) = locked_databases(&mut transaction, tenancy_id).await? else {
        return Ok(DatabaseChange::UnknownTenancy);
    };
    if databases.contains_key(database_id) {
        return Ok(DatabaseChange::Conflict);
    }
    if databases.len() >= max_databases {
        return Ok(DatabaseChange::TooMany);
    }
    let mut databases = databases;
    databases.insert(database_id.to_owned(), entry.clone());
    write_databases(&mut transaction, tenancy_id, databases).await?;
    transaction.commit().await?;
    Ok(DatabaseChange::Done)
}

/// Removes database `database_id` from the tenancy. Its tables in the tenant database
/// stay as they are; nothing is synced to it any more.
pub async fn remove_database(
    pool: &sqlx::PgPool,
    tenancy_id: Uuid,
    database_id: &str,
) -> Result<DatabaseChange, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let Some(mut databases) = locked_databases(&mut transaction, tenancy_id).await? else {
        return Ok(DatabaseChange::UnknownTenancy);
    };
    if databases.remove(database_id).is_none() {
        return Ok(DatabaseChange::Conflict);
    }
    write_databases(&mut transaction, tenancy_id, databases).await?;
    transaction.commit().await?;
    Ok(DatabaseChange::Done)
}

/// The tenancy's `externalDatabases` (empty when absent or not an object), with its row
/// locked; `None` when there is no such tenancy.
async fn locked_databases(
    transaction: &mut sqlx::PgConnection,
    tenancy_id: Uuid,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, sqlx::Error> {
    let config: Option<serde_json::Value> = sqlx::query_scalar(
        r#"select coalesce("config" -> 'dbSync' -> 'externalDatabases', 'null'::jsonb)
           from "Tenancy" where "id" = $1 for update"#,
    )
    .bind(tenancy_id)
    .fetch_optional(&mut *transaction)
    .await?;
    Ok(config.map(|config| match config {
        serde_json::Value::Object(databases) => databases,
        _ => serde_json::Map::new(),
    }))
}

/// Sets `config.dbSync.externalDatabases`, keeping everything else of the configuration.
async fn write_databases(
    transaction: &mut sqlx::PgConnection,
    tenancy_id: Uuid,
    databases: serde_json::Map<String, serde_json::Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"update "Tenancy"
           set "config" = case jsonb_typeof("config") when 'object'
                              then "config" else '{}'::jsonb end
                          || jsonb_build_object('dbSync',
                   case jsonb_typeof("config" -> 'dbSync') when 'object'
                   then "config" -> 'dbSync' else '{}'::jsonb end
                   || jsonb_build_object('externalDatabases', $2::jsonb)),
               "updatedAt" = current_timestamp
           where "id" = $1"#,
    )
    .bind(tenancy_id)
    .bind(serde_json::Value::Object(databases))
    .execute(&mut *transaction)
    .await?;
    Ok(())
}
