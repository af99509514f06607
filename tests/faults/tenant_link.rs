//! The link to a tenant database broken while `serve` syncs through it: cut in the
//! middle of a transaction, paused (the server hears nothing and answers nothing), and
//! slowed down. A proxy the test controls stands between the service and the database.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{email, rename_user, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{attach, latest_change, recorded_error, wait_until_equal, watermark};
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
    let mut parsed = url::Url::parse(&url).unwrap();
    let target: SocketAddr = format!("127.0.0.1:{}", parsed.port().unwrap())
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    parsed.set_port(Some(proxy.port())).unwrap();
    (proxy, parsed.to_string(), tenant)
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
