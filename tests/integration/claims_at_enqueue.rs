//! In `direct` mode the sequencer's batch claims the requests it queues for its own
//! process's poller, in the same statement (DESIGN.md §11, migration 21): the request
//! is inserted already claimed, announced to nobody, and synced by the publishes the
//! batch starts. The request stays the durable record of the work: a process that dies
//! after the batch leaves it to be taken over when its lease runs out.

use std::time::Duration;

use external_db_sync::db::queue::{self, Claimant};
use external_db_sync::db::sequencing::{sequence_batch_claiming, Wakefulness};
use external_db_sync::db::warm::WarmConnections;
use external_db_sync::db::{fusebox, REQUESTS_CHANNEL};
use external_db_sync::poller::{InFlight, PollerSettings};
use external_db_sync::sequencer::{ClaimFor, SequencerSettings};
use external_db_sync::wakeup::SequencerLoop;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{rename_user, request_key, tenancy_with_placeholder_database, user};
use crate::harness::notifications::{listener_on, notified};
use crate::harness::polling::{
    direct_poller, direct_poller_leasing, poll_once, tenancy_synced_once,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::assert_tenant_matches_source;
use crate::harness::wait;

/// The tenancy's requests: (id, claimed, attempts), oldest first.
async fn requests(pool: &PgPool, tenancy: Uuid) -> Vec<(Uuid, bool, i32)> {
    sqlx::query_as(
        r#"select "id", "startedFulfillingAt" is not null, "attempts" from "OutgoingRequest"
           where "deduplicationKey" = $1 order by "createdAt""#,
    )
    .bind(request_key(tenancy))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A batch of the sequencer's loop, claiming for `poller` into `in_flight`.
async fn batch_claiming(
    pool: &PgPool,
    poller: &external_db_sync::poller::Poller,
    in_flight: &InFlight,
) {
    let connections = WarmConnections::new(pool.clone());
    let claim_for = ClaimFor { poller, in_flight };
    let mut sequencer = SequencerLoop::default();
    (sequencer.step(
        &connections,
        &SequencerSettings::default(),
        Some(&claim_for),
    ))
    .await
    .unwrap();
}

/// A change synced with no claim of the poller: the batch inserts its request claimed,
/// announces nothing, starts its sync, and the sync settles it.
#[tokio::test]
async fn a_batch_claims_the_request_it_queues_and_its_sync_settles_it() {
    let pool = migrated_pool().await;
    let poller = direct_poller(&pool, 4);
    let (tenancy, tenant, ada) = tenancy_synced_once(&pool, &poller).await;
    let mut listener = listener_on(&pool, REQUESTS_CHANNEL).await;

    rename_user(&pool, ada, "ada 2").await;
    let in_flight = InFlight::default();
    batch_claiming(&pool, &poller, &in_flight).await;
    assert!(
        !notified(&pool, &mut listener, REQUESTS_CHANNEL).await,
        "a request inserted claimed is announced to no poller"
    );
    let settled = poller.finish(&in_flight).await.unwrap();
    assert_eq!(settled.published, 1, "the publish the batch started");
    assert_eq!(requests(&pool, tenancy).await, [], "settled: deleted");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// What the batch leaves pending for the poller's claim: a tenancy whose request is in
/// flight, one with a failing database (the claim reserves those), one with a request
/// pending already (relied on, as before), those beyond the limit, and every one while
/// the poller is switched off. Those pending are announced.
#[tokio::test]
async fn a_batch_claims_only_tenancies_with_nothing_queued_and_nothing_failing_up_to_its_limit() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for _ in 0..5 {
        let tenancy = tenancy_with_placeholder_database(&pool).await;
        tenancies.push((tenancy, user(&pool, tenancy, "ada").await));
    }
    let [in_flight, failing, pending, free, beyond] = tenancies[..] else {
        unreachable!()
    };
    let lease = PollerSettings::default().lease;
    for (_, user) in &tenancies {
        rename_user(&pool, *user, "first").await;
    }
    // The first batch claims nothing: every tenancy's request is queued pending.
    let first = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 0, &[])
        .await
        .unwrap();
    assert_eq!(first.claimed.len(), 0);
    // The first tenancy's request goes in flight, the third's is given back (pending),
    // the others' are settled; the second gets a failing database.
    let claimed = queue::claim(&pool, 10, lease, Claimant::Publisher)
        .await
        .unwrap();
    let (flying, rest): (Vec<_>, Vec<_>) =
        (claimed.iter()).partition(|request| request.deduplication_key == request_key(in_flight.0));
    let settled: Vec<Uuid> = (rest.iter())
        .filter(|request| request.deduplication_key != request_key(pending.0))
        .map(|request| request.id)
        .collect();
    queue::complete_many(
        &pool,
        &settled
            .iter()
            .map(|&id| queue::Completed { id, synced: None })
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let giving_back = rest
        .iter()
        .find(|r| r.deduplication_key == request_key(pending.0));
    queue::release(&pool, giving_back.unwrap(), "given back", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(flying.len(), 1);
    sqlx::query(
        r#"insert into "ExternalDbSyncStatus" ("tenancyId", "databaseId", "consecutiveFailures")
           values ($1, 'main', 1)"#,
    )
    .bind(failing.0)
    .execute(&pool)
    .await
    .unwrap();

    fusebox::write(&pool, None, Some(false)).await.unwrap();
    rename_user(&pool, free.1, "switched off").await;
    let off = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 10, &[])
        .await
        .unwrap();
    assert_eq!(off.claimed.len(), 0, "the poller is switched off");
    assert_eq!(requests(&pool, free.0).await.len(), 1);
    sqlx::query(r#"delete from "OutgoingRequest" where "deduplicationKey" = $1"#)
        .bind(request_key(free.0))
        .execute(&pool)
        .await
        .unwrap();
    fusebox::write(&pool, None, Some(true)).await.unwrap();

    let mut listener = listener_on(&pool, REQUESTS_CHANNEL).await;
    for (_, user) in &tenancies {
        rename_user(&pool, *user, "second").await;
    }
    let second = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 1, &[])
        .await
        .unwrap();
    let batch = second.batch.unwrap();
    assert_eq!((batch.tenancies, batch.requests_enqueued), (5, 4));
    let [claimed] = &second.claimed[..] else {
        panic!("one claimed, the limit: {:?}", second.claimed);
    };
    let claimed_tenancy = claimed.tenancy_id().unwrap();
    assert!(
        claimed_tenancy == free.0 || claimed_tenancy == beyond.0,
        "only a tenancy with nothing queued and nothing failing is claimed"
    );
    assert_eq!((claimed.attempts, claimed.queued_seconds), (1, 0.0));
    assert!(
        claimed.latest_user_change.is_some(),
        "read after the numbering"
    );
    assert!(!claimed.statuses_failing && claimed.databases.not_due_databases.is_empty());
    let unclaimed = if claimed_tenancy == free.0 {
        beyond
    } else {
        free
    };
    assert_eq!(
        requests(&pool, claimed_tenancy).await[..]
            .iter()
            .map(|(id, claimed, attempts)| (*id, *claimed, *attempts))
            .collect::<Vec<_>>(),
        [(claimed.id, true, 1)]
    );
    assert!(matches!(
        requests(&pool, unclaimed.0).await[..],
        [(_, false, 0)]
    ));
    assert!(matches!(
        requests(&pool, failing.0).await[..],
        [(_, false, 0)]
    ));
    assert!(matches!(
        requests(&pool, in_flight.0).await[..],
        [(_, true, _), (_, false, 0)]
    ));
    assert!(
        matches!(requests(&pool, pending.0).await[..], [(_, false, 1)]),
        "the pending one is relied on"
    );
    assert!(
        notified(&pool, &mut listener, REQUESTS_CHANNEL).await,
        "the pending requests are announced"
    );
}

/// Completions left for a claim go with the batch, first: the tenancy whose request
/// they settle has nothing in flight, and its new request is claimed at once.
#[tokio::test]
async fn a_batch_carries_completions_and_claims_the_request_they_would_have_held_back() {
    let pool = migrated_pool().await;
    let tenancy = tenancy_with_placeholder_database(&pool).await;
    let ada = user(&pool, tenancy, "ada").await;
    sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 0, &[])
        .await
        .unwrap();
    let lease = PollerSettings::default().lease;
    let [synced] = &queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap()[..]
    else {
        panic!("one request");
    };

    rename_user(&pool, ada, "ada 2").await;
    let without = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 10, &[])
        .await
        .unwrap();
    assert_eq!(
        without.claimed.len(),
        0,
        "held back by the request in flight"
    );
    rename_user(&pool, ada, "ada 3").await;
    let with = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 10, &[synced.id])
        .await
        .unwrap();
    // The pending request of the batch before is relied on: it stays pending, and the
    // tenancy gets no second one; nothing is in flight any more.
    assert_eq!(with.claimed.len(), 0);
    let left = requests(&pool, tenancy).await;
    assert!(
        matches!(left[..], [(id, false, 0)] if id != synced.id),
        "the completion went with the batch: {left:?}"
    );

    let [pending] = &queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap()[..]
    else {
        panic!("the pending request is claimable");
    };
    rename_user(&pool, ada, "ada 4").await;
    let carried = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 10, &[pending.id])
        .await
        .unwrap();
    let [claimed] = &carried.claimed[..] else {
        panic!("claimed at once: {:?}", carried.claimed);
    };
    assert_eq!(
        requests(&pool, tenancy).await,
        [(claimed.id, true, 1)],
        "the completion deleted, the new request claimed"
    );
}

/// The crash window: a process whose batch claimed a request dies before syncing it.
/// The request stays claimed until its lease runs out; then a poller takes it over and
/// the change reaches the tenant database.
#[tokio::test]
async fn a_request_claimed_at_enqueue_by_a_process_that_died_is_taken_over_after_its_lease() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(1);
    let poller = direct_poller_leasing(&pool, 4, lease);
    let (tenancy, tenant, ada) = tenancy_synced_once(&pool, &poller).await;

    rename_user(&pool, ada, "renamed by a process that died").await;
    let died = sequence_batch_claiming(&pool, 1000, Wakefulness::OneOff, 10, &[])
        .await
        .unwrap();
    assert_eq!(died.claimed.len(), 1, "claimed at its insert, then nothing");
    assert!(matches!(requests(&pool, tenancy).await[..], [(_, true, 1)]));

    wait::until(
        "another poller to take the request over",
        Duration::from_secs(30),
        || async { (poll_once(&poller).await.published == 1).then_some(()) },
    )
    .await;
    assert_eq!(requests(&pool, tenancy).await, []);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A batch does not wait for a statement that is completing requests left for a claim
/// (it would hold every change behind it): it carries none, and claims all the same.
#[tokio::test]
async fn a_batch_does_not_wait_for_a_statement_completing_requests_left() {
    let pool = migrated_pool().await;
    let poller = direct_poller(&pool, 4);
    let (tenancy, tenant, ada) = tenancy_synced_once(&pool, &poller).await;
    let turn = poller
        .carried_if_free()
        .expect("no statement completes any");
    assert!(
        poller.carried_if_free().is_none(),
        "one statement at a time"
    );

    rename_user(&pool, ada, "ada 2").await;
    let in_flight = InFlight::default();
    tokio::time::timeout(
        Duration::from_secs(10),
        batch_claiming(&pool, &poller, &in_flight),
    )
    .await
    .expect("the batch ran while the turn was held");
    assert!(matches!(requests(&pool, tenancy).await[..], [(_, true, 1)]));
    drop(turn);
    assert_eq!(poller.finish(&in_flight).await.unwrap().published, 1);
    assert_eq!(requests(&pool, tenancy).await, []);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// Once the process is stopping, a batch claims nothing: its poller is finishing what it
/// started, and a publish started now would outlive it. The request stays pending for
/// the next process.
#[tokio::test]
async fn a_stopping_process_claims_nothing_at_enqueue() {
    let pool = migrated_pool().await;
    let stopping = tokio_util::sync::CancellationToken::new();
    let poller = direct_poller(&pool, 4).stopping_on(stopping.clone());
    let tenancy = tenancy_with_placeholder_database(&pool).await;
    user(&pool, tenancy, "ada").await;
    assert!(
        !poller.slots_for_enqueue().is_empty(),
        "free slots while running"
    );

    stopping.cancel();
    assert!(poller.slots_for_enqueue().is_empty());
    let in_flight = InFlight::default();
    batch_claiming(&pool, &poller, &in_flight).await;
    assert!(matches!(
        requests(&pool, tenancy).await[..],
        [(_, false, 0)]
    ));
    assert_eq!(poller.finish(&in_flight).await.unwrap().published, 0);
}
