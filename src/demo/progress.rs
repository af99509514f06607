//! What the demo shows while it runs: per tenancy, rows in its tenant database against
//! rows in the source, and the changes it still lacks. Live bars on a terminal; plain
//! lines every two seconds otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use uuid::Uuid;

use super::workload::DemoTenancy;
use crate::db;

/// How often plain lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// One tenancy at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct TenancyProgress {
    /// Users and contact channels in the source.
    pub source_rows: u64,
    /// Users and contact channels in the tenant database.
    pub tenant_rows: u64,
    /// Changes the tenant database does not have yet: sequenced ones after its
    /// watermarks, and ones the sequencer has not numbered yet.
    pub changes_behind: i64,
}

/// Reads every tenancy's progress.
pub async fn measure(
    pool: &PgPool,
    tenancies: &[DemoTenancy],
) -> anyhow::Result<Vec<TenancyProgress>> {
    let ids: Vec<Uuid> = tenancies.iter().map(|tenancy| tenancy.id).collect();
    // Per tenancy, in one pass: its live rows, and its changes not numbered yet (they
    // are behind no watermark, but not synced either).
    let source: HashMap<Uuid, (i64, i64)> = sqlx::query_as::<_, (Uuid, i64, i64)>(
        r#"select "tenancyId", count(*) filter (where live),
                  count(*) filter (where "shouldUpdateSequenceId")
           from (select "tenancyId", true as live, "shouldUpdateSequenceId"
                 from "ProjectUser" where "tenancyId" = any($1)
                 union all
                 select "tenancyId", true, "shouldUpdateSequenceId"
                 from "ContactChannel" where "tenancyId" = any($1)
                 union all
                 select "tenancyId", false, true
                 from "DeletedRow"
                 where "shouldUpdateSequenceId" and "tenancyId" = any($1)
                 union all
                 -- Owners whose mark a channel write deferred (migration 16).
                 select "tenancyId", false, true
                 from "ExternalDbSyncOwnerMark" where "tenancyId" = any($1)) as rows
           group by "tenancyId""#,
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(tenancy, rows, unsequenced)| (tenancy, (rows, unsequenced)))
    .collect();
    let behind: HashMap<Uuid, i64> = db::status::read(pool, None)
        .await?
        .into_iter()
        .map(|status| (status.tenancy_id, status.changes_behind))
        .collect();
    let mut progress = Vec::new();
    for tenancy in tenancies {
        // Before the first sync the tables do not exist: nothing is there yet.
        let tenant_rows: i64 = sqlx::query_scalar(
            "select (select count(*) from users) + (select count(*) from contact_channels)",
        )
        .fetch_one(&tenancy.tenant)
        .await
        .unwrap_or(0);
        let (source_rows, unsequenced) = source.get(&tenancy.id).copied().unwrap_or((0, 0));
        progress.push(TenancyProgress {
            source_rows: source_rows as u64,
            tenant_rows: tenant_rows as u64,
            changes_behind: behind.get(&tenancy.id).copied().unwrap_or(0) + unsequenced,
        });
    }
    Ok(progress)
}

/// The live display of one phase.
pub struct Progress {
    names: Vec<String>,
    /// Present when stdout is a terminal.
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    last_plain: Option<Instant>,
}

impl Progress {
    /// Bars for `names` on a terminal (`interactive`), plain lines otherwise.
    pub fn new(names: Vec<String>, interactive: bool) -> Self {
        let interactive = interactive && std::io::stdout().is_terminal();
        Self {
            names,
            multi: interactive
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout())),
            bars: Vec::new(),
            last_plain: None,
        }
    }

    /// Starts a phase: its title, and fresh bars.
    pub fn phase(&mut self, title: &str) {
        self.finish();
        self.line(title);
        let Some(multi) = &self.multi else {
            self.last_plain = None;
            return;
        };
        let style =
            ProgressStyle::with_template("  {prefix:<14} [{bar:32}] {pos:>8}/{len:<8} rows  {msg}")
                .expect("a valid template")
                .progress_chars("=> ");
        self.bars = self
            .names
            .iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(name.clone());
                bar
            })
            .collect();
    }

    pub fn show(&mut self, progress: &[TenancyProgress]) {
        if self.multi.is_some() {
            for (bar, tenancy) in self.bars.iter().zip(progress) {
                bar.set_length(tenancy.source_rows);
                bar.set_position(tenancy.tenant_rows.min(tenancy.source_rows));
                bar.set_message(format!("{} changes behind", tenancy.changes_behind));
            }
            return;
        }
        if self.last_plain.is_some_and(|at| at.elapsed() < PLAIN_EVERY) {
            return;
        }
        self.last_plain = Some(Instant::now());
        for (name, tenancy) in self.names.iter().zip(progress) {
            println!(
                "  {name:<14} {}/{} rows, {} changes behind",
                tenancy.tenant_rows, tenancy.source_rows, tenancy.changes_behind
            );
        }
    }

    /// Leaves the bars of the phase as they are, drawn once more.
    pub fn finish(&mut self) {
        for bar in self.bars.drain(..) {
            bar.finish();
        }
    }

    /// A line above the bars (or on its own).
    pub fn line(&self, text: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(text);
            }
            None => println!("{text}"),
        }
    }
}
