//! `resync`: per database and mapping, what was changed to bring it back to the source.

use super::table;
use crate::sync::resync::TenancyResync;

pub fn print(resync: &TenancyResync, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(resync)?);
        return Ok(());
    }
    let (databases, ok) = (&resync.databases, resync.ok);
    if databases.is_empty() {
        println!(
            "tenancy {}: no tenant databases configured",
            resync.tenancy_id
        );
        return Ok(());
    }
    let mut rows = Vec::new();
    for database in databases {
        if let Some(error) = &database.error {
            let code = database.code.unwrap_or("error");
            rows.push(vec![
                database.database_id.clone(),
                "-".to_owned(),
                format!("not resynced: {code}: {error}"),
            ]);
        }
        for mapping in &database.mappings {
            rows.push(vec![
                database.database_id.clone(),
                mapping.mapping.to_owned(),
                format!(
                    "{} removed, {} written; watermark {} (was {})",
                    mapping.removed, mapping.written, mapping.watermark, mapping.watermark_before
                ),
            ]);
        }
    }
    println!(
        "{}",
        table::render(&["DATABASE", "MAPPING", "RESULT"], &rows)
    );
    println!(
        "{}",
        if ok {
            "every database is back to its source"
        } else {
            "some database could not be resynced"
        }
    );
    Ok(())
}
