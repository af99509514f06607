//! The tenant's owner changing the synced tables behind the service's back: truncating
//! them, dropping them, writing rows of their own, taking the watermark back. Each is
//! detected at the next sync, repaired (the table brought back to the source exactly),
//! and recorded in status.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::{TestApp, CRON_SECRET};
use crate::harness::fixtures::{tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{assert_tenant_matches_source, attach, wait_until_equal, watermark};
use crate::harness::wait;
use crate::tenant_link::{serve, users_with_emails};

/// A tenancy of `users` users with an email each, synced by `serve` to a tenant
/// database: the internal pool, the tenancy, the tenant pool, and the service.
async fn synced(users: usize) -> (PgPool, Uuid, PgPool, TestApp) {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (tenant_url, tenant) = tenant_database().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &tenant_url)]).await;
    users_with_emails(&internal, tenancy, users).await;
    let app = serve(&internal_url, &[]).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    (internal, tenancy, tenant, app)
}

/// A change in the source after the tampering, and the wait for the tenant database to
/// equal the source again; returns how long that took.
async fn change_and_wait(internal: &PgPool, tenancy: Uuid, tenant: &PgPool) -> Duration {
    let changed_at = Instant::now();
    user(internal, tenancy, "after the tampering").await;
    wait_until_equal(internal, tenancy, tenant).await;
    changed_at.elapsed()
}

/// The status of the tenancy's only database, as `GET /status` answers it.
async fn database_status(app: &TestApp, tenancy: Uuid) -> Value {
    let response = app
        .request(
            Method::GET,
            &format!("/api/latest/internal/external-db-sync/status?tenancyId={tenancy}"),
            Some(CRON_SECRET),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut status: Value = response.json().await.unwrap();
    status["databases"][0].take()
}

/// Waits for status to record the repair of `mappings` (one repair each) and the
/// database caught up, and checks that the last repair says why.
async fn assert_repairs_recorded(app: &TestApp, tenancy: Uuid, mappings: &[&str]) {
    let status = wait::until(
        "status to record the repair",
        Duration::from_secs(30),
        || async {
            let status = database_status(app, tenancy).await;
            let repaired = status["repairs"].as_u64() >= Some(mappings.len() as u64);
            (repaired && status["changesBehind"] == 0).then_some(status)
        },
    )
    .await;
    let reason = status["lastRepair"].as_str().unwrap_or_default();
    assert!(
        mappings
            .iter()
            .any(|mapping| reason.starts_with(&format!("the {mapping} watermark went back"))),
        "{status}"
    );
    assert_eq!(status["consecutiveFailures"], 0, "{status}");
}

#[tokio::test]
async fn truncated_tables_are_noticed_and_filled_again() {
    let (internal, tenancy, tenant, app) = synced(300).await;
    sqlx::raw_sql("truncate users, contact_channels")
        .execute(&tenant)
        .await
        .unwrap();
    // The guard took both watermarks back in the truncating transaction.
    assert_eq!(watermark(&tenant, "users").await, -1);
    assert_eq!(watermark(&tenant, "contact_channels").await, -1);

    let took = change_and_wait(&internal, tenancy, &tenant).await;
    eprintln!("truncated tables filled again {took:?} after the next change");
    assert_repairs_recorded(&app, tenancy, &["users", "contact_channels"]).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_table_is_created_and_filled_again() {
    let (internal, tenancy, tenant, app) = synced(300).await;
    sqlx::raw_sql("drop table users")
        .execute(&tenant)
        .await
        .unwrap();

    let took = change_and_wait(&internal, tenancy, &tenant).await;
    eprintln!("dropped table filled again {took:?} after the next change");
    assert_repairs_recorded(&app, tenancy, &["users"]).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn rows_written_by_the_owner_are_taken_back_to_the_source() {
    let (internal, tenancy, tenant, app) = synced(50).await;
    // The owner adds a row, deletes one and edits another: the table is no longer
    // the source, whatever its watermark says.
    sqlx::raw_sql(
        "insert into contact_channels \
             (id, user_id, type, value, is_primary, is_verified, used_for_auth, created_at) \
         values (gen_random_uuid(), gen_random_uuid(), 'EMAIL', 'intruder@example.com', \
                 false, false, false, now()); \
         delete from contact_channels where id = (select id from contact_channels order by id limit 1); \
         update users set display_name = 'edited by hand' where id = (select id from users order by id desc limit 1);",
    )
    .execute(&tenant)
    .await
    .unwrap();

    let took = change_and_wait(&internal, tenancy, &tenant).await;
    eprintln!("rows written by the owner taken back {took:?} after the next change");
    // Both tables were written, so both watermarks went back, and the two repairs are
    // recorded in whichever order the syncs of the two mappings end.
    assert_repairs_recorded(&app, tenancy, &["users", "contact_channels"]).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_watermark_taken_back_by_hand_is_noticed_and_the_rows_after_it_replayed() {
    let (internal, tenancy, tenant, app) = synced(50).await;
    // As a restore from an older backup would: rows and watermark back together, with
    // the guard not firing (replication role, as `pg_restore` and logical replication
    // run).
    let users = watermark(&tenant, "users").await;
    sqlx::raw_sql(&format!(
        "set session_replication_role = replica; \
         update users set display_name = 'as it was' where id = (select id from users order by id desc limit 1); \
         update _stack_sync_metadata set last_synced_sequence_id = {} \
         where mapping_name = 'users'; \
         reset session_replication_role;",
        users - 60
    ))
    .execute(&tenant)
    .await
    .unwrap();

    let took = change_and_wait(&internal, tenancy, &tenant).await;
    eprintln!("a watermark taken back by hand caught up {took:?} after the next change");
    assert_repairs_recorded(&app, tenancy, &["users"]).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_operators_sync_repairs_a_truncated_table_without_waiting_for_a_change() {
    let (internal, tenancy, tenant, app) = synced(50).await;
    sqlx::raw_sql("truncate contact_channels")
        .execute(&tenant)
        .await
        .unwrap();

    // No change in the source: `sync` looks at every table under its lock at once,
    // whatever the service remembers of the database.
    let response = app
        .request(
            Method::POST,
            &format!("/api/latest/internal/external-db-sync/tenancies/{tenancy}/sync"),
            Some(CRON_SECRET),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_tenant_matches_source(&internal, tenancy, &tenant).await;
    assert_repairs_recorded(&app, tenancy, &["contact_channels"]).await;
    app.stop().await.unwrap();
}
