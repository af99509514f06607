//! The demo's one summary: what it wrote, how fast it arrived, and whether every tenant
//! database equals its source.

use std::time::Duration;

use serde_json::json;

use super::workload::{Latencies, Written};
use super::DemoArgs;
use crate::sync::verify::DatabaseComparison;

pub struct Summary {
    pub tenancies: u32,
    pub users_per_tenancy: u32,
    /// Users and contact channels of the initial load, all tenancies.
    pub initial_rows: u64,
    /// From the first write of the load until every tenant database had it.
    pub initial_load: Duration,
    pub burst: Duration,
    pub written: Written,
    /// After the burst, until every tenant database had every change.
    pub catch_up: Duration,
    pub latencies: Latencies,
    pub verification: Vec<DatabaseComparison>,
}

impl Summary {
    pub fn new(args: &DemoArgs) -> Self {
        Self {
            tenancies: args.tenancies,
            users_per_tenancy: args.users,
            initial_rows: 0,
            initial_load: Duration::ZERO,
            burst: Duration::ZERO,
            written: Written::default(),
            catch_up: Duration::ZERO,
            latencies: Latencies::default(),
            verification: Vec::new(),
        }
    }

    /// Every tenant database was compared and found equal to its source.
    pub fn all_equal(&self) -> bool {
        self.verification.len() == self.tenancies as usize
            && self.verification.iter().all(|database| database.equal)
    }

    fn equal_count(&self) -> usize {
        self.verification
            .iter()
            .filter(|database| database.equal)
            .count()
    }

    fn rate(count: u64, took: Duration) -> f64 {
        count as f64 / took.as_secs_f64().max(0.001)
    }

    pub fn print(&self, as_json: bool) -> anyhow::Result<()> {
        let millis = |quantile: f64| {
            self.latencies
                .quantile(quantile)
                .map(|latency| latency.as_secs_f64() * 1000.0)
        };
        if as_json {
            let document = json!({
                "ok": self.all_equal(),
                "tenancies": self.tenancies,
                "usersPerTenancy": self.users_per_tenancy,
                "initialLoad": {
                    "rows": self.initial_rows,
                    "seconds": self.initial_load.as_secs_f64(),
                    "rowsPerSecond": Self::rate(self.initial_rows, self.initial_load),
                },
                "burst": {
                    "seconds": self.burst.as_secs_f64(),
                    "changes": self.written,
                    "changesPerSecond": Self::rate(self.written.total(), self.burst),
                    "catchUpSeconds": self.catch_up.as_secs_f64(),
                },
                "latencyMs": {
                    "p50": millis(0.5), "p99": millis(0.99),
                    "samples": self.latencies.samples.len(), "lost": self.latencies.lost,
                },
                "verification": self.verification,
            });
            println!("{}", serde_json::to_string_pretty(&document)?);
            return Ok(());
        }
        let written = &self.written;
        let latency = match (millis(0.5), millis(0.99)) {
            (Some(p50), Some(p99)) => format!(
                "p50 {p50:.0} ms, p99 {p99:.0} ms ({} samples, {} not visible in time)",
                self.latencies.samples.len(),
                self.latencies.lost
            ),
            _ => "no samples (the burst was too short)".to_owned(),
        };
        println!(
            "\nsummary\n  \
             tenancies           {} (each with its own tenant database)\n  \
             initial load        {} rows ({} users and their emails per tenancy) in {:.1} s: \
             {:.0} rows/s into the tenant databases\n  \
             burst               {} changes in {:.0} s ({} inserts, {} updates, {} deletes): \
             {:.0} changes/s; caught up {:.1} s after it ended\n  \
             commit to visible   {latency}\n  \
             verification        {} of {} tenant databases equal to their source",
            self.tenancies,
            self.initial_rows,
            self.users_per_tenancy,
            self.initial_load.as_secs_f64(),
            Self::rate(self.initial_rows, self.initial_load),
            written.total(),
            self.burst.as_secs_f64(),
            written.inserts,
            written.updates,
            written.deletes,
            Self::rate(written.total(), self.burst),
            self.catch_up.as_secs_f64(),
            self.equal_count(),
            self.tenancies,
        );
        for database in self.verification.iter().filter(|database| !database.equal) {
            let differences: Vec<String> = database
                .mappings
                .iter()
                .filter(|mapping| !mapping.is_equal())
                .map(|mapping| {
                    format!(
                        "{}: {} missing, {} extra, {} differing",
                        mapping.mapping,
                        mapping.missing.count,
                        mapping.extra.count,
                        mapping.differing.count
                    )
                })
                .chain(database.error.clone())
                .collect();
            println!("  DIFFERS             {}", differences.join("; "));
        }
        Ok(())
    }
}
