//! QStash mode under faults: publishes refused, the webhook answering 5xx while the
//! tenant database's server is down, and every message delivered twice at once, to one
//! replica or to two. The tenant database ends equal to its source, and no version of a
//! row is written twice.

use std::time::Duration;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{rename_user, tenancy, tenant_database};
use crate::harness::postgres::{pool, server};
use crate::harness::qstash::{CURRENT_SIGNING_KEY, NEXT_SIGNING_KEY};
use crate::harness::qstash_standin::{QstashStandIn, TOKEN};
use crate::harness::sync::{attach, wait_until_equal};
use crate::harness::wait;
use crate::tenant_link::{
    hold_user_row, log_writes, sessions_waiting_for_a_lock, users_with_emails,
    versions_written_twice,
};
use crate::tenant_server::{tenancy_on_its_own_tenant_server, OwnTenantServer};

#[tokio::test]
async fn refused_publishes_5xx_answers_and_duplicate_deliveries_lose_and_repeat_nothing() {
    let OwnTenantServer {
        internal_url,
        internal,
        tenant_server,
        tenant_url,
        tenancy,
    } = tenancy_on_its_own_tenant_server().await;
    let users = users_with_emails(&internal, tenancy, 20).await;

    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;
    standin.deliver_each_twice();
    standin.fail_publishes(3);
    let app = replica(&internal_url, &standin, true).await;
    standin.deliver_to(&app.address);
    let tenant = pool(&tenant_url).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    assert_eq!(
        standin.publishes_still_failing(),
        0,
        "publishes were refused"
    );
    log_writes(&tenant).await;

    // The tenant's server goes down while its users change: deliveries fail with 5xx
    // and are retried, by QStash and by the database's own retry schedule.
    tenant.close().await;
    tenant_server.stop();
    for (n, user) in users.iter().enumerate() {
        rename_user(&internal, *user, &format!("renamed while down {n}")).await;
    }
    wait::until(
        "a delivery answered 5xx",
        Duration::from_secs(30),
        || async {
            standin
                .deliveries()
                .iter()
                .any(|d| d.status >= 500)
                .then_some(())
        },
    )
    .await;
    tenant_server.restart();
    let tenant = pool(&tenant_url).await;
    for (n, user) in users.iter().enumerate().take(5) {
        rename_user(&internal, *user, &format!("renamed after {n}")).await;
    }
    wait_until_equal(&internal, tenancy, &tenant).await;

    // Every message went twice (the second copy of the last one may still be on its
    // way), and twice nothing was applied twice.
    let standin = &standin;
    wait::until(
        "both copies of every message to be delivered",
        Duration::from_secs(30),
        || async move {
            let deliveries = standin.deliveries();
            let first_attempts = |id: &str| {
                deliveries
                    .iter()
                    .filter(|d| d.message_id == id && d.retried == 0)
                    .count()
            };
            deliveries
                .iter()
                .all(|d| first_attempts(&d.message_id) == 2)
                .then_some(())
        },
    )
    .await;
    assert_eq!(versions_written_twice(&tenant).await, []);
    app.stop().await.unwrap();
}

/// Both copies of each message reach two replicas at once while the tenant's owner holds
/// a row the sync must write, so that both syncs are in flight together: one writes the
/// change, the other finds it applied and writes nothing.
#[tokio::test]
async fn two_copies_delivered_to_two_replicas_at_once_apply_the_change_once() {
    let internal_url = server().migrated_database().await;
    let internal = pool(&internal_url).await;
    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;
    standin.deliver_each_twice();
    let publishing = replica(&internal_url, &standin, true).await;
    let answering = replica(&internal_url, &standin, false).await;
    standin.deliver_copies_to(&[&publishing.address, &answering.address]);
    // The tenancy comes after: its first message must find where to go.
    let (url, tenant) = tenant_database().await;
    let tenancy = tenancy(&internal).await;
    attach(&internal, tenancy, &[("main", &url)]).await;
    let users = users_with_emails(&internal, tenancy, 5).await;
    wait_until_equal(&internal, tenancy, &tenant).await;
    all_delivered(&standin).await;
    log_writes(&tenant).await;

    let blocker = hold_user_row(&tenant, users[0]).await;
    rename_user(&internal, users[0], "renamed once").await;
    wait::until(
        "both copies' syncs to wait on a lock in the tenant database",
        Duration::from_secs(30),
        || async { (sessions_waiting_for_a_lock(&tenant).await >= 2).then_some(()) },
    )
    .await;
    blocker.rollback().await.unwrap();

    wait_until_equal(&internal, tenancy, &tenant).await;
    all_delivered(&standin).await;
    assert_eq!(versions_written_twice(&tenant).await, []);
    answering.stop().await.unwrap();
    publishing.stop().await.unwrap();
}

/// A `serve` in QStash mode on `internal_url` whose deliveries come from `standin`,
/// running the loops (it publishes) or only answering the webhook.
async fn replica(internal_url: &str, standin: &QstashStandIn, loops: bool) -> TestApp {
    TestApp::spawn_on(
        internal_url,
        &[
            ("SYNC_QUEUE", "qstash"),
            ("QSTASH_URL", standin.url.as_str()),
            ("QSTASH_TOKEN", TOKEN),
            ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
            ("QSTASH_NEXT_SIGNING_KEY", NEXT_SIGNING_KEY),
            ("PUBLIC_URL", "https://sync.example.test"),
            ("RUN_WORKERS", if loops { "true" } else { "false" }),
            ("ALLOW_PRIVATE_TARGETS", "true"),
            ("SYNC_RETRY_FIRST_MS", "100"),
            ("SYNC_RETRY_MAX_MS", "1000"),
        ],
    )
    .await
}

/// Waits, with a deadline, until both copies of every message published so far were
/// delivered and answered 2xx; on timeout, names every delivery.
async fn all_delivered(standin: &QstashStandIn) {
    let all_answered = || {
        let deliveries = standin.deliveries();
        let answered = |id: &str| {
            deliveries
                .iter()
                .filter(|d| d.message_id == id && (200..300).contains(&d.status))
                .count()
        };
        standin
            .published()
            .iter()
            .all(|message| answered(message["messageId"].as_str().unwrap()) == 2)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !all_answered() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after 30 s waiting for both copies of every message to be answered \
             2xx; deliveries (message, retried, status): {:?}",
            standin
                .deliveries()
                .iter()
                .map(|d| (&d.message_id, d.retried, d.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
