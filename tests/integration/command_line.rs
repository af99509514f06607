//! The binary itself: configuration errors, `migrate`, `serve` and its shutdown.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::app::CRON_SECRET;
use crate::harness::binary::{command, serve_logging_to};
use crate::harness::postgres::server;
use crate::harness::wait;

/// Runs the binary to completion (bounded) and returns (exit code, stderr).
async fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), command(args, env).output())
        .await
        .expect("the command finished within a minute")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn assert_config_error(env: &[(&str, &str)], variable: &str, secret: Option<&str>) {
    let (code, stderr) = run(&["serve"], env).await;
    assert_eq!(code, Some(2), "{variable}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains(variable), "names {variable}: {stderr}");
    if let Some(secret) = secret {
        assert!(!stderr.contains(secret), "leaks a secret: {stderr}");
    }
}

#[tokio::test]
async fn an_unparsable_database_url_stops_start_up_naming_the_variable() {
    let env = [
        (
            "DATABASE_URL",
            "postgres://app:s3cr3t-pass@host:notaport/db",
        ),
        ("CRON_SECRET", CRON_SECRET),
    ];
    assert_config_error(&env, "DATABASE_URL", Some("s3cr3t-pass")).await;
}

#[tokio::test]
async fn an_unknown_sync_queue_stops_start_up_naming_the_variable() {
    let env = [
        ("DATABASE_URL", "postgres://app:s3cr3t-pass@localhost/db"),
        ("CRON_SECRET", CRON_SECRET),
        ("SYNC_QUEUE", "nonsense"),
    ];
    assert_config_error(&env, "SYNC_QUEUE", Some(CRON_SECRET)).await;
}

#[tokio::test]
async fn missing_required_variables_stop_start_up_naming_them() {
    // Without DATABASE_URL, serve runs an embedded database (see embedded.rs); with one,
    // CRON_SECRET is required.
    assert_config_error(
        &[("DATABASE_URL", "postgres://localhost/db")],
        "CRON_SECRET",
        None,
    )
    .await;
    let bad_log = [
        ("DATABASE_URL", "postgres://localhost/db"),
        ("CRON_SECRET", CRON_SECRET),
        ("LOG_FORMAT", "xml"),
    ];
    assert_config_error(&bad_log, "LOG_FORMAT", None).await;
}

#[tokio::test]
async fn help_documents_every_command() {
    let (code, _) = run(&["--help"], &[]).await;
    assert_eq!(code, Some(0));
    let top = help(&[]).await;
    let commands = commands_in(&top);
    for expected in [
        "serve", "migrate", "demo", "status", "sync", "verify", "resync", "tenancy", "database",
    ] {
        assert!(commands.contains(&expected.to_owned()), "{expected}: {top}");
    }
    // Every command and subcommand the help lists documents itself.
    for command in commands {
        let text = help(&[&command]).await;
        assert!(text.lines().count() > 3, "{command}: {text}");
        for subcommand in commands_in(&text) {
            let text = help(&[&command, &subcommand]).await;
            assert!(text.contains("Usage:"), "{command} {subcommand}: {text}");
        }
    }
}

/// `external-db-sync ARGS --help`, which must succeed.
async fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let output = command(&all, &[]).output().await.unwrap();
    assert!(output.status.success(), "{all:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The commands a help text lists under `Commands:`, without `help`.
fn commands_in(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|command| *command != "help")
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn migrate_applies_the_schema_and_can_run_again() {
    let url = server().empty_database("migrate").await;

    for attempt in 1..=2 {
        let (code, stderr) = run(&["migrate"], &[("DATABASE_URL", &url)]).await;
        assert_eq!(code, Some(0), "attempt {attempt}: {stderr}");
    }

    let pool = crate::harness::postgres::pool(&url).await;
    let tables: i64 = sqlx::query_scalar(
        r#"select count(*) from information_schema.tables where table_schema = 'public' and table_name in
           ('Tenancy', 'ProjectUser', 'ContactChannel', 'DeletedRow', 'OutgoingRequest', 'ExternalDbSyncMetadata')"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 6);
}

#[tokio::test]
async fn migrate_reports_an_unreachable_database_on_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://app:s3cr3t-pass@127.0.0.1:{port}/db?connect_timeout=2");
    let (code, stderr) = run(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-pass"), "{stderr}");
}

/// The loops `serve` runs in-process, by the name they log as `worker`.
const WORKERS: [&str; 2] = ["sequencer", "poller"];

/// The log lines of a `serve` process that logs JSON, each as an object; lines that are
/// not JSON (none are expected) are kept as their text.
fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_owned())))
        .collect()
}

/// The position of the first log line with `message` whose fields include `fields`.
fn position(lines: &[Value], message: &str, fields: &[(&str, &str)]) -> Option<usize> {
    lines.iter().position(|line| {
        line["message"] == message && fields.iter().all(|(name, value)| line[*name] == *value)
    })
}

/// `serve` with its in-process workers: both workers start; on SIGTERM each worker loop
/// stops, then its task, and only then does the process report a clean shut-down and
/// exit 0.
#[tokio::test]
async fn serve_shuts_down_cleanly_on_sigterm() {
    let url = server().migrated_database().await;
    let log = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, _address) = serve_logging_to(
        &url,
        &[("LOG_FORMAT", "json"), ("RUN_WORKERS", "true")],
        &log,
    )
    .await;
    for worker in WORKERS {
        wait::until(
            &format!("the {worker} worker to start"),
            Duration::from_secs(30),
            || {
                let started = position(&log_lines(&log), "worker started", &[("worker", worker)]);
                async move { started }
            },
        )
        .await;
    }

    // SAFETY: kill has no memory-safety preconditions; the pid is our live child's.
    let sent = unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("serve exits within 30 s of SIGTERM")
        .unwrap();

    let lines = log_lines(&log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    let signal = position(&lines, "shutting down", &[("signal", "SIGTERM")])
        .unwrap_or_else(|| panic!("the signal is reported: {text}"));
    let clean = position(&lines, "shut down cleanly", &[])
        .unwrap_or_else(|| panic!("the shut-down is reported: {text}"));
    assert_eq!(clean, lines.len() - 1, "the last line: {text}");
    for worker in WORKERS {
        let stopped = position(&lines, "worker stopped", &[("worker", worker)])
            .unwrap_or_else(|| panic!("the {worker} loop reported its end: {text}"));
        let task = format!("{worker} worker");
        let ended = position(&lines, "stopped", &[("task", &task)])
            .unwrap_or_else(|| panic!("the {task} task reported its end: {text}"));
        assert!(
            signal < stopped && stopped < ended && ended < clean,
            "signal, loop end, task end, clean shut-down in this order: {text}"
        );
    }
    assert!(!text.contains(CRON_SECRET), "{text}");
}
