//! `status`: how far behind each tenant database is, from the binary, as JSON and as a
//! table, with its exit code.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::app::{TestApp, CRON_SECRET, PREFIX};
use crate::harness::binary::command;
use crate::harness::fixtures::{sequence_all, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{attach, engine, sync, sync_ok};

/// `status` with `args` against `database_url`: (exit code, stdout).
async fn status(database_url: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        command(&all, &[("DATABASE_URL", database_url)]).output(),
    )
    .await
    .expect("status answers within a minute")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The JSON status of `tenancy`'s one database, and the exit code.
async fn database_status(database_url: &str, tenancy: Uuid) -> (Option<i32>, Value) {
    let (code, stdout) = status(database_url, &[&tenancy.to_string(), "--json"]).await;
    let document: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("status --json is JSON ({error}): {stdout}"));
    let databases = document["databases"].as_array().unwrap();
    assert_eq!(databases.len(), 1, "{document}");
    (code, databases[0].clone())
}

async fn add_users(pool: &PgPool, tenancy: Uuid, count: usize) {
    for n in 0..count {
        user(pool, tenancy, &format!("user {n}")).await;
    }
    sequence_all(pool, 1000).await;
}

async fn allow_connections(database_url: &str, allowed: bool) {
    let name = database_url.rsplit('/').next().unwrap();
    server()
        .admin_execute(&format!(
            r#"alter database "{name}" allow_connections {allowed};
               select pg_terminate_backend(pid) from pg_stat_activity
               where datname = '{name}' and not {allowed}"#
        ))
        .await;
}

#[tokio::test]
async fn status_shows_the_lag_grow_while_a_database_fails_and_vanish_once_it_is_back() {
    let url = server().migrated_database().await;
    let pool = pool(&url).await;
    let tenancy = tenancy(&pool).await;
    let (tenant_url, _tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &tenant_url)]).await;
    add_users(&pool, tenancy, 3).await;

    let (code, before) = database_status(&url, tenancy).await;
    assert_eq!(code, Some(0), "never synced is not failing: {before}");
    assert_eq!(before["databaseId"], "main");
    assert_eq!(before["configured"], true);
    assert_eq!(before["changesBehind"], 3, "{before}");
    assert_eq!(before["syncedThrough"], Value::Null);

    let engine = engine(&pool);
    sync_ok(&pool, &engine, tenancy).await;
    let (code, synced) = database_status(&url, tenancy).await;
    assert_eq!(code, Some(0), "{synced}");
    assert_eq!(synced["changesBehind"], 0, "{synced}");
    assert_eq!(synced["syncedThrough"], synced["latestSequenceId"]);
    assert!(synced["secondsSinceSuccess"].as_f64().unwrap() < 60.0);

    allow_connections(&tenant_url, false).await;
    add_users(&pool, tenancy, 2).await;
    sync(&pool, &engine, tenancy).await;
    let (code, failing) = database_status(&url, tenancy).await;
    assert_eq!(code, Some(1), "a failing database: exit 1: {failing}");
    assert_eq!(failing["changesBehind"], 2, "{failing}");
    assert_eq!(failing["consecutiveFailures"], 1, "{failing}");
    assert!(failing["lastError"].as_str().is_some(), "{failing}");
    add_users(&pool, tenancy, 2).await;
    let (_, growing) = database_status(&url, tenancy).await;
    assert_eq!(growing["changesBehind"], 4, "the lag grows: {growing}");

    let (code, table) = status(&url, &[]).await;
    assert_eq!(code, Some(1));
    let header = table.lines().next().unwrap();
    for column in [
        "TENANCY",
        "DATABASE",
        "SYNCED THROUGH",
        "BEHIND",
        "LAST ERROR",
    ] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|line| line.starts_with(&tenancy.to_string()) && line.contains(" 4 ")),
        "the table has the tenancy's row with its lag: {table}"
    );

    allow_connections(&tenant_url, true).await;
    crate::harness::wait::until("the database to heal", Duration::from_secs(30), || async {
        let report = sync(&pool, &engine, tenancy).await;
        report
            .databases
            .iter()
            .all(|database| database.result.is_ok())
            .then_some(())
    })
    .await;
    let (code, back) = database_status(&url, tenancy).await;
    assert_eq!(code, Some(0), "{back}");
    assert_eq!(back["changesBehind"], 0, "{back}");
    assert_eq!(back["consecutiveFailures"], 0, "{back}");
}

#[tokio::test]
async fn status_of_a_tenancy_without_databases_says_so() {
    let url = server().migrated_database().await;
    let pool = pool(&url).await;
    let tenancy = tenancy(&pool).await;
    let (code, stdout) = status(&url, &[&tenancy.to_string()]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(stdout.trim(), "no tenant databases configured");
}

#[tokio::test]
async fn the_status_route_answers_what_the_command_prints() {
    let app = TestApp::spawn().await;
    let tenancy = tenancy(&app.pool).await;
    let (tenant_url, _tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("main", &tenant_url)]).await;
    add_users(&app.pool, tenancy, 2).await;
    let path = format!("{PREFIX}/status?tenancyId={tenancy}");

    let answer = app.request(Method::GET, &path, Some(CRON_SECRET)).await;
    assert_eq!(answer.status(), 200);
    let answered: Value = answer.json().await.unwrap();
    let (code, stdout) = status(&app.database_url, &[&tenancy.to_string(), "--json"]).await;
    assert_eq!(code, Some(0));
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    let without_clock = |mut document: Value| {
        for database in document["databases"].as_array_mut().unwrap() {
            database["secondsSinceSuccess"] = Value::Null;
        }
        document
    };
    assert_eq!(without_clock(answered.clone()), without_clock(printed));
    assert_eq!(answered["ok"], true);
    assert_eq!(answered["databases"][0]["changesBehind"], 2);

    let unauthorized = app.request(Method::GET, &path, None).await;
    assert_eq!(unauthorized.status(), 401);
    let bad = app
        .request(
            Method::GET,
            &format!("{PREFIX}/status?tenancyId=nope"),
            Some(CRON_SECRET),
        )
        .await;
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["code"], "bad_request");
}
