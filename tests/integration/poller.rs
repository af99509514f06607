//! The poller and the queue: publishing in `direct` mode, failures that keep requests,
//! leases that expire, wake-ups that are never lost, the fusebox, and `serve` doing it all
//! on its own.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use external_db_sync::db::fusebox;
use external_db_sync::db::queue::{self, Claimant};
use external_db_sync::db::sync_status::{Backoff, RetrySchedule, RETRY_REQUEST_KEY_PREFIX};
use external_db_sync::mapping::Mapping;
use external_db_sync::poller::{InFlight, Poller};
use external_db_sync::sync::SyncSettings;
use external_db_sync::workers::Outcome;
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::harness::app::{TestApp, CRON_SECRET, PREFIX};
use crate::harness::fixtures::{
    delete_channel, delete_user, email, pending_request_keys, rename_user, request_key,
    sequence_all, tenancy, tenancy_with_placeholder_database, tenant_database, user,
};
use crate::harness::polling::{
    direct_poller, direct_poller_leasing, direct_poller_with, poll_once, step,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::reads;
use crate::harness::sync::{
    assert_tenant_matches_source, attach, external_channels, external_users, hold_mapping_lock,
    let_time_pass, recorded_error, recorded_status, tenancy_with_database, test_settings,
    two_tenancies_with_users, wait_for_user, watermark,
};
use crate::harness::wait;

fn retry_key(tenancy: Uuid) -> String {
    format!("{RETRY_REQUEST_KEY_PREFIX}{tenancy}")
}

/// `(attempts, lastError, in flight, due now)` of the tenancy's requests.
async fn request_states(pool: &PgPool, tenancy: Uuid) -> Vec<(i32, Option<String>, bool, bool)> {
    sqlx::query_as(
        r#"select "attempts", "lastError", "startedFulfillingAt" is not null,
                  "nextAttemptAt" <= current_timestamp::timestamp(3)
           from "OutgoingRequest" where "deduplicationKey" = $1 order by "createdAt""#,
    )
    .bind(request_key(tenancy))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn direct_mode_end_to_end_with_two_cron_calls() {
    let app = TestApp::spawn_with(&[("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let [(first, first_tenant), (second, second_tenant)] =
        two_tenancies_with_users(&app.pool).await;

    app.run_sequencer("stopWhenIdle=true").await;
    let answer = app.run_poller("stopWhenIdle=true").await;

    assert_eq!(answer["published"], 2, "{answer}");
    assert_eq!(answer["failed"], 0);
    assert_eq!(answer["stopReason"], "idle");
    assert_tenant_matches_source(&app.pool, first, &first_tenant).await;
    assert_tenant_matches_source(&app.pool, second, &second_tenant).await;
    assert_eq!(external_users(&second_tenant).await.len(), 2);
    assert!(pending_request_keys(&app.pool).await.is_empty());
}

#[tokio::test]
async fn serve_alone_brings_a_write_to_the_tenant_database() {
    let app =
        TestApp::spawn_with(&[("ALLOW_PRIVATE_TARGETS", "true"), ("RUN_WORKERS", "true")]).await;
    let (tenancy, tenant) = tenancy_with_database(&app.pool).await;

    let id = user(&app.pool, tenancy, "written once").await;

    wait_for_user(&tenant, id).await;
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    app.stop().await.unwrap();
}

/// `(consecutiveFailures, whether "nextAttemptAt" is ahead)` of a database.
async fn retry_state(pool: &PgPool, tenancy: Uuid, database_id: &str) -> (i32, bool) {
    sqlx::query_as(
        r#"select "consecutiveFailures",
                  coalesce("nextAttemptAt" > current_timestamp::timestamp(3), false)
           from "ExternalDbSyncStatus" where "tenancyId" = $1 and "databaseId" = $2"#,
    )
    .bind(tenancy)
    .bind(database_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A tenancy with one change queued and one database, `main`, where nothing listens
/// (port 1: connection refused, a retryable failure).
async fn tenancy_whose_database_refuses(pool: &PgPool) -> Uuid {
    let tenancy = tenancy(pool).await;
    attach(
        pool,
        tenancy,
        &[("main", "postgres://sync@127.0.0.1:1/tenant")],
    )
    .await;
    user(pool, tenancy, "waits").await;
    sequence_all(pool, 1000).await;
    tenancy
}

/// A direct poller (4 slots) whose failed databases are attempted again `after` their
/// failure, retryable or not.
fn poller_retrying_after(pool: &PgPool, after: Duration) -> Poller {
    let backoff = Backoff {
        first: after,
        max: after,
    };
    let settings = SyncSettings {
        retry: RetrySchedule {
            retryable: backoff,
            permanent: backoff,
        },
        ..test_settings()
    };
    direct_poller_with(pool, 4, settings)
}

/// A database that fails completes its request all the same: it is retried by a retry
/// request of its own when its next attempt is due, not by the tenancy's next change,
/// and a change meanwhile syncs without attempting it.
#[tokio::test]
async fn a_failing_database_is_retried_by_its_own_request_when_due() {
    let pool = migrated_pool().await;
    let tenancy = tenancy_whose_database_refuses(&pool).await;
    let poller = poller_retrying_after(&pool, Duration::from_secs(60));

    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (1, 1, 0));
    assert!(request_states(&pool, tenancy).await.is_empty());
    assert_eq!(retry_state(&pool, tenancy, "main").await, (1, true));
    assert_eq!(pending_request_keys(&pool).await, [retry_key(tenancy)]);
    let (_, retryable, _) = recorded_error(&pool, tenancy, "main").await;
    assert_eq!(retryable, Some(true));
    // Not due yet: a change syncs the tenancy without attempting the database.
    user(&pool, tenancy, "second").await;
    sequence_all(&pool, 1000).await;
    let batch = poll_once(&poller).await;
    assert_eq!((batch.claimed, batch.published), (1, 1));
    assert_eq!(retry_state(&pool, tenancy, "main").await, (1, true));
    assert_eq!(poll_once(&poller).await.claimed, 0);

    // Its time comes: attempted again, with no change, and still down.
    let_time_pass(&pool).await;
    assert_eq!(poll_once(&poller).await.claimed, 1);
    assert_eq!(retry_state(&pool, tenancy, "main").await, (2, true));

    // The database comes back: its entry changed, so it is due at once, and the change
    // queued a sync of the tenancy beside the retry request; they bring everything over.
    let (url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &url)]).await;
    sqlx::query(r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp"#)
        .execute(&pool)
        .await
        .unwrap();
    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published), (2, 2));
    // One of the two syncs attempted the database; the other found it reserved for that
    // attempt and planned a retry for when the reservation would run out (it will find
    // nothing to do). No change request is left.
    assert_eq!(
        pending_request_keys(&pool).await,
        [retry_key(tenancy)],
        "only the planned retry is left"
    );
    assert_eq!(retry_state(&pool, tenancy, "main").await, (0, false));
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn malformed_requests_fail_alone_and_the_others_in_their_claim_are_published() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "valid").await;
    sequence_all(&pool, 1000).await;
    // Rows no producer of ours writes, but someone with access to the table could:
    // tenancy ids that are no uuid, one of them shaped like one.
    for (key, body) in [
        ("broken:1", json!({ "tenancyId": "not-a-uuid" })),
        (
            "broken:2",
            json!({ "tenancyId": "------------------------------------" }),
        ),
        ("broken:3", json!({ "tenant": 42 })),
    ] {
        sqlx::query(
            r#"insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
               values ($1, jsonb_build_object('url', 'x', 'body', $2::jsonb))"#,
        )
        .bind(key)
        .bind(body)
        .execute(&pool)
        .await
        .unwrap();
    }
    let poller = direct_poller(&pool, 8);

    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (4, 1, 3));
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    let kept: Vec<(String, Option<String>)> = sqlx::query_as(
        r#"select "deduplicationKey", "lastError" from "OutgoingRequest"
           order by "deduplicationKey""#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let keys: Vec<&str> = kept.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["broken:1", "broken:2", "broken:3"]);
    for (key, error) in &kept {
        assert!(
            error
                .as_deref()
                .is_some_and(|error| error.contains("tenancyId")),
            "{key}: {error:?}"
        );
    }
}

#[tokio::test]
async fn a_request_for_a_deleted_tenancy_is_published_and_does_nothing() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "soon gone").await;
    sequence_all(&pool, 1000).await;
    sqlx::query(r#"delete from "Tenancy" where "id" = $1"#)
        .bind(tenancy)
        .execute(&pool)
        .await
        .unwrap();
    let poller = direct_poller(&pool, 4);

    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (1, 1, 0));
    assert!(request_states(&pool, tenancy).await.is_empty());
    let untouched: bool = sqlx::query_scalar("select to_regclass('users') is null")
        .fetch_one(&tenant)
        .await
        .unwrap();
    assert!(untouched, "nothing was created in the tenant database");
}

/// A direct sync skips a mapping whose latest change, as the claim read it, is not after
/// the watermark the process knows; every other mapping is synced, deletions included
/// (their latest change is a tombstone).
#[tokio::test]
async fn claimed_syncs_skip_only_the_mappings_that_have_no_new_change() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let kept = user(&pool, tenancy, "kept").await;
    let leaving = user(&pool, tenancy, "leaving").await;
    let channel = email(&pool, tenancy, kept, "kept@example.com", true).await;
    email(&pool, tenancy, leaving, "leaving@example.com", true).await;
    // One poller, so one engine that remembers the watermarks from sync to sync.
    let poller = direct_poller(&pool, 4);
    sequence_all(&pool, 1000).await;
    assert_eq!(poll_once(&poller).await.published, 1);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    let sync_step = |step: &'static str| {
        let (pool, poller, tenant) = (&pool, &poller, &tenant);
        async move {
            sequence_all(pool, 1000).await;
            let batch = poll_once(poller).await;
            assert_eq!((batch.claimed, batch.published), (1, 1), "{step}");
            assert_tenant_matches_source(pool, tenancy, tenant).await;
        }
    };

    // Twice: after the first, the users' watermark is past every channel's id, so a
    // mix-up of the two mappings' latest changes would skip the second.
    rename_user(&pool, kept, "renamed").await;
    sync_step("a user-only change").await;
    rename_user(&pool, kept, "renamed again").await;
    sync_step("another user-only change").await;
    delete_channel(&pool, channel).await;
    sync_step("a deleted channel").await;
    delete_user(&pool, leaving).await;
    sync_step("a deleted user").await;

    assert_eq!(external_users(&tenant).await.len(), 1);
    assert!(external_channels(&tenant).await.is_empty());
}

/// A direct sync records its databases' successes with the request's completion, and a
/// failure of one of them at once; the request completes either way.
#[tokio::test]
async fn direct_syncs_record_every_database_status_whether_it_succeeded_or_not() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let (url, tenant) = tenant_database().await;
    // Nothing listens on port 1: connection refused, a retryable failure.
    attach(
        &pool,
        tenancy,
        &[
            ("good", &url),
            ("down", "postgres://sync@127.0.0.1:1/tenant"),
        ],
    )
    .await;
    let first = user(&pool, tenancy, "first").await;
    let channel = email(&pool, tenancy, first, "first@example.com", true).await;
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 4);

    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (1, 1, 0));
    let synced_through = watermark(&tenant, "users")
        .await
        .min(watermark(&tenant, "contact_channels").await);
    assert_eq!(
        recorded_status(&pool, tenancy, "good").await,
        (Some(synced_through), true, 0)
    );
    assert_eq!(
        recorded_status(&pool, tenancy, "down").await,
        (None, false, 1)
    );

    // The second database is dropped from the configuration; the next sync (and the
    // retry request of the failed database, due at once here) complete.
    attach(&pool, tenancy, &[("good", &url)]).await;
    crate::harness::fixtures::verify_channel(&pool, channel).await;
    sequence_all(&pool, 1000).await;
    let batch = poll_once(&poller).await;

    assert!(
        batch.claimed >= 1 && batch.published == batch.claimed,
        "{batch:?}"
    );
    assert!(pending_request_keys(&pool).await.is_empty());
    let newest = watermark(&tenant, "users")
        .await
        .min(watermark(&tenant, "contact_channels").await);
    assert!(newest > synced_through);
    assert_eq!(
        recorded_status(&pool, tenancy, "good").await,
        (Some(newest), true, 0)
    );
}

/// `"nextAttemptAt"` keeps milliseconds, rounded: a request made due at this very
/// moment may be stored as up to half a millisecond later. It is due all the same.
#[tokio::test]
async fn a_request_due_this_very_moment_is_claimed() {
    let pool = migrated_pool().await;
    let tenancy = tenancy_with_placeholder_database(&pool).await;
    user(&pool, tenancy, "first").await;
    sequence_all(&pool, 1000).await;

    // Twenty tries, each in one transaction, so that the claim's "now" is the very
    // moment the request was made due; about half of such moments round up.
    for _ in 0..20 {
        let mut transaction = pool.begin().await.unwrap();
        sqlx::query(r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp"#)
            .execute(&mut *transaction)
            .await
            .unwrap();
        let claimed = queue::claim(
            &mut *transaction,
            10,
            Duration::from_secs(300),
            Claimant::Syncer,
        )
        .await
        .unwrap();
        assert_eq!(claimed.len(), 1);
        transaction.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn a_claim_whose_poller_died_is_taken_over_after_its_lease() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "orphaned").await;
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 4);
    // A poller claims the request and dies before publishing it.
    let claimed = queue::claim(&pool, 10, Duration::from_secs(300), Claimant::Syncer)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    drop(claimed);

    // While the lease holds, nobody else takes it.
    assert_eq!(poll_once(&poller).await.claimed, 0);

    // Ten minutes later (the claim is back-dated rather than waited for).
    sqlx::query(
        r#"update "OutgoingRequest"
           set "startedFulfillingAt" = "startedFulfillingAt" - interval '10 minutes'"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published), (1, 1));
    assert!(request_states(&pool, tenancy).await.is_empty());
    assert_eq!(external_users(&tenant).await.len(), 1);
}

#[tokio::test]
async fn a_change_while_a_request_is_in_flight_leaves_exactly_one_pending_request() {
    let pool = migrated_pool().await;
    let tenancy = tenancy_with_placeholder_database(&pool).await;
    let id = user(&pool, tenancy, "first").await;
    sequence_all(&pool, 1000).await;
    // Many more changes while the request is pending: still one request.
    for n in 0..5 {
        crate::harness::fixtures::rename_user(&pool, id, &format!("pending {n}")).await;
        sequence_all(&pool, 1000).await;
    }
    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);
    let in_flight = queue::claim(&pool, 10, Duration::from_secs(300), Claimant::Syncer)
        .await
        .unwrap();
    assert!(pending_request_keys(&pool).await.is_empty());

    for n in 0..5 {
        crate::harness::fixtures::rename_user(&pool, id, &format!("in flight {n}")).await;
        sequence_all(&pool, 1000).await;
    }

    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);
    assert_eq!(
        request_states(&pool, tenancy).await.len(),
        2,
        "one in flight, one pending"
    );
    // The in-flight one fails: it merges into the pending one, which keeps its record.
    queue::release(
        &pool,
        &in_flight[0],
        "tenant database down",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let states = request_states(&pool, tenancy).await;
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].0, 1, "the attempt is remembered");
    assert_eq!(states[0].1.as_deref(), Some("tenant database down"));
}

#[tokio::test]
async fn the_fusebox_stops_and_resumes_the_poller_and_the_sequencer() {
    let app = TestApp::spawn_with(&[("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let (tenancy, tenant) = tenancy_with_database(&app.pool).await;
    user(&app.pool, tenancy, "held back").await;
    let read = app
        .request(Method::GET, &format!("{PREFIX}/fusebox"), Some(CRON_SECRET))
        .await;
    assert_eq!(read.status(), 200);
    assert_eq!(
        read.json::<serde_json::Value>().await.unwrap(),
        json!({ "ok": true, "sequencer_enabled": true, "poller_enabled": true })
    );

    let answer = app
        .set_fusebox(json!({ "sequencer_enabled": false, "poller_enabled": false }))
        .await;
    assert_eq!(answer["poller_enabled"], false);
    let sequencer = app.run_sequencer("stopWhenIdle=true").await;
    assert_eq!(sequencer["stopReason"], "disabled");
    assert_eq!(sequencer["sequenced"]["projectUsers"], 0);
    assert_the_sequencer_is_switched_off(&app.pool).await;
    let poller = app.run_poller("stopWhenIdle=true").await;
    assert_eq!(poller["stopReason"], "disabled");
    assert_eq!(poller["claimed"], 0);

    app.set_fusebox(json!({ "sequencer_enabled": true })).await;
    app.run_sequencer("stopWhenIdle=true").await;
    let poller = app.run_poller("stopWhenIdle=true").await;
    assert_eq!(poller["claimed"], 0, "the poller is still off");
    assert_eq!(
        pending_request_keys(&app.pool).await,
        [request_key(tenancy)]
    );

    app.set_fusebox(json!({ "poller_enabled": true })).await;
    let poller = app.run_poller("stopWhenIdle=true").await;
    assert_eq!(poller["published"], 1);
    assert_eq!(external_users(&tenant).await.len(), 1);
}

/// The sequencer's run-once function, as the in-process loop calls it, honours the
/// fusebox too.
async fn assert_the_sequencer_is_switched_off(pool: &PgPool) {
    let settings = external_db_sync::sequencer::SequencerSettings {
        batch_size: 100,
        idle_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let run = external_db_sync::sequencer::run_once(pool, &settings)
        .await
        .unwrap();
    assert_eq!(run, external_db_sync::sequencer::SequencerRun::Disabled);
}

#[tokio::test]
async fn the_poller_and_fusebox_routes_require_the_bearer() {
    let app = TestApp::spawn().await;
    for (method, route) in [
        (Method::GET, "poller"),
        (Method::POST, "poller"),
        (Method::GET, "fusebox"),
        (Method::POST, "fusebox"),
    ] {
        let path = format!("{PREFIX}/{route}");
        for bearer in [None, Some("wrong-secret-of-enough-length"), Some("")] {
            let response = app.request(method.clone(), &path, bearer).await;
            assert_eq!(response.status(), 401, "{method} {route} {bearer:?}");
            assert!(response.headers().contains_key("www-authenticate"));
        }
    }
    let bad = app
        .post(
            &format!("{PREFIX}/fusebox"),
            br#"{"poller_enabled": "yes"}"#.to_vec(),
            &[("authorization", format!("Bearer {CRON_SECRET}"))],
        )
        .await;
    assert_eq!(bad.status(), 400);
}

/// A tenancy whose request is claimed (in flight) and whose next change queued another,
/// pending behind it: the tenancy, its user and the claimed request.
async fn a_request_pending_behind_one_in_flight(
    pool: &PgPool,
    lease: Duration,
) -> (Uuid, Uuid, queue::ClaimedRequest) {
    let tenancy = tenancy_with_placeholder_database(pool).await;
    let id = user(pool, tenancy, "first").await;
    sequence_all(pool, 1000).await;
    let mut first = queue::claim(pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    rename_user(pool, id, "second").await;
    sequence_all(pool, 1000).await;
    (tenancy, id, first.remove(0))
}

#[tokio::test]
async fn a_pending_request_waits_while_its_tenancy_is_in_flight() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(300);
    let (tenancy, id, first) = a_request_pending_behind_one_in_flight(&pool, lease).await;
    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);

    // Due, but its tenancy is in flight: a second sync would only queue behind the first.
    assert!(queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap()
        .is_empty());

    // Settled: the pending request is claimable at once.
    queue::complete(&pool, first.id, None).await.unwrap();
    let second = queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].id, first.id);

    // A claim whose lease ran out holds nothing back.
    crate::harness::fixtures::rename_user(&pool, id, "third").await;
    sequence_all(&pool, 1000).await;
    sqlx::query(
        r#"update "OutgoingRequest" set "startedFulfillingAt" = "startedFulfillingAt" - interval '10 minutes'
           where "id" = $1"#,
    )
    .bind(second[0].id)
    .execute(&pool)
    .await
    .unwrap();
    let mut ids: Vec<Uuid> = queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap()
        .into_iter()
        .map(|request| request.id)
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 2, "the expired claim and the pending request");
    assert!(ids.contains(&second[0].id));
}

#[tokio::test]
async fn the_poller_claims_only_as_many_requests_as_it_has_free_sync_slots() {
    let pool = migrated_pool().await;
    for name in ["one", "two", "three"] {
        let (tenancy, _) = tenancy_with_database(&pool).await;
        user(&pool, tenancy, name).await;
    }
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 2);
    let in_flight = InFlight::default();

    let batch = step(&poller, &in_flight).await;

    assert_eq!(batch.claimed, 2);
    assert_eq!(
        pending_request_keys(&pool).await.len(),
        1,
        "one left for later"
    );
    let finished = poller.finish(&in_flight).await.unwrap();
    assert_eq!((finished.published, finished.failed), (2, 0));
    let rest = poll_once(&poller).await;
    assert_eq!((rest.claimed, rest.published), (1, 1));
    assert!(pending_request_keys(&pool).await.is_empty());
}

#[tokio::test]
async fn a_slow_tenancy_does_not_hold_up_the_others() {
    let pool = migrated_pool().await;
    let (slow, slow_tenant) = tenancy_with_database(&pool).await;
    let (busy, busy_tenant) = tenancy_with_database(&pool).await;
    user(&pool, slow, "slow").await;
    user(&pool, busy, "busy").await;
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 2);
    poll_once(&poller).await;
    assert_eq!(external_users(&slow_tenant).await.len(), 1);

    // Another writer holds the slow tenancy's users lock: its next sync waits on it.
    let blocker = hold_mapping_lock(&slow_tenant, Mapping::Users).await;
    user(&pool, slow, "slow again").await;
    user(&pool, busy, "busy again").await;
    sequence_all(&pool, 1000).await;
    let in_flight = InFlight::default();
    let mut total = step(&poller, &in_flight).await;
    assert_eq!(total.claimed, 2);

    // The busy tenancy's sync ends and is settled while the slow one still waits...
    wait_until_synced(&pool, busy, &busy_tenant, 2).await;
    // ...and its next change takes the free slot.
    user(&pool, busy, "busy a third time").await;
    sequence_all(&pool, 1000).await;
    let second = step(&poller, &in_flight).await;
    assert_eq!(second.claimed, 1);
    total.add(&second);
    wait_until_synced(&pool, busy, &busy_tenant, 3).await;
    let slow_states = request_states(&pool, slow).await;
    assert_eq!(slow_states.len(), 1);
    assert!(slow_states[0].2, "the slow tenancy is still in flight");
    assert_eq!(external_users(&slow_tenant).await.len(), 1);

    blocker.rollback().await.unwrap();
    total.add(&poller.finish(&in_flight).await.unwrap());
    assert_eq!((total.claimed, total.published, total.failed), (3, 3, 0));
    assert_tenant_matches_source(&pool, slow, &slow_tenant).await;
    assert_tenant_matches_source(&pool, busy, &busy_tenant).await;
}

/// A sync that runs longer than the lease keeps its claim: its poller renews the lease
/// while the sync runs, so no other poller takes the request over meanwhile and syncs
/// the tenancy a second time.
#[tokio::test]
async fn a_sync_longer_than_its_lease_keeps_its_claim() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let lease = Duration::from_secs(3);
    let poller = direct_poller_leasing(&pool, 2, lease);
    // Another writer holds the users lock: the sync waits on it.
    let blocker = hold_mapping_lock(&tenant, Mapping::Users).await;
    user(&pool, tenancy, "slow").await;
    sequence_all(&pool, 1000).await;
    let in_flight = InFlight::default();
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    let claimed_at = claim_time(&pool, tenancy).await;

    // Two leases after the claim, the sync still waits, and the claim still holds.
    wait::until(
        "two leases since the claim",
        Duration::from_secs(20),
        || async {
            let since: f64 =
                sqlx::query_scalar("select extract(epoch from (current_timestamp - $1))::float8")
                    .bind(claimed_at)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (since > 2.0 * lease.as_secs_f64()).then_some(())
        },
    )
    .await;
    assert!(
        claim_time(&pool, tenancy).await > claimed_at,
        "the lease was renewed"
    );
    let taken_over = queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap();
    assert!(taken_over.is_empty(), "taken over: {taken_over:?}");

    blocker.rollback().await.unwrap();
    let batch = poller.finish(&in_flight).await.unwrap();
    assert_eq!((batch.published, batch.failed), (1, 0));
    assert!(request_states(&pool, tenancy).await.is_empty());
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A publish whose lease was renewed still settles its request: stopped while its sync
/// waits, it gives the request back at once under the renewed claim, rather than
/// leaving it claimed until the lease runs out.
#[tokio::test]
async fn a_renewed_claim_is_given_back_when_the_process_stops() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let stopping = tokio_util::sync::CancellationToken::new();
    let poller =
        direct_poller_leasing(&pool, 2, Duration::from_secs(3)).stopping_on(stopping.clone());
    let blocker = hold_mapping_lock(&tenant, Mapping::Users).await;
    user(&pool, tenancy, "slow").await;
    sequence_all(&pool, 1000).await;
    let in_flight = InFlight::default();
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    let claimed_at = claim_time(&pool, tenancy).await;
    wait::until("the lease renewed", Duration::from_secs(20), || async {
        (claim_time(&pool, tenancy).await > claimed_at).then_some(())
    })
    .await;

    stopping.cancel();
    let batch = poller.finish(&in_flight).await.unwrap();

    assert_eq!((batch.published, batch.failed), (0, 1));
    let states = request_states(&pool, tenancy).await;
    assert_eq!(states.len(), 1);
    assert!(
        !states[0].2,
        "the request is no longer in flight: {states:?}"
    );
    blocker.rollback().await.unwrap();
}

/// When nothing is due but a pending request comes due before the idle timer would end
/// (a retry, a request given back with backoff), the in-process loop is told to look
/// again then, rather than after the idle interval.
#[tokio::test]
async fn the_loop_looks_again_when_the_next_pending_request_comes_due() {
    let pool = migrated_pool().await;
    let (tenancy, _tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "later").await;
    sequence_all(&pool, 1000).await;
    let due_in = |seconds: i32| {
        sqlx::query(
            r#"update "OutgoingRequest"
               set "nextAttemptAt" = current_timestamp + make_interval(secs => $1)"#,
        )
        .bind(f64::from(seconds))
        .execute(&pool)
    };
    due_in(2).await.unwrap();
    // Idle interval: 5 s.
    let poller = direct_poller(&pool, 2);
    let in_flight = InFlight::default();

    let outcome = poller.loop_step(&in_flight).await.unwrap();

    match outcome {
        Outcome::Recheck(pause) => assert!(
            pause > Duration::ZERO && pause <= Duration::from_secs(2),
            "{pause:?}"
        ),
        other => panic!("not told to look again: {other:?}"),
    }
    let run = poller.run_once(&in_flight).await.unwrap();
    assert_eq!(
        run.outcome(100),
        Outcome::Idle,
        "a cron call stops when idle"
    );
    // Due in a minute: the idle timer comes first.
    due_in(60).await.unwrap();
    assert_eq!(poller.loop_step(&in_flight).await.unwrap(), Outcome::Idle);
}

/// The loop's publishes wake it only when their end may free work (nothing else wakes
/// this loop: no timer, no queue notification). An end that frees nothing does not; a
/// request held back because its tenancy's sync is in flight is claimed when that sync
/// ends: the claim that found it held back (here one that claimed nothing) asked for
/// the next end.
#[tokio::test]
async fn a_request_held_back_by_its_tenancys_sync_in_flight_is_claimed_when_that_sync_ends() {
    let pool = migrated_pool().await;
    let (slow, slow_tenant) = tenancy_with_database(&pool).await;
    let (quick, quick_tenant) = tenancy_with_database(&pool).await;
    let poller = direct_poller(&pool, 4);
    let wake = Arc::new(Notify::new());
    let in_flight = InFlight::for_loop(wake.clone());
    let woken = || tokio::time::timeout(Duration::from_secs(20), wake.notified());
    sequence_all(&pool, 1000).await;
    poll_once(&poller).await;
    assert!(pending_request_keys(&pool).await.is_empty());

    // The slow tenancy's sync waits on a lock another writer holds.
    let blocker = hold_mapping_lock(&slow_tenant, Mapping::Users).await;
    let id = user(&pool, slow, "first").await;
    sequence_all(&pool, 1000).await;
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    // The quick tenancy's sync ends at once, and nothing waited for it: its end is
    // counted, and wakes nobody.
    user(&pool, quick, "quick").await;
    sequence_all(&pool, 1000).await;
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    wait_until_counted(&poller, &in_flight, 1).await;
    assert!(
        wake.notified().now_or_never().is_none(),
        "an end that freed nothing woke the loop"
    );
    wait_until_synced(&pool, quick, &quick_tenant, 1).await;

    // A change of the slow tenancy is due, but held back behind its sync in flight.
    rename_user(&pool, id, "second").await;
    sequence_all(&pool, 1000).await;
    assert_eq!(
        poller.loop_step(&in_flight).await.unwrap(),
        Outcome::Waiting,
        "nothing claimed; the slow sync is still in flight"
    );
    assert!(wake.notified().now_or_never().is_none(), "nothing ended");

    // The slow sync ends, and its end wakes the loop, which claims the held-back request.
    blocker.rollback().await.unwrap();
    woken()
        .await
        .expect("the end of the sync that held a request back wakes the loop");
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    let finished = poller.finish(&in_flight).await.unwrap();
    assert_eq!(finished.failed, 0);
    assert!(pending_request_keys(&pool).await.is_empty());
    assert_tenant_matches_source(&pool, slow, &slow_tenant).await;
    assert_tenant_matches_source(&pool, quick, &quick_tenant).await;
}

/// The same, when the claim that finds a request held back takes others: it reads in
/// the same statement that one waits, and asks for the next end. Driven by wake-ups
/// alone, the held-back request is claimed once the sync holding it ends.
#[tokio::test]
async fn a_claim_that_takes_requests_and_finds_one_held_back_asks_for_the_next_end() {
    let pool = migrated_pool().await;
    let (slow, slow_tenant) = tenancy_with_database(&pool).await;
    let (quick, quick_tenant) = tenancy_with_database(&pool).await;
    let poller = direct_poller(&pool, 4);
    let wake = Arc::new(Notify::new());
    let in_flight = InFlight::for_loop(wake.clone());
    sequence_all(&pool, 1000).await;
    poll_once(&poller).await;

    let blocker = hold_mapping_lock(&slow_tenant, Mapping::Users).await;
    let id = user(&pool, slow, "first").await;
    sequence_all(&pool, 1000).await;
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    // Held back behind the slow sync, and a change of the quick tenancy beside it: one
    // claim takes the quick one and sees the other wait.
    rename_user(&pool, id, "second").await;
    user(&pool, quick, "quick").await;
    sequence_all(&pool, 1000).await;
    let (poller, in_flight, wake) = (&poller, &in_flight, &wake);
    let step_claims = |claimed: u64| async move {
        assert_eq!(step(poller, in_flight).await.claimed, claimed);
    };
    step_claims(1).await;

    // From here only wake-ups drive the loop. The quick sync's end wakes it (the claim
    // wanted it); that step claims nothing and asks again; the slow sync's end then
    // wakes it into the claim of the held-back request.
    let woken = |why: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(20), wake.notified())
            .await
            .unwrap_or_else(|_| panic!("not woken: {why}"));
    };
    woken("the quick sync ended after a claim that saw a request held back").await;
    step_claims(0).await;
    blocker.rollback().await.unwrap();
    woken("the slow sync, which held the request back, ended").await;
    step_claims(1).await;
    let finished = poller.finish(in_flight).await.unwrap();
    assert_eq!(finished.failed, 0);
    assert!(pending_request_keys(&pool).await.is_empty());
    assert_tenant_matches_source(&pool, slow, &slow_tenant).await;
    assert_tenant_matches_source(&pool, quick, &quick_tenant).await;
}

/// What a poller that claimed nothing reads next is a later snapshot than its claim's.
/// A request the claim found held back by its tenancy's sync in flight may be free by
/// then: that sync was settled in between, and its end, which came before anyone asked
/// for it, woke no one. The read says so (claimable), rather than "nothing held back,
/// nothing due", after which the loop slept with the request due.
#[tokio::test]
async fn a_request_freed_between_an_empty_claim_and_the_read_after_it_is_claimable() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(300);
    let (_, _, first) = a_request_pending_behind_one_in_flight(&pool, lease).await;

    // The claim finds the new request held back.
    assert!(queue::claim(&pool, 10, lease, Claimant::Syncer)
        .await
        .unwrap()
        .is_empty());
    let held = queue::after_empty_claim(&pool, lease).await.unwrap();
    assert!(held.held_back && !held.claimable, "{held:?}");

    // The sync in flight is settled before the read that follows the claim.
    queue::complete(&pool, first.id, None).await.unwrap();
    let freed = queue::after_empty_claim(&pool, lease).await.unwrap();
    assert!(!freed.held_back && freed.claimable, "{freed:?}");
}

/// A switched-off poller still claims at each queue notification (to notice being
/// switched on), and reads after each empty claim; then only the fusebox is read, not
/// the queue. Switched on, the same read looks at the queue (and finds the request due).
#[tokio::test]
async fn a_switched_off_poller_reads_no_request_after_an_empty_claim() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(300);
    // One request pending (configuring the database may have queued it already).
    let (tenancy, _) = tenancy_with_database(&pool).await;
    queue::enqueue_sync(&pool, tenancy).await.unwrap();
    assert_eq!(pending_request_keys(&pool).await.len(), 1);

    // Scans of the queue by the read, in a transaction of its own.
    async fn queue_reads(pool: &PgPool, lease: Duration) -> (queue::AfterEmptyClaim, i64) {
        let mut transaction = pool.begin().await.unwrap();
        let before = reads::counts(&mut transaction, &["OutgoingRequest"]).await;
        let after = queue::after_empty_claim(&mut *transaction, lease)
            .await
            .unwrap();
        let read = reads::since(&mut transaction, before).await;
        transaction.rollback().await.unwrap();
        (after, read[0].scans())
    }

    fusebox::write(&pool, None, Some(false)).await.unwrap();
    let (off, scans) = queue_reads(&pool, lease).await;
    assert!(!off.enabled, "{off:?}");
    assert_eq!(scans, 0, "the queue was read while the poller was off");

    fusebox::write(&pool, None, Some(true)).await.unwrap();
    let (on, scans) = queue_reads(&pool, lease).await;
    assert!(on.enabled && on.claimable && !on.held_back, "{on:?}");
    assert!(scans > 0, "switched on, the read looks at the queue");
}

/// A claim reads the queue a few times over, however many requests it looks at: the keys
/// of the requests in flight once (not once for each pending request, to see whether its
/// tenancy has one), and each claimed request's message with the claim itself (not read
/// again for each). Measured with every read a sequential scan, the plan the planner
/// chose under `cost` while it took the queue for small (each claim of four requests
/// read it about twelve times over, a few hundred pages of rows its churn had left).
#[tokio::test]
async fn a_claim_reads_the_queue_a_few_times_over_however_many_requests_it_takes() {
    let pool = migrated_pool().await;
    let lease = Duration::from_secs(300);
    const TAKEN: usize = 12;
    // TAKEN tenancies with a request in flight, then TAKEN others with one pending, and
    // one pending behind a request in flight (held back).
    for _ in 0..TAKEN {
        queue::enqueue_sync(&pool, Uuid::new_v4()).await.unwrap();
    }
    let in_flight = queue::claim(&pool, TAKEN as u32, lease, Claimant::Publisher)
        .await
        .unwrap();
    assert_eq!(in_flight.len(), TAKEN);
    let held = in_flight[0].tenancy_id().unwrap();
    queue::enqueue_sync(&pool, held).await.unwrap();
    for _ in 0..TAKEN {
        queue::enqueue_sync(&pool, Uuid::new_v4()).await.unwrap();
    }
    let queued = (2 * TAKEN + 1) as i64;

    let mut transaction = pool.begin().await.unwrap();
    // Every read of the queue a sequential scan, as the planner chose under `cost`.
    for setting in ["enable_indexscan", "enable_bitmapscan"] {
        sqlx::query(&format!("set local {setting} = off"))
            .execute(&mut *transaction)
            .await
            .unwrap();
    }
    let before = reads::counts(&mut transaction, &["OutgoingRequest"]).await;
    let claimed = queue::claim(&mut *transaction, TAKEN as u32 + 1, lease, Claimant::Syncer)
        .await
        .unwrap();
    let read = reads::since(&mut transaction, before).await;
    transaction.rollback().await.unwrap();

    assert_eq!(claimed.len(), TAKEN, "the request held back is not taken");
    assert!(claimed.iter().all(|request| request.held_back));
    assert!(claimed
        .iter()
        .all(|request| request.tenancy_id().unwrap() != held));
    // Five reads (the expired leases, the keys in flight, the pending requests, whether
    // one is held back, the claimed rows updated), each of every row at most; it was 19
    // reads, 415 rows, with the keys in flight and the messages read once per request.
    assert!(read[0].scans() <= 5, "{read:?}");
    assert!(
        read[0].rows() <= 5 * queued,
        "{} rows read for {queued} queued: {read:?}",
        read[0].rows()
    );
}

/// A loop step whose claim took nothing while a due request that nothing holds back was
/// there looks again soon, instead of waiting for a wake-up that nothing promises (the
/// idle timer is 5 s here). The race above cannot be timed from outside; here the claim
/// misses the request because another transaction holds its row, which the read after
/// the claim sees the same way.
#[tokio::test]
async fn a_loop_step_that_missed_a_due_request_looks_again_soon() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "Ada").await;
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 2);
    let in_flight = InFlight::for_loop(Arc::new(Notify::new()));
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(r#"select from "OutgoingRequest" for update"#)
        .execute(&mut *holder)
        .await
        .unwrap();

    match poller.loop_step(&in_flight).await.unwrap() {
        Outcome::Recheck(pause) => assert!(pause <= Duration::from_millis(100), "{pause:?}"),
        other => panic!("not told to look again soon: {other:?}"),
    }

    holder.commit().await.unwrap();
    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    assert_eq!(poller.finish(&in_flight).await.unwrap().failed, 0);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A sync that queues a retry (its database is down) wakes the loop when it ends, so
/// that the loop reads when the retry comes due: moving a retry earlier notifies nobody.
#[tokio::test]
async fn a_sync_that_queues_a_retry_wakes_the_loop_when_it_ends() {
    let pool = migrated_pool().await;
    let tenancy = tenancy_whose_database_refuses(&pool).await;
    // Retried 2 s after a failure: before the loop's idle timer (5 s) would end.
    let poller = poller_retrying_after(&pool, Duration::from_secs(2));
    let wake = Arc::new(Notify::new());
    let in_flight = InFlight::for_loop(wake.clone());

    assert_eq!(step(&poller, &in_flight).await.claimed, 1);
    tokio::time::timeout(Duration::from_secs(20), wake.notified())
        .await
        .expect("the end of a sync that queued a retry wakes the loop");

    assert_eq!(pending_request_keys(&pool).await, [retry_key(tenancy)]);
    match poller.loop_step(&in_flight).await.unwrap() {
        Outcome::Recheck(pause) => assert!(pause <= Duration::from_secs(2), "{pause:?}"),
        other => panic!("not told when the retry comes due: {other:?}"),
    }
}

/// Steps until the caller's publishes that ended number `published`.
async fn wait_until_counted(poller: &Poller, in_flight: &InFlight, published: u64) {
    let counted = &std::sync::atomic::AtomicU64::new(0);
    wait::until(
        "the publishes counted",
        Duration::from_secs(20),
        || async move {
            let now = step(poller, in_flight).await.published;
            let so_far = counted.fetch_add(now, std::sync::atomic::Ordering::Relaxed) + now;
            (so_far >= published).then_some(())
        },
    )
    .await;
}

/// When the tenancy's request in flight was claimed, or its lease last renewed.
async fn claim_time(pool: &PgPool, tenancy: Uuid) -> chrono::NaiveDateTime {
    sqlx::query_scalar(
        r#"select "startedFulfillingAt" from "OutgoingRequest"
           where "deduplicationKey" = $1 and "startedFulfillingAt" is not null"#,
    )
    .bind(request_key(tenancy))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `tenant` has `users` users and the tenancy has no request left.
async fn wait_until_synced(pool: &PgPool, tenancy: Uuid, tenant: &PgPool, users: usize) {
    wait::until(
        &format!("{users} users synced and settled"),
        Duration::from_secs(20),
        || async move {
            let synced = external_users(tenant).await.len() == users;
            let settled = request_states(pool, tenancy).await.is_empty();
            (synced && settled).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_request_is_not_consumed_while_a_sequencer_batch_that_relies_on_it_is_open() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let first = user(&pool, tenancy, "first").await;
    sequence_all(&pool, 1000).await;
    let poller = direct_poller(&pool, 2);
    poll_once(&poller).await;
    // A pending request for the tenancy...
    crate::harness::fixtures::rename_user(&pool, first, "pending").await;
    sequence_all(&pool, 1000).await;
    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);

    // ...and a sequencer batch that numbers a newer change and, finding that request
    // pending, queues none of its own. It has not committed yet.
    let second = user(&pool, tenancy, "second").await;
    let mut batch = pool.begin().await.unwrap();
    let sequenced = external_db_sync::db::sequencing::sequence_batch(
        &mut *batch,
        1000,
        external_db_sync::db::sequencing::Wakefulness::OneOff,
    )
    .await
    .unwrap()
    .expect("the sequencer is switched on");
    assert_eq!(sequenced.project_users, 1);
    assert_eq!(sequenced.requests_enqueued, 0);

    // A poller that consumed the request now would sync without the newer change and
    // leave nothing queued for it.
    let meanwhile = poll_once(&poller).await;
    batch.commit().await.unwrap();
    let after = poll_once(&poller).await;

    assert_eq!(
        meanwhile.claimed + after.claimed,
        1,
        "one request, one sync"
    );
    assert!(pending_request_keys(&pool).await.is_empty());
    let users = external_users(&tenant).await;
    assert!(users.iter().any(|synced| synced.id == second), "{users:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A request is settled (deleted, with its statuses) in one statement after its sync.
/// When the internal database fails that statement (a restart, a failover), it is tried
/// again at once, rather than left claimed until its lease runs out: meanwhile no newer
/// request of the tenancy could be claimed (found by the fault test of an internal
/// database restart).
#[tokio::test]
async fn a_settle_that_the_internal_database_fails_is_tried_again() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let id = user(&pool, tenancy, "ada").await;
    sequence_all(&pool, 100).await;
    // The first deletion of a request fails, as a statement cut by a restart would.
    sqlx::raw_sql(
        r#"create sequence settle_attempts;
           create function fail_first_settle() returns trigger language plpgsql as $$
           begin
               if nextval('settle_attempts') = 1 then
                   raise exception 'injected: the internal database went away';
               end if;
               return old;
           end $$;
           create trigger fail_first_settle before delete on "OutgoingRequest"
               for each row execute function fail_first_settle();"#,
    )
    .execute(&pool)
    .await
    .unwrap();

    let batch = poll_once(&direct_poller(&pool, 1)).await;

    assert_eq!((batch.published, batch.failed), (1, 0), "{batch:?}");
    assert_eq!(pending_request_keys(&pool).await, Vec::<String>::new());
    let left: i64 = sqlx::query_scalar(r#"select count(*) from "OutgoingRequest""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "settled, not left claimed");
    let attempts: i64 = sqlx::query_scalar("select last_value from settle_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 2);
    wait_for_user(&tenant, id).await;
}
