//! `POST /sync-engine` over real HTTP: QStash's signature, the body, and the answers
//! that tell QStash whether to retry.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::app::{TestApp, PREFIX};
use crate::harness::fixtures::{sequence_all, tenancy, tenant_database, user};
use crate::harness::qstash::{claims, sign, CURRENT_SIGNING_KEY, NEXT_SIGNING_KEY};
use crate::harness::sync::{
    attach, expected_users, external_users, table_exists, tenancy_with_database,
};

const PUBLIC_URL: &str = "https://sync.example.test";

fn path() -> String {
    format!("{PREFIX}/sync-engine")
}

/// The URL QStash calls, hence the `sub` it signs.
fn signed_url() -> String {
    format!("{PUBLIC_URL}{}", path())
}

async fn app() -> TestApp {
    TestApp::spawn_with(&[
        ("PUBLIC_URL", PUBLIC_URL),
        ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
        ("QSTASH_NEXT_SIGNING_KEY", NEXT_SIGNING_KEY),
        ("ALLOW_PRIVATE_TARGETS", "true"),
    ])
    .await
}

fn body(tenancy: Uuid) -> Vec<u8> {
    serde_json::to_vec(&json!({ "tenancyId": tenancy })).unwrap()
}

/// Posts `body` with a signature made from `claims` and `key`.
async fn deliver(app: &TestApp, body: Vec<u8>, claims: &Value, key: &str) -> (u16, Value) {
    let signature = sign(claims, key);
    let response = app
        .post(&path(), body, &[("Upstash-Signature", signature)])
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Posts `body` signed with `key`, with the claims QStash would send.
async fn deliver_signed(app: &TestApp, body: &[u8], key: &str) -> (u16, Value) {
    deliver(app, body.to_vec(), &claims(&signed_url(), body), key).await
}

/// A tenancy with one user and one tenant database, sequenced and ready to sync.
async fn tenancy_with_a_user(app: &TestApp) -> (Uuid, sqlx::PgPool) {
    let (tenancy, tenant) = tenancy_with_database(&app.pool).await;
    user(&app.pool, tenancy, "via webhook").await;
    sequence_all(&app.pool, 1000).await;
    (tenancy, tenant)
}

#[tokio::test]
async fn a_delivery_signed_with_the_current_key_syncs_the_tenancy() {
    let app = app().await;
    let (tenancy, tenant) = tenancy_with_a_user(&app).await;
    let body = body(tenancy);

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["outcome"], "synced");
    assert_eq!(answer["databases"][0]["databaseId"], "main");
    assert_eq!(answer["databases"][0]["ok"], true);
    assert_eq!(answer["databases"][0]["mappings"][0]["mapping"], "users");
    assert_eq!(answer["databases"][0]["mappings"][0]["upserted"], 1);
    assert_eq!(
        external_users(&tenant).await,
        expected_users(&app.pool, tenancy).await
    );
}

#[tokio::test]
async fn a_delivery_signed_with_the_next_key_is_accepted() {
    let app = app().await;
    let (tenancy, tenant) = tenancy_with_a_user(&app).await;
    let body = body(tenancy);

    let (status, _) = deliver_signed(&app, &body, NEXT_SIGNING_KEY).await;

    assert_eq!(status, 200);
    assert_eq!(external_users(&tenant).await.len(), 1);
}

#[tokio::test]
async fn bad_signatures_are_rejected_with_401_and_nothing_is_synced() {
    let app = app().await;
    let (tenancy, tenant) = tenancy_with_a_user(&app).await;
    let body = body(tenancy);
    let good = claims(&signed_url(), &body);
    let now = chrono::Utc::now().timestamp();
    let with = |field: &str, value: Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("wrong key", good.clone(), "sig_someone_else"),
        (
            "wrong sub",
            with("sub", json!(format!("https://evil.example{}", path()))),
            CURRENT_SIGNING_KEY,
        ),
        (
            "wrong iss",
            with("iss", json!("Mallory")),
            CURRENT_SIGNING_KEY,
        ),
        (
            "expired",
            with("exp", json!(now - 120)),
            CURRENT_SIGNING_KEY,
        ),
        (
            "not yet valid",
            with("nbf", json!(now + 120)),
            CURRENT_SIGNING_KEY,
        ),
    ];
    for (case, claims, key) in cases {
        let (status, answer) = deliver(&app, body.clone(), &claims, key).await;
        assert_eq!(status, 401, "{case}: {answer}");
        assert_eq!(answer["ok"], false, "{case}");
        // Which check failed is for the log, not for the caller.
        assert_eq!(
            (&answer["code"], &answer["error"]),
            (
                &json!("invalid_signature"),
                &json!("invalid Upstash-Signature")
            ),
            "{case}"
        );
    }

    // A tampered body: signed for one tenancy, delivered for another.
    let other = self::body(Uuid::new_v4());
    let (status, _) = deliver(&app, other, &good, CURRENT_SIGNING_KEY).await;
    assert_eq!(status, 401, "tampered body");

    // No header, and a header that is not a JWT.
    let response = app.post(&path(), body.clone(), &[]).await;
    assert_eq!(response.status(), 401, "missing header");
    let garbage = [("Upstash-Signature", "definitely.not.a-jwt".to_owned())];
    let response = app.post(&path(), body.clone(), &garbage).await;
    assert_eq!(response.status(), 401, "garbage header");

    // The tables appear with the first sync, so none ran.
    assert!(!table_exists(&tenant, "users").await);
}

#[tokio::test]
async fn a_signed_but_malformed_body_is_a_400() {
    let app = app().await;
    for body in [
        b"not json".to_vec(),
        br#"{"tenancyId": "not-a-uuid"}"#.to_vec(),
        br#"{"somethingElse": 1}"#.to_vec(),
    ] {
        let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(&body));
        assert!(answer["error"].as_str().unwrap().contains("tenancyId"));
    }
}

#[tokio::test]
async fn an_unknown_tenancy_is_a_200_with_nothing_done() {
    let app = app().await;
    let body = body(Uuid::new_v4());

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 200);
    assert_eq!(answer["outcome"], "unknownTenancy");
    assert_eq!(answer["databases"], json!([]));
}

#[tokio::test]
async fn without_signing_keys_the_webhook_answers_503() {
    let app = TestApp::spawn_with(&[("PUBLIC_URL", PUBLIC_URL)]).await;
    let body = body(Uuid::new_v4());

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 503);
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("QSTASH_CURRENT_SIGNING_KEY"));
}

#[tokio::test]
async fn a_retryable_failure_answers_500_with_every_database_result() {
    let app = app().await;
    let tenancy = tenancy(&app.pool).await;
    let (url, tenant) = tenant_database().await;
    attach(
        &app.pool,
        tenancy,
        &[
            ("bad", "postgresql://invalid:invalid@invalid:5432/invalid"),
            ("good", &url),
        ],
    )
    .await;
    user(&app.pool, tenancy, "arrives").await;
    sequence_all(&app.pool, 1000).await;
    let body = body(tenancy);

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 500, "QStash must retry: {answer}");
    assert_eq!(answer["ok"], false);
    let databases = answer["databases"].as_array().unwrap();
    assert_eq!(databases[0]["databaseId"], "bad");
    assert_eq!(databases[0]["ok"], false);
    assert_eq!(databases[0]["retryable"], true);
    assert!(databases[0]["error"]
        .as_str()
        .unwrap()
        .contains("cannot resolve host invalid"));
    assert_eq!(databases[1]["databaseId"], "good");
    assert_eq!(databases[1]["ok"], true);
    assert_eq!(external_users(&tenant).await.len(), 1);
}

#[tokio::test]
async fn a_permanent_failure_answers_200_so_qstash_stops_retrying() {
    let app = TestApp::spawn_with(&[
        ("PUBLIC_URL", PUBLIC_URL),
        ("QSTASH_CURRENT_SIGNING_KEY", CURRENT_SIGNING_KEY),
        // Private targets stay refused: the loopback tenant database is a permanent
        // configuration problem.
    ])
    .await;
    let tenancy = tenancy(&app.pool).await;
    let (url, _tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("local", &url)]).await;
    let body = body(tenancy);

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["databases"][0]["retryable"], false);
    assert!(answer["databases"][0]["error"]
        .as_str()
        .unwrap()
        .contains("loopback"));
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let app = app().await;
    let body = vec![b' '; 100 * 1024];

    let (status, answer) = deliver_signed(&app, &body, CURRENT_SIGNING_KEY).await;

    assert_eq!(status, 413);
    assert_eq!(answer["code"], "payload_too_large");
}
