//! Tenant sessions kept between syncs: reused while the configuration is the same,
//! never under a changed one, replaced when the server closed them, closed when idle,
//! and bounded.

use std::time::Duration;

use external_db_sync::sync::sessions::SessionPoolSettings;
use external_db_sync::sync::SyncError;
use sqlx::PgPool;

use crate::harness::fixtures::{rename_user, tenancy, tenant_database, user};
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine, engine_with, recorded_error, sync_ok,
    tenancy_with_database, test_settings, PrivateTargets,
};
use crate::harness::wait;

/// Backend process ids of the service's sessions in `tenant`'s database, and when each
/// last finished a statement.
async fn service_sessions(tenant: &PgPool) -> Vec<(i32, chrono::DateTime<chrono::Utc>)> {
    sqlx::query_as(
        "select pid, state_change from pg_stat_activity
         where application_name = 'external-db-sync' and datname = current_database()
         order by pid",
    )
    .fetch_all(tenant)
    .await
    .unwrap()
}

async fn service_pids(tenant: &PgPool) -> Vec<i32> {
    service_sessions(tenant)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

async fn wait_for_session_count(tenant: &PgPool, count: usize) {
    wait::until(
        &format!("{count} service sessions in the tenant database"),
        Duration::from_secs(10),
        || async { (service_pids(tenant).await.len() == count).then_some(()) },
    )
    .await;
}

async fn server_now(tenant: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(tenant)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_second_sync_reuses_the_sessions_of_the_first() {
    let pool = crate::harness::postgres::migrated_pool().await;
    let engine = engine(&pool);
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let id = user(&pool, tenancy, "first").await;
    sync_ok(&pool, &engine, tenancy).await;
    let first = service_pids(&tenant).await;
    assert_eq!(first.len(), 2, "one session per mapping, kept");
    assert_eq!(engine.idle_sessions(), 2);

    rename_user(&pool, id, "second").await;
    sync_ok(&pool, &engine, tenancy).await;

    assert_eq!(service_pids(&tenant).await, first, "the same sessions");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_changed_connection_string_never_uses_the_old_sessions() {
    let pool = crate::harness::postgres::migrated_pool().await;
    let engine = engine(&pool);
    let tenancy = tenancy(&pool).await;
    let (url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &url)]).await;
    let id = user(&pool, tenancy, "first").await;
    sync_ok(&pool, &engine, tenancy).await;
    let old = service_pids(&tenant).await;

    // Same database, different configuration (as a rotated password would be).
    attach(
        &pool,
        tenancy,
        &[("main", &format!("{url}?connect_timeout=7"))],
    )
    .await;
    rename_user(&pool, id, "second").await;
    let before = server_now(&tenant).await;
    sync_ok(&pool, &engine, tenancy).await;

    let used: Vec<i32> = service_sessions(&tenant)
        .await
        .into_iter()
        .filter(|(_, state_change)| *state_change > before)
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(used.len(), 2, "two sessions did the second sync: {used:?}");
    assert!(
        used.iter().all(|pid| !old.contains(pid)),
        "old sessions {old:?}, used {used:?}"
    );
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn kept_sessions_the_server_closed_are_replaced_without_a_failure() {
    let pool = crate::harness::postgres::migrated_pool().await;
    let engine = engine(&pool);
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let id = user(&pool, tenancy, "first").await;
    sync_ok(&pool, &engine, tenancy).await;
    let old = service_pids(&tenant).await;

    // The tenant's administrator ends our sessions, as a restart would.
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where application_name = 'external-db-sync' and datname = current_database()",
    )
    .execute(&tenant)
    .await
    .unwrap();
    rename_user(&pool, id, "after the restart").await;
    sync_ok(&pool, &engine, tenancy).await;

    let (error, _, failures) = recorded_error(&pool, tenancy, "main").await;
    assert_eq!((error, failures), (None, 0));
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    wait::until("only new sessions", Duration::from_secs(10), || async {
        let now = service_pids(&tenant).await;
        (!now.is_empty() && now.iter().all(|pid| !old.contains(pid))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn idle_sessions_are_closed_after_the_idle_timeout() {
    let pool = crate::harness::postgres::migrated_pool().await;
    let mut settings = test_settings();
    settings.pool.idle_timeout = Duration::from_millis(300);
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "someone").await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(engine.idle_sessions(), 2);

    // No sync comes along: the sessions close on their own.
    wait_for_session_count(&tenant, 0).await;
    assert_eq!(engine.idle_sessions(), 0);
}

#[tokio::test]
async fn kept_sessions_are_bounded_in_total() {
    let pool = crate::harness::postgres::migrated_pool().await;
    let mut settings = test_settings();
    settings.pool = SessionPoolSettings {
        total: 3,
        ..SessionPoolSettings::default()
    };
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    let (first, first_tenant) = tenancy_with_database(&pool).await;
    let (second, second_tenant) = tenancy_with_database(&pool).await;
    user(&pool, first, "one").await;
    user(&pool, second, "two").await;

    sync_ok(&pool, &engine, first).await;
    sync_ok(&pool, &engine, second).await;

    assert_eq!(engine.idle_sessions(), 3);
    wait_for_session_count(&first_tenant, 2).await;
    // The second database's other session was closed, not kept.
    wait_for_session_count(&second_tenant, 1).await;
}

/// What decides whether a failed sync on kept sessions is tried again on new ones: a
/// session the server ended counts as lost; an error the server reports on a live
/// session does not.
#[tokio::test]
async fn a_session_the_server_ended_counts_as_lost_and_a_statement_error_does_not() {
    let (url, tenant) = tenant_database().await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let statement_error = client.execute("select nonsense", &[]).await.unwrap_err();
    assert!(!SyncError::Target(statement_error).is_lost_session());

    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    sqlx::query("select pg_terminate_backend($1)")
        .bind(pid)
        .execute(&tenant)
        .await
        .unwrap();
    let ended = client.execute("select 1", &[]).await.unwrap_err();

    assert!(SyncError::Target(ended).is_lost_session());
}
