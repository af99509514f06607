//! `POST …/tenancies/{id}/sync`, `…/verify` and `…/resync`: the operator's commands over
//! HTTP, against the real service and a real tenant database.

use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use crate::harness::app::{TestApp, CRON_SECRET, PREFIX};
use crate::harness::fixtures::{sequence_all, tenancy, tenant_database, user};
use crate::harness::sync::{assert_tenant_matches_source, attach};

async fn post(app: &TestApp, path: &str) -> (u16, Value) {
    let answer = app
        .request(Method::POST, &format!("{PREFIX}{path}"), Some(CRON_SECRET))
        .await;
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

#[tokio::test]
async fn sync_verify_and_resync_routes_repair_a_tenant_database_changed_by_hand() {
    let app = TestApp::spawn_with(&[("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let tenancy = tenancy(&app.pool).await;
    let (tenant_url, tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("main", &tenant_url)]).await;
    for name in ["ana", "bo", "cy"] {
        user(&app.pool, tenancy, name).await;
    }
    sequence_all(&app.pool, 100).await;

    let (status, synced) = post(&app, &format!("/tenancies/{tenancy}/sync")).await;
    assert_eq!(status, 200, "{synced}");
    assert_eq!(synced["ok"], true, "{synced}");
    assert_eq!(synced["databases"][0]["databaseId"], "main", "{synced}");
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;

    sqlx::query("delete from users where display_name = 'bo'")
        .execute(&tenant)
        .await
        .unwrap();
    let (status, compared) = post(&app, &format!("/tenancies/{tenancy}/verify")).await;
    assert_eq!(status, 200, "{compared}");
    assert_eq!(compared["equal"], false, "{compared}");
    assert_eq!(
        compared["databases"][0]["mappings"][0]["missing"]["count"],
        1
    );

    let (status, resynced) = post(
        &app,
        &format!("/tenancies/{tenancy}/resync?databaseId=main"),
    )
    .await;
    assert_eq!(status, 200, "{resynced}");
    assert_eq!(resynced["ok"], true, "{resynced}");
    assert_eq!(resynced["databases"][0]["mappings"][0]["written"], 1);
    assert_tenant_matches_source(&app.pool, tenancy, &tenant).await;
    let (_, compared) = post(&app, &format!("/tenancies/{tenancy}/verify")).await;
    assert_eq!(compared["equal"], true, "{compared}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn tenancy_routes_refuse_unknown_tenancies_and_databases_with_stable_codes() {
    let app = TestApp::spawn().await;
    let tenancy = tenancy(&app.pool).await;
    let unknown = Uuid::new_v4();
    for action in ["sync", "verify", "resync"] {
        let (status, answer) = post(&app, &format!("/tenancies/{unknown}/{action}")).await;
        assert_eq!(status, 404, "{action}: {answer}");
        assert_eq!(answer["code"], "unknown_tenancy", "{action}: {answer}");
        assert_eq!(answer["ok"], false);

        let (status, answer) = post(&app, &format!("/tenancies/nope/{action}")).await;
        assert_eq!(status, 400, "{action}: {answer}");
        assert_eq!(answer["code"], "bad_request");

        let path = format!("{PREFIX}/tenancies/{tenancy}/{action}");
        let answer = app.request(Method::POST, &path, None).await;
        assert_eq!(answer.status(), 401, "{action}");
        let answer = app.request(Method::GET, &path, Some(CRON_SECRET)).await;
        assert_eq!(answer.status(), 405, "{action}");
    }
    for action in ["verify", "resync"] {
        let (status, answer) = post(
            &app,
            &format!("/tenancies/{tenancy}/{action}?databaseId=nope"),
        )
        .await;
        assert_eq!(status, 404, "{action}: {answer}");
        assert_eq!(answer["code"], "unknown_database", "{action}: {answer}");
        let (status, answer) = post(&app, &format!("/tenancies/{tenancy}/{action}?other=1")).await;
        assert_eq!(status, 400, "{action}: {answer}");
    }
    app.stop().await.unwrap();
}
