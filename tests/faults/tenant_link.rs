//! The link to a tenant database broken while `serve` syncs through it: cut in the
//! middle of a transaction, paused (the server hears nothing and answers nothing), and
//! slowed down. A proxy the test controls stands between the service and the database.

use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::harness::app::TestApp;
use external_db_sync::sync::SyncSettings;

use crate::harness::fixtures::{email, rename_user, sequence_all, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine_with, latest_change, recorded_error, sync_only,
    test_settings, wait_until_equal, watermark, PrivateTargets,
};
use crate::harness::wait;
use crate::proxy::{Direction, Proxy};

/// `serve` in-process with its loops, retrying failed databases within a second.
pub async fn serve(internal_url: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut variables = vec![
        ("RUN_WORKERS", "true"),
        ("ALLOW_PRIVATE_TARGETS", "true"),
        ("SYNC_RETRY_FIRST_MS", "100"),
        ("SYNC_RETRY_MAX_MS", "1000"),
    ];
    variables.extend_from_slice(extra);
    TestApp::spawn_on(internal_url, &variables).await
}

/// A tenant database on the shared server, a proxy in front of it, and the connection
/// string that goes through the proxy.
pub async fn proxied_tenant() -> (Proxy, String, PgPool) {
    let (url, tenant) = tenant_database().await;
    let (proxy, proxied) = Proxy::in_front_of(&url).await;
    (proxy, proxied, tenant)
}

/// Logs every row version written to the tenant's `users`, in the order written: a
/// version written twice would be a change applied twice, an older one after a newer
/// one a change applied out of order.
pub async fn log_writes(tenant: &PgPool) {
    sqlx::raw_sql(
        r#"create table written (n bigserial, id uuid not null, display_name text);
           create function log_written() returns trigger language plpgsql as $$
           begin
               insert into written (id, display_name) values (new.id, new.display_name);
               return null;
           end $$;
           create trigger log_written after insert or update on users
               for each row execute function log_written();"#,
    )
    .execute(tenant)
    .await
    .unwrap();
}

/// `count` users of `tenancy`, each with a primary e-mail.
pub async fn users_with_emails(internal: &PgPool, tenancy: Uuid, count: usize) -> Vec<Uuid> {
    let mut users = Vec::with_capacity(count);
    for n in 0..count {
        let id = user(internal, tenancy, &format!("user {n}")).await;
        email(internal, tenancy, id, &format!("user{n}@example.com"), true).await;
        users.push(id);
    }
    users
}

pub async fn versions_written_twice(tenant: &PgPool) -> Vec<(Uuid, Option<String>)> {
    sqlx::query_as(
        "select id, display_name from written group by id, display_name having count(*) > 1",
    )
    .fetch_all(tenant)
    .await
    .unwrap()
}

/// How many of the service's sessions in the tenant database wait for a lock.
pub async fn sessions_waiting_for_a_lock(tenant: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database()
           and application_name = 'external-db-sync'
           and wait_event_type = 'Lock'",
    )
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The tenant's owner holds the row of `user` in `users` (until the transaction ends):
/// a sync that must write it stops there, in the middle of its transaction.
pub async fn hold_user_row(tenant: &PgPool, user: Uuid) -> sqlx::Transaction<'static, Postgres> {
    let mut blocker = tenant.begin().await.unwrap();
    sqlx::query("select from users where id = $1 for update")
        .bind(user)
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

async fn rename_all(internal: &PgPool, tenancy: Uuid, name: &str) {
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = $2 || ' ' || "projectUserId"
           where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .bind(name)
    .execute(internal)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_connection_cut_in_the_middle_of_a_transaction_heals_and_applies_nothing_twice() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, tenant) = proxied_tenant().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &proxied_url)]).await;
    let users = users_with_emails(&internal, tenancy, 30).await;
    let app = serve(&internal_url, &[]).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    log_writes(&tenant).await;

    // The tenant's owner holds a row of `users`: the sync's transaction, sent whole,
    // stops in its middle, holding the mapping's lock, and there the link is cut.
    let blocker = hold_user_row(&tenant, users[0]).await;
    rename_all(&internal, tenancy, "renamed").await;
    wait::until(
        "the sync to wait in the middle of its transaction",
        Duration::from_secs(30),
        || async { (sessions_waiting_for_a_lock(&tenant).await >= 1).then_some(()) },
    )
    .await;
    let cut_at = Instant::now();
    proxy.cut();
    blocker.rollback().await.unwrap();

    wait_until_equal(&internal, tenancy, &tenant).await;
    let healed = cut_at.elapsed();
    assert_eq!(versions_written_twice(&tenant).await, []);
    let latest = latest_change(&internal, tenancy, "ProjectUser").await;
    assert_eq!(watermark(&tenant, "users").await, latest);
    assert!(proxy.accepted() >= 2, "the service connected again");
    println!("healed {:.1} s after the cut", healed.as_secs_f64());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_paused_link_fails_its_sync_at_the_stall_limit_while_other_tenancies_go_on() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, paused) = proxied_tenant().await;
    let (direct_url, direct) = tenant_database().await;
    let (stuck, flowing) = (tenancy(&internal).await, tenancy(&internal).await);
    attach(&internal, stuck, &[("main", &proxied_url)]).await;
    attach(&internal, flowing, &[("main", &direct_url)]).await;
    let stuck_user = user(&internal, stuck, "stuck").await;
    let flowing_user = user(&internal, flowing, "flowing").await;
    // Statements end after 1 s: a session in use that hears nothing for 2 s is stalled.
    let app = serve(&internal_url, &[("SYNC_STATEMENT_TIMEOUT_MS", "1000")]).await;
    wait_until_equal(&internal, stuck, &paused).await;
    wait_until_equal(&internal, flowing, &direct).await;

    proxy.hold(Direction::ToServer);
    proxy.hold(Direction::ToClient);
    let paused_at = Instant::now();
    rename_user(&internal, stuck_user, "stuck, renamed").await;
    rename_user(&internal, flowing_user, "flowing, renamed").await;

    // The other tenancy's change arrives while the link is paused.
    wait_until_equal(&internal, flowing, &direct).await;
    // The paused sync fails at the stall limit, recorded as a retryable error.
    let message = wait::until(
        "the paused sync to fail as stalled",
        Duration::from_secs(30),
        || async {
            let (error, retryable, _) = recorded_error(&internal, stuck, "main").await;
            error
                .filter(|error| error.contains("sent nothing"))
                .map(|error| (error, retryable))
        },
    )
    .await;
    let detected = paused_at.elapsed();
    assert_eq!(message.1, Some(true), "{}", message.0);
    assert!(
        detected >= Duration::from_secs(2),
        "not before the limit: {detected:?}"
    );

    proxy.resume();
    wait_until_equal(&internal, stuck, &paused).await;
    println!(
        "stall detected {:.1} s after the pause; healed {:.1} s after it",
        detected.as_secs_f64(),
        paused_at.elapsed().as_secs_f64()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_link_delays_every_change_and_loses_none() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, tenant) = proxied_tenant().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &proxied_url)]).await;
    proxy.delay(Duration::from_millis(50));
    let app = serve(&internal_url, &[]).await;
    let users = users_with_emails(&internal, tenancy, 20).await;
    for (n, id) in users.iter().enumerate().step_by(3) {
        rename_user(&internal, *id, &format!("slowly renamed {n}")).await;
    }
    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = any($1)"#)
        .bind(&users[..5])
        .execute(&internal)
        .await
        .unwrap();
    wait_until_equal(&internal, tenancy, &tenant).await;
    app.stop().await.unwrap();
}

/// How many of the service's sessions in the tenant database wait for a lock in the
/// merge of a staged batch.
async fn staged_merges_waiting(tenant: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database()
           and application_name = 'external-db-sync'
           and wait_event_type = 'Lock'
           and query like 'delete from users using pg_temp._stack_sync_stage_users%'",
    )
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The link cut while a staged batch is merged (the merge waits for a row the tenant's
/// owner holds): the batch fails and leaves nothing behind, neither its rows nor its
/// staging table nor a watermark moved; the batches before it stay, and the next sync
/// brings the database equal to the source.
#[tokio::test]
async fn a_staged_batch_cut_during_its_merge_leaves_nothing_behind() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, tenant) = proxied_tenant().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &proxied_url)]).await;
    users_with_emails(&internal, tenancy, 60).await;
    sequence_all(&internal, 1000).await;
    // Batches of 10, then staged batches of 20: 10 + 20 + 20 + 10 renames.
    let settings = SyncSettings {
        batch_size: 10,
        staged_batch_size: 20,
        max_batches_per_run: 1000,
        ..test_settings()
    };
    let engine = engine_with(&internal, settings.clone(), PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    // A process with no session kept: one with a kept session would try the database
    // once more on a new session after the cut, and the test would see the retry.
    let engine = engine_with(&internal, settings, PrivateTargets::Allowed);
    rename_all(&internal, tenancy, "renamed").await;
    sequence_all(&internal, 1000).await;
    let numbered_last: Vec<Uuid> = sqlx::query_scalar(
        r#"select "projectUserId" from "ProjectUser" where "tenancyId" = $1
           order by "sequenceId" desc limit 10"#,
    )
    .bind(tenancy)
    .fetch_all(&internal)
    .await
    .unwrap();

    // The user numbered last is in the last staged batch; its row is held.
    let blocker = hold_user_row(&tenant, numbered_last[0]).await;
    let syncing = tokio::spawn(async move {
        let report = sync_only(&engine, tenancy).await;
        (engine, report)
    });
    wait::until(
        "the merge of the last staged batch to wait for the held row",
        Duration::from_secs(30),
        || async { (staged_merges_waiting(&tenant).await >= 1).then_some(()) },
    )
    .await;
    proxy.cut();
    blocker.rollback().await.unwrap();
    let (engine, report) = syncing.await.unwrap();
    assert!(
        report.databases[0].result.is_err(),
        "the cut batch failed: {report:?}"
    );

    wait::until(
        "the cut session to end in the tenant database",
        Duration::from_secs(30),
        || async { (service_sessions(&tenant).await == 0).then_some(()) },
    )
    .await;
    let staging_tables: i64 = sqlx::query_scalar(
        r"select count(*) from pg_catalog.pg_class where relname like '\_stack\_sync\_stage%'",
    )
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert_eq!(
        staging_tables, 0,
        "the staging table went with the transaction"
    );
    let renamed_of_the_cut_batch: i64 = sqlx::query_scalar(
        "select count(*) from users where id = any($1) and display_name like 'renamed%'",
    )
    .bind(&numbered_last)
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert_eq!(
        renamed_of_the_cut_batch, 0,
        "nothing of the cut batch was kept"
    );
    let renamed: i64 =
        sqlx::query_scalar("select count(*) from users where display_name like 'renamed%'")
            .fetch_one(&tenant)
            .await
            .unwrap();
    assert_eq!(renamed, 50, "the batches before it stay");
    let numbered_before: i64 = sqlx::query_scalar(
        r#"select max("sequenceId") from "ProjectUser" where "tenancyId" = $1
           and not "projectUserId" = any($2)"#,
    )
    .bind(tenancy)
    .bind(&numbered_last)
    .fetch_one(&internal)
    .await
    .unwrap();
    assert_eq!(watermark(&tenant, "users").await, numbered_before);

    sync_only(&engine, tenancy).await;
    assert_tenant_matches_source(&internal, tenancy, &tenant).await;
}

/// How many sessions of the service are open in the tenant database.
async fn service_sessions(tenant: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and application_name = 'external-db-sync'",
    )
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The tenant's `table`: its primary key's index, or none.
async fn primary_key_index(tenant: &PgPool, table: &str) -> Option<i64> {
    sqlx::query_scalar(
        "select conindid::int8 from pg_constraint
         where conrelid = $1::text::regclass and contype = 'p'",
    )
    .bind(table)
    .fetch_optional(tenant)
    .await
    .unwrap()
}

/// Whether a session of the service holds `users` alone: an initial copy that dropped
/// its key to build it after the rows.
async fn users_taken_alone(tenant: &PgPool) -> bool {
    sqlx::query_scalar(
        "select exists (select from pg_locks l join pg_stat_activity a using (pid)
                        where a.application_name = 'external-db-sync'
                          and l.relation = 'users'::regclass
                          and l.mode = 'AccessExclusiveLock' and l.granted)",
    )
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The link cut while an initial copy has its rows in and its key not built yet (a
/// trigger of the tenant's holds the copy at the end of its statement): the transaction
/// is rolled back, and leaves the table as it was, empty and with its key; the next sync
/// copies every row.
#[tokio::test]
async fn an_initial_copy_cut_before_its_key_is_built_leaves_the_table_empty_with_its_key() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, tenant) = proxied_tenant().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &proxied_url)]).await;
    let settings = SyncSettings {
        batch_size: 10,
        max_batches_per_run: 1000,
        ..test_settings()
    };
    // No change yet: the tables are created, empty.
    sync_only(
        &engine_with(&internal, settings.clone(), PrivateTargets::Allowed),
        tenancy,
    )
    .await;
    // A process with no session kept: one with a kept session would try the database
    // once more on a new session after the cut, and the test would see the retry.
    let engine = engine_with(&internal, settings, PrivateTargets::Allowed);
    let key = primary_key_index(&tenant, "users").await;
    assert!(key.is_some());
    sqlx::raw_sql(
        "create function hold_copy() returns trigger language plpgsql as $$
         begin
             perform pg_advisory_lock(4242);
             perform pg_advisory_unlock(4242);
             return null;
         end $$;
         create trigger hold_copy after insert on users
             for each statement execute function hold_copy();",
    )
    .execute(&tenant)
    .await
    .unwrap();
    let mut holder = tenant.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock(4242)")
        .execute(&mut *holder)
        .await
        .unwrap();
    users_with_emails(&internal, tenancy, 30).await;
    sequence_all(&internal, 1000).await;

    let syncing = tokio::spawn(async move { sync_only(&engine, tenancy).await });
    wait::until(
        "the copy to wait at the end of its statement, holding users alone",
        Duration::from_secs(30),
        || async {
            (sessions_waiting_for_a_lock(&tenant).await >= 1 && users_taken_alone(&tenant).await)
                .then_some(())
        },
    )
    .await;
    proxy.cut();
    sqlx::query("select pg_advisory_unlock(4242)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let report = syncing.await.unwrap();
    assert!(
        report.databases[0].result.is_err(),
        "the cut copy failed: {report:?}"
    );

    wait::until(
        "the cut session to end in the tenant database",
        Duration::from_secs(30),
        || async { (service_sessions(&tenant).await == 0).then_some(()) },
    )
    .await;
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&tenant)
        .await
        .unwrap();
    assert_eq!(users, 0, "none of the cut copy's rows was kept");
    assert_eq!(
        primary_key_index(&tenant, "users").await,
        key,
        "the key is the one it had"
    );
    assert_eq!(watermark(&tenant, "users").await, -1);

    let engine = engine_with(&internal, test_settings(), PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    assert_tenant_matches_source(&internal, tenancy, &tenant).await;
}
