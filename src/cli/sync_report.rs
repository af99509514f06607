//! `sync`: each database's result, as a table or as the webhook's JSON.

use super::table;
use crate::sync::summary::{DatabaseResult, SyncSummary};

pub fn print(summary: &SyncSummary, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    if let Some(error) = &summary.error {
        println!(
            "tenancy {}: {} ({})",
            summary.tenancy_id,
            error,
            summary.code.unwrap_or("error")
        );
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = summary.databases.iter().map(row).collect();
    rows.extend(summary.not_due_databases.iter().map(|database_id| {
        vec![
            database_id.clone(),
            "not due".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "waiting for its next attempt after a failure".to_owned(),
        ]
    }));
    if rows.is_empty() {
        println!(
            "tenancy {}: no tenant databases configured",
            summary.tenancy_id
        );
        return Ok(());
    }
    println!(
        "{}",
        table::render(
            &["DATABASE", "RESULT", "SYNCED THROUGH", "CHANGES", "ERROR"],
            &rows
        )
    );
    if summary.requeued {
        println!("more changes are left; a new sync request is queued");
    }
    Ok(())
}

fn row(database: &DatabaseResult) -> Vec<String> {
    let changes: u64 = database
        .mappings
        .iter()
        .flatten()
        .map(|mapping| mapping.changes)
        .sum();
    vec![
        database.database_id.clone(),
        if database.ok { "synced" } else { "failed" }.to_owned(),
        database
            .synced_through
            .map_or_else(|| "-".to_owned(), |through| through.to_string()),
        changes.to_string(),
        match (&database.error, database.code) {
            (Some(error), Some(code)) => format!("{code}: {error}"),
            (Some(error), None) => error.clone(),
            _ => "-".to_owned(),
        },
    ]
}
