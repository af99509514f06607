//! `sync TENANCY`: a sync now, in the foreground, from the binary.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::harness::binary::command;
use crate::harness::fixtures::{sequence_all, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{assert_tenant_matches_source, attach};

/// The binary with `args` against `database_url` and `env`: (exit code, stdout, stderr).
async fn run(
    database_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut variables = vec![("DATABASE_URL", database_url)];
    variables.extend_from_slice(env);
    let output = tokio::time::timeout(Duration::from_secs(60), command(args, &variables).output())
        .await
        .expect("the command ends within a minute")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn sync_brings_a_tenancy_up_to_date_and_says_what_it_did() {
    let url = server().migrated_database().await;
    let pool = pool(&url).await;
    let tenancy = tenancy(&pool).await;
    let (tenant_url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &tenant_url)]).await;
    for name in ["ana", "ben", "cy"] {
        user(&pool, tenancy, name).await;
    }
    sequence_all(&pool, 1000).await;
    let private = [("ALLOW_PRIVATE_TARGETS", "true")];

    let (code, stdout, stderr) = run(&url, &["sync", &tenancy.to_string()], &private).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("DATABASE") && header.contains("RESULT"),
        "{stdout}"
    );
    let row = stdout.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("main") && row.contains("synced"),
        "{stdout}"
    );
    assert!(row.contains(" 3 "), "three changes applied: {stdout}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;

    let (code, stdout, _) = run(&url, &["sync", &tenancy.to_string(), "--json"], &private).await;
    assert_eq!(code, Some(0));
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["databases"][0]["databaseId"], "main");
    assert_eq!(
        summary["databases"][0]["mappings"][0]["changes"], 0,
        "nothing new: {summary}"
    );
}

#[tokio::test]
async fn sync_refuses_what_the_service_refuses_and_names_an_unknown_tenancy() {
    let url = server().migrated_database().await;
    let pool = pool(&url).await;
    let tenancy = tenancy(&pool).await;
    let (tenant_url, _tenant) = tenant_database().await;
    let with_password = tenant_url.replacen("postgres@", "postgres:hunter2-secret@", 1);
    attach(&pool, tenancy, &[("main", &with_password)]).await;

    // Without ALLOW_PRIVATE_TARGETS, a loopback tenant database is refused.
    let (code, stdout, stderr) = run(&url, &["sync", &tenancy.to_string()], &[]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("failed") && stdout.contains("target_refused"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );

    let unknown = Uuid::new_v4();
    let (code, stdout, stderr) = run(&url, &["sync", &unknown.to_string()], &[]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("external-db-sync: no tenancy {unknown}"),
        "one line naming it"
    );
    let (code, _, stderr) = run(&url, &["sync", "not-a-uuid"], &[]).await;
    assert_eq!(code, Some(2), "a bad argument is a usage error: {stderr}");
}
