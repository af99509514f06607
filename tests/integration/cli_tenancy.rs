//! `tenancy create|list|show|delete` and `database add|remove`, from the binary: each
//! command, each refusal with its message and exit code, and no password in any output.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::harness::binary::command;
use crate::harness::fixtures::{sequence_all, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::assert_tenant_matches_source;

const PASSWORD: &str = "Sup3r-Secret-pw";

/// Variables set for one run.
type Env<'a> = &'a [(&'a str, &'a str)];

/// The binary with `args` on `database_url`, `stdin` written to it: (exit code, stdout,
/// stderr). Every output is checked for the password here.
async fn run(
    database_url: &str,
    extra_env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> (Option<i32>, String, String) {
    let mut env = vec![("DATABASE_URL", database_url)];
    env.extend_from_slice(extra_env);
    let mut child = command(args, &env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends within a minute")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{args:?} showed the password:\n{stdout}{stderr}"
    );
    (output.status.code(), stdout, stderr)
}

async fn external_databases(pool: &sqlx::PgPool, tenancy: Uuid) -> Value {
    sqlx::query_scalar(r#"select "config" from "Tenancy" where "id" = $1"#)
        .bind(tenancy)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn tenancies_are_created_listed_shown_and_deleted() {
    let url = server().migrated_database().await;
    let (code, stdout, _) = run(&url, &[], &["tenancy", "create"], None).await;
    assert_eq!(code, Some(0));
    let first: Uuid = stdout.trim().parse().expect("create prints the id alone");
    let (code, stdout, _) = run(
        &url,
        &[],
        &["tenancy", "create", "--project-id", "shop", "--json"],
        None,
    )
    .await;
    assert_eq!(code, Some(0));
    let created: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(created["projectId"], "shop");
    let second: Uuid = created["id"].as_str().unwrap().parse().unwrap();

    let (code, stdout, _) = run(&url, &[], &["tenancy", "list", "--json"], None).await;
    assert_eq!(code, Some(0));
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<&str> = listed["tenancies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tenancy| tenancy["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.to_string(), second.to_string()]);
    let (_, table, _) = run(&url, &[], &["tenancy", "list"], None).await;
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("shop"), "{table}");

    let (code, stdout, _) = run(&url, &[], &["tenancy", "show", &first.to_string()], None).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("project default"), "{stdout}");
    assert!(stdout.contains("no tenant databases"), "{stdout}");

    let (code, _, stderr) = run(&url, &[], &["tenancy", "delete", &first.to_string()], None).await;
    assert_eq!(code, Some(2), "without --yes: {stderr}");
    assert!(stderr.contains("add --yes to confirm"), "{stderr}");
    let internal = pool(&url).await;
    user(&internal, first, "ana").await;
    let (code, stdout, _) = run(
        &url,
        &[],
        &["tenancy", "delete", &first.to_string(), "--yes"],
        None,
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("deleted tenancy"), "{stdout}");
    let users: i64 = sqlx::query_scalar(r#"select count(*) from "ProjectUser""#)
        .fetch_one(&internal)
        .await
        .unwrap();
    assert_eq!(users, 0, "the tenancy's users went with it");
    let (code, _, stderr) = run(
        &url,
        &[],
        &["tenancy", "delete", &first.to_string(), "--yes"],
        None,
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("no tenancy {first}")), "{stderr}");
    let (code, _, stderr) = run(&url, &[], &["tenancy", "show", &first.to_string()], None).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no tenancy"), "{stderr}");
}

#[tokio::test]
async fn database_add_validates_like_the_sync_engine_and_writes_nothing_it_refuses() {
    let url = server().migrated_database().await;
    let internal = pool(&url).await;
    let (_, stdout, _) = run(&url, &[], &["tenancy", "create"], None).await;
    let tenancy: Uuid = stdout.trim().parse().unwrap();
    let id = tenancy.to_string();
    user(&internal, tenancy, "ana").await;
    let (tenant_url, tenant) = tenant_database().await;
    let with_password = tenant_url.replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    let before = external_databases(&internal, tenancy).await;

    let refusals: [(Env, String, &str); 4] = [
        (
            &[],
            format!("postgres://ana:{PASSWORD}@/db"),
            "connectionString: not a URL",
        ),
        (
            &[],
            format!("postgres://ana:{PASSWORD}@db.example.com/db?sslrootcert=/etc/passwd"),
            "sslrootcert may only be `system`",
        ),
        // The test server is on loopback: refused unless private targets are allowed.
        (&[], with_password.clone(), "refused"),
        (
            &[("ALLOW_PRIVATE_TARGETS", "true")],
            format!("mysql://ana:{PASSWORD}@db.example.com/db"),
            "expected a postgres://",
        ),
    ];
    for (env, bad_url, reason) in refusals {
        let (code, _, stderr) = run(
            &url,
            env,
            &["database", "add", &id, "main", "--url", &bad_url],
            None,
        )
        .await;
        assert_eq!(code, Some(2), "{bad_url}: {stderr}");
        assert!(stderr.contains("database main refused"), "{stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
        assert_eq!(external_databases(&internal, tenancy).await, before);
    }
    let allow = [("ALLOW_PRIVATE_TARGETS", "true")];
    let (code, _, stderr) = run(
        &url,
        &allow,
        &[
            "database",
            "add",
            &id,
            "main",
            "--url",
            "-",
            "--read-role",
            "public",
        ],
        Some(&with_password),
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("readRoles cannot name PUBLIC"), "{stderr}");
    let unknown = Uuid::new_v4().to_string();
    let (code, _, stderr) = run(
        &url,
        &allow,
        &["database", "add", &unknown, "main", "--url", &with_password],
        None,
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no tenancy"), "{stderr}");

    // Accepted, from standard input: written, and a sync is queued that fills it.
    let (code, stdout, stderr) = run(
        &url,
        &allow,
        &[
            "database",
            "add",
            &id,
            "main",
            "--url",
            "-",
            "--read-role",
            "analyst",
        ],
        Some(&format!("{with_password}\n")),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("a sync that fills it is queued"),
        "{stdout}"
    );
    let config = external_databases(&internal, tenancy).await;
    let entry = &config["dbSync"]["externalDatabases"]["main"];
    assert_eq!(entry["connectionString"], with_password.as_str());
    assert_eq!(entry["readRoles"], serde_json::json!(["analyst"]));
    let queued: i64 = sqlx::query_scalar(
        r#"select count(*) from "OutgoingRequest"
           where "qstashOptions" -> 'body' ->> 'tenancyId' = $1"#,
    )
    .bind(&id)
    .fetch_one(&internal)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    sqlx::query("create role analyst")
        .execute(&tenant)
        .await
        .ok();
    // What `serve` does next: the sequencer numbers the user, the queued sync runs.
    sequence_all(&internal, 100).await;
    let (code, stdout, stderr) = run(&url, &allow, &["sync", &id], None).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_tenant_matches_source(&internal, tenancy, &tenant).await;

    let (code, _, stderr) = run(
        &url,
        &allow,
        &["database", "add", &id, "main", "--url", &with_password],
        None,
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("already has a database main"), "{stderr}");

    let (code, stdout, _) = run(&url, &[], &["tenancy", "show", &id, "--json"], None).await;
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    let database = &shown["databases"][0];
    assert_eq!(database["databaseId"], "main");
    assert_eq!(
        database["connection"],
        format!("{}?sslmode=prefer", tenant_url.split('?').next().unwrap()),
        "{database}"
    );
    assert_eq!(database["readRoles"], serde_json::json!(["analyst"]));
    let (_, table, _) = run(&url, &[], &["tenancy", "show", &id], None).await;
    assert!(table.contains("sslmode=prefer"), "{table}");
    let (_, listed, _) = run(&url, &[], &["tenancy", "list", "--json"], None).await;
    assert!(listed.contains("\"databases\": 1"), "{listed}");

    let (code, stdout, _) = run(&url, &[], &["database", "remove", &id, "main"], None).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("removed database main"), "{stdout}");
    assert_eq!(
        external_databases(&internal, tenancy).await["dbSync"]["externalDatabases"],
        serde_json::json!({})
    );
    let (code, _, stderr) = run(&url, &[], &["database", "remove", &id, "main"], None).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no database main"), "{stderr}");
}
