//! Waking the sequencer: writers notify while it sleeps and stay quiet while it is
//! awake (migration 8), and going to sleep never strands a writer's change.

use std::time::Duration;

use external_db_sync::db::fusebox;
use external_db_sync::db::sequencing::{sequence_batch, SequencedBatch, Wakefulness};
use external_db_sync::db::warm::WarmConnections;
use external_db_sync::db::{CHANGES_CHANNEL, REQUESTS_CHANNEL};
use external_db_sync::sequencer::SequencerSettings;
use external_db_sync::wakeup::SequencerLoop;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{self, rename_user, sequence_all};
use crate::harness::notifications::{listener_on, notified};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{assert_tenant_matches_source, tenancy_with_database, wait_for_user};
use crate::harness::wait;

const LEASE: Duration = Duration::from_secs(600);
const AWAKE: Wakefulness = Wakefulness::Awake { lease: LEASE };
const SLEEPY: Wakefulness = Wakefulness::Sleepy { lease: LEASE };

async fn batch(pool: &PgPool, wakefulness: Wakefulness) -> SequencedBatch {
    sequence_batch(pool, 1000, wakefulness)
        .await
        .unwrap()
        .expect("the sequencer is switched on")
}

async fn listener(pool: &PgPool) -> PgListener {
    listener_on(pool, CHANGES_CHANNEL).await
}

/// Whether the writes committed since the last call sent a change notification.
async fn writes_notified(pool: &PgPool, listener: &mut PgListener) -> bool {
    notified(pool, listener, CHANGES_CHANNEL).await
}

async fn sequencer_awake(pool: &PgPool) -> bool {
    sqlx::query_scalar("select external_db_sync_sequencer_awake()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits (30 s at most) until no sequencer holds a lease.
async fn wait_until_no_lease(pool: &PgPool, what: &str) {
    wait::until(what, Duration::from_secs(30), || async {
        (!sequencer_awake(pool).await).then_some(())
    })
    .await;
}

/// A tenancy with one user, already sequenced.
async fn sequenced_user(pool: &PgPool) -> (Uuid, Uuid) {
    let tenancy = fixtures::tenancy_with_placeholder_database(pool).await;
    let user = fixtures::user(pool, tenancy, "Ada").await;
    sequence_all(pool, 100).await;
    (tenancy, user)
}

#[tokio::test]
async fn writers_notify_only_while_no_sequencer_loop_is_awake() {
    let pool = migrated_pool().await;
    let (tenancy, user) = sequenced_user(&pool).await;
    let mut listener = listener(&pool).await;

    // No loop has ever run: writers notify, and one-off batches change nothing about it.
    rename_user(&pool, user, "one").await;
    assert!(writes_notified(&pool, &mut listener).await);
    assert_eq!(batch(&pool, Wakefulness::OneOff).await.project_users, 1);
    rename_user(&pool, user, "two").await;
    assert!(writes_notified(&pool, &mut listener).await);

    // An awake loop: writers stay quiet, and it still numbers their changes.
    assert_eq!(batch(&pool, AWAKE).await.project_users, 1);
    rename_user(&pool, user, "three").await;
    fixtures::email(&pool, tenancy, user, "a@example.com", true).await;
    assert!(!writes_notified(&pool, &mut listener).await);
    let sequenced = batch(&pool, SLEEPY).await;
    assert_eq!(sequenced.project_users, 1);
    assert_eq!(sequenced.contact_channels, 1);
    assert!(
        !sequenced.sleeping,
        "a batch that found work does not go to sleep"
    );
    assert!(sequencer_awake(&pool).await);

    // Nothing left, nobody committing: it goes to sleep, and writers notify again.
    assert!(batch(&pool, SLEEPY).await.sleeping);
    assert!(!sequencer_awake(&pool).await);
    rename_user(&pool, user, "four").await;
    assert!(writes_notified(&pool, &mut listener).await);
}

#[tokio::test]
async fn a_writer_that_stayed_quiet_keeps_the_sequencer_awake_until_it_committed() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    assert_eq!(batch(&pool, AWAKE).await.project_users, 0);

    // The writer has written (and seen the lease) but not committed.
    let mut writer = pool.begin().await.unwrap();
    sqlx::query(r#"update "ProjectUser" set "displayName" = 'late' where "projectUserId" = $1"#)
        .bind(user)
        .execute(&mut *writer)
        .await
        .unwrap();

    let while_writing = batch(&pool, SLEEPY).await;
    assert_eq!(while_writing.project_users, 0, "nothing committed yet");
    assert!(
        !while_writing.sleeping,
        "asleep now, the sequencer would never hear of the writer's change"
    );
    assert!(sequencer_awake(&pool).await);

    writer.commit().await.unwrap();
    let after = batch(&pool, SLEEPY).await;
    assert_eq!(after.project_users, 1, "the next look finds the change");
    assert!(batch(&pool, SLEEPY).await.sleeping);
}

#[tokio::test]
async fn a_flagged_row_that_another_transaction_locks_keeps_the_sequencer_awake() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    assert_eq!(batch(&pool, AWAKE).await.project_users, 0);
    rename_user(&pool, user, "changed").await;

    // Committed and flagged, but locked: the batch skips it.
    let locker = fixtures::hold_user(&pool, user, fixtures::UserLock::AsADelete).await;
    let while_locked = batch(&pool, SLEEPY).await;
    assert_eq!(while_locked.project_users, 0);
    assert!(
        !while_locked.sleeping,
        "asleep now, nothing would wake the sequencer for the skipped row"
    );
    assert!(sequencer_awake(&pool).await);

    locker.commit().await.unwrap();
    assert_eq!(batch(&pool, SLEEPY).await.project_users, 1);
    assert!(batch(&pool, SLEEPY).await.sleeping);
}

#[tokio::test]
async fn a_switched_off_sequencer_gives_its_lease_up_and_switching_on_wakes_the_loops() {
    let pool = migrated_pool().await;
    let mut changes = listener(&pool).await;
    let mut requests = listener_on(&pool, REQUESTS_CHANNEL).await;
    batch(&pool, AWAKE).await;
    assert!(sequencer_awake(&pool).await);

    fusebox::write(&pool, Some(false), Some(false))
        .await
        .unwrap();
    let switched_off = sequence_batch(&pool, 1000, AWAKE).await.unwrap();
    assert_eq!(switched_off, None);
    assert!(!sequencer_awake(&pool).await);
    assert!(!notified(&pool, &mut changes, CHANGES_CHANNEL).await);
    assert!(!notified(&pool, &mut requests, REQUESTS_CHANNEL).await);

    fusebox::write(&pool, Some(true), None).await.unwrap();
    assert!(notified(&pool, &mut changes, CHANGES_CHANNEL).await);
    assert!(!notified(&pool, &mut requests, REQUESTS_CHANNEL).await);
    fusebox::write(&pool, None, Some(true)).await.unwrap();
    assert!(notified(&pool, &mut requests, REQUESTS_CHANNEL).await);
}

#[tokio::test]
async fn a_stopping_loop_gives_its_lease_up() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    let settings = SequencerSettings {
        batch_size: 100,
        idle_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut worker = SequencerLoop::default();
    let connections = WarmConnections::new(pool.clone());
    rename_user(&pool, user, "changed").await;
    worker.step(&connections, &settings, None).await.unwrap();
    assert!(
        sequencer_awake(&pool).await,
        "a loop that found work is awake"
    );

    worker.give_up_lease(&connections, &settings).await;

    assert!(!sequencer_awake(&pool).await);
}

#[tokio::test]
async fn a_writer_whose_snapshot_is_older_than_the_sleep_still_notifies() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    let mut listener = listener(&pool).await;
    assert_eq!(batch(&pool, AWAKE).await.project_users, 0);

    // A repeatable-read transaction takes its snapshot while the sequencer is awake...
    let mut writer = pool.begin().await.unwrap();
    sqlx::query("set transaction isolation level repeatable read")
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query("select 1").execute(&mut *writer).await.unwrap();
    // ...the sequencer goes to sleep...
    assert!(batch(&pool, SLEEPY).await.sleeping);
    // ...and the write comes after: the lease is read as it is now, not as of then.
    sqlx::query(r#"update "ProjectUser" set "displayName" = 'late' where "projectUserId" = $1"#)
        .bind(user)
        .execute(&mut *writer)
        .await
        .unwrap();
    writer.commit().await.unwrap();

    assert!(writes_notified(&pool, &mut listener).await);
}

#[tokio::test]
async fn a_lease_that_is_not_renewed_runs_out() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    let mut listener = listener(&pool).await;
    let lease = Duration::from_millis(500);

    let before: i64 = sqlx::query_scalar("select external_db_sync_clock_ms()")
        .fetch_one(&pool)
        .await
        .unwrap();
    batch(&pool, Wakefulness::Awake { lease }).await;
    let after: i64 = sqlx::query_scalar("select external_db_sync_clock_ms()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let awake_until: i64 =
        sqlx::query_scalar("select last_value from external_db_sync_sequencer_awake_until")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        (before + 500..=after + 500).contains(&awake_until),
        "the lease lasts 500 ms from the batch: {before} .. {awake_until} .. {after}"
    );

    // The loop died without giving the lease up: once it ran out, writers notify.
    wait_until_no_lease(&pool, "the lease to run out").await;
    rename_user(&pool, user, "after the lease").await;
    assert!(writes_notified(&pool, &mut listener).await);
}

/// With timers that never fire within the test, only the notifications can bring a
/// write through: each write comes after the sequencer went to sleep.
#[tokio::test]
async fn serve_wakes_for_each_write_after_sleeping() {
    let app = TestApp::spawn_with(&[
        ("ALLOW_PRIVATE_TARGETS", "true"),
        ("RUN_WORKERS", "true"),
        ("SEQUENCER_IDLE_INTERVAL_MS", "3600000"),
        ("POLLER_IDLE_INTERVAL_MS", "3600000"),
    ])
    .await;
    let (tenancy, tenant) = tenancy_with_database(&app.pool).await;
    let mut listener = listener(&app.pool).await;

    for round in 0..3 {
        wait_until_no_lease(&app.pool, "the sequencer to sleep").await;
        let id = fixtures::user(&app.pool, tenancy, &format!("round {round}")).await;
        assert!(
            writes_notified(&app.pool, &mut listener).await,
            "the sleeping sequencer is notified"
        );
        wait_for_user(&tenant, id).await;
    }
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_that_relies_on_a_pending_request_wakes_the_pollers() {
    let pool = migrated_pool().await;
    let (_, user) = sequenced_user(&pool).await;
    let mut requests = listener_on(&pool, REQUESTS_CHANNEL).await;
    // The tenancy's request is pending (queued by the batch that numbered the user).
    let pending: i64 = sqlx::query_scalar(
        r#"select count(*) from "OutgoingRequest" where "startedFulfillingAt" is null"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending, 1);
    assert!(!notified(&pool, &mut requests, REQUESTS_CHANNEL).await);

    // A new change of the same tenancy: the batch queues nothing new, it relies on the
    // pending request, which it held locked while it ran. Pollers that skipped it then
    // must hear about it.
    rename_user(&pool, user, "changed").await;
    let relied = batch(&pool, AWAKE).await;
    assert_eq!((relied.tenancies, relied.requests_enqueued), (1, 0));
    assert!(notified(&pool, &mut requests, REQUESTS_CHANNEL).await);

    // A batch that numbers nothing stays quiet.
    let empty = batch(&pool, AWAKE).await;
    assert_eq!(empty.tenancies, 0);
    assert!(!notified(&pool, &mut requests, REQUESTS_CHANNEL).await);
}
