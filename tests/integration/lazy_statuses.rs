//! Statuses written lazily (DESIGN.md §11): a database's plain success is written with
//! its completion only if none was written lately; the others are kept, and written by
//! a pass once the interval is over, when the poller finishes, or when the process
//! stops. A success that changes a status (after a failure) is written at once, and a
//! kept one never undoes a failure recorded since. A process that dies loses only the
//! progress of the statuses it kept; the next process writes its first success at once.

use std::time::Duration;

use external_db_sync::poller::{InFlight, Poller, PollerSettings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::fixtures::{rename_user, request_key, sequence_all};
use crate::harness::polling::{direct_poller_settled, step, tenancy_synced_once};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, latest_change, recorded_error, recorded_status,
};
use crate::harness::wait;

/// A poller that writes a plain success at most every `interval` per database.
fn poller(pool: &PgPool, interval: Duration) -> Poller {
    direct_poller_settled(
        pool,
        PollerSettings {
            status_interval: interval,
            ..PollerSettings::default()
        },
    )
}

/// A tenancy with a database and a user, synced once (its first success is written at
/// once); the user's id.
async fn synced_tenancy(pool: &PgPool, poller: &Poller) -> (Uuid, PgPool, Uuid) {
    let (tenancy, tenant, ada) = tenancy_synced_once(pool, poller).await;
    let through = latest_change(pool, tenancy, "ProjectUser").await;
    assert_eq!(users_synced_through(pool, tenancy).await, Some(through));
    (tenancy, tenant, ada)
}

/// How far `"ExternalDbSyncStatus"` says the tenancy's database `main` has its users.
async fn users_synced_through(pool: &PgPool, tenancy: Uuid) -> Option<i64> {
    sqlx::query_scalar(
        r#"select "usersSyncedThrough" from "ExternalDbSyncStatus"
           where "tenancyId" = $1 and "databaseId" = 'main'"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Whether the database `main`'s next attempt is later than now; `None` when it has
/// none (it is due with every change).
async fn next_attempt_later(pool: &PgPool, tenancy: Uuid) -> Option<bool> {
    sqlx::query_scalar(
        r#"select "nextAttemptAt" > current_timestamp::timestamp(3) from "ExternalDbSyncStatus"
           where "tenancyId" = $1 and "databaseId" = 'main'"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Renames the user, numbers the change and starts its sync in `in_flight`; returns once
/// its request is completed (deleted), with the change's sequence id.
async fn sync_a_rename(
    pool: &PgPool,
    poller: &Poller,
    in_flight: &InFlight,
    tenancy: Uuid,
    user: Uuid,
    name: &str,
) -> i64 {
    rename_user(pool, user, name).await;
    sequence_all(pool, 1000).await;
    assert_eq!(step(poller, in_flight).await.claimed, 1);
    wait::until(
        "the request to be completed",
        Duration::from_secs(30),
        || async {
            let left: i64 = sqlx::query_scalar(
                r#"select count(*) from "OutgoingRequest" where "deduplicationKey" = $1"#,
            )
            .bind(request_key(tenancy))
            .fetch_one(pool)
            .await
            .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
    latest_change(pool, tenancy, "ProjectUser").await
}

/// Waits (20 s at most) until the status says the users are synced through `through`.
async fn wait_for_status(pool: &PgPool, tenancy: Uuid, through: i64) {
    wait::until(
        "the status to be written",
        Duration::from_secs(20),
        || async { (users_synced_through(pool, tenancy).await == Some(through)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_plain_success_soon_after_the_last_is_kept_and_written_when_the_poller_finishes() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_secs(60));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &poller).await;
    let first = users_synced_through(&pool, tenancy).await;

    let in_flight = InFlight::default();
    let second = sync_a_rename(&pool, &poller, &in_flight, tenancy, ada, "ada 2").await;
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    assert_eq!(
        users_synced_through(&pool, tenancy).await,
        first,
        "the completion did not write the status"
    );
    assert_eq!(poller.kept_statuses(), 1);

    poller.finish(&in_flight).await.unwrap();
    assert_eq!(users_synced_through(&pool, tenancy).await, Some(second));
    assert_eq!(poller.kept_statuses(), 0);
}

#[tokio::test]
async fn a_kept_success_is_written_by_a_pass_once_its_interval_is_over() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_secs(3));
    let (tenancy, _tenant, ada) = synced_tenancy(&pool, &poller).await;

    let in_flight = InFlight::default();
    let second = sync_a_rename(&pool, &poller, &in_flight, tenancy, ada, "ada 2").await;
    assert_eq!(
        poller.kept_statuses(),
        1,
        "written 3 s after the last, not before"
    );
    // No finish: the background pass writes it.
    wait_for_status(&pool, tenancy, second).await;
    assert_eq!(poller.kept_statuses(), 0);
}

#[tokio::test]
async fn kept_successes_are_written_when_the_process_stops() {
    let pool = migrated_pool().await;
    let stopping = CancellationToken::new();
    let poller = poller(&pool, Duration::from_secs(60)).stopping_on(stopping.clone());
    let (tenancy, _tenant, ada) = synced_tenancy(&pool, &poller).await;

    let in_flight = InFlight::default();
    let second = sync_a_rename(&pool, &poller, &in_flight, tenancy, ada, "ada 2").await;
    assert_eq!(poller.kept_statuses(), 1);
    stopping.cancel();
    wait_for_status(&pool, tenancy, second).await;
}

#[tokio::test]
async fn a_success_after_a_failure_is_written_with_its_completion() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_secs(60));
    let (tenancy, _tenant, ada) = synced_tenancy(&pool, &poller).await;
    // The database failed since (as another process would record it), and its next
    // attempt is due.
    sqlx::query(
        r#"update "ExternalDbSyncStatus" set "consecutiveFailures" = 2, "lastError" = 'refused',
               "nextAttemptAt" = current_timestamp - interval '1 second'
           where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .execute(&pool)
    .await
    .unwrap();

    let in_flight = InFlight::default();
    let second = sync_a_rename(&pool, &poller, &in_flight, tenancy, ada, "ada 2").await;
    let (_, succeeded, failures) = recorded_status(&pool, tenancy, "main").await;
    assert_eq!(
        (
            succeeded,
            failures,
            users_synced_through(&pool, tenancy).await
        ),
        (true, 0, Some(second)),
        "healed at once, not at the next pass"
    );
    assert_eq!(
        next_attempt_later(&pool, tenancy).await,
        None,
        "due with every change again"
    );
    assert_eq!(poller.kept_statuses(), 0);
}

/// A failure recorded after a kept success (by this process or another) stays: writing
/// the kept success later moves the watermark it reached forward and nothing else.
#[tokio::test]
async fn a_kept_success_written_later_never_undoes_a_failure_recorded_since() {
    let pool = migrated_pool().await;
    let poller = poller(&pool, Duration::from_secs(60));
    let (tenancy, _tenant, ada) = synced_tenancy(&pool, &poller).await;
    let in_flight = InFlight::default();
    let second = sync_a_rename(&pool, &poller, &in_flight, tenancy, ada, "ada 2").await;
    assert_eq!(poller.kept_statuses(), 1);
    // Another process records a failure of the database after that success.
    sqlx::query(
        r#"update "ExternalDbSyncStatus" set "consecutiveFailures" = 1, "lastError" = 'refused',
               "lastErrorAt" = current_timestamp,
               "nextAttemptAt" = current_timestamp + interval '1 minute',
               "updatedAt" = current_timestamp
           where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .execute(&pool)
    .await
    .unwrap();

    poller.finish(&in_flight).await.unwrap();
    let (error, _, failures) = recorded_error(&pool, tenancy, "main").await;
    assert_eq!(
        (error.as_deref(), failures),
        (Some("refused"), 1),
        "still failing"
    );
    assert_eq!(
        next_attempt_later(&pool, tenancy).await,
        Some(true),
        "its next attempt stays where the failure put it"
    );
    assert_eq!(
        users_synced_through(&pool, tenancy).await,
        Some(second),
        "the watermark it reached is recorded"
    );
    assert_eq!(poller.kept_statuses(), 0);
}

/// A process that dies loses what it kept: the status lags, the data does not, and the
/// next process writes its first success of the database at once.
#[tokio::test]
async fn statuses_kept_by_a_process_that_dies_lag_and_the_next_process_catches_them_up() {
    let pool = migrated_pool().await;
    let dying = poller(&pool, Duration::from_secs(60));
    let (tenancy, tenant, ada) = synced_tenancy(&pool, &dying).await;
    let first = users_synced_through(&pool, tenancy).await;
    let in_flight = InFlight::default();
    sync_a_rename(&pool, &dying, &in_flight, tenancy, ada, "ada 2").await;
    assert_eq!(dying.kept_statuses(), 1);
    drop(in_flight);
    drop(dying);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    assert_eq!(users_synced_through(&pool, tenancy).await, first, "lags");

    let next = poller(&pool, Duration::from_secs(60));
    let in_flight = InFlight::default();
    let third = sync_a_rename(&pool, &next, &in_flight, tenancy, ada, "ada 3").await;
    assert_eq!(users_synced_through(&pool, tenancy).await, Some(third));
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}
