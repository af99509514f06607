//! `SYNC_QUEUE=qstash` end to end through the QStash stand-in: the poller publishes a
//! batch, the stand-in calls `/sync-engine` back with QStash's signature, and retries
//! when the answer asks for it.

use std::time::Duration;

use external_db_sync::db::sync_status::RETRY_REQUEST_KEY_PREFIX;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{
    email, pending_request_keys, request_key, tenancy, tenant_database, user,
};
use crate::harness::postgres::server;
use crate::harness::qstash::{CURRENT_SIGNING_KEY, NEXT_SIGNING_KEY};
use crate::harness::qstash_standin::{MessageAnswer, QstashStandIn, TOKEN};
use crate::harness::sync::{
    assert_tenant_matches_source, attach, let_time_pass, recorded_error, tenancy_with_database,
    two_tenancies_with_users, wait_until_equal,
};
use crate::harness::wait;

const PUBLIC_URL: &str = "https://sync.example.test";

async fn app_with_qstash(token: &str) -> (TestApp, QstashStandIn) {
    app_with_qstash_and(token, &[]).await
}

/// [`app_with_qstash`] with `env` on top.
async fn app_with_qstash_and(token: &str, env: &[(&str, &str)]) -> (TestApp, QstashStandIn) {
    let standin = QstashStandIn::start(CURRENT_SIGNING_KEY).await;
    let mut variables = vec![
        ("SYNC_QUEUE", "qstash"),
        ("QSTASH_URL", standin.url.as_str()),
        ("QSTASH_TOKEN", token),
        ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
        ("QSTASH_NEXT_SIGNING_KEY", NEXT_SIGNING_KEY),
        ("PUBLIC_URL", PUBLIC_URL),
        ("ALLOW_PRIVATE_TARGETS", "true"),
    ];
    variables.extend_from_slice(env);
    let app = TestApp::spawn_with(&variables).await;
    // QStash calls the public URL; here it reaches the app directly.
    standin.deliver_to(&app.address);
    (app, standin)
}

#[tokio::test]
async fn qstash_mode_end_to_end_through_the_signed_webhook() {
    let (app, standin) = app_with_qstash(TOKEN).await;
    let [(first, first_tenant), (second, second_tenant)] =
        two_tenancies_with_users(&app.pool).await;

    app.run_sequencer("stopWhenIdle=true").await;
    let answer = app.run_poller("stopWhenIdle=true").await;

    assert_eq!(answer["published"], 2, "{answer}");
    wait_until_equal(&app.pool, first, &first_tenant).await;
    wait_until_equal(&app.pool, second, &second_tenant).await;
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
    // A delivery is recorded once its answer arrives, just after the data committed.
    let deliveries = wait::until(
        "both deliveries to be answered",
        Duration::from_secs(10),
        || {
            let deliveries = standin.deliveries();
            async move { (deliveries.len() >= 2).then_some(deliveries) }
        },
    )
    .await;
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

    // One iteration: a request given back is due again within a second, and a poller
    // that went on could take it again.
    let answer = app.run_poller("maxDurationMs=0").await;

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
    wait_until_equal(&app.pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_refused_token_is_recorded_and_nothing_is_lost() {
    let (app, standin) = app_with_qstash("qstash_wrong_token").await;
    let (tenancy, _tenant) = tenancy_with_database(&app.pool).await;
    user(&app.pool, tenancy, "waits").await;
    app.run_sequencer("stopWhenIdle=true").await;

    // One iteration, as above.
    let answer = app.run_poller("maxDurationMs=0").await;

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

/// QStash answers a batch message by message. A message it refused (`{"error": …}`, or a
/// URL group's answer with a refused endpoint) leaves its request queued, with the
/// reason recorded and the attempt counted, until QStash accepts it; the messages it
/// accepted in the same batch (a URL group's answer when every endpoint took it) are
/// deleted and delivered.
#[tokio::test]
async fn a_batch_answer_is_checked_message_by_message() {
    let (app, standin) = app_with_qstash(TOKEN).await;
    let (accepted, accepted_tenant) = tenancy_with_database(&app.pool).await;
    let (grouped, grouped_tenant) = tenancy_with_database(&app.pool).await;
    let (refused, _) = tenancy_with_database(&app.pool).await;
    let (partly_refused, _) = tenancy_with_database(&app.pool).await;
    for tenancy in [accepted, grouped, refused, partly_refused] {
        user(&app.pool, tenancy, "batched").await;
    }
    standin.answer_messages(
        &refused.to_string(),
        MessageAnswer::Refused("destination is blocked".to_owned()),
    );
    standin.answer_messages(
        &grouped.to_string(),
        MessageAnswer::UrlGroup(vec![None, None]),
    );
    standin.answer_messages(
        &partly_refused.to_string(),
        MessageAnswer::UrlGroup(vec![None, Some("endpoint quota exceeded".to_owned())]),
    );
    app.run_sequencer("stopWhenIdle=true").await;
    let refused_keys = {
        let mut keys = [request_key(refused), request_key(partly_refused)];
        keys.sort();
        keys
    };

    // One iteration: one batch of the four requests.
    let answer = app.run_poller("maxDurationMs=0").await;

    assert_eq!(
        (&answer["claimed"], &answer["published"], &answer["failed"]),
        (&json!(4), &json!(2), &json!(2)),
        "{answer}"
    );
    assert_eq!(pending_request_keys(&app.pool).await, refused_keys);
    assert_eq!(
        queued_state(&app.pool, refused).await,
        (
            1,
            "QStash refused the message: destination is blocked".to_owned()
        )
    );
    assert_eq!(
        queued_state(&app.pool, partly_refused).await,
        (
            1,
            "QStash refused the message: endpoint quota exceeded".to_owned()
        )
    );
    wait_until_equal(&app.pool, accepted, &accepted_tenant).await;
    wait_until_equal(&app.pool, grouped, &grouped_tenant).await;

    // Refused again when due: the attempts add up.
    make_requests_due(&app.pool).await;
    let answer = app.run_poller("maxDurationMs=0").await;
    assert_eq!(
        (&answer["claimed"], &answer["published"], &answer["failed"]),
        (&json!(2), &json!(0), &json!(2)),
        "{answer}"
    );
    assert_eq!(queued_state(&app.pool, refused).await.0, 2);
    assert_eq!(queued_state(&app.pool, partly_refused).await.0, 2);

    // Accepted at last: published and deleted.
    standin.accept_all();
    make_requests_due(&app.pool).await;
    let answer = app.run_poller("maxDurationMs=0").await;
    assert_eq!(
        (&answer["claimed"], &answer["published"], &answer["failed"]),
        (&json!(2), &json!(2), &json!(0)),
        "{answer}"
    );
    assert!(pending_request_keys(&app.pool).await.is_empty());
}

/// `(attempts, lastError)` of the tenancy's queued request.
async fn queued_state(pool: &PgPool, tenancy: Uuid) -> (i32, String) {
    let (attempts, error): (i32, Option<String>) = sqlx::query_as(
        r#"select "attempts", "lastError" from "OutgoingRequest"
           where "deduplicationKey" = $1 and "startedFulfillingAt" is null"#,
    )
    .bind(request_key(tenancy))
    .fetch_one(pool)
    .await
    .unwrap();
    (attempts, error.unwrap_or_default())
}

/// [`app_with_qstash`] whose failing databases wait a minute before their next attempt,
/// so that no stall of this machine can make one due early: a test makes it due.
async fn app_retrying_after_a_minute() -> (TestApp, QstashStandIn) {
    app_with_qstash_and(
        TOKEN,
        &[
            ("SYNC_RETRY_FIRST_MS", "60000"),
            ("SYNC_RETRY_MAX_MS", "60000"),
        ],
    )
    .await
}

/// Makes every queued request due now, as if its backoff had passed.
async fn make_requests_due(pool: &PgPool) {
    sqlx::query(r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp"#)
        .execute(pool)
        .await
        .unwrap();
}

/// A database that cannot be reached answers 5xx, and QStash delivers the message again;
/// while the database's next attempt is not due, that delivery leaves it alone
/// (answered 200). The database is attempted again by a retry request of its own,
/// published when due, and heals.
///
/// The database waits a minute before its next attempt, so no stall of this machine can
/// make it due early; its time coming is simulated by moving the retry request's due
/// time rather than waited for, and each step waits on the state it needs.
#[tokio::test]
async fn a_database_that_answered_5xx_heals_through_its_retry_request() {
    let (app, standin) = app_retrying_after_a_minute().await;
    let tenancy = tenancy(&app.pool).await;
    // Nothing listens on port 1: connection refused, a retryable failure.
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
    let first = standin.published()[0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();

    // QStash's first delivery failed on the database and asked for a retry; its retry
    // found the database not due and was answered 200, which ended the deliveries.
    wait::until(
        "QStash's retry of the message to be answered",
        Duration::from_secs(10),
        || {
            let attempts = delivery_attempts(&standin, &first);
            async move { (attempts.len() >= 2).then_some(attempts) }
        },
    )
    .await;
    assert_eq!(delivery_attempts(&standin, &first), [(0, 500), (1, 200)]);
    let (_, retryable, failures) = recorded_error(&app.pool, tenancy, "main").await;
    assert_eq!(
        (retryable, failures),
        (Some(true), 1),
        "attempted once: the retry left it alone"
    );
    let retry_key = format!("{RETRY_REQUEST_KEY_PREFIX}{tenancy}");
    assert_eq!(
        pending_request_keys(&app.pool).await,
        std::slice::from_ref(&retry_key)
    );
    let not_yet = app.run_poller("maxDurationMs=0").await;
    assert_eq!(not_yet["claimed"], 0, "the retry request is not due yet");

    // The database comes back, and the retry request's time comes.
    let (url, tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("main", &url)]).await;
    let retry_request: Uuid = sqlx::query_scalar(
        r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp
           where "deduplicationKey" = $1 returning "id""#,
    )
    .bind(&retry_key)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let answer = app.run_poller("maxDurationMs=0").await;

    // The retry request, and the sync of the tenancy that changing its entry queued.
    assert_eq!(answer["published"], 2, "{answer}");
    let retry_message = standin
        .published()
        .into_iter()
        .find(|message| message["headers"]["Upstash-Deduplication-Id"] == retry_request.to_string())
        .expect("the retry request was published");
    let retry_message = retry_message["messageId"].as_str().unwrap().to_owned();
    wait::until(
        "the retry request's delivery to be answered",
        Duration::from_secs(20),
        || {
            let attempts = delivery_attempts(&standin, &retry_message);
            async move { (!attempts.is_empty()).then_some(()) }
        },
    )
    .await;
    assert_eq!(delivery_attempts(&standin, &retry_message), [(0, 200)]);
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    assert_eq!(recorded_error(&app.pool, tenancy, "main").await.2, 0);
    assert!(pending_request_keys(&app.pool).await.is_empty());
}

/// A failing database that comes back as it was (its entry unchanged) is attempted by
/// the sync that QStash's delivery runs once the database's next attempt is due:
/// publishing the request reserves nothing, so the delivery finds the database due.
/// (A reservation made by the publish kept it from the delivery for five minutes.)
#[tokio::test]
async fn a_failing_database_whose_time_comes_is_attempted_by_the_delivery() {
    let (app, standin) = app_retrying_after_a_minute().await;
    let tenancy = tenancy(&app.pool).await;
    let (url, tenant) = tenant_database().await;
    let database = url.rsplit('/').next().unwrap();
    let allow =
        |allowed: bool| format!(r#"alter database "{database}" allow_connections = {allowed}"#);
    server().admin_execute(&allow(false)).await;
    attach(&app.pool, tenancy, &[("main", &url)]).await;
    user(&app.pool, tenancy, "eventually").await;
    app.run_sequencer("stopWhenIdle=true").await;
    assert_eq!(app.run_poller("stopWhenIdle=true").await["published"], 1);
    // Its delivery failed on the database, and was answered 200 (the failure is
    // permanent: the database's own schedule retries it): no delivery is under way.
    let first = standin.published()[0]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait::until(
        "the message's delivery to be answered",
        Duration::from_secs(20),
        || {
            let attempts = delivery_attempts(&standin, &first);
            async move { (!attempts.is_empty()).then_some(()) }
        },
    )
    .await;
    assert_eq!(delivery_attempts(&standin, &first), [(0, 200)]);
    let (_, retryable, failures) = recorded_error(&app.pool, tenancy, "main").await;
    assert_eq!((retryable, failures), (Some(false), 1));

    // The database comes back, and its time comes: every request and the database due.
    server().admin_execute(&allow(true)).await;
    let_time_pass(&app.pool).await;
    let published = standin.published().len();
    let answer = app.run_poller("maxDurationMs=0").await;
    assert!(answer["published"].as_u64() >= Some(1), "{answer}");

    let messages: Vec<String> = standin.published()[published..]
        .iter()
        .map(|message| message["messageId"].as_str().unwrap().to_owned())
        .collect();
    wait::until(
        "the deliveries of what was published to be answered 200",
        Duration::from_secs(20),
        || {
            let answered = messages.iter().all(|id| {
                delivery_attempts(&standin, id)
                    .iter()
                    .any(|(_, status)| *status == 200)
            });
            async move { answered.then_some(()) }
        },
    )
    .await;
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    assert_eq!(recorded_error(&app.pool, tenancy, "main").await.2, 0);
}

/// `(Upstash-Retried, status)` of every delivery attempt of `message_id` so far.
fn delivery_attempts(standin: &QstashStandIn, message_id: &str) -> Vec<(u32, u16)> {
    let mut attempts: Vec<(u32, u16)> = standin
        .deliveries()
        .into_iter()
        .filter(|delivery| delivery.message_id == message_id)
        .map(|delivery| (delivery.retried, delivery.status))
        .collect();
    attempts.sort_unstable();
    attempts
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
        wait_until_equal(&pool, *tenancy, tenant).await;
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
