//! The internal database restarted while `serve` runs its loops: `/readyz` tells the
//! outage while it lasts, the loops live through it, and the change listener comes back,
//! so a change after the restart is synced without waiting for the loops' timers. And
//! `serve` stopped while the internal database is down ends promptly.

use std::time::{Duration, Instant};

use reqwest::Method;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::binary::serve_logging_to;
use crate::harness::fixtures::{rename_user, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, ClusterSetup, RestartableServer};
use crate::harness::sync::{attach, wait_until_equal};
use crate::harness::wait;
use crate::tenant_link::serve;

/// An internal database on a server of the test's own, and a tenancy with a tenant
/// database (on the shared server) attached.
async fn internal_of_its_own() -> (RestartableServer, String, PgPool, Uuid, PgPool) {
    let internal_server = RestartableServer::start(&ClusterSetup::default());
    let internal_url = internal_server.databases().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (tenant_url, tenant) = tenant_database().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &tenant_url)]).await;
    (internal_server, internal_url, internal, tenancy, tenant)
}

#[tokio::test]
async fn serve_rides_out_a_restart_of_the_internal_database() {
    let (internal_server, internal_url, internal, tenancy, tenant) = internal_of_its_own().await;
    let id = user(&internal, tenancy, "before").await;
    // The loops' timers are a minute: only a notification wakes them sooner.
    let app = serve(
        &internal_url,
        &[
            ("SEQUENCER_IDLE_INTERVAL_MS", "60000"),
            ("POLLER_IDLE_INTERVAL_MS", "60000"),
        ],
    )
    .await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    let ready = || async { app.request(Method::GET, "/readyz", None).await.status() };
    assert_eq!(ready().await, 200);

    internal.close().await;
    internal_server.stop();
    let stopped_at = Instant::now();
    wait::until(
        "/readyz to tell the outage",
        Duration::from_secs(30),
        || async { (ready().await == 503).then_some(()) },
    )
    .await;
    // Down a little longer than a loop's first retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    internal_server.restart();
    let restarted_at = Instant::now();
    wait::until(
        "/readyz to be ready again",
        Duration::from_secs(30),
        || async { (ready().await == 200).then_some(()) },
    )
    .await;
    let ready_after = restarted_at.elapsed();

    // The sequencer loop is asleep (it gave its lease up, so writers notify), on its
    // one-minute timer: only the listener can wake it now.
    let internal = pool(&internal_url).await;
    wait::until(
        "the sequencer loop to sleep",
        Duration::from_secs(30),
        || async {
            let awake_until: i64 =
                sqlx::query_scalar("select last_value from external_db_sync_sequencer_awake_until")
                    .fetch_one(&internal)
                    .await
                    .unwrap();
            (awake_until == 0).then_some(())
        },
    )
    .await;
    rename_user(&internal, id, "after the restart").await;
    let changed_at = Instant::now();
    wait::until(
        "the change after the restart, well before the loops' timers",
        Duration::from_secs(20),
        || async {
            let name: Option<String> =
                sqlx::query_scalar("select display_name from users where id = $1")
                    .bind(id)
                    .fetch_optional(&tenant)
                    .await
                    .unwrap()
                    .flatten();
            (name.as_deref() == Some("after the restart")).then_some(())
        },
    )
    .await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    println!(
        "outage {:.1} s; ready {:.1} s after the restart; a change after it synced in {:.2} s",
        (restarted_at - stopped_at).as_secs_f64(),
        ready_after.as_secs_f64(),
        changed_at.elapsed().as_secs_f64()
    );
    app.stop().await.unwrap();
}

/// How long `serve` may take to end on SIGTERM when the internal database is down: its
/// loops and in-flight work give up on the database at once instead of waiting out
/// timeouts and retries.
const STOP_WITH_DATABASE_DOWN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn serve_ends_promptly_on_sigterm_while_the_internal_database_is_down() {
    let (internal_server, internal_url, internal, tenancy, tenant) = internal_of_its_own().await;
    user(&internal, tenancy, "before").await;
    let directory = tempfile::tempdir().unwrap();
    let (mut child, address) = serve_logging_to(
        &internal_url,
        &[("RUN_WORKERS", "true")],
        &directory.path().join("serve.log"),
    )
    .await;
    wait_until_equal(&internal, tenancy, &tenant).await;

    internal.close().await;
    internal_server.stop();
    let client = reqwest::Client::new();
    wait::until(
        "/readyz to tell the outage",
        Duration::from_secs(30),
        || async {
            let status = client
                .get(format!("http://{address}/readyz"))
                .send()
                .await
                .ok()?
                .status();
            (status == 503).then_some(())
        },
    )
    .await;
    // Its loops have failed at least once and are retrying.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let signalled_at = Instant::now();
    // SAFETY: kill with the pid of a child this test started and still owns.
    let sent = unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("serve ended within a minute")
        .unwrap();
    let took = signalled_at.elapsed();
    let log = std::fs::read_to_string(directory.path().join("serve.log")).unwrap();
    assert!(
        took < STOP_WITH_DATABASE_DOWN,
        "serve took {took:?} to end; its log:\n{log}"
    );
    assert!(status.success(), "{status:?}; its log:\n{log}");
    println!("ended {:.2} s after SIGTERM", took.as_secs_f64());
}
