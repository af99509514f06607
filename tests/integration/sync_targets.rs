//! Connecting to tenant databases: TLS per `sslmode`, refused targets, and who may read
//! the synced tables.

use std::time::Duration;

use external_db_sync::sync::SyncError;
use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::harness::binary::{peak_rss_bytes, serve_logging_to, PEAK_RSS_BOUND};
use crate::harness::fixtures::{tenancy, tenant_database, user};
use crate::harness::postgres::{migrated_pool, pool, server, short_id};
use crate::harness::sync::{
    attach, attach_config, engine, engine_with, expected_users, external_users, recorded_error,
    sync, sync_ok, table_exists, test_settings, PrivateTargets,
};
use crate::harness::tls::tls_server;
use crate::harness::wait;

/// A database on the TLS-only server, and its URL with `parameters` appended.
async fn tls_database(parameters: &str) -> (String, sqlx::PgPool) {
    let url = tls_server().server.empty_database("tls").await;
    let tenant = pool(&url).await;
    (format!("{url}?{parameters}"), tenant)
}

#[tokio::test]
async fn sslmode_require_syncs_over_tls() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, tenant) = tls_database("sslmode=require").await;
    attach(&internal, tenancy, &[("tls", &url)]).await;
    user(&internal, tenancy, "over TLS").await;

    sync_ok(&internal, &engine(&internal), tenancy).await;

    assert_eq!(
        external_users(&tenant).await,
        expected_users(&internal, tenancy).await
    );
}

/// An entry for a database on the TLS server with `parameters`, trusting `ca_pem`.
fn tls_entry(url: &str, ca_pem: &str) -> serde_json::Value {
    json!({"type": "postgres", "connectionString": url, "caCertificate": ca_pem})
}

#[tokio::test]
async fn sslmode_verify_full_with_the_right_ca_certificate_syncs() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let ca = &tls_server().ca_pem;
    let (url, tenant) = tls_database("sslmode=verify-full").await;
    // verify-ca checks the chain but not the name: "localhost" vs the address works too.
    let (ca_only_url, ca_only_tenant) = tls_database("sslmode=verify-ca").await;
    attach_config(
        &internal,
        tenancy,
        json!({"full": tls_entry(&url, ca), "ca": tls_entry(&ca_only_url, ca)}),
    )
    .await;
    user(&internal, tenancy, "verified").await;

    sync_ok(&internal, &engine(&internal), tenancy).await;

    assert_eq!(external_users(&tenant).await.len(), 1);
    assert_eq!(external_users(&ca_only_tenant).await.len(), 1);
}

#[tokio::test]
async fn sslmode_verify_full_with_another_ca_fails_clearly_and_is_recorded() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, tenant) = tls_database("sslmode=verify-full").await;
    let (ca_only_url, _) = tls_database("sslmode=verify-ca").await;
    let other_ca = &tls_server().other_ca_pem;
    attach_config(
        &internal,
        tenancy,
        json!({"wrong-ca": tls_entry(&url, other_ca), "wrong-ca-only": tls_entry(&ca_only_url, other_ca)}),
    )
    .await;
    user(&internal, tenancy, "never arrives").await;

    let report = sync(&internal, &engine(&internal), tenancy).await;

    for database in &report.databases {
        let error = database.result.as_ref().unwrap_err();
        assert!(matches!(error, SyncError::Tls(_)), "{error:?}");
        assert!(
            error.to_string().contains("certificate rejected"),
            "{error}"
        );
        assert!(!error.is_retryable());
    }
    let (recorded, retryable, _) = recorded_error(&internal, tenancy, "wrong-ca").await;
    assert!(recorded.unwrap().contains("certificate rejected"));
    assert_eq!(retryable, Some(false));
    assert!(!table_exists(&tenant, "users").await);
}

/// Four entries whose `sslrootcert` names something that must never be read: a file
/// that never ends, a FIFO that blocks a reader forever, a directory, a missing file.
/// The FIFO lives in `files`.
fn entries_naming_files(url: &str, files: &tempfile::TempDir) -> serde_json::Value {
    let fifo = files.path().join("fifo");
    let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path and has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
    let paths = [
        "/dev/zero".to_owned(),
        fifo.display().to_string(),
        files.path().display().to_string(),
        "/no/such/file.pem".to_owned(),
    ];
    let entries: serde_json::Map<String, serde_json::Value> = paths
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let url = format!("{url}?sslmode=verify-full&sslrootcert={path}");
            (
                format!("db{index}"),
                json!({"type": "postgres", "connectionString": url}),
            )
        })
        .collect();
    entries.into()
}

/// A tenant cannot make the service open a file: every `sslrootcert` path is refused
/// when the configuration is read, before anything is opened. A FIFO would block a read
/// forever and `/dev/zero` would never end one, so a prompt answer proves no read.
#[tokio::test]
async fn sslrootcert_paths_are_refused_before_anything_is_read() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let files = tempfile::tempdir().unwrap();
    let (url, tenant) = tenant_database().await;
    let entries = entries_naming_files(&url, &files);
    attach_config(&internal, tenancy, entries).await;
    user(&internal, tenancy, "stays put").await;

    let report = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        sync(&internal, &engine(&internal), tenancy),
    )
    .await
    .expect("the sync answered without reading any of the files");

    let answers: Vec<String> = report
        .databases
        .iter()
        .map(|database| {
            let error = database.result.as_ref().unwrap_err();
            assert!(matches!(error, SyncError::InvalidConfig(_)), "{error:?}");
            error.to_string()
        })
        .collect();
    assert_eq!(answers.len(), 4);
    assert!(answers[0].contains("caCertificate"), "{}", answers[0]);
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "the answer must not tell which paths exist: {answers:?}"
    );
    assert!(!table_exists(&tenant, "users").await);
}

/// The same entries against a running `serve`: each database's refusal is recorded,
/// `/healthz` keeps answering (a FIFO read would hold a runtime thread), and the
/// process stays small (a read of `/dev/zero` would grow it without end).
#[tokio::test]
async fn serve_stays_small_and_answers_while_tenants_name_files() {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let tenancy = tenancy(&internal).await;
    let files = tempfile::tempdir().unwrap();
    let (url, _) = tenant_database().await;
    attach_config(&internal, tenancy, entries_naming_files(&url, &files)).await;
    user(&internal, tenancy, "stays put").await;

    let log = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, address) = serve_logging_to(&database_url, &[], &log).await;
    let internal = &internal;
    wait::until(
        "the four refusals to be recorded",
        Duration::from_secs(30),
        || async move {
            let refused: i64 = sqlx::query_scalar(
                r#"select count(*) from "ExternalDbSyncStatus"
                   where "tenancyId" = $1 and "lastError" like '%caCertificate%'"#,
            )
            .bind(tenancy)
            .fetch_one(internal)
            .await
            .unwrap();
            (refused == 4).then_some(())
        },
    )
    .await;
    let health = reqwest::get(format!("http://{address}/healthz"))
        .await
        .unwrap();
    let peak = peak_rss_bytes(child.id().unwrap());
    child.kill().await.unwrap();

    assert_eq!(health.status(), 200);
    assert!(
        peak < PEAK_RSS_BOUND,
        "the service peaked at {} MiB",
        peak / 1024 / 1024
    );
}

#[tokio::test]
async fn sslmode_disable_cannot_reach_a_tls_only_server() {
    // The counterpart of the tests above: the server really refuses plain connections,
    // so their success means the connection was encrypted.
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, _tenant) = tls_database("sslmode=disable").await;
    attach(&internal, tenancy, &[("plain", &url)]).await;

    let report = sync(&internal, &engine(&internal), tenancy).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(error.to_string().contains("pg_hba.conf"), "{error}");
}

#[tokio::test]
async fn a_loopback_target_is_refused_unless_private_targets_are_allowed() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, tenant) = tenant_database().await;
    assert!(
        url.contains("@127.0.0.1:"),
        "the test server listens on loopback"
    );
    attach(&internal, tenancy, &[("local", &url)]).await;
    user(&internal, tenancy, "stays inside").await;
    let strict = engine_with(&internal, test_settings(), PrivateTargets::Refused);

    let report = sync(&internal, &strict, tenancy).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(matches!(error, SyncError::TargetRefused(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("127.0.0.1 is a loopback address"),
        "{error}"
    );
    assert!(
        error.to_string().contains("ALLOW_PRIVATE_TARGETS"),
        "{error}"
    );
    assert!(!report.has_retryable_failure());
    assert!(!table_exists(&tenant, "users").await, "nothing was written");
    let (recorded, retryable, _) = recorded_error(&internal, tenancy, "local").await;
    assert!(recorded.unwrap().contains("loopback"));
    assert_eq!(retryable, Some(false));

    // With private targets allowed, the same database is synced.
    sync_ok(&internal, &engine(&internal), tenancy).await;
    assert_eq!(external_users(&tenant).await.len(), 1);
}

/// The internal database is refused however a tenant spells it, even with private
/// targets allowed, and nothing is created in it. The Unix socket passes every address
/// check (it has no address); only the identity check after connecting stops it.
#[tokio::test]
async fn the_internal_database_is_refused_however_it_is_spelled() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let options = internal.connect_options();
    let (port, dbname) = (
        options.get_port(),
        options.get_database().unwrap().to_owned(),
    );
    let mut spellings = vec![
        ("own", server().url(&dbname)),
        (
            "mapped",
            format!("postgres://postgres@[::ffff:127.0.0.1]:{port}/{dbname}"),
        ),
        (
            "unspecified",
            format!("postgres://postgres@0.0.0.0:{port}/{dbname}"),
        ),
        (
            "name",
            format!("postgres://postgres@localhost:{port}/{dbname}"),
        ),
    ];
    let socket = server().socket_directory.as_ref().map(|directory| {
        let encoded = directory.display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{encoded}:{port}/{dbname}")
    });
    spellings.extend(socket.map(|url| ("socket", url)));
    let entries: serde_json::Map<String, serde_json::Value> = spellings
        .iter()
        .map(|(id, url)| {
            (
                (*id).to_owned(),
                json!({"type": "postgres", "connectionString": url}),
            )
        })
        .collect();
    attach_config(&internal, tenancy, entries.into()).await;
    user(&internal, tenancy, "must not land in the internal database").await;

    let report = sync(&internal, &engine(&internal), tenancy).await;

    assert_eq!(report.databases.len(), spellings.len());
    for database in &report.databases {
        let error = database.result.as_ref().unwrap_err();
        assert!(
            matches!(error, SyncError::TargetRefused(_))
                && error.to_string().contains("internal database"),
            "{}: {error}",
            database.database_id
        );
    }
    let exists: bool = sqlx::query_scalar("select to_regclass('users') is not null")
        .fetch_one(&internal)
        .await
        .unwrap();
    assert!(!exists);
}

/// A login role on the test server, unique to this test.
async fn role(prefix: &str) -> String {
    let name = format!("{prefix}_{}", short_id());
    server()
        .admin_execute(&format!(r#"create role "{name}" login"#))
        .await;
    name
}

async fn connect_as(url: &str, role: &str) -> PgConnection {
    PgConnection::connect(&url.replacen("postgres@", &format!("{role}@"), 1))
        .await
        .unwrap()
}

fn sqlstate(result: Result<impl std::fmt::Debug, sqlx::Error>) -> Option<String> {
    match result {
        Err(sqlx::Error::Database(error)) => error.code().map(|code| code.into_owned()),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test]
async fn only_read_roles_can_read_and_nobody_can_write() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, tenant) = tenant_database().await;
    let analyst = role("analyst").await;
    let outsider = role("outsider").await;
    // Privileges granted behind the service's back are taken away again.
    sqlx::query("create table users (id uuid primary key, display_name text, profile_image_url text, primary_email text, primary_email_verified boolean not null default false, signed_up_at timestamp not null, client_metadata jsonb not null default '{}', client_read_only_metadata jsonb not null default '{}', server_metadata jsonb not null default '{}', is_anonymous boolean not null default false)")
        .execute(&tenant)
        .await
        .unwrap();
    sqlx::query(&format!(
        r#"grant select, insert on users to "{outsider}", public"#
    ))
    .execute(&tenant)
    .await
    .unwrap();
    attach_config(
        &internal,
        tenancy,
        serde_json::json!({ "main": {
            "type": "postgres", "connectionString": url, "readRoles": [analyst] } }),
    )
    .await;
    user(&internal, tenancy, "readable").await;

    sync_ok(&internal, &engine(&internal), tenancy).await;

    let mut as_analyst = connect_as(&url, &analyst).await;
    for table in ["users", "contact_channels"] {
        let count: i64 = sqlx::query_scalar(&format!("select count(*) from {table}"))
            .fetch_one(&mut as_analyst)
            .await
            .unwrap();
        assert_eq!(count, i64::from(table == "users"), "{table}");
    }
    let write = sqlx::query("delete from users")
        .execute(&mut as_analyst)
        .await;
    assert_eq!(sqlstate(write).as_deref(), Some("42501"));
    let write = sqlx::query("insert into contact_channels select * from contact_channels")
        .execute(&mut as_analyst)
        .await;
    assert_eq!(sqlstate(write).as_deref(), Some("42501"));

    let mut as_outsider = connect_as(&url, &outsider).await;
    for statement in [
        "select count(*) from users",
        "select count(*) from contact_channels",
        "select count(*) from _stack_sync_metadata",
        "insert into users (id, signed_up_at) values (gen_random_uuid(), now())",
    ] {
        let result = sqlx::query(statement).execute(&mut as_outsider).await;
        assert_eq!(sqlstate(result).as_deref(), Some("42501"), "{statement}");
    }
}

#[tokio::test]
async fn a_read_role_that_does_not_exist_is_a_permanent_clear_error() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    let (url, _tenant) = tenant_database().await;
    attach_config(
        &internal,
        tenancy,
        serde_json::json!({ "main": {
            "type": "postgres", "connectionString": url, "readRoles": ["no_such_role_x"] } }),
    )
    .await;

    let report = sync(&internal, &engine(&internal), tenancy).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(error.to_string().contains("no_such_role_x"), "{error}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn an_unsupported_database_type_is_recorded_and_not_retried() {
    let internal = migrated_pool().await;
    let tenancy = tenancy(&internal).await;
    attach_config(
        &internal,
        tenancy,
        serde_json::json!({ "warehouse": {
            "type": "mysql", "connectionString": "mysql://a:secret@db.example.com/x" } }),
    )
    .await;
    let report = sync(&internal, &engine(&internal), tenancy).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(
        error.to_string().contains("type `mysql` is not supported"),
        "{error}"
    );
    assert!(!report.has_retryable_failure());
    let (recorded, retryable, failures) = recorded_error(&internal, tenancy, "warehouse").await;
    assert!(!recorded.unwrap().contains("secret"));
    assert_eq!((retryable, failures), (Some(false), 1));
}
