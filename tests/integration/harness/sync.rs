//! Driving the sync engine from tests, and reading what arrived in tenant databases.

use std::time::Duration;

use chrono::NaiveDateTime;
use external_db_sync::db::sync_status::{Backoff, RetrySchedule};
use external_db_sync::db::InternalDatabase;
use external_db_sync::mapping::Mapping;
pub use external_db_sync::sync::policy::PrivateTargets;
use external_db_sync::sync::policy::TargetPolicy;
use external_db_sync::sync::report::MappingReport;
use external_db_sync::sync::TenancyReport;
use external_db_sync::sync::{sync_tenancy, SyncEngine, SyncSettings, TenancySync};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::fixtures::sequence_all;

/// An engine on the internal database behind `pool`, allowing private targets (the
/// tenant databases of the tests are on 127.0.0.1).
pub fn engine(pool: &PgPool) -> SyncEngine {
    engine_with(pool, test_settings(), PrivateTargets::Allowed)
}

/// Small batches, and a failed database due again after a millisecond: tests that sync
/// again right after a failure mean to attempt it again.
pub fn test_settings() -> SyncSettings {
    let at_once = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(1),
    };
    SyncSettings {
        batch_size: 1000,
        retry: RetrySchedule {
            retryable: at_once,
            permanent: at_once,
        },
        ..SyncSettings::default()
    }
}

pub fn engine_with(
    pool: &PgPool,
    settings: SyncSettings,
    private_targets: PrivateTargets,
) -> SyncEngine {
    let options = pool.connect_options();
    let internal = InternalDatabase {
        host: options.get_host().to_owned(),
        port: options.get_port(),
        dbname: options.get_database().unwrap_or_default().to_owned(),
    };
    SyncEngine::new(
        pool.clone(),
        settings,
        TargetPolicy::new(private_targets, internal),
    )
}

/// Sets the tenancy's external databases to `databases` (id, connection string).
pub async fn attach(pool: &PgPool, tenancy: Uuid, databases: &[(&str, &str)]) {
    let entries: serde_json::Map<String, Value> = databases
        .iter()
        .map(|(id, url)| {
            (
                (*id).to_owned(),
                json!({ "type": "postgres", "connectionString": url }),
            )
        })
        .collect();
    attach_config(pool, tenancy, Value::Object(entries)).await;
}

/// Sets `config.dbSync.externalDatabases` verbatim.
pub async fn attach_config(pool: &PgPool, tenancy: Uuid, external_databases: Value) {
    sqlx::query(r#"update "Tenancy" set "config" = $2 where "id" = $1"#)
        .bind(tenancy)
        .bind(json!({ "dbSync": { "externalDatabases": external_databases } }))
        .execute(pool)
        .await
        .unwrap();
}

/// Sequences everything, then syncs the tenancy once.
pub async fn sync(pool: &PgPool, engine: &SyncEngine, tenancy: Uuid) -> TenancyReport {
    sequence_all(pool, 1000).await;
    sync_only(engine, tenancy).await
}

/// Syncs the tenancy once, without sequencing first.
pub async fn sync_only(engine: &SyncEngine, tenancy: Uuid) -> TenancyReport {
    match sync_tenancy(engine, tenancy).await.unwrap() {
        TenancySync::Synced(report) => report,
        other => panic!("expected a sync, got {other:?}"),
    }
}

/// Like [`sync`], and every database must have succeeded.
pub async fn sync_ok(pool: &PgPool, engine: &SyncEngine, tenancy: Uuid) -> TenancyReport {
    let report = sync(pool, engine, tenancy).await;
    for database in &report.databases {
        if let Err(error) = &database.result {
            panic!("database {} failed: {error}", database.database_id);
        }
    }
    report
}

/// A `users` row as read back from a tenant database.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExternalUser {
    pub id: Uuid,
    pub display_name: Option<String>,
    pub profile_image_url: Option<String>,
    pub primary_email: Option<String>,
    pub primary_email_verified: bool,
    pub signed_up_at: NaiveDateTime,
    pub client_metadata: Value,
    pub client_read_only_metadata: Value,
    pub server_metadata: Value,
    pub is_anonymous: bool,
}

/// A `contact_channels` row as read back from a tenant database.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExternalChannel {
    pub id: Uuid,
    pub user_id: Uuid,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub value: String,
    pub is_primary: bool,
    pub is_verified: bool,
    pub used_for_auth: bool,
    pub created_at: NaiveDateTime,
}

pub async fn external_users(tenant: &PgPool) -> Vec<ExternalUser> {
    sqlx::query_as("select * from users order by id")
        .fetch_all(tenant)
        .await
        .unwrap()
}

pub async fn external_channels(tenant: &PgPool) -> Vec<ExternalChannel> {
    sqlx::query_as("select * from contact_channels order by id")
        .fetch_all(tenant)
        .await
        .unwrap()
}

/// The users of `tenancy` as the tenant should see them, computed from the internal
/// tables with a query of the test's own.
pub async fn expected_users(pool: &PgPool, tenancy: Uuid) -> Vec<ExternalUser> {
    sqlx::query_as(
        r#"
        select u."projectUserId" as id, u."displayName" as display_name,
               u."profileImageUrl" as profile_image_url,
               (select c."value" from "ContactChannel" c
                where c."tenancyId" = u."tenancyId" and c."projectUserId" = u."projectUserId"
                  and c."type" = 'EMAIL' and c."isPrimary") as primary_email,
               coalesce((select c."isVerified" from "ContactChannel" c
                where c."tenancyId" = u."tenancyId" and c."projectUserId" = u."projectUserId"
                  and c."type" = 'EMAIL' and c."isPrimary"), false) as primary_email_verified,
               coalesce(u."signedUpAt", u."createdAt") as signed_up_at,
               coalesce(u."clientMetadata", '{}') as client_metadata,
               coalesce(u."clientReadOnlyMetadata", '{}') as client_read_only_metadata,
               coalesce(u."serverMetadata", '{}') as server_metadata,
               u."isAnonymous" as is_anonymous
        from "ProjectUser" u
        where u."tenancyId" = $1
        order by u."projectUserId"
        "#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The channels of `tenancy` as the tenant should see them.
pub async fn expected_channels(pool: &PgPool, tenancy: Uuid) -> Vec<ExternalChannel> {
    sqlx::query_as(
        r#"
        select "id", "projectUserId" as user_id, "type", "value",
               coalesce("isPrimary", false) as is_primary, "isVerified" as is_verified,
               coalesce("usedForAuth", false) as used_for_auth, "createdAt" as created_at
        from "ContactChannel"
        where "tenancyId" = $1
        order by "id"
        "#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Asserts that the tenant database holds exactly the tenancy's users and channels.
pub async fn assert_tenant_matches_source(pool: &PgPool, tenancy: Uuid, tenant: &PgPool) {
    assert_eq!(
        external_users(tenant).await,
        expected_users(pool, tenancy).await
    );
    assert_eq!(
        external_channels(tenant).await,
        expected_channels(pool, tenancy).await
    );
}

/// `_stack_sync_metadata.last_synced_sequence_id` of `mapping`.
pub async fn watermark(tenant: &PgPool, mapping: &str) -> i64 {
    sqlx::query_scalar(
        "select last_synced_sequence_id from _stack_sync_metadata where mapping_name = $1",
    )
    .bind(mapping)
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The highest sequence id among `table`'s changes in `tenancy_id`: live rows and
/// tombstones. A caught-up mapping's watermark is exactly this, unless tombstones were
/// pruned (see [`has_changes_after`]).
pub async fn latest_change(pool: &PgPool, tenancy_id: Uuid, table: &str) -> i64 {
    let live = match table {
        "ProjectUser" => r#"select max("sequenceId") from "ProjectUser" where "tenancyId" = $1"#,
        _ => r#"select max("sequenceId") from "ContactChannel" where "tenancyId" = $1"#,
    };
    let live: Option<i64> = sqlx::query_scalar(live)
        .bind(tenancy_id)
        .fetch_one(pool)
        .await
        .unwrap();
    let tombstones: Option<i64> = sqlx::query_scalar(
        r#"select max("sequenceId") from "DeletedRow" where "tenancyId" = $1 and "tableName" = $2"#,
    )
    .bind(tenancy_id)
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap();
    live.max(tombstones).expect("the mapping has changes")
}

pub async fn table_exists(tenant: &PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, Option<String>>("select pg_catalog.to_regclass($1)::pg_catalog.text")
        .bind(table)
        .fetch_one(tenant)
        .await
        .unwrap()
        .is_some()
}

/// One database's row in `"ExternalDbSyncStatus"`.
#[derive(sqlx::FromRow)]
struct RecordedRow {
    #[sqlx(rename = "lastSyncedSequenceId")]
    last_synced_sequence_id: Option<i64>,
    succeeded: bool,
    #[sqlx(rename = "lastError")]
    last_error: Option<String>,
    #[sqlx(rename = "lastErrorRetryable")]
    last_error_retryable: Option<bool>,
    #[sqlx(rename = "consecutiveFailures")]
    consecutive_failures: i32,
}

async fn recorded(pool: &PgPool, tenancy: Uuid, database_id: &str) -> RecordedRow {
    sqlx::query_as(
        r#"select "lastSyncedSequenceId", "lastSuccessAt" is not null as succeeded,
                  "lastError", "lastErrorRetryable", "consecutiveFailures"
           from "ExternalDbSyncStatus" where "tenancyId" = $1 and "databaseId" = $2"#,
    )
    .bind(tenancy)
    .bind(database_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What `"ExternalDbSyncStatus"` says of one database: `(lastSyncedSequenceId, whether
/// lastSuccessAt is set, consecutiveFailures)`.
pub async fn recorded_status(
    pool: &PgPool,
    tenancy: Uuid,
    database_id: &str,
) -> (Option<i64>, bool, i32) {
    let row = recorded(pool, tenancy, database_id).await;
    (
        row.last_synced_sequence_id,
        row.succeeded,
        row.consecutive_failures,
    )
}

/// The error recorded for one database in `"ExternalDbSyncStatus"`:
/// `(lastError, lastErrorRetryable, consecutiveFailures)`.
pub async fn recorded_error(
    pool: &PgPool,
    tenancy: Uuid,
    database_id: &str,
) -> (Option<String>, Option<bool>, i32) {
    let row = recorded(pool, tenancy, database_id).await;
    (
        row.last_error,
        row.last_error_retryable,
        row.consecutive_failures,
    )
}

/// Waits (30 s at most) until the user `id` is in the tenant database.
pub async fn wait_for_user(tenant: &PgPool, id: Uuid) {
    super::wait::until(
        "the user in the tenant database",
        std::time::Duration::from_secs(30),
        || async move {
            let users = sqlx::query_scalar::<_, Uuid>("select id from users")
                .fetch_all(tenant)
                .await
                .ok()?;
            users.contains(&id).then_some(())
        },
    )
    .await;
}

/// A new tenancy with one new tenant database, `main`, attached.
pub async fn tenancy_with_database(pool: &PgPool) -> (Uuid, PgPool) {
    let tenancy = super::fixtures::tenancy(pool).await;
    let (url, tenant) = super::fixtures::tenant_database().await;
    attach(pool, tenancy, &[("main", &url)]).await;
    (tenancy, tenant)
}

/// Two tenancies with a database each: the first with one user, the second with two,
/// each user with a primary e-mail.
pub async fn two_tenancies_with_users(pool: &PgPool) -> [(Uuid, PgPool); 2] {
    let first = tenancy_with_database(pool).await;
    let second = tenancy_with_database(pool).await;
    for (tenancy, name) in [(first.0, "ada"), (second.0, "grace"), (second.0, "linus")] {
        let id = super::fixtures::user(pool, tenancy, name).await;
        super::fixtures::email(pool, tenancy, id, &format!("{name}@example.com"), true).await;
    }
    [first, second]
}

/// Takes `mapping`'s advisory lock in `tenant`, as a concurrent sync would, and holds it
/// until the returned transaction ends.
pub async fn hold_mapping_lock(
    tenant: &PgPool,
    mapping: external_db_sync::mapping::Mapping,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = tenant.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(external_db_sync::sync::statements::lock_key(mapping))
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Waits (60 s at most) until the tenant database holds exactly the source's users and
/// contact channels of `tenancy`; before the first sync created its tables, it does not.
pub async fn wait_until_equal(internal: &PgPool, tenancy: Uuid, tenant: &PgPool) {
    super::wait::until(
        "the tenant database to equal its source",
        std::time::Duration::from_secs(60),
        || async move {
            // Both tables, whoever dropped them (not created yet, or by the tenant).
            if !table_exists(tenant, "users").await
                || !table_exists(tenant, "contact_channels").await
            {
                return None;
            }
            let users_equal =
                external_users(tenant).await == expected_users(internal, tenancy).await;
            let channels_equal =
                external_channels(tenant).await == expected_channels(internal, tenancy).await;
            (users_equal && channels_equal).then_some(())
        },
    )
    .await;
}

/// Whether `table` has a change in `tenancy_id` numbered after `watermark`: live rows
/// and tombstones. A caught-up mapping has none, even once its tombstones are pruned.
pub async fn has_changes_after(
    pool: &PgPool,
    tenancy_id: Uuid,
    table: &str,
    watermark: i64,
) -> bool {
    let live = match table {
        "ProjectUser" => {
            r#"select from "ProjectUser" where "tenancyId" = $1 and "sequenceId" > $3"#
        }
        _ => r#"select from "ContactChannel" where "tenancyId" = $1 and "sequenceId" > $3"#,
    };
    sqlx::query_scalar(&format!(
        r#"select exists ({live}) or exists (
               select from "DeletedRow"
               where "tenancyId" = $1 and "tableName" = $2 and "sequenceId" > $3)"#
    ))
    .bind(tenancy_id)
    .bind(table)
    .bind(watermark)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Makes every request and every failing database due now, as if their time had come.
pub async fn let_time_pass(pool: &PgPool) {
    sqlx::raw_sql(
        r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp;
           update "ExternalDbSyncStatus" set "nextAttemptAt" = current_timestamp
           where "nextAttemptAt" is not null"#,
    )
    .execute(pool)
    .await
    .unwrap();
}

/// What a sync of the tenancy's first database did for `mapping`; it must have succeeded.
pub fn mapping_report(report: &TenancyReport, mapping: Mapping) -> MappingReport {
    let synced = report.databases[0]
        .result
        .as_ref()
        .expect("the database synced");
    synced
        .mappings
        .iter()
        .find(|report| report.mapping == mapping)
        .expect("every mapping is reported")
        .clone()
}
