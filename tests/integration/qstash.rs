//! `SYNC_QUEUE=qstash` end to end through the QStash stand-in: the poller publishes a
//! batch, the stand-in calls `/sync-engine` back with QStash's signature, and retries
//! when the answer asks for it.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{email, request_key, tenancy, tenant_database, user};
use crate::harness::qstash::{CURRENT_SIGNING_KEY, NEXT_SIGNING_KEY};
use crate::harness::qstash_standin::{QstashStandIn, TOKEN};
use crate::harness::sync::{
    assert_tenant_matches_source, attach, expected_users, external_users, tenancy_with_database,
    two_tenancies_with_users,
};
use crate::harness::wait;

const PUBLIC_URL: &str = "https://sync.example.test";

async fn app_with_qstash(token: &str) -> (TestApp, QstashStandIn) {
    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;
    let app = TestApp::spawn_with(&[
        ("SYNC_QUEUE", "qstash"),
        ("QSTASH_URL", &standin.url),
        ("QSTASH_TOKEN", token),
        ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
        ("QSTASH_NEXT_SIGNING_KEY", NEXT_SIGNING_KEY),
        ("PUBLIC_URL", PUBLIC_URL),
        ("ALLOW_PRIVATE_TARGETS", "true"),
    ])
    .await;
    // QStash calls the public URL; here it reaches the app directly.
    standin.deliver_to(&app.address);
    (app, standin)
}

/// Waits until the tenant database holds exactly the tenancy's users.
async fn wait_for_source_state(pool: &PgPool, tenancy: Uuid, tenant: &PgPool) {
    wait::until(
        "the tenant database to catch up",
        Duration::from_secs(30),
        || {
            let (pool, tenant) = (pool.clone(), tenant.clone());
            async move {
                let users = sqlx::query_scalar::<_, i64>("select count(*) from users")
                    .fetch_one(&tenant)
                    .await
                    .ok()?;
                let expected = expected_users(&pool, tenancy).await;
                (users as usize == expected.len() && external_users(&tenant).await == expected)
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn qstash_mode_end_to_end_through_the_signed_webhook() {
    let (app, standin) = app_with_qstash(TOKEN).await;
    let [(first, first_tenant), (second, second_tenant)] =
        two_tenancies_with_users(&app.pool).await;

    app.run_sequencer("stopWhenIdle=true").await;
    let answer = app.run_poller("stopWhenIdle=true").await;

    assert_eq!(answer["published"], 2, "{answer}");
    wait_for_source_state(&app.pool, first, &first_tenant).await;
    wait_for_source_state(&app.pool, second, &second_tenant).await;
    assert_tenant_matches_source(&app.pool, second, &second_tenant).await;
    let published = standin.published();
    assert_eq!(published.len(), 2);
    for message in &published {
        assert_eq!(
            message["destination"],
            format!("{PUBLIC_URL}/api/latest/internal/external-db-sync/sync-engine")
        );
        let body: Value = serde_json::from_str(message["body"].as_str().unwrap()).unwrap();
        let tenancy = body["tenancyId"].as_str().unwrap();
        assert_eq!(
            message["headers"]["Upstash-Flow-Control-Key"],
            format!("external-db-sync-{tenancy}")
        );
        assert_eq!(
            message["headers"]["Upstash-Flow-Control-Value"],
            "parallelism=1"
        );
        assert_eq!(message["headers"]["Upstash-Retries"], "5");
    }
    // The data is committed before the answer reaches the stand-in, which records the
    // delivery then.
    wait::until("both deliveries answered", Duration::from_secs(10), || {
        let answered = standin.deliveries().len() >= 2;
        async move { answered.then_some(()) }
    })
    .await;
    let deliveries = standin.deliveries();
    assert_eq!(
        deliveries.len(),
        2,
        "one delivery per message: {deliveries:?}"
    );
    for delivery in &deliveries {
        assert_eq!(delivery.status, 200);
        assert!(published.iter().any(|message| message["messageId"]
            == delivery.message_id.as_str()
            && message["destination"] == delivery.destination.as_str()));
    }
}

#[tokio::test]
async fn a_failed_publish_leaves_the_request_for_a_later_run() {
    publish_failure_leaves_the_request(|standin| standin.fail_publishes(1), "QStash answered 500")
        .await;
}

#[tokio::test]
async fn a_publish_whose_connection_is_dropped_leaves_the_request_for_a_later_run() {
    publish_failure_leaves_the_request(
        |standin| standin.drop_connections(1),
        "cannot reach QStash",
    )
    .await;
}

/// One publish fails as `fail` makes it: the request stays with its attempt and
/// `expected_error` (never the token), nothing reaches QStash, and a later run
/// publishes it.
async fn publish_failure_leaves_the_request(
    fail: impl FnOnce(&QstashStandIn),
    expected_error: &str,
) {
    let (app, standin) = app_with_qstash(TOKEN).await;
    let (tenancy, tenant) = tenancy_with_database(&app.pool).await;
    user(&app.pool, tenancy, "patient").await;
    app.run_sequencer("stopWhenIdle=true").await;
    fail(&standin);

    let answer = app.run_poller("stopWhenIdle=true").await;

    assert_eq!(
        (answer["published"].as_u64(), answer["failed"].as_u64()),
        (Some(0), Some(1))
    );
    let (attempts, error): (i32, Option<String>) = sqlx::query_as(
        r#"select "attempts", "lastError" from "OutgoingRequest" where "deduplicationKey" = $1"#,
    )
    .bind(request_key(tenancy))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    let error = error.unwrap();
    assert!(error.contains(expected_error), "{error}");
    assert!(!error.contains(TOKEN), "the token is not recorded");
    assert!(standin.published().is_empty());

    // The backoff has passed (moved rather than waited for).
    sqlx::query(r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp"#)
        .execute(&app.pool)
        .await
        .unwrap();
    let answer = app.run_poller("stopWhenIdle=true").await;
    assert_eq!(answer["published"], 1);
    wait_for_source_state(&app.pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_refused_token_is_recorded_and_nothing_is_lost() {
    let (app, standin) = app_with_qstash("qstash_wrong_token").await;
    let (tenancy, _tenant) = tenancy_with_database(&app.pool).await;
    user(&app.pool, tenancy, "waits").await;
    app.run_sequencer("stopWhenIdle=true").await;

    let answer = app.run_poller("stopWhenIdle=true").await;

    assert_eq!(answer["failed"], 1);
    let error: Option<String> = sqlx::query_scalar(
        r#"select "lastError" from "OutgoingRequest" where "deduplicationKey" = $1"#,
    )
    .bind(request_key(tenancy))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let error = error.unwrap();
    assert!(error.contains("401"), "{error}");
    assert!(
        !error.contains("qstash_wrong_token"),
        "the token is not recorded"
    );
    assert!(standin.published().is_empty());
}

/// A database that cannot be reached answers 5xx (QStash may retry); it is attempted
/// again by a retry request of its own, published when due, and heals.
#[tokio::test]
async fn a_database_that_answered_5xx_heals_through_its_retry_request() {
    let (app, standin) = app_with_qstash(TOKEN).await;
    let tenancy = tenancy(&app.pool).await;
    attach(
        &app.pool,
        tenancy,
        &[("main", "postgres://sync@127.0.0.1:1/down")],
    )
    .await;
    user(&app.pool, tenancy, "eventually").await;
    app.run_sequencer("stopWhenIdle=true").await;
    let answer = app.run_poller("stopWhenIdle=true").await;
    assert_eq!(answer["published"], 1);
    wait::until("a delivery answered 500", Duration::from_secs(10), || {
        let failed = standin
            .deliveries()
            .iter()
            .any(|delivery| delivery.status == 500);
        async move { failed.then_some(()) }
    })
    .await;

    let (url, tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("main", &url)]).await;

    // The failed database's retry request is published when due (at most a second or
    // two here); its entry changed meanwhile, so it is attempted at once.
    let app = &app;
    wait::until(
        "the retry request to be published",
        Duration::from_secs(20),
        || async move {
            let answer = app.run_poller("maxDurationMs=0").await;
            (answer["published"].as_u64() > Some(0)).then_some(())
        },
    )
    .await;
    wait_for_source_state(&app.pool, tenancy, &tenant).await;
    // The data is committed before the answer reaches the stand-in.
    wait::until("a delivery answered 200", Duration::from_secs(10), || {
        let answered = standin
            .deliveries()
            .last()
            .is_some_and(|last| last.status == 200);
        async move { answered.then_some(()) }
    })
    .await;
}

/// Two `serve` replicas (each running a sequencer and a poller loop) share one internal
/// database while a writer keeps changing 20 tenancies: every tenant database ends equal
/// to its source, and no request is published twice.
#[tokio::test]
async fn two_replicas_over_twenty_tenancies_lose_nothing_and_publish_nothing_twice() {
    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;
    let overrides = [
        ("SYNC_QUEUE", "qstash"),
        ("QSTASH_URL", standin.url.as_str()),
        ("QSTASH_TOKEN", TOKEN),
        ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
        ("PUBLIC_URL", PUBLIC_URL),
        ("ALLOW_PRIVATE_TARGETS", "true"),
        ("RUN_WORKERS", "true"),
    ];
    let first = TestApp::spawn_with(&overrides).await;
    let second = TestApp::spawn_on(&first.database_url, &overrides).await;
    standin.deliver_to(&first.address);
    let pool = first.pool.clone();
    let mut tenancies = Vec::new();
    for _ in 0..20 {
        tenancies.push(tenancy_with_database(&pool).await);
    }

    // The writer: rounds over all tenancies that create (three rounds in five), rename
    // and delete users.
    let mut users: Vec<(Uuid, Uuid)> = Vec::new();
    for step in 0..300usize {
        let (tenancy, _) = &tenancies[step % tenancies.len()];
        match (step / tenancies.len()) % 5 {
            0..=2 => {
                let id = user(&pool, *tenancy, &format!("user {step}")).await;
                email(&pool, *tenancy, id, &format!("u{step}@example.com"), true).await;
                users.push((*tenancy, id));
            }
            3 => {
                let (_, id) = users[step % users.len()];
                crate::harness::fixtures::rename_user(&pool, id, &format!("renamed {step}")).await;
            }
            _ => {
                let (_, id) = users.swap_remove(step % users.len());
                crate::harness::fixtures::delete_user(&pool, id).await;
            }
        }
    }

    for (tenancy, tenant) in &tenancies {
        wait_for_source_state(&pool, *tenancy, tenant).await;
        assert_tenant_matches_source(&pool, *tenancy, tenant).await;
    }
    let published = standin.published();
    let mut request_ids: Vec<&str> = published
        .iter()
        .map(|message| {
            message["headers"]["Upstash-Deduplication-Id"]
                .as_str()
                .unwrap()
        })
        .collect();
    let total = request_ids.len();
    request_ids.sort_unstable();
    request_ids.dedup();
    assert_eq!(request_ids.len(), total, "a request was published twice");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

/// The stand-in itself, against a destination that fails on purpose: a 5xx answer is
/// retried with `Upstash-Retried` counting up until a 2xx, and a 489 with
/// `Upstash-NonRetryable-Error: true` ends the deliveries of that message at once.
#[tokio::test]
async fn the_standin_retries_failures_and_stops_on_a_non_retryable_489() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::routing::post;

    let flaky_calls = Arc::new(AtomicU32::new(0));
    let destination = axum::Router::new()
        .route(
            "/flaky",
            post({
                let calls = flaky_calls.clone();
                move || async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        )
        .route(
            "/refuse",
            post(|| async {
                (
                    StatusCode::from_u16(489).unwrap(),
                    [("Upstash-NonRetryable-Error", "true")],
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, destination).await });
    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;

    let answer = reqwest::Client::new()
        .post(format!("{}/v2/batch", standin.url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!([
            { "destination": format!("{base}/refuse"), "body": "{}",
              "headers": { "Upstash-Retries": "5" } },
            { "destination": format!("{base}/flaky"), "body": "{}",
              "headers": { "Upstash-Retries": "5" } },
        ]))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());

    // The flaky message's third attempt comes after two backoffs; by then a retry of
    // the refused message (due after the first, shorter backoff) would have been made.
    let deliveries_to = |path: &'static str| {
        let standin = standin.clone();
        let destination = format!("{base}{path}");
        move || {
            let mut attempts: Vec<(u32, u16)> = standin
                .deliveries()
                .into_iter()
                .filter(|delivery| delivery.destination == destination)
                .map(|delivery| (delivery.retried, delivery.status))
                .collect();
            attempts.sort_unstable();
            attempts
        }
    };
    let flaky = deliveries_to("/flaky");
    wait::until(
        "the flaky destination to succeed",
        Duration::from_secs(10),
        || {
            let attempts = flaky();
            async move {
                attempts
                    .last()
                    .is_some_and(|(_, status)| *status == 200)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(flaky(), [(0, 500), (1, 500), (2, 200)]);
    assert_eq!(deliveries_to("/refuse")(), [(0, 489)]);
}
