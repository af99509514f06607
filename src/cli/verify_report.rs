//! `verify`: per database and mapping, what differs from the source.

use uuid::Uuid;

use super::table;
use crate::sync::verify::{Differences, TenancyComparison};

pub fn print(comparison: &TenancyComparison, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(comparison)?);
        return Ok(());
    }
    let (comparisons, equal) = (&comparison.databases, comparison.equal);
    if comparisons.is_empty() {
        println!(
            "tenancy {}: no tenant databases configured",
            comparison.tenancy_id
        );
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut examples = Vec::new();
    for database in comparisons {
        if let Some(error) = &database.error {
            let code = database.code.unwrap_or("error");
            rows.push(vec![
                database.database_id.clone(),
                "-".to_owned(),
                format!("not compared: {code}: {error}"),
            ]);
            continue;
        }
        for mapping in &database.mappings {
            rows.push(vec![
                database.database_id.clone(),
                mapping.mapping.to_owned(),
                format!(
                    "{} source rows, {} in the database: {}",
                    mapping.source_rows,
                    mapping.tenant_rows,
                    if mapping.is_equal() {
                        "equal".to_owned()
                    } else {
                        format!(
                            "{} missing, {} extra, {} differing",
                            mapping.missing.count, mapping.extra.count, mapping.differing.count
                        )
                    }
                ),
            ]);
            for (kind, differences) in [
                ("missing", &mapping.missing),
                ("extra", &mapping.extra),
                ("differing", &mapping.differing),
            ] {
                if let Some(line) =
                    example_line(&database.database_id, mapping.mapping, kind, differences)
                {
                    examples.push(line);
                }
            }
        }
    }
    println!(
        "{}",
        table::render(&["DATABASE", "MAPPING", "RESULT"], &rows)
    );
    for line in examples {
        println!("{line}");
    }
    println!(
        "{}",
        if equal {
            "every database equals its source"
        } else {
            "some database differs from its source: `status` shows whether it is behind or failing"
        }
    );
    Ok(())
}

fn example_line(
    database: &str,
    mapping: &str,
    kind: &str,
    differences: &Differences,
) -> Option<String> {
    if differences.examples.is_empty() {
        return None;
    }
    let ids: Vec<String> = differences.examples.iter().map(Uuid::to_string).collect();
    Some(format!("{database} {mapping} {kind}: {}", ids.join(", ")))
}
