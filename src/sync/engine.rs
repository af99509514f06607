//! [`sync_tenancy`]: brings every external database of one tenancy up to date.
//!
//! For each database (several at once, up to a bound): check the target and connect (or
//! take a kept session), prepare the schema unless this process did so a moment ago,
//! then for each mapping apply batches until the database is caught up or the per-run
//! batch budget is spent; a mapping with nothing after its known watermark is skipped.
//! A batch is applied in one transaction in the tenant database, under an advisory
//! lock, after re-reading the watermark inside that lock: two runs for the same database
//! take turns, and the later one starts from where the earlier one stopped, reading the
//! internal database after it did, so it can only move the tenant's copy forward.

use std::time::Duration;

use futures::stream::{self, StreamExt};
use sqlx::PgPool;
use uuid::Uuid;

use super::connect::SessionSettings;
use super::database::sync_target;
use super::error::SyncError;
use super::external_database::{self, ExternalDatabase};
use super::gather::{GatheredCount, GatheredReads};
use super::known::KnownDatabases;
use super::policy::TargetPolicy;
use super::report::{DatabaseReport, DatabaseSynced, TenancyReport, TenancySync};
use super::sessions::{SessionPool, SessionPoolSettings};
use crate::db;
use crate::db::identity::DatabaseIdentity;
use crate::db::sync_status::{DatabaseStates, FailureKind, RetrySchedule};
use crate::error::error_chain;
use crate::instruments::{self, SyncOutcome};
use crate::mapping::Mapping;

/// Tuning of the sync engine.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Changes read and applied per transaction (`SYNC_BATCH_SIZE`).
    pub batch_size: u32,
    /// Changes per batch once a run found a full batch (`SYNC_STAGED_BATCH_SIZE`): the
    /// batches after it go by `COPY` into a staging table and a set-based merge. `0`
    /// keeps every batch on the upsert path.
    pub staged_batch_size: u32,
    /// Batches per mapping and database in one run before the tenancy is re-queued
    /// (`SYNC_MAX_BATCHES_PER_RUN`).
    pub max_batches_per_run: u32,
    /// Databases of one tenancy synced at the same time (`SYNC_DATABASE_CONCURRENCY`).
    pub database_concurrency: usize,
    /// Most databases one tenancy may configure (`SYNC_MAX_DATABASES_PER_TENANCY`).
    pub max_databases_per_tenancy: usize,
    /// Timeouts of every tenant-database session.
    pub session: SessionSettings,
    /// Tenant sessions kept open between syncs.
    pub pool: SessionPoolSettings,
    /// When a database that failed is attempted again.
    pub retry: RetrySchedule,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            batch_size: 5000,
            staged_batch_size: 20_000,
            max_batches_per_run: 20,
            database_concurrency: 4,
            max_databases_per_tenancy: 10,
            session: SessionSettings {
                connect_timeout: Duration::from_secs(10),
                statement_timeout: Duration::from_secs(60),
                lock_timeout: Duration::from_secs(30),
                idle_in_transaction_timeout: Duration::from_secs(120),
                max_message_bytes: super::framing::DEFAULT_MAX_MESSAGE_BYTES,
            },
            pool: SessionPoolSettings::default(),
            retry: RetrySchedule::default(),
        }
    }
}

/// What the engine needs: the internal database, its settings, and the target policy.
pub struct SyncEngine {
    pub(super) pool: PgPool,
    pub(super) settings: SyncSettings,
    pub(super) policy: TargetPolicy,
    /// The internal database's identity, which no tenant session may have; read on
    /// first use (a failed read is tried again next time).
    internal_identity: tokio::sync::OnceCell<DatabaseIdentity>,
    pub(super) known: KnownDatabases,
    /// Small reads of changes, gathered across the syncs that ask at the same moment.
    pub(super) reads: GatheredReads,
    pub(super) sessions: SessionPool,
    /// Initial copies running at once (see [`INITIAL_COPIES`]).
    pub(super) copy_slots: tokio::sync::Semaphore,
}

/// How many mappings this process copies into empty tables at once. A copy holds an
/// internal connection for as long as it streams; more of them at once could take the
/// pool from the sequencer, the poller and every other tenancy's sync. A mapping that
/// finds no slot free goes by batches, which hold a connection only while each batch
/// is read.
const INITIAL_COPIES: usize = 2;

impl SyncEngine {
    pub fn new(pool: PgPool, settings: SyncSettings, policy: TargetPolicy) -> Self {
        let sessions = SessionPool::new(settings.pool);
        let reads = GatheredReads::new(pool.clone(), settings.batch_size);
        Self {
            reads,
            pool,
            settings,
            policy,
            internal_identity: tokio::sync::OnceCell::new(),
            known: KnownDatabases::default(),
            sessions,
            copy_slots: tokio::sync::Semaphore::new(INITIAL_COPIES),
        }
    }

    pub(super) async fn internal_identity(&self) -> Result<DatabaseIdentity, SyncError> {
        let identity = self
            .internal_identity
            .get_or_try_init(|| db::identity::read(&self.pool))
            .await?;
        Ok(*identity)
    }

    /// Reads of changes that syncs asked at the same moment and one statement answered,
    /// and how many statements that took, since this engine started.
    pub fn gathered_reads(&self) -> GatheredCount {
        self.reads.count()
    }

    /// Tenant sessions waiting for their next sync.
    pub fn idle_sessions(&self) -> usize {
        self.sessions.idle_count()
    }

    /// The databases `tenancy_id` configures (only `only`, if given), in id order, each
    /// parsed or with why it cannot be used; a configuration unusable as a whole is one
    /// entry under [`external_database::WHOLE_CONFIGURATION`]. `None` when there is no
    /// such tenancy. For the operator's commands, which read but reserve nothing.
    pub(super) async fn configured_databases(
        &self,
        tenancy_id: Uuid,
        only: Option<&str>,
    ) -> Result<Option<Vec<external_database::Entry>>, sqlx::Error> {
        let Some(config) = db::tenancy::external_databases(&self.pool, tenancy_id).await? else {
            return Ok(None);
        };
        let entries =
            match external_database::parse_all(&config, self.settings.max_databases_per_tenancy) {
                Ok(entries) => entries,
                Err(error) => {
                    let whole = external_database::WHOLE_CONFIGURATION.to_owned();
                    return Ok(Some(vec![(whole, Err(error))]));
                }
            };
        Ok(Some(
            entries
                .into_iter()
                .filter(|(id, _)| only.map_or(true, |only| only == id))
                .collect(),
        ))
    }
}

/// What the poller's claim read about a tenancy, so that a sync started right after it
/// need not read it again. The latest changes are read after the request was locked
/// (see [`crate::db::queue::claim`]), so they cover every change that relied on it.
#[derive(Debug, Clone, Default)]
pub struct ClaimedTenancy {
    /// `config.dbSync.externalDatabases` (JSON `null` when absent); `None`: no such
    /// tenancy.
    pub external_databases: Option<serde_json::Value>,
    /// The highest sequence id among each mapping's changes, by [`Mapping::index`];
    /// `None` where the mapping has none.
    pub latest_changes: [Option<i64>; Mapping::ALL.len()],
    /// Which databases to leave alone, and how far tombstones are pruned.
    pub databases: DatabaseStates,
}

/// What an operator's `sync` does: [`sync_tenancy`], after forgetting what this process
/// knows of the tenancy's databases, so that each is prepared and each mapping's
/// watermark read under its lock: a table changed behind the service's back since the
/// last sync is noticed and repaired now, not at the tenancy's next change.
pub async fn sync_tenancy_now(
    engine: &SyncEngine,
    tenancy_id: Uuid,
) -> Result<TenancySync, sqlx::Error> {
    engine.known.forget_tenancy(tenancy_id);
    sync_tenancy(engine, tenancy_id).await
}

/// Syncs every external database of `tenancy_id`. Failures of single databases are in
/// the report; only a failure to read the tenancy itself is an error.
pub async fn sync_tenancy(
    engine: &SyncEngine,
    tenancy_id: Uuid,
) -> Result<TenancySync, sqlx::Error> {
    let claimed = db::tenancy::to_sync(&engine.pool, tenancy_id)
        .await?
        .map(|tenancy| ClaimedTenancy {
            external_databases: Some(tenancy.external_databases),
            latest_changes: [None; Mapping::ALL.len()],
            databases: tenancy.databases,
        });
    let Some(claimed) = claimed else {
        tracing::info!(%tenancy_id, "sync requested for an unknown tenancy; nothing to do");
        return Ok(TenancySync::UnknownTenancy);
    };
    let facts = MappingFacts {
        latest: None,
        pruned_through: claimed.databases.pruned_through(),
    };
    sync_with(engine, tenancy_id, claimed, facts, Successes::RecordNow).await
}

/// [`sync_tenancy`] with what its claim read. A mapping whose watermark this process
/// knows to be at or past the mapping's latest change is left alone without reading
/// anything: most syncs of a busy tenancy have changes of one mapping only. A change
/// the claim's latest values do not cover came with a sync request of its own: its
/// sequencer batch committed after the claim locked the request, found it no longer
/// pending, and queued another. Batches that relied on the claimed request committed
/// before the claim could lock it, and the latest values were read after that.
///
/// The statuses of the databases that succeeded are left in
/// [`TenancyReport::unrecorded`], for the caller to record with the completion of the
/// request (one statement for both), unless work was left over: then they are recorded
/// before the next run is queued. Failures are recorded at once, with their next
/// attempt.
pub async fn sync_claimed_tenancy(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    claimed: ClaimedTenancy,
) -> Result<TenancySync, sqlx::Error> {
    let facts = MappingFacts {
        latest: Some(claimed.latest_changes),
        pruned_through: claimed.databases.pruned_through(),
    };
    sync_with(engine, tenancy_id, claimed, facts, Successes::LeaveToCaller).await
}

/// What the caller read about the tenancy's mappings, by [`Mapping::index`].
#[derive(Debug, Clone, Copy)]
pub(super) struct MappingFacts {
    /// The latest change of each mapping, when a claim read them.
    latest: Option<[Option<i64>; Mapping::ALL.len()]>,
    /// How far each mapping's tombstones have been pruned, if at all.
    pub(super) pruned_through: [Option<i64>; Mapping::ALL.len()],
}

impl MappingFacts {
    /// What the caller knows of `mapping`'s latest change.
    pub(super) fn latest(&self, mapping: Mapping) -> LatestChange {
        match self.latest {
            None => LatestChange::Unknown,
            Some(latest) => latest[mapping.index()].map_or(LatestChange::None, LatestChange::At),
        }
    }
}

/// A mapping's latest change, as far as the caller of a sync knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LatestChange {
    /// Not read: the mapping may have changes after any watermark.
    Unknown,
    /// The mapping has no change at all.
    None,
    /// The highest sequence id among the mapping's changes.
    At(i64),
}

/// Who records the statuses of the databases a sync brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Successes {
    /// The sync, at its end.
    RecordNow,
    /// The caller, with the completion of its request: they are left in
    /// [`TenancyReport::unrecorded`].
    LeaveToCaller,
}

/// Syncs the due databases of a tenancy whose configuration the caller read, queues
/// what comes next (more work, retries), and records or hands back the outcomes.
async fn sync_with(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    tenancy: ClaimedTenancy,
    facts: MappingFacts,
    successes: Successes,
) -> Result<TenancySync, sqlx::Error> {
    let Some(config) = tenancy.external_databases else {
        tracing::info!(%tenancy_id, "sync requested for an unknown tenancy; nothing to do");
        return Ok(TenancySync::UnknownTenancy);
    };
    let max_databases = engine.settings.max_databases_per_tenancy;
    let entries = match external_database::parse_all(&config, max_databases) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%tenancy_id, %error, "unusable external database configuration");
            db::sync_status::record_failure(
                &engine.pool,
                tenancy_id,
                external_database::WHOLE_CONFIGURATION,
                &error.to_string(),
                FailureKind::Permanent,
                &engine.settings.retry,
            )
            .await?;
            return Ok(TenancySync::InvalidConfig(error));
        }
    };
    let (due, not_due): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(id, _)| !tenancy.databases.not_due_databases.contains(id));
    let mut not_due: Vec<String> = not_due.into_iter().map(|(id, _)| id).collect();
    not_due.sort();

    let mut databases: Vec<DatabaseReport> = stream::iter(due)
        .map(|(database_id, entry)| sync_database(engine, tenancy_id, database_id, entry, facts))
        .buffer_unordered(engine.settings.database_concurrency.max(1))
        .collect()
        .await;
    databases.sort_by(|a, b| a.database_id.cmp(&b.database_id));

    let mut report = TenancyReport {
        databases,
        not_due,
        requeued: false,
        unrecorded: None,
    };
    let synced = report.successes(tenancy_id);
    // A sync that left work over queues its next run, which a poller may claim at once:
    // that run must find these databases recorded as synced, not still reserved by
    // this one (a database that had failed is reserved while it is attempted), or it
    // would leave them alone until their reservation ran out.
    let more_remaining = report
        .databases
        .iter()
        .any(|database| matches!(&database.result, Ok(synced) if synced.more_remaining()));
    match successes {
        _ if synced.databases.is_empty() => {}
        Successes::LeaveToCaller if !more_remaining => report.unrecorded = Some(synced),
        Successes::LeaveToCaller | Successes::RecordNow => {
            if let Err(error) = db::sync_status::record_successes(&engine.pool, &synced).await {
                // The syncs themselves are done; losing a status update is not worth
                // failing them.
                tracing::warn!(%tenancy_id, error = %error_chain(&error), "cannot record sync status");
            }
        }
    }
    report.requeued = queue_what_comes_next(engine, tenancy_id, &report, more_remaining).await?;
    Ok(TenancySync::Synced(report))
}

/// Queues a new sync request if work was left over (returns whether one was queued),
/// and a retry request for when the first database that failed now, or is waiting for
/// its next attempt, is due: it heals without a new change to its tenancy.
async fn queue_what_comes_next(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    report: &TenancyReport,
    more_remaining: bool,
) -> Result<bool, sqlx::Error> {
    let requeued = more_remaining && db::queue::enqueue_sync(&engine.pool, tenancy_id).await?;
    if report.queues_retry() {
        // Every configured database: the ones attempted and the ones not due.
        let ids: Vec<&str> = (report.databases.iter())
            .map(|database| database.database_id.as_str())
            .chain(report.not_due.iter().map(String::as_str))
            .collect();
        db::sync_status::schedule_retry(&engine.pool, tenancy_id, &ids).await?;
    }
    Ok(requeued)
}

/// Syncs one database and records a failure in `"ExternalDbSyncStatus"` (successes are
/// recorded by the caller, all of the tenancy's in one statement).
async fn sync_database(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    database_id: String,
    entry: Result<ExternalDatabase, SyncError>,
    facts: MappingFacts,
) -> DatabaseReport {
    let target = entry
        .as_ref()
        .map(|database| database.target.describe())
        .ok();
    let target = target.as_deref().unwrap_or_default();
    let started = std::time::Instant::now();
    let result = match entry {
        Ok(database) => sync_target(engine, tenancy_id, &database_id, &database, facts).await,
        Err(error) => Err(error),
    };
    measure(&result, started.elapsed());
    match &result {
        Ok(synced) => log_success(tenancy_id, &database_id, target, synced),
        Err(error) => {
            let message = error_chain(error);
            tracing::warn!(
                %tenancy_id,
                %database_id,
                target,
                retryable = error.is_retryable(),
                error = %message,
                "external database sync failed"
            );
            let kind = if error.is_retryable() {
                FailureKind::Retryable
            } else {
                FailureKind::Permanent
            };
            let recorded = db::sync_status::record_failure(
                &engine.pool,
                tenancy_id,
                &database_id,
                &message,
                kind,
                &engine.settings.retry,
            )
            .await;
            if let Err(error) = recorded {
                // The sync itself is done; losing one status update is not worth
                // failing it.
                tracing::warn!(%tenancy_id, %database_id, error = %error_chain(&error), "cannot record sync status");
            }
        }
    }
    DatabaseReport {
        database_id,
        result,
    }
}

fn measure(result: &Result<DatabaseSynced, SyncError>, took: Duration) {
    let (outcome, upserted, deleted) = match result {
        Ok(synced) => {
            let mappings = &synced.mappings;
            let upserted = mappings.iter().map(|mapping| mapping.upserted).sum();
            let deleted = mappings
                .iter()
                .map(|mapping| {
                    mapping.deleted + mapping.repair.as_ref().map_or(0, |repair| repair.removed)
                })
                .sum();
            (SyncOutcome::Ok, upserted, deleted)
        }
        Err(error) if error.is_retryable() => (SyncOutcome::RetryableFailure, 0, 0),
        Err(_) => (SyncOutcome::PermanentFailure, 0, 0),
    };
    instruments::database_synced(outcome, took, upserted, deleted);
}

fn log_success(tenancy_id: Uuid, database_id: &str, target: &str, synced: &DatabaseSynced) {
    if synced.changes() == 0 {
        tracing::debug!(%tenancy_id, %database_id, "external database already up to date");
    } else {
        tracing::info!(
            %tenancy_id,
            %database_id,
            target,
            changes = synced.changes(),
            synced_through = synced.synced_through(),
            more_remaining = synced.more_remaining(),
            "external database synced"
        );
    }
}
