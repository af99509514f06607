//! `demo`, from the binary: the whole pipeline on an embedded database of its own, its
//! verification, its test hook, and what it leaves behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::embedded::{data_parent, processes_naming};
use crate::harness::binary::command;

/// `demo` with `args`, its temporary directory under `parent`: (exit code, stdout,
/// stdout and stderr).
async fn demo(parent: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    let output = command(&all, &[("TMPDIR", parent.to_str().unwrap())]).output();
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("the demo ends within five minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        stdout.clone(),
        format!("{stdout}{stderr}"),
    )
}

/// The directory the demo said it started PostgreSQL in.
fn demo_directory(output: &str) -> PathBuf {
    let line = output
        .lines()
        .find(|line| line.starts_with("starting PostgreSQL in "))
        .unwrap_or_else(|| panic!("the demo names its directory: {output}"));
    PathBuf::from(line.trim_start_matches("starting PostgreSQL in "))
}

#[tokio::test]
async fn demo_runs_the_pipeline_verifies_every_database_and_leaves_nothing_behind() {
    let parent = data_parent();
    let (code, _, output) = demo(
        parent.path(),
        &["--tenancies", "2", "--users", "300", "--seconds", "3"],
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
    for expected in [
        "initial load: 300 users",
        "burst: inserts, updates and deletes",
        "demo_tenant_2",
        "initial load        1200 rows",
        "commit to visible   p50",
        "verification        2 of 2 tenant databases equal to their source",
    ] {
        assert!(output.contains(expected), "{expected}: {output}");
    }
    let directory = demo_directory(&output);
    assert!(!directory.exists(), "the demo's directory is removed");
    assert!(processes_naming(&directory).is_empty());
}

#[tokio::test]
async fn a_row_changed_by_hand_during_the_demo_fails_its_verification() {
    let parent = data_parent();
    let (code, stdout, output) = demo(
        parent.path(),
        &[
            "--tenancies",
            "2",
            "--users",
            "300",
            "--seconds",
            "1",
            "--corrupt-a-row",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{output}");
    // Progress lines, then the summary.
    let json_start = stdout
        .find("\n{\n")
        .unwrap_or_else(|| panic!("a JSON summary: {output}"));
    let summary: Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(summary["ok"], false, "{summary}");
    let verification = summary["verification"].as_array().unwrap();
    let equal: Vec<bool> = verification
        .iter()
        .map(|database| database["equal"].as_bool().unwrap())
        .collect();
    assert_eq!(equal, [false, true], "{summary}");
    assert_eq!(verification[0]["mappings"][0]["differing"]["count"], 1);
    assert!(summary["latencyMs"]["samples"].as_u64().is_some());
}

#[tokio::test]
async fn demo_keep_leaves_the_service_running_until_interrupted_and_keeps_its_data() {
    let parent = data_parent();
    let mut child = command(
        &[
            "demo",
            "--tenancies",
            "1",
            "--users",
            "50",
            "--seconds",
            "0",
            "--keep",
        ],
        &[("TMPDIR", parent.path().to_str().unwrap())],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let until_psql = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("external-db-sync status");
            seen.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), until_psql)
        .await
        .expect("the psql commands within two minutes");
    let output = seen.join("\n");
    assert!(output.contains("psql -h 127.0.0.1 -p"), "{output}");
    assert!(output.contains("demo_tenant_1"), "{output}");
    let directory = demo_directory(&output);

    // SAFETY: kill has no memory-safety preconditions; the pid is our live child's.
    let sent = unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the demo stops within a minute of Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(directory.join("data").join("PG_VERSION").is_file());
    assert!(processes_naming(&directory).is_empty());
}
