//! Completions carried by claims (DESIGN.md §11): a published request whose completion
//! has nothing to write at once is left for the poller's next claim, which deletes it in
//! the same statement and no longer counts it in flight, so that it claims the request
//! it held back. One that no claim takes goes alone once the wait is over, and those
//! left when the poller finishes go then.

use std::time::Duration;

use external_db_sync::db::queue::{self, Claimant};
use external_db_sync::poller::{InFlight, Poller, PollerSettings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{rename_user, request_key, sequence_all};
use crate::harness::polling::{direct_poller_settled, poll_once, step, tenancy_synced_once};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::assert_tenant_matches_source;
use crate::harness::wait;

/// A poller whose completions wait up to `wait` for a claim.
fn poller(pool: &PgPool, wait: Duration) -> Poller {
    direct_poller_settled(
        pool,
        PollerSettings {
            completion_wait: wait,
            ..PollerSettings::default()
        },
    )
}

/// The tenancy's requests: (id, claimed), oldest first.
async fn requests(pool: &PgPool, tenancy: Uuid) -> Vec<(Uuid, bool)> {
    sqlx::query_as(
        r#"select "id", "startedFulfillingAt" is not null from "OutgoingRequest"
           where "deduplicationKey" = $1 order by "createdAt""#,
    )
    .bind(request_key(tenancy))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A tenancy with a database and a user, synced once (its first success is written at
/// once, so its completion goes at once too); the user's id.
async fn synced_tenancy(pool: &PgPool, poller: &Poller) -> (Uuid, PgPool, Uuid) {
    let (tenancy, tenant, ada) = tenancy_synced_once(pool, poller).await;
    assert_eq!(requests(pool, tenancy).await, []);
    (tenancy, tenant, ada)
}

/// Renames the user, sequences it, and starts its sync in `in_flight`; returns once the
/// sync asked for its completion.
async fn sync_a_rename(
    pool: &PgPool,
    poller: &Poller,
    in_flight: &InFlight,
    ada: Uuid,
    name: &str,
) {
    let asked = poller.gathered_completions().asked;
    rename_user(pool, ada, name).await;
    sequence_all(pool, 1000).await;
    assert_eq!(step(poller, in_flight).await.claimed, 1);
    wait::until(
        "the sync to ask for its completion",
        Duration::from_secs(30),
        || async { (poller.gathered_completions().asked > asked).then_some(()) },
    )
    .await;
}

/// The completion left waits in the queue as a request in flight: another process's
/// claim holds the tenancy's next request back. This poller's next claim deletes it and
/// claims that next request in the same statement; no statement of its own completed it.
#[tokio::test]
async fn a_completion_left_goes_with_the_next_claim_which_takes_the_request_it_held_back() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_secs(60));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &poller).await;
    let in_flight = InFlight::default();
    sync_a_rename(&pool, &poller, &in_flight, ada, "ada 2").await;
    let [(synced, true)] = requests(&pool, tenancy).await[..] else {
        panic!("the synced request is left, still claimed");
    };
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;

    rename_user(&pool, ada, "ada 3").await;
    sequence_all(&pool, 1000).await;
    let lease = PollerSettings::default().lease;
    let elsewhere = queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap();
    assert!(
        elsewhere.is_empty(),
        "held back by the request left: {elsewhere:?}"
    );

    let before = poller.gathered_completions();
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    let after = poller.gathered_completions();
    assert_eq!(after.by_claims - before.by_claims, 1);
    assert_eq!(
        after.statements, before.statements,
        "no statement of its own"
    );
    let left = requests(&pool, tenancy).await;
    assert!(
        left.iter().all(|(id, _)| *id != synced),
        "the claim deleted it: {left:?}"
    );

    poller.finish(&in_flight).await.unwrap();
    assert_eq!(
        requests(&pool, tenancy).await,
        [],
        "finish completes what is left"
    );
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A completion left that no claim takes goes alone, in a statement of its own, once the
/// wait is over.
#[tokio::test]
async fn a_completion_no_claim_takes_goes_alone_once_the_wait_is_over() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_millis(200));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &poller).await;
    let in_flight = InFlight::default();
    let before = poller.gathered_completions();
    sync_a_rename(&pool, &poller, &in_flight, ada, "ada 2").await;
    wait::until(
        "the request left to be completed",
        Duration::from_secs(30),
        || async { requests(&pool, tenancy).await.is_empty().then_some(()) },
    )
    .await;
    let after = poller.gathered_completions();
    assert_eq!(after.by_claims, before.by_claims);
    assert_eq!(after.statements - before.statements, 1);
    assert_eq!(after.completed - before.completed, 1);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// With no wait, every completion has a statement of its own at once, as before claims
/// carried them.
#[tokio::test]
async fn with_no_wait_each_completion_goes_at_once() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::ZERO);
    let (tenancy, _tenant, ada) = synced_tenancy(&pool, &poller).await;
    let in_flight = InFlight::default();
    let before = poller.gathered_completions();
    sync_a_rename(&pool, &poller, &in_flight, ada, "ada 2").await;
    // Asked is counted before the statement runs: wait for its commit.
    wait::until(
        "the completion's statement to commit",
        Duration::from_secs(30),
        || async { requests(&pool, tenancy).await.is_empty().then_some(()) },
    )
    .await;
    let after = poller.gathered_completions();
    assert_eq!(after.by_claims, 0, "no claim carried it");
    assert_eq!(
        after.statements - before.statements,
        1,
        "a statement of its own"
    );
    poller.finish(&in_flight).await.unwrap();
}

/// A poller dropped with a completion left (its process died) leaves the request
/// claimed: another poller takes it over when its lease runs out, syncs again (nothing
/// to do) and completes it.
#[tokio::test]
async fn a_completion_left_by_a_poller_that_goes_away_is_taken_over_after_the_lease() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(1);
    let settled = |wait| PollerSettings {
        completion_wait: wait,
        lease,
        ..PollerSettings::default()
    };
    let dying = direct_poller_settled(&pool, settled(Duration::from_secs(60)));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &dying).await;
    let in_flight = InFlight::default();
    sync_a_rename(&pool, &dying, &in_flight, ada, "ada 2").await;
    drop(in_flight);
    drop(dying);
    assert!(matches!(requests(&pool, tenancy).await[..], [(_, true)]));

    let next = direct_poller_settled(&pool, settled(Duration::from_millis(20)));
    wait::until(
        "the request to be taken over and completed",
        Duration::from_secs(30),
        || async {
            poll_once(&next).await;
            requests(&pool, tenancy).await.is_empty().then_some(())
        },
    )
    .await;
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A claim never runs while a statement of their own completes requests left (no claim
/// took them within the wait): it waits for that statement's commit. Run at the same
/// time, it would see such a request in flight, hold its tenancy's next request back,
/// and nothing would wake the poller when the statement commits.
#[tokio::test]
async fn a_claim_waits_for_the_statement_completing_requests_left_and_takes_what_they_held_back() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_millis(50));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &poller).await;
    let in_flight = InFlight::default();
    sync_a_rename(&pool, &poller, &in_flight, ada, "ada 2").await;
    let [(left, true)] = requests(&pool, tenancy).await[..] else {
        panic!("the synced request is left, still claimed");
    };
    // The statement of their own that completes it waits for this lock.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(r#"select from "OutgoingRequest" where "id" = $1 for update"#)
        .bind(left)
        .execute(&mut *holder)
        .await
        .unwrap();
    wait::until(
        "the statement completing the request left to wait for its lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                r#"select count(*) from pg_stat_activity
                   where datname = current_database() and wait_event_type = 'Lock'
                     and query like 'delete from "OutgoingRequest"%'"#,
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;

    rename_user(&pool, ada, "ada 3").await;
    sequence_all(&pool, 1000).await;
    let claiming = async { step(&poller, &in_flight).await.claimed };
    let releasing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        holder.commit().await.unwrap();
    };
    let (claimed, ()) = tokio::join!(claiming, releasing);
    assert_eq!(
        claimed, 1,
        "the claim took the request held back until then"
    );
    poller.finish(&in_flight).await.unwrap();
    assert_eq!(requests(&pool, tenancy).await, []);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}
