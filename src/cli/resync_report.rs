//! `resync`: per database and mapping, what was changed to bring it back to the source.

use serde_json::json;
use uuid::Uuid;

use super::table;
use crate::sync::resync::DatabaseResync;

pub fn print(tenancy: Uuid, databases: &[DatabaseResync], as_json: bool) -> anyhow::Result<()> {
    let ok = databases.iter().all(|database| database.ok);
    if as_json {
        let document = json!({ "tenancyId": tenancy, "ok": ok, "databases": databases });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    if databases.is_empty() {
        println!("tenancy {tenancy}: no tenant databases configured");
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
