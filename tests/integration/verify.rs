//! `verify TENANCY` and `resync TENANCY`, from the binary: a tenant database compared
//! with its source, then brought back to it.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::harness::binary::command;
use crate::harness::fixtures::{email, tenancy, tenant_database, user};
use crate::harness::postgres::{pool, server};
use crate::harness::sync::{attach, engine, sync_ok};

async fn verify(database_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    run("verify", database_url, args).await
}

async fn run(subcommand: &str, database_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec![subcommand];
    all.extend_from_slice(args);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        command(
            &all,
            &[
                ("DATABASE_URL", database_url),
                ("ALLOW_PRIVATE_TARGETS", "true"),
            ],
        )
        .output(),
    )
    .await
    .expect("the command ends within two minutes")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn examples(report: &Value, mapping: usize, kind: &str) -> Vec<String> {
    report["databases"][0]["mappings"][mapping][kind]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn verify_finds_rows_changed_by_hand_and_resync_brings_them_back_while_readers_see_every_row()
{
    let url = server().migrated_database().await;
    let pool = pool(&url).await;
    let tenancy = tenancy(&pool).await;
    let (tenant_url, tenant) = tenant_database().await;
    attach(&pool, tenancy, &[("main", &tenant_url)]).await;
    // More users than one page (5,000) on each side, so that the merge crosses pages.
    crate::harness::fixtures::users(&pool, tenancy, 6_000, "user ").await;
    let ana = user(&pool, tenancy, "ana").await;
    email(&pool, tenancy, ana, "ana@example.com", true).await;
    sync_ok(&pool, &engine(&pool), tenancy).await;

    let (code, stdout, stderr) = verify(&url, &[&tenancy.to_string()]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("6001 source rows, 6001 in the database: equal"),
        "{stdout}"
    );
    assert!(
        stdout.contains("every database equals its source"),
        "{stdout}"
    );

    let edited: Uuid = sqlx::query_scalar("select id from users order by id offset 5500 limit 1")
        .fetch_one(&tenant)
        .await
        .unwrap();
    sqlx::query("update users set display_name = 'changed by hand' where id = $1")
        .bind(edited)
        .execute(&tenant)
        .await
        .unwrap();
    let deleted: Uuid = sqlx::query_scalar("select id from users order by id offset 10 limit 1")
        .fetch_one(&tenant)
        .await
        .unwrap();
    sqlx::query("delete from users where id = $1")
        .bind(deleted)
        .execute(&tenant)
        .await
        .unwrap();
    let added = Uuid::new_v4();
    sqlx::query("insert into users (id, signed_up_at) values ($1, now())")
        .bind(added)
        .execute(&tenant)
        .await
        .unwrap();
    sqlx::query("update contact_channels set is_verified = not is_verified")
        .execute(&tenant)
        .await
        .unwrap();

    let (code, stdout, stderr) = verify(&url, &[&tenancy.to_string(), "--json"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["equal"], false);
    let users = &report["databases"][0]["mappings"][0];
    assert_eq!(users["mapping"], "users");
    assert_eq!(users["sourceRows"], 6001, "{users}");
    assert_eq!(users["tenantRows"], 6001, "{users}");
    assert_eq!(examples(&report, 0, "missing"), [deleted.to_string()]);
    assert_eq!(examples(&report, 0, "extra"), [added.to_string()]);
    assert_eq!(examples(&report, 0, "differing"), [edited.to_string()]);
    let channels = &report["databases"][0]["mappings"][1];
    assert_eq!(channels["differing"]["count"], 1, "{channels}");

    // The table names the same ids.
    let (code, stdout, _) = verify(&url, &[&tenancy.to_string(), "--database", "main"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains(&format!("main users missing: {deleted}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 missing, 1 extra, 1 differing"),
        "{stdout}"
    );

    let (code, _, stderr) = verify(&url, &[&tenancy.to_string(), "--database", "nope"]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no database nope"), "{stderr}");
    let unknown = Uuid::new_v4();
    let (code, _, stderr) = verify(&url, &[&unknown.to_string()]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("no tenancy {unknown}")),
        "{stderr}"
    );

    resync_brings_the_database_back(&url, tenancy, &tenant).await;
}

/// After the hand edits above: `resync` makes `verify` pass, and a reader polling
/// `count(*)` meanwhile never sees fewer rows than the source's 6,001. A watermark moved
/// ahead by hand is set back to the source's last change.
async fn resync_brings_the_database_back(url: &str, tenancy: Uuid, tenant: &sqlx::PgPool) {
    sqlx::query(
        "update _stack_sync_metadata set last_synced_sequence_id = 999999999 \
         where mapping_name = 'users'",
    )
    .execute(tenant)
    .await
    .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let (tenant, done) = (tenant.clone(), done.clone());
        async move {
            let mut counts = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let count: i64 = sqlx::query_scalar("select count(*) from users")
                    .fetch_one(&tenant)
                    .await
                    .unwrap();
                counts.push(count);
            }
            counts
        }
    });
    let (code, stdout, stderr) = run("resync", url, &[&tenancy.to_string(), "--json"]).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let counts = reader.await.unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!counts.is_empty());
    assert!(
        counts.iter().all(|count| *count >= 6001),
        "a reader saw fewer rows than the source has: {:?}",
        counts.iter().min()
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let users = &report["databases"][0]["mappings"][0];
    assert_eq!(users["removed"], 1, "{users}");
    assert_eq!(
        users["written"], 2,
        "the deleted and the edited row: {users}"
    );
    assert_eq!(users["watermarkBefore"], 999999999, "{users}");
    let source_last: i64 =
        sqlx::query_scalar(r#"select max("sequenceId") from "ProjectUser" where "tenancyId" = $1"#)
            .bind(tenancy)
            .fetch_one(&pool(url).await)
            .await
            .unwrap();
    assert_eq!(users["watermark"], source_last, "{users}");
    let channels = &report["databases"][0]["mappings"][1];
    assert_eq!(channels["written"], 1, "{channels}");

    let (code, stdout, stderr) = verify(url, &[&tenancy.to_string()]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let count: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(tenant)
        .await
        .unwrap();
    assert_eq!(count, 6001);

    // The table form, and a tenancy that does not exist.
    let (code, stdout, _) = run("resync", url, &[&tenancy.to_string()]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("0 removed, 0 written"), "{stdout}");
    assert!(
        stdout.contains("every database is back to its source"),
        "{stdout}"
    );
    let unknown = Uuid::new_v4();
    let (code, _, stderr) = run("resync", url, &[&unknown.to_string()]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("no tenancy {unknown}")),
        "{stderr}"
    );
}
