//! The poller and the queue: publishing in `direct` mode, failures that keep requests,
//! leases that expire, wake-ups that are never lost, the fusebox, and `serve` doing it all
//! on its own.

use std::sync::Arc;
use std::time::Duration;

use external_db_sync::db::queue;
use external_db_sync::poller::{self, PolledBatch, PollerRun, PollerSettings};
use external_db_sync::queue::direct::DirectPublisher;
use external_db_sync::queue::Publisher;
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::{TestApp, CRON_SECRET, PREFIX};
use crate::harness::fixtures::{
    pending_request_keys, request_key, sequence_all, tenancy, tenant_database, user,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine, external_users, tenancy_with_database,
    two_tenancies_with_users,
};
use crate::harness::wait;

fn direct_publisher(pool: &PgPool) -> Publisher {
    Publisher::Direct(DirectPublisher::new(Arc::new(engine(pool)), 4))
}

async fn poll_once(pool: &PgPool, publisher: &Publisher) -> PolledBatch {
    match poller::run_once(pool, publisher, &PollerSettings::default())
        .await
        .unwrap()
    {
        PollerRun::Batch(batch) => batch,
        PollerRun::Disabled => panic!("the poller is switched off"),
    }
}

/// `(attempts, lastError, in flight, due now)` of the tenancy's requests.
async fn request_states(pool: &PgPool, tenancy: Uuid) -> Vec<(i32, Option<String>, bool, bool)> {
    sqlx::query_as(
        r#"select "attempts", "lastError", "startedFulfillingAt" is not null,
                  "nextAttemptAt" <= current_timestamp
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

    wait::until(
        "the user in the tenant database",
        Duration::from_secs(30),
        || {
            let tenant = tenant.clone();
            async move {
                let users = sqlx::query_scalar::<_, Uuid>("select id from users")
                    .fetch_all(&tenant)
                    .await
                    .ok()?;
                users.contains(&id).then_some(())
            }
        },
    )
    .await;
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_publish_keeps_the_request_with_its_error_until_it_succeeds() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    // Nothing listens on port 1: connection refused, a retryable failure.
    attach(
        &pool,
        tenancy,
        &[("main", "postgres://sync@127.0.0.1:1/tenant")],
    )
    .await;
    user(&pool, tenancy, "waits").await;
    sequence_all(&pool, 1000).await;
    let publisher = direct_publisher(&pool);

    let batch = poll_once(&pool, &publisher).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (1, 0, 1));
    let states = request_states(&pool, tenancy).await;
    assert_eq!(states.len(), 1, "the request is still there");
    let (attempts, error, in_flight, due) = &states[0];
    assert_eq!(*attempts, 1);
    assert!(error.as_deref().unwrap().contains("main"), "{error:?}");
    assert!(!in_flight);
    assert!(!due, "it waits for its backoff");
    // Not due yet: a second run leaves it alone.
    assert_eq!(poll_once(&pool, &publisher).await.claimed, 0);

    // The database comes back, and the backoff has passed.
    let (url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &url)]).await;
    sqlx::query(r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp"#)
        .execute(&pool)
        .await
        .unwrap();
    let batch = poll_once(&pool, &publisher).await;

    assert_eq!((batch.claimed, batch.published), (1, 1));
    assert!(request_states(&pool, tenancy).await.is_empty());
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_claim_whose_poller_died_is_taken_over_after_its_lease() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    user(&pool, tenancy, "orphaned").await;
    sequence_all(&pool, 1000).await;
    let publisher = direct_publisher(&pool);
    // A poller claims the request and dies before publishing it.
    let claimed = queue::claim(&pool, 10, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    drop(claimed);

    // While the lease holds, nobody else takes it.
    assert_eq!(poll_once(&pool, &publisher).await.claimed, 0);

    // Ten minutes later (the claim is back-dated rather than waited for).
    sqlx::query(
        r#"update "OutgoingRequest"
           set "startedFulfillingAt" = "startedFulfillingAt" - interval '10 minutes'"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let batch = poll_once(&pool, &publisher).await;

    assert_eq!((batch.claimed, batch.published), (1, 1));
    assert!(request_states(&pool, tenancy).await.is_empty());
    assert_eq!(external_users(&tenant).await.len(), 1);
}

#[tokio::test]
async fn a_change_while_a_request_is_in_flight_leaves_exactly_one_pending_request() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let id = user(&pool, tenancy, "first").await;
    sequence_all(&pool, 1000).await;
    // Many more changes while the request is pending: still one request.
    for n in 0..5 {
        crate::harness::fixtures::rename_user(&pool, id, &format!("pending {n}")).await;
        sequence_all(&pool, 1000).await;
    }
    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);
    let in_flight = queue::claim(&pool, 10, Duration::from_secs(300))
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
    let settings = external_db_sync::config::SequencerSettings {
        batch_size: 100,
        idle_interval: Duration::from_millis(50),
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
