//! `status`: the tenant databases' lag, as a table or as JSON.

use super::table;
use crate::db::status::{DatabaseStatus, StatusReport, CHANGES_BEHIND_CAP};

/// Longest part of a last error shown in the table (`--json` has it whole).
const ERROR_CHARS: usize = 80;

/// Prints the report; as JSON, it is what `GET /status` answers.
pub fn print(report: &StatusReport, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let statuses = &report.databases;
    if statuses.is_empty() {
        println!("no tenant databases configured");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = statuses.iter().map(row).collect();
    println!(
        "{}",
        table::render(
            &[
                "TENANCY",
                "DATABASE",
                "LATEST",
                "SYNCED THROUGH",
                "BEHIND",
                "LAST SUCCESS",
                "FAILURES",
                "LAST ERROR",
                "REPAIRS",
            ],
            &rows,
        )
    );
    Ok(())
}

fn row(status: &DatabaseStatus) -> Vec<String> {
    let optional = |value: Option<i64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let behind = if status.changes_behind >= CHANGES_BEHIND_CAP {
        format!("{CHANGES_BEHIND_CAP}+")
    } else {
        status.changes_behind.to_string()
    };
    let database = if status.configured {
        status.database_id.clone()
    } else {
        format!("{} (not configured)", status.database_id)
    };
    let last_success = status.seconds_since_success.map_or_else(
        || "never".to_owned(),
        |seconds| format!("{seconds:.0} s ago"),
    );
    let error: String = status
        .last_error
        .as_deref()
        .filter(|_| status.is_failing())
        .unwrap_or("-")
        .chars()
        .take(ERROR_CHARS)
        .collect();
    vec![
        status.tenancy_id.to_string(),
        database,
        optional(status.latest_sequence_id),
        optional(status.synced_through),
        behind,
        last_success,
        status.consecutive_failures.to_string(),
        error,
        repairs(status),
    ]
}

/// How many times the database was brought back to the source, and when last
/// (`--json` says why).
fn repairs(status: &DatabaseStatus) -> String {
    match status.seconds_since_repair {
        Some(seconds) if status.repairs > 0 => {
            format!("{} (last {seconds:.0} s ago)", status.repairs)
        }
        _ => status.repairs.to_string(),
    }
}
