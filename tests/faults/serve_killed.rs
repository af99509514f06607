//! A `serve` process killed with SIGKILL in the middle of a sync, and another one
//! started: the request is taken over once its lease runs out, nothing is lost, and the
//! dead process's last transaction, delivered to the tenant database after the new
//! process wrote a newer version, changes nothing. Killed after a sync, before its
//! completion went, it leaves that request to the next process the same way.

use std::time::{Duration, Instant};

use crate::harness::binary::serve_logging_to;
use crate::harness::fixtures::{rename_user, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{attach, wait_until_equal};
use crate::harness::wait;
use crate::proxy::Direction;
use crate::tenant_link::{log_writes, proxied_tenant};

#[tokio::test]
async fn a_killed_serve_is_taken_over_after_its_lease_and_its_last_transaction_is_stale() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (proxy, proxied_url, tenant) = proxied_tenant().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &proxied_url)]).await;
    let id = user(&internal, tenancy, "original").await;
    let directory = tempfile::tempdir().unwrap();
    let env = [("RUN_WORKERS", "true"), ("POLLER_LEASE_SECS", "3")];
    let (mut first, _) =
        serve_logging_to(&internal_url, &env, &directory.path().join("first.log")).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    // A change synced on the kept session prepares the statements of a small batch
    // there: the next one is written in a single round trip, the one held below.
    rename_user(&internal, id, "warmed up").await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    log_writes(&tenant).await;

    // The first process's sync is on its way to the tenant database when it dies.
    proxy.hold(Direction::ToServer);
    rename_user(&internal, id, "first").await;
    wait::until(
        "the first process's sync to be in flight",
        Duration::from_secs(30),
        || async { (proxy.held(Direction::ToServer) > 0).then_some(()) },
    )
    .await;
    // The tenant-side sessions of the first process, all opened before any of the
    // second's.
    let first_sessions: Vec<i32> = sqlx::query_scalar(
        "select pid from pg_stat_activity
         where datname = current_database() and application_name = 'external-db-sync'",
    )
    .fetch_all(&tenant)
    .await
    .unwrap();
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let killed_at = Instant::now();
    // What it sent stays held; new connections go through.
    proxy.freeze_open_connections();
    proxy.resume();

    rename_user(&internal, id, "second").await;
    let (mut second, _) =
        serve_logging_to(&internal_url, &env, &directory.path().join("second.log")).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    let taken_over = killed_at.elapsed();

    // The dead process's transaction reaches the server now, after the newer version.
    proxy.thaw();
    wait::until(
        "the dead process's connections to end",
        Duration::from_secs(30),
        || async {
            let stale: i64 =
                sqlx::query_scalar("select count(*) from pg_stat_activity where pid = any($1)")
                    .bind(&first_sessions)
                    .fetch_one(&tenant)
                    .await
                    .unwrap();
            (stale == 0).then_some(())
        },
    )
    .await;
    let order: Vec<String> =
        sqlx::query_scalar("select display_name from written where id = $1 order by n")
            .bind(id)
            .fetch_all(&tenant)
            .await
            .unwrap();
    // Nothing older was written after the newest version.
    let newest = order.iter().position(|name| name == "second");
    let after_newest = &order[newest.expect("the newest version was written")..];
    assert!(
        after_newest.iter().all(|name| name == "second"),
        "{order:?}"
    );
    wait_until_equal(&internal, tenancy, &tenant).await;
    println!(
        "taken over and equal {:.1} s after the kill (lease 3 s)",
        taken_over.as_secs_f64()
    );
    second.start_kill().unwrap();
}

/// A `serve` killed after a sync committed in the tenant database and before its
/// completion went (left for a claim that never came, `POLLER_COMPLETION_WAIT_MS`): the
/// request stays claimed, and the next process takes it over when its lease runs out,
/// syncs again for nothing and completes it. Nothing is lost or left behind.
#[tokio::test]
async fn a_serve_killed_before_a_completion_left_for_a_claim_went_leaves_it_to_the_next() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let (tenant_url, tenant) = tenant_database().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &tenant_url)]).await;
    let id = user(&internal, tenancy, "original").await;
    let directory = tempfile::tempdir().unwrap();
    let env = [
        ("RUN_WORKERS", "true"),
        ("POLLER_LEASE_SECS", "2"),
        ("POLLER_COMPLETION_WAIT_MS", "1000"),
    ];
    // The process to kill claims only for the renames: its loops' safety-net timers are
    // kept out of the window. (The next one needs its poller's: they take over a claim
    // whose lease ran out.)
    let [run, lease, wait] = env;
    let quiet = [
        run,
        lease,
        wait,
        ("POLLER_IDLE_INTERVAL_MS", "600000"),
        ("SEQUENCER_IDLE_INTERVAL_MS", "600000"),
    ];
    let (mut first, _) =
        serve_logging_to(&internal_url, &quiet, &directory.path().join("first.log")).await;
    let mut renames = 0;
    // The kill must land in the window, within the wait after the sync: on a machine
    // too slow for that, the completion went first, and the next rename tries again.
    loop {
        // A process's first sync of a database writes its status at once, and its
        // completion with it: only a later one is left for a claim.
        renames += 1;
        rename_user(&internal, id, &format!("synced first {renames}")).await;
        wait_until_equal(&internal, tenancy, &tenant).await;
        wait::until(
            "the first sync's request to be completed",
            Duration::from_secs(30),
            || async { (requests(&internal).await == 0).then_some(()) },
        )
        .await;
        slow_renames(&tenant).await;

        renames += 1;
        rename_user(&internal, id, &format!("renamed {renames}")).await;
        wait_until_equal(&internal, tenancy, &tenant).await;
        first.start_kill().unwrap();
        first.wait().await.unwrap();
        if requests(&internal).await == 1 {
            println!("killed in the window at attempt {}", renames / 2);
            break;
        }
        assert!(renames < 10, "the completion always went before the kill");
        (first, _) =
            serve_logging_to(&internal_url, &quiet, &directory.path().join("first.log")).await;
    }
    let in_flight: bool =
        sqlx::query_scalar(r#"select "startedFulfillingAt" is not null from "OutgoingRequest""#)
            .fetch_one(&internal)
            .await
            .unwrap();
    assert!(
        in_flight,
        "the request left is the synced one, still claimed"
    );

    let (mut second, _) =
        serve_logging_to(&internal_url, &env, &directory.path().join("second.log")).await;
    wait::until(
        "the request to be taken over and completed",
        Duration::from_secs(60),
        || async { (requests(&internal).await == 0).then_some(()) },
    )
    .await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    second.start_kill().unwrap();
}

/// Makes each sync of a rename to `renamed …` take a second in the tenant database.
/// A sequencer batch also carries the completions left for a claim, and the sequencer
/// stays awake for a few batches after numbering a change: a sync that ended while it
/// was awake would be completed by one of them, not left. After a second it sleeps.
async fn slow_renames(tenant: &sqlx::PgPool) {
    sqlx::raw_sql(
        r#"create or replace function slow_rename() returns trigger language plpgsql as $$
           begin perform pg_sleep(1); return null; end $$;
           drop trigger if exists slow_rename on users;
           create trigger slow_rename after update on users for each row
               when (new.display_name like 'renamed %') execute function slow_rename();"#,
    )
    .execute(tenant)
    .await
    .unwrap();
}

/// Requests queued, pending or in flight.
async fn requests(internal: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(r#"select count(*) from "OutgoingRequest""#)
        .fetch_one(internal)
        .await
        .unwrap()
}
