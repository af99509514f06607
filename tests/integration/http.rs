//! The HTTP interface: cron-route auth and parameters, health probes.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::harness::app::{TestApp, CRON_SECRET, PREFIX};
use crate::harness::fixtures::{self, flagged_rows, pending_request_keys, request_key};

#[tokio::test]
async fn sequencer_rejects_missing_malformed_and_wrong_bearers() {
    let app = TestApp::spawn().await;
    let tenancy = fixtures::tenancy(&app.pool).await;
    fixtures::user(&app.pool, tenancy, "Ada").await;
    let url = format!("{}{PREFIX}/sequencer?maxDurationMs=0", app.address);
    let client = reqwest::Client::new();

    let wrong = "Bearer not-the-secret".to_owned();
    let prefix = format!("Bearer {}", &CRON_SECRET[..10]);
    let other_scheme = format!("Token {CRON_SECRET}");
    let no_scheme = CRON_SECRET.to_owned();
    let cases: [(&str, Option<&str>); 6] = [
        ("missing header", None),
        ("wrong secret", Some(&wrong)),
        ("prefix of the secret", Some(&prefix)),
        ("scheme without token", Some("Bearer")),
        ("other scheme", Some(&other_scheme)),
        ("no scheme", Some(&no_scheme)),
    ];
    for (case, authorization) in cases {
        let mut request = client.get(&url);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{case}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ok"], false, "{case}");
        assert!(!body.to_string().contains(CRON_SECRET));
    }
    assert_eq!(
        flagged_rows(&app.pool).await,
        1,
        "a rejected call did no work"
    );
}

#[tokio::test]
async fn sequencer_with_the_right_bearer_answers_with_its_summary() {
    let app = TestApp::spawn().await;
    let tenancy = fixtures::tenancy_with_placeholder_database(&app.pool).await;
    let user = fixtures::user(&app.pool, tenancy, "Ada").await;
    fixtures::email(&app.pool, tenancy, user, "ada@example.com", true).await;

    for method in [Method::GET, Method::POST] {
        let response = app
            .request(
                method.clone(),
                &format!("{PREFIX}/sequencer?maxDurationMs=0"),
                Some(CRON_SECRET),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{method}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ok"], true);
        assert_eq!(
            body["iterations"], 1,
            "maxDurationMs=0 runs exactly one iteration"
        );
    }
    // The first call did the work: one user, one channel, one request.
    assert_eq!(flagged_rows(&app.pool).await, 0);
    assert_eq!(
        pending_request_keys(&app.pool).await,
        vec![request_key(tenancy)]
    );

    // Lower-case scheme is accepted too.
    let response = reqwest::Client::new()
        .post(format!("{}{PREFIX}/sequencer?maxDurationMs=0", app.address))
        .header("Authorization", format!("bearer {CRON_SECRET}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn sequencer_reports_what_it_did() {
    let app = TestApp::spawn().await;
    let tenancy = fixtures::tenancy_with_placeholder_database(&app.pool).await;
    let user = fixtures::user(&app.pool, tenancy, "Ada").await;
    fixtures::email(&app.pool, tenancy, user, "ada@example.com", true).await;
    // A tenancy without databases: its user is numbered, but no request is queued.
    let without_databases = fixtures::tenancy(&app.pool).await;
    fixtures::user(&app.pool, without_databases, "Grace").await;

    let body = app.run_sequencer("maxDurationMs=0").await;

    assert_eq!(body["sequenced"]["projectUsers"], 2);
    assert_eq!(body["sequenced"]["contactChannels"], 1);
    assert_eq!(body["sequenced"]["deletedRows"], 0);
    assert_eq!(body["requestsEnqueued"], 1);
    assert_eq!(body["stopReason"], "deadline");
}

#[tokio::test]
async fn stop_when_idle_runs_until_the_work_is_done_then_returns() {
    let app = TestApp::spawn_with(&[("SEQUENCER_BATCH_SIZE", "10")]).await;
    let tenancy = fixtures::tenancy(&app.pool).await;
    for n in 0..35 {
        fixtures::user(&app.pool, tenancy, &format!("user {n}")).await;
    }

    let body = app.run_sequencer("stopWhenIdle=true").await;

    // Four batches of at most 10 did the work, the fifth found nothing.
    assert_eq!(body["iterations"], 5);
    assert_eq!(body["stopReason"], "idle");
    assert_eq!(body["sequenced"]["projectUsers"], 35);
    assert_eq!(flagged_rows(&app.pool).await, 0);
}

#[tokio::test]
async fn max_duration_bounds_an_idle_run() {
    let app = TestApp::spawn().await;

    let body = app.run_sequencer("maxDurationMs=300").await;

    assert_eq!(body["stopReason"], "deadline");
    let iterations = body["iterations"].as_u64().unwrap();
    assert!(
        iterations >= 2,
        "idle iterations repeat about every 50 ms: {iterations}"
    );
    assert!(body["durationMs"].as_u64().unwrap() >= 300);
}

#[tokio::test]
async fn bad_query_parameters_are_a_clear_400() {
    let app = TestApp::spawn().await;
    for query in [
        "maxDurationMs=soon",
        "maxDurationMs=-1",
        "stopWhenIdle=perhaps",
        "maxDurationMs=99999999999",
    ] {
        let response = app
            .request(
                Method::GET,
                &format!("{PREFIX}/sequencer?{query}"),
                Some(CRON_SECRET),
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ok"], false);
        assert!(
            body["error"].as_str().unwrap().contains("maxDurationMs"),
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn a_disabled_sequencer_does_no_work() {
    let app = TestApp::spawn().await;
    let tenancy = fixtures::tenancy(&app.pool).await;
    fixtures::user(&app.pool, tenancy, "Ada").await;
    external_db_sync::db::fusebox::write(&app.pool, Some(false), None)
        .await
        .unwrap();

    let body = app.run_sequencer("maxDurationMs=10000").await;

    assert_eq!(body["stopReason"], "disabled");
    assert_eq!(body["iterations"], 0);
    assert_eq!(flagged_rows(&app.pool).await, 1);

    external_db_sync::db::fusebox::write(&app.pool, Some(true), None)
        .await
        .unwrap();
    let body = app.run_sequencer("stopWhenIdle=true").await;
    assert_eq!(body["sequenced"]["projectUsers"], 1);
    assert_eq!(flagged_rows(&app.pool).await, 0);
}

#[tokio::test]
async fn health_probes_answer_and_readiness_follows_the_database() {
    let app = TestApp::spawn().await;

    let live = app.request(Method::GET, "/healthz", None).await;
    assert_eq!(live.status(), StatusCode::OK);
    let ready = app.request(Method::GET, "/readyz", None).await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await.unwrap()["database"], "ok");

    // Take the database away: refuse new connections and end the existing ones.
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    app.pool.close().await;
    crate::harness::postgres::server()
        .admin_execute(&format!(
            r#"alter database "{database}" allow_connections false;
               select pg_terminate_backend(pid) from pg_stat_activity where datname = '{database}';"#
        ))
        .await;

    let not_ready = app.request(Method::GET, "/readyz", None).await;
    assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        not_ready.json::<Value>().await.unwrap()["database"],
        "unreachable"
    );
    let still_live = app.request(Method::GET, "/healthz", None).await;
    assert_eq!(still_live.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_in_flight_cron_call_ends_promptly_at_shutdown() {
    let app = TestApp::spawn().await;
    let client = reqwest::Client::new();
    let url = format!("{}{PREFIX}/sequencer?maxDurationMs=600000", app.address);
    let call = tokio::spawn(async move { client.get(url).bearer_auth(CRON_SECRET).send().await });
    // Wait until the call is being served (it has run at least one idle iteration). The
    // cluster is shared with other tests' services: only this database's sessions count.
    crate::harness::wait::until(
        "the cron call to start",
        std::time::Duration::from_secs(10),
        || async {
            let active: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where application_name = 'external-db-sync' \
             and datname = current_database() \
             and query like '%external_db_sync_sequence_and_claim%' and pid <> pg_backend_pid()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
            (active > 0).then_some(())
        },
    )
    .await;

    let (stopped, response) = tokio::time::timeout(SHUTDOWN_BOUND, async {
        let stopped = app.stop().await;
        (stopped, call.await)
    })
    .await
    .unwrap_or_else(|_| {
        panic!("the app stopped and the cron call ended within {SHUTDOWN_BOUND:?} of shutdown")
    });

    stopped.unwrap();
    let response = response.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["stopReason"], "shutdown");
}

/// How long the app may take to stop, and an in-flight cron call to end, once shutdown
/// begins. The call notices the shutdown between iterations (an idle iteration pauses
/// about 50 ms) and answers at once: a healthy run takes 30-40 ms on the 2-core
/// development machine. Ten seconds leaves room for a loaded machine while still telling
/// "promptly" from the ten minutes (`maxDurationMs=600000`) the call would otherwise run.
const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::test]
async fn workers_in_serve_sequence_and_publish_changes_without_any_cron_call() {
    let app =
        TestApp::spawn_with(&[("RUN_WORKERS", "true"), ("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let (tenancy, tenant) = crate::harness::sync::tenancy_with_database(&app.pool).await;
    let user = fixtures::user(&app.pool, tenancy, "Ada").await;

    let sequence_id = crate::harness::wait::until(
        "the in-process sequencer to number the new user",
        std::time::Duration::from_secs(10),
        || async {
            let (flag, sequence_id) = fixtures::user_state(&app.pool, tenancy, user).await;
            (!flag).then_some(sequence_id)
        },
    )
    .await;

    assert!(sequence_id.is_some());
    // The in-process poller then takes the tenancy's request and publishes it: the
    // tenant database receives the user.
    crate::harness::wait::until(
        "the in-process poller to publish the request",
        std::time::Duration::from_secs(10),
        || async {
            let left: i64 = sqlx::query_scalar(
                r#"select count(*) from "OutgoingRequest" where "deduplicationKey" = $1"#,
            )
            .bind(request_key(tenancy))
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
    crate::harness::sync::wait_until_equal(&app.pool, tenancy, &tenant).await;
    assert!(pending_request_keys(&app.pool).await.is_empty());
    app.stop().await.unwrap();
}

/// Every error answer is JSON with a stable code and a short message, whatever the
/// route, and a malformed webhook body is not echoed back.
#[tokio::test]
async fn error_answers_carry_a_stable_code_and_a_short_message() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            Method::GET,
            "/no/such/route".to_owned(),
            Some(CRON_SECRET),
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/healthz".to_owned(),
            None,
            405,
            "method_not_allowed",
        ),
        (
            Method::GET,
            format!("{PREFIX}/sequencer"),
            None,
            401,
            "unauthorized",
        ),
        (
            Method::GET,
            format!("{PREFIX}/poller?maxDurationMs=soon"),
            Some(CRON_SECRET),
            400,
            "bad_request",
        ),
    ];
    for (method, path, bearer, status, code) in cases {
        let response = app.request(method.clone(), &path, bearer).await;
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ok"], false, "{method} {path}");
        assert_eq!(body["code"], code, "{method} {path}");
        assert!(body["error"]
            .as_str()
            .is_some_and(|error| !error.is_empty() && error.len() < 200));
    }
}
