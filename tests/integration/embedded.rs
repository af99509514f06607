//! `serve` without `DATABASE_URL`: the embedded PostgreSQL, across restarts, alone in
//! its directory, and gone when the service stops.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use uuid::Uuid;

use crate::harness::binary::{command, free_address, wait_until_healthy};

/// A directory for the embedded data, under one the `postgres` account can traverse
/// (when the tests run as root, the cluster runs as that account).
pub(crate) fn data_parent() -> tempfile::TempDir {
    let parent = tempfile::Builder::new()
        .prefix("external-db-sync-embedded-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    parent
}

/// `serve` on `directory` with no `DATABASE_URL` and no `CRON_SECRET`; returns once it
/// answers `/healthz`, with its address and the start-up block's lines.
async fn serve_embedded(directory: &Path) -> (Child, String, Vec<String>) {
    let address = free_address();
    let directory = directory.to_str().unwrap();
    let mut child = command(
        &["serve"],
        &[("EMBEDDED_DATA_DIR", directory), ("BIND_ADDR", &address)],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut block = Vec::new();
    let read_block = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let last = line.contains("cron secret");
            block.push(line);
            if last {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_block)
        .await
        .expect("the start-up block within a minute");
    wait_until_healthy(&address, &mut child).await;
    (child, address, block)
}

/// `serve` on `directory`, expected to give up: its output once it exited (a minute at
/// most).
async fn serve_to_the_end(directory: &Path) -> std::process::Output {
    let output = command(
        &["serve"],
        &[
            ("EMBEDDED_DATA_DIR", directory.to_str().unwrap()),
            ("BIND_ADDR", &free_address()),
        ],
    )
    .output();
    tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("serve gives up within a minute")
        .unwrap()
}

/// The internal database URL of the start-up block, with the password from its file.
fn database_url(block: &[String], directory: &Path) -> String {
    let line = block
        .iter()
        .find(|line| line.contains("internal database"))
        .unwrap_or_else(|| panic!("the block names the database: {block:?}"));
    let shown = line
        .split_whitespace()
        .find(|word| word.starts_with("postgres://"))
        .unwrap();
    let password = std::fs::read_to_string(directory.join("password")).unwrap();
    assert!(
        !line.contains(password.trim()),
        "the block shows no password: {line}"
    );
    shown.replacen("postgres@", &format!("postgres:{}@", password.trim()), 1)
}

async fn stop(mut child: Child) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our live child's.
    let sent = unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("serve exits within a minute of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Processes whose command line names `directory` (the embedded server and its
/// children name their data directory).
pub(crate) fn processes_naming(directory: &Path) -> Vec<String> {
    let needle = directory.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.contains(needle).then_some(text)
        })
        .collect()
}

#[tokio::test]
async fn serve_without_a_database_url_keeps_its_data_across_restarts_and_leaves_nothing_running() {
    let parent = data_parent();
    let directory = parent.path().join("state");

    let (child, address, block) = serve_embedded(&directory).await;
    let ready = reqwest::get(format!("http://{address}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{block:?}");
    let secret_file = directory.join("cron-secret");
    assert!(
        block
            .iter()
            .any(|line| line.contains(secret_file.to_str().unwrap())),
        "the block says where the generated secret is: {block:?}"
    );
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret is private");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    let sequencer = reqwest::Client::new()
        .post(format!(
            "http://{address}/api/latest/internal/external-db-sync/sequencer?stopWhenIdle=true"
        ))
        .bearer_auth(secret.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(
        sequencer.status(),
        200,
        "the generated secret is the one in use"
    );

    let url = database_url(&block, &directory);
    let tenancy = Uuid::new_v4();
    let mut connection = PgConnection::connect(&url).await.unwrap();
    sqlx::query(r#"insert into "Tenancy" ("id", "projectId", "config") values ($1, 'p', '{}')"#)
        .bind(tenancy)
        .execute(&mut connection)
        .await
        .unwrap();
    connection.close().await.unwrap();
    stop(child).await;
    assert_eq!(
        processes_naming(&directory),
        Vec::<String>::new(),
        "no process of the embedded server is left"
    );

    let (child, address, block) = serve_embedded(&directory).await;
    let ready = reqwest::get(format!("http://{address}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let url = database_url(&block, &directory);
    let mut connection = PgConnection::connect(&url).await.unwrap();
    let kept: i64 = sqlx::query_scalar(r#"select count(*) from "Tenancy" where "id" = $1"#)
        .bind(tenancy)
        .fetch_one(&mut connection)
        .await
        .unwrap();
    connection.close().await.unwrap();
    assert_eq!(kept, 1, "the tenancy survived the restart");
    assert_eq!(
        std::fs::read_to_string(&secret_file).unwrap(),
        secret,
        "the same secret"
    );
    stop(child).await;
    assert_eq!(processes_naming(&directory), Vec::<String>::new());
}

#[tokio::test]
async fn a_second_serve_on_the_same_directory_fails_with_a_clear_message() {
    let parent = data_parent();
    let directory = parent.path().join("state");
    let (first, address, _block) = serve_embedded(&directory).await;

    let output = serve_to_the_end(&directory).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another external-db-sync process"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // The first one is untouched.
    let ready = reqwest::get(format!("http://{address}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    stop(first).await;
    assert_eq!(processes_naming(&directory), Vec::<String>::new());
}

#[tokio::test]
async fn a_directory_holding_other_files_is_refused_untouched() {
    let parent = data_parent();
    let directory = parent.path().join("project");
    std::fs::create_dir(&directory).unwrap();
    std::fs::write(directory.join("notes.txt"), "mine").unwrap();
    std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = serve_to_the_end(&directory).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds other files"), "{stderr}");
    let mode = std::fs::metadata(&directory).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "its permissions are left alone");
    assert_eq!(
        std::fs::read_dir(&directory).unwrap().count(),
        1,
        "nothing is written into it"
    );
}

#[tokio::test]
async fn a_data_directory_the_server_account_cannot_reach_is_named() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Only root hands the cluster to another account; CI runs as root.
        eprintln!("skipped: not running as root, so no other account runs the cluster");
        return;
    }
    let closed = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let directory = closed.path().join("state");
    let output = serve_to_the_end(&directory).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("EMBEDDED_DATA_DIR"), "{stderr}");
    assert!(stderr.contains("cannot reach it"), "{stderr}");
}
