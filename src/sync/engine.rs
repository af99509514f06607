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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use sqlx::PgPool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::error::SyncError;
use super::external_database::{self, ExternalDatabase};
use super::mapping::{Applied, Batch, Columns, Mapping};
use super::schema;
use super::sessions::{SessionKey, SessionPool, SessionPoolSettings, TenantSession};
use super::target::{self, SessionSettings, TargetPolicy};
use crate::db;
use crate::db::identity::DatabaseIdentity;
use crate::db::sync_status::{DatabaseStates, RetrySchedule, SyncSuccess, SyncedTenancy};
use crate::error::error_chain;
use crate::routes::SYNC_ENGINE_PATH;

/// Tuning of the sync engine.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Changes read and applied per transaction (`SYNC_BATCH_SIZE`).
    pub batch_size: u32,
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
            max_batches_per_run: 20,
            database_concurrency: 4,
            max_databases_per_tenancy: 10,
            session: SessionSettings {
                connect_timeout: Duration::from_secs(10),
                statement_timeout: Duration::from_secs(60),
                lock_timeout: Duration::from_secs(30),
                idle_in_transaction_timeout: Duration::from_secs(120),
            },
            pool: SessionPoolSettings::default(),
            retry: RetrySchedule::default(),
        }
    }
}

/// What the engine needs: the internal database, its settings, and the target policy.
pub struct SyncEngine {
    pool: PgPool,
    settings: SyncSettings,
    policy: TargetPolicy,
    /// The internal database's identity, which no tenant session may have; read on
    /// first use (a failed read is tried again next time).
    internal_identity: tokio::sync::OnceCell<DatabaseIdentity>,
    known: KnownDatabases,
    sessions: SessionPool,
}

impl SyncEngine {
    pub fn new(pool: PgPool, settings: SyncSettings, policy: TargetPolicy) -> Self {
        let sessions = SessionPool::new(settings.pool);
        Self {
            pool,
            settings,
            policy,
            internal_identity: tokio::sync::OnceCell::new(),
            known: KnownDatabases::default(),
            sessions,
        }
    }

    async fn internal_identity(&self) -> Result<DatabaseIdentity, SyncError> {
        let identity = self
            .internal_identity
            .get_or_try_init(|| db::identity::read(&self.pool))
            .await?;
        Ok(*identity)
    }

    /// Tenant sessions waiting for their next sync.
    pub fn idle_sessions(&self) -> usize {
        self.sessions.idle_count()
    }
}

/// How long what this process learned about a tenant database is trusted before it is
/// checked again.
const RECHECK_AFTER: Duration = Duration::from_secs(60);

/// What this process learned about tenant databases it synced recently, by tenancy and
/// configuration entry: that it prepared the tables, ownership and privileges, and the
/// watermark of each mapping as of its last transaction there.
///
/// Preparing costs a dozen statements, DDL checks included, and a busy tenancy syncs
/// many times a minute. A known watermark lets a sync read the changes after it first
/// and leave a mapping with none alone. It is never ahead of the real one: it is what
/// this process committed or read under the lock, and a watermark only moves forward
/// (another process moving it further only costs a re-read). Everything is forgotten
/// after [`RECHECK_AFTER`] and on any failure of the database, so a dropped table is
/// recreated on the next attempt.
#[derive(Default)]
struct KnownDatabases {
    by_key: Mutex<HashMap<SessionKey, Known>>,
}

struct Known {
    prepared_at: Instant,
    watermarks: [Option<i64>; Mapping::ALL.len()],
}

impl KnownDatabases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Known>> {
        self.by_key
            .lock()
            .expect("the lock is never held across a panic")
    }

    fn is_fresh(&self, key: &SessionKey) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|known| known.prepared_at.elapsed() < RECHECK_AFTER)
    }

    /// The schema of `key`'s database was just prepared; its watermarks are not known.
    fn mark(&self, key: SessionKey) {
        let mut known = self.lock();
        known.retain(|_, known| known.prepared_at.elapsed() < RECHECK_AFTER);
        known.insert(
            key,
            Known {
                prepared_at: Instant::now(),
                watermarks: [None; Mapping::ALL.len()],
            },
        );
    }

    fn watermark(&self, key: &SessionKey, mapping: Mapping) -> Option<i64> {
        self.lock()
            .get(key)
            .filter(|known| known.prepared_at.elapsed() < RECHECK_AFTER)
            .and_then(|known| known.watermarks[mapping.index()])
    }

    /// Records a watermark this process committed or read under the lock. The latest
    /// one wins, even if lower: it was real when it was seen.
    fn set_watermark(&self, key: &SessionKey, mapping: Mapping, watermark: i64) {
        if let Some(known) = self.lock().get_mut(key) {
            known.watermarks[mapping.index()] = Some(watermark);
        }
    }

    fn forget(&self, key: &SessionKey) {
        self.lock().remove(key);
    }
}

/// The outcome of [`sync_tenancy`].
#[derive(Debug)]
pub enum TenancySync {
    /// No such tenancy; nothing was done.
    UnknownTenancy,
    /// `dbSync.externalDatabases` itself is unusable. Permanent.
    InvalidConfig(SyncError),
    /// Each configured database was attempted.
    Synced(TenancyReport),
}

#[derive(Debug)]
pub struct TenancyReport {
    /// One entry per configured database that was due, in id order.
    pub databases: Vec<DatabaseReport>,
    /// Configured databases left alone because their last attempt failed and their
    /// next one is not due yet (`"nextAttemptAt"`), in id order. A retry request is
    /// queued for when the first of them is due.
    pub not_due: Vec<String>,
    /// Whether a new sync request was queued because work was left over.
    pub requeued: bool,
    /// Successes whose status the caller records: [`sync_claimed_tenancy`] leaves them
    /// to the completion of the request. `None` when they are recorded already.
    pub unrecorded: Option<SyncedTenancy>,
}

impl TenancyReport {
    /// The databases that synced successfully, with how far.
    fn successes(&self, tenancy_id: Uuid) -> SyncedTenancy {
        let databases = self
            .databases
            .iter()
            .filter_map(|database| {
                let synced = database.result.as_ref().ok()?;
                Some(SyncSuccess {
                    database_id: database.database_id.clone(),
                    last_synced_sequence_id: synced.synced_through(),
                    watermarks: synced.watermarks(),
                })
            })
            .collect();
        SyncedTenancy {
            tenancy_id,
            databases,
        }
    }

    /// Whether some database failed in a way that a later attempt may fix.
    pub fn has_retryable_failure(&self) -> bool {
        self.databases
            .iter()
            .any(|database| matches!(&database.result, Err(error) if error.is_retryable()))
    }
}

#[derive(Debug)]
pub struct DatabaseReport {
    pub database_id: String,
    pub result: Result<DatabaseSynced, SyncError>,
}

#[derive(Debug)]
pub struct DatabaseSynced {
    pub mappings: Vec<MappingReport>,
}

impl DatabaseSynced {
    /// The sequence id up to which every mapping of the database is synced.
    pub fn synced_through(&self) -> i64 {
        self.mappings
            .iter()
            .map(|mapping| mapping.watermark)
            .min()
            .unwrap_or(-1)
    }

    /// Each mapping's watermark, by [`Mapping::index`].
    pub fn watermarks(&self) -> [i64; Mapping::ALL.len()] {
        let mut watermarks = [-1; Mapping::ALL.len()];
        for mapping in &self.mappings {
            watermarks[mapping.mapping.index()] = mapping.watermark;
        }
        watermarks
    }

    /// Changes applied in this run, over all mappings.
    pub fn changes(&self) -> u64 {
        self.mappings.iter().map(|mapping| mapping.changes).sum()
    }

    pub fn more_remaining(&self) -> bool {
        self.mappings.iter().any(|mapping| mapping.more_remaining)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingReport {
    pub mapping: Mapping,
    pub batches: u32,
    pub changes: u64,
    pub upserted: u64,
    pub deleted: u64,
    /// The watermark after this run.
    pub watermark: i64,
    /// The batch budget ran out before the mapping was caught up.
    pub more_remaining: bool,
    /// The database had missed deletions whose tombstones were pruned (it was away, or
    /// its watermark went back), and was brought back to the source: this many rows
    /// that the source no longer has were removed.
    pub removed_by_resync: Option<u64>,
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
    sync_with(engine, tenancy_id, claimed, facts, false).await
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
/// request (one statement for both). Failures are recorded at once, with their next
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
    sync_with(engine, tenancy_id, claimed, facts, true).await
}

/// What the caller read about the tenancy's mappings, by [`Mapping::index`].
#[derive(Debug, Clone, Copy)]
struct MappingFacts {
    /// The latest change of each mapping, when a claim read them.
    latest: Option<[Option<i64>; Mapping::ALL.len()]>,
    /// How far each mapping's tombstones have been pruned, if at all.
    pruned_through: [Option<i64>; Mapping::ALL.len()],
}

async fn sync_with(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    tenancy: ClaimedTenancy,
    facts: MappingFacts,
    defer_successes: bool,
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
                false,
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

    let more_remaining = databases
        .iter()
        .any(|database| matches!(&database.result, Ok(synced) if synced.more_remaining()));
    let requeued = more_remaining
        && db::queue::enqueue_sync(&engine.pool, tenancy_id, SYNC_ENGINE_PATH).await?;
    // A database that failed now, or is waiting for its next attempt, gets a request
    // for then: it heals without a new change to its tenancy.
    if !not_due.is_empty() || databases.iter().any(|database| database.result.is_err()) {
        // Every configured database: the ones attempted and the ones not due.
        let ids: Vec<&str> = databases
            .iter()
            .map(|database| database.database_id.as_str())
            .chain(not_due.iter().map(String::as_str))
            .collect();
        db::sync_status::schedule_retry(&engine.pool, tenancy_id, &ids, SYNC_ENGINE_PATH).await?;
    }
    let mut report = TenancyReport {
        databases,
        not_due,
        requeued,
        unrecorded: None,
    };
    let successes = report.successes(tenancy_id);
    if defer_successes {
        report.unrecorded = Some(successes);
    } else if !successes.databases.is_empty() {
        if let Err(error) = db::sync_status::record_successes(&engine.pool, &successes).await {
            // The syncs themselves are done; losing a status update is not worth
            // failing them.
            tracing::warn!(%tenancy_id, error = %error_chain(&error), "cannot record sync status");
        }
    }
    Ok(TenancySync::Synced(report))
}

/// Syncs one database and records the outcome in `"ExternalDbSyncStatus"`.
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
    let result = match entry {
        Ok(database) => sync_target(engine, tenancy_id, &database_id, &database, facts).await,
        Err(error) => Err(error),
    };
    // Successes are recorded by the caller, all of the tenancy's in one statement.
    let recorded = match &result {
        Ok(synced) => {
            if synced.changes() == 0 {
                tracing::debug!(%tenancy_id, %database_id, "external database already up to date");
            } else {
                tracing::info!(
                    %tenancy_id,
                    %database_id,
                    target = target.as_deref().unwrap_or_default(),
                    changes = synced.changes(),
                    synced_through = synced.synced_through(),
                    more_remaining = synced.more_remaining(),
                    "external database synced"
                );
            }
            Ok(())
        }
        Err(error) => {
            let message = error_chain(error);
            tracing::warn!(
                %tenancy_id,
                %database_id,
                target = target.as_deref().unwrap_or_default(),
                retryable = error.is_retryable(),
                error = %message,
                "external database sync failed"
            );
            db::sync_status::record_failure(
                &engine.pool,
                tenancy_id,
                &database_id,
                &message,
                error.is_retryable(),
                &engine.settings.retry,
            )
            .await
        }
    };
    if let Err(error) = recorded {
        // The sync itself is done; losing one status update is not worth failing it.
        tracing::warn!(%tenancy_id, %database_id, error = %error_chain(&error), "cannot record sync status");
    }
    DatabaseReport {
        database_id,
        result,
    }
}

async fn sync_target(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    database_id: &str,
    database: &ExternalDatabase,
    facts: MappingFacts,
) -> Result<DatabaseSynced, SyncError> {
    let key = SessionKey {
        tenancy_id,
        fingerprint: database.fingerprint,
    };
    let kept = Sessions::new(engine, key, database_id, database, true);
    match sync_on(&kept, facts).await {
        // A kept session can have been closed while it waited (the server restarted, an
        // idle timeout, a proxy). That says nothing about the database now: try once
        // more on new sessions. Safe, because a batch is all or nothing and idempotent.
        Err(error) if kept.reused() && error.is_lost_session() => {
            tracing::debug!(%tenancy_id, error = %error_chain(&error), "a kept tenant session was closed; syncing on new sessions");
            sync_on(
                &Sessions::new(engine, key, database_id, database, false),
                facts,
            )
            .await
        }
        synced => synced,
    }
}

/// Where a sync of one database gets its sessions: kept ones first (if `reuse`), new
/// ones otherwise. The address policy is checked before connecting; a kept session is
/// still connected to an address that was checked when it was opened.
struct Sessions<'a> {
    engine: &'a SyncEngine,
    key: SessionKey,
    database_id: &'a str,
    database: &'a ExternalDatabase,
    reuse: bool,
    reused: AtomicBool,
}

impl<'a> Sessions<'a> {
    fn new(
        engine: &'a SyncEngine,
        key: SessionKey,
        database_id: &'a str,
        database: &'a ExternalDatabase,
        reuse: bool,
    ) -> Self {
        Self {
            engine,
            key,
            database_id,
            database,
            reuse,
            reused: AtomicBool::new(false),
        }
    }

    async fn open(&self) -> Result<TenantSession, SyncError> {
        if self.reuse {
            if let Some(session) = self.engine.sessions.take(&self.key) {
                self.reused.store(true, Ordering::Relaxed);
                return Ok(session);
            }
        }
        let settings = &self.engine.settings.session;
        let addresses = self
            .engine
            .policy
            .check(&self.database.target, settings.connect_timeout)
            .await?;
        let internal = self.engine.internal_identity().await?;
        let client = target::connect(&self.database.target, &addresses, settings, internal).await?;
        Ok(TenantSession::new(client))
    }

    /// Keeps a session whose last transaction committed for the next sync.
    fn give_back(&self, session: TenantSession) {
        self.engine.sessions.give_back(self.key, session);
    }

    /// Whether any session handed out was a kept one.
    fn reused(&self) -> bool {
        self.reused.load(Ordering::Relaxed)
    }
}

/// Prepares the schema if needed, then syncs the mappings side by side, each on a
/// session of its own: they are independent (own table, own watermark, own lock). A
/// session goes back to be kept only after its transactions committed; on a failure it
/// is closed (it may be mid-transaction), and what this process knows about the
/// database is forgotten.
async fn sync_on(
    sessions: &Sessions<'_>,
    facts: MappingFacts,
) -> Result<DatabaseSynced, SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let synced = async {
        let mut first = None;
        if !engine.known.is_fresh(key) {
            let mut session = sessions.open().await?;
            schema::prepare(
                session.client_mut(),
                key.tenancy_id,
                &sessions.database.read_roles,
            )
            .await?;
            engine.known.mark(*key);
            first = Some(session);
        }
        let handed = [first, None];
        let mappings = futures::future::try_join_all(Mapping::ALL.into_iter().zip(handed).map(
            |(mapping, session)| {
                let latest = facts.latest.map(|latest| latest[mapping.index()]);
                let pruned_through = facts.pruned_through[mapping.index()];
                sync_mapping(sessions, mapping, session, latest, pruned_through)
            },
        ))
        .await?;
        Ok(DatabaseSynced { mappings })
    }
    .await;
    if synced.is_err() {
        engine.known.forget(key);
    }
    synced
}

/// Brings one mapping up to date. If this process knows the mapping's watermark, a
/// mapping whose `latest` change (as read by the claim, if any) is not after it is done
/// at once; otherwise the changes after it are read first, and a mapping with none is
/// done without touching the tenant database.
///
/// A known watermark older than the mapping's pruned tombstones (`pruned_through`) is
/// not trusted: the database may have been away while they were pruned (removed from
/// the configuration and added back), so it goes the locked way, which checks.
async fn sync_mapping(
    sessions: &Sessions<'_>,
    mapping: Mapping,
    session: Option<TenantSession>,
    latest: Option<Option<i64>>,
    pruned_through: Option<i64>,
) -> Result<MappingReport, SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let mut read_ahead = None;
    let known = engine
        .known
        .watermark(key, mapping)
        .filter(|watermark| pruned_through.map_or(true, |pruned| *watermark >= pruned));
    if let Some(watermark) = known {
        // Whether the claim saw no change of this mapping after the watermark.
        let caught_up = match latest {
            Some(Some(latest)) => latest <= watermark,
            Some(None) => true,
            None => false,
        };
        let batch = if caught_up {
            None
        } else {
            read_batch(engine, key.tenancy_id, mapping, watermark).await?
        };
        if batch.is_none() {
            if let Some(session) = session {
                sessions.give_back(session);
            }
            return Ok(MappingReport::nothing_after(mapping, watermark));
        }
        read_ahead = Some(ReadAhead {
            after: watermark,
            batch,
        });
    }
    let mut session = match session {
        Some(session) => session,
        None => sessions.open().await?,
    };
    let report = apply_batches(sessions, &mut session, mapping, read_ahead).await?;
    sessions.give_back(session);
    Ok(report)
}

impl MappingReport {
    fn nothing_after(mapping: Mapping, watermark: i64) -> Self {
        Self {
            mapping,
            batches: 0,
            changes: 0,
            upserted: 0,
            deleted: 0,
            watermark,
            more_remaining: false,
            removed_by_resync: None,
        }
    }
}

/// Applies batches of `mapping` until it is caught up or the batch budget is spent.
///
/// While one batch is written to the tenant database, the next one is read from the
/// internal database. A batch read ahead (or before the session was open) is only used
/// if the watermark, re-read under the lock, is still where it was read from: then no
/// other run wrote in between, and the batch is newer than anything written so far.
/// Otherwise it is read again.
async fn apply_batches(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    mut read_ahead: Option<ReadAhead>,
) -> Result<MappingReport, SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let settings = &engine.settings;
    let mut report = MappingReport::nothing_after(mapping, -1);
    // A small batch read after the known watermark: one round trip, guarded by that
    // watermark. If another run moved it meanwhile, nothing was written, and the batch
    // is read again under the lock below.
    if let Some(ReadAhead {
        after,
        batch: Some(batch),
    }) = &read_ahead
    {
        if batch.changes < u64::from(settings.batch_size) {
            if let Some(applied) = write_batch(session, mapping, batch, Some(*after)).await? {
                engine
                    .known
                    .set_watermark(key, mapping, batch.last_sequence_id);
                report.batches = 1;
                report.changes = batch.changes;
                report.upserted = applied.upserted;
                report.deleted = applied.deleted;
                report.watermark = batch.last_sequence_id;
                return Ok(report);
            }
            read_ahead = None;
        }
    }
    let mut deletions_checked = false;
    loop {
        let watermark = begin_locked(session, mapping).await?;
        report.watermark = watermark;
        if !deletions_checked {
            deletions_checked = true;
            let missed = db::tombstones::missed_pruned_deletions(
                &engine.pool,
                key.tenancy_id,
                sessions.database_id,
                mapping.source_table(),
                watermark,
            )
            .await?;
            if missed {
                let removed = remove_rows_not_in_source(sessions, session, mapping).await?;
                report.removed_by_resync = Some(removed);
                read_ahead = None;
                continue;
            }
        }
        let batch = match read_ahead.take() {
            Some(ahead) if ahead.after == watermark => ahead.batch,
            _ => read_batch(engine, key.tenancy_id, mapping, watermark).await?,
        };
        let Some(batch) = batch else {
            session
                .client()
                .batch_execute("commit")
                .await
                .map_err(SyncError::target)?;
            engine.known.set_watermark(key, mapping, watermark);
            break;
        };

        let full = batch.changes >= u64::from(settings.batch_size);
        let another = full && report.batches + 1 < settings.max_batches_per_run;
        let next_after = batch.last_sequence_id;
        let write = write_batch(session, mapping, &batch, None);
        let read_next = async {
            if another {
                read_batch(engine, key.tenancy_id, mapping, next_after)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        let (applied, next) = tokio::join!(write, read_next);
        let applied = applied?.expect("an unguarded write always applies");
        engine
            .known
            .set_watermark(key, mapping, batch.last_sequence_id);
        read_ahead = next?.map(|batch| ReadAhead {
            after: next_after,
            batch,
        });

        report.batches += 1;
        report.changes += batch.changes;
        report.upserted += applied.upserted;
        report.deleted += applied.deleted;
        report.watermark = batch.last_sequence_id;
        if !full {
            break;
        }
        if report.batches >= settings.max_batches_per_run {
            report.more_remaining = true;
            break;
        }
    }
    Ok(report)
}

/// Ids of the source's live rows sent to the tenant database at once during a resync.
const RESYNC_PAGE: i64 = 10_000;

/// Brings a database that missed deletions (their tombstones are pruned) back to the
/// source: in the transaction [`begin_locked`] opened, removes every row of `mapping`
/// whose id the source no longer has, and commits. The ids go to a temporary table a
/// page at a time; memory stays bounded however large the tenancy. The watermark stays:
/// every live row changed after it is still after it in the source. Then the database
/// is recorded as having every deletion up to the latest sequence id applied.
async fn remove_rows_not_in_source(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<u64, SyncError> {
    let (engine, tenancy_id) = (sessions.engine, sessions.key.tenancy_id);
    // Read first: a deletion numbered later comes with a tombstone after this.
    let complete_through = db::tombstones::latest_sequence_id(&engine.pool).await?;
    let client = session.client();
    client
        .batch_execute(
            "create temporary table _stack_sync_keep (id uuid primary key) on commit drop",
        )
        .await
        .map_err(SyncError::target)?;
    let mut after = None;
    loop {
        let ids = db::tombstones::live_ids(
            &engine.pool,
            tenancy_id,
            mapping.source_table(),
            after,
            RESYNC_PAGE,
        )
        .await?;
        let Some(last) = ids.last().copied() else {
            break;
        };
        client
            .execute(
                "insert into pg_temp._stack_sync_keep select pg_catalog.unnest($1::uuid[])",
                &[&ids],
            )
            .await
            .map_err(SyncError::target)?;
        if ids.len() < RESYNC_PAGE as usize {
            break;
        }
        after = Some(last);
    }
    let removed = client
        .execute(
            &format!(
                "delete from {} as target where not exists \
                 (select from pg_temp._stack_sync_keep as keep where keep.id = target.id)",
                mapping.name()
            ),
            &[],
        )
        .await
        .map_err(SyncError::target)?;
    client
        .batch_execute("commit")
        .await
        .map_err(SyncError::target)?;
    db::tombstones::record_resync(
        &engine.pool,
        tenancy_id,
        sessions.database_id,
        complete_through,
    )
    .await?;
    tracing::warn!(
        %tenancy_id,
        database_id = sessions.database_id,
        mapping = mapping.name(),
        removed,
        "the tenant database had missed deletions whose tombstones were pruned; \
         brought it back to the source"
    );
    Ok(removed)
}

/// A batch read before its turn, and the watermark it was read after.
struct ReadAhead {
    after: i64,
    batch: Option<Batch>,
}

/// Opens a transaction, takes the mapping's advisory lock in it, so that runs for the
/// same tenant database take turns, and reads the watermark under the lock: one round
/// trip, on statements prepared once per session. The answer is bounded whatever the
/// tenant did to its table: at most two rows of one `int8`.
async fn begin_locked(session: &mut TenantSession, mapping: Mapping) -> Result<i64, SyncError> {
    let [lock, read] = session
        .statements([LOCK_MAPPING, READ_WATERMARK])
        .await
        .map_err(SyncError::target)?;
    let (name, lock_key) = (mapping.name(), mapping.lock_key());
    let client = session.client();
    let lock_params: [&(dyn ToSql + Sync); 1] = [&lock_key];
    let read_params: [&(dyn ToSql + Sync); 1] = [&name];
    let (begun, locked, rows) = tokio::join!(
        biased;
        client.batch_execute("begin"),
        client.execute(&lock, &lock_params),
        client.query(&read, &read_params),
    );
    begun.map_err(SyncError::target)?;
    locked.map_err(SyncError::target)?;
    match rows.map_err(SyncError::target)?.as_slice() {
        [] => Err(SyncError::MissingWatermark(name)),
        [row] => row.try_get(0).map_err(|_| {
            SyncError::Malformed(format!(
                "the watermark of {name} in _stack_sync_metadata is null"
            ))
        }),
        _ => Err(SyncError::Malformed(format!(
            "_stack_sync_metadata holds more than one row for {name}; its primary key is gone"
        ))),
    }
}

async fn read_batch(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    mapping: Mapping,
    after: i64,
) -> Result<Option<Batch>, SyncError> {
    let batch_size = engine.settings.batch_size;
    Ok(db::changes::next_batch(&engine.pool, mapping, tenancy_id, after, batch_size).await?)
}

const ADVANCE_WATERMARK: &str = "update _stack_sync_metadata \
     set last_synced_sequence_id = $2, updated_at = pg_catalog.now() \
     where mapping_name = $1 and last_synced_sequence_id < $2";

const ADVANCE_WATERMARK_FROM: &str = "update _stack_sync_metadata \
     set last_synced_sequence_id = $2, updated_at = pg_catalog.now() \
     where mapping_name = $1 and last_synced_sequence_id = $3";

/// Every catalog function sent to a tenant database is schema-qualified: the session's
/// `search_path` is set by [`super::target::connect`], but a tenant's trigger could
/// change it on a kept session.
const LOCK_MAPPING: &str = "select pg_catalog.pg_advisory_xact_lock($1)";

/// At most two rows, each one `int8` converted by the server: whatever the tenant did
/// to the table (dropped its key, changed the column's type), the answer stays small.
const READ_WATERMARK: &str = "select last_synced_sequence_id::pg_catalog.int8 \
     from _stack_sync_metadata where mapping_name = $1 limit 2";

/// Writes `batch` (one delete and one upsert statement, whatever the batch size), moves
/// the watermark forward, and commits: sent together, in one round trip, on statements
/// prepared once per session. The server runs them in order; if one fails, the
/// transaction is aborted, the rest fail or roll back, and the first error is returned:
/// nothing of the batch is kept.
///
/// Without a `guard`, the transaction is already open, holds the mapping's lock, and
/// the watermark was checked under it; the watermark never moves back. With
/// `guard: Some(expected)`, the transaction is opened and the lock taken in the same
/// round trip, and every statement does its part only if the watermark is `expected`;
/// `None` is returned when it was not (another run moved it), and then nothing was
/// written.
async fn write_batch(
    session: &mut TenantSession,
    mapping: Mapping,
    batch: &Batch,
    guard: Option<i64>,
) -> Result<Option<Applied>, SyncError> {
    let (delete_sql, upsert_sql, advance_sql) = match guard {
        None => (
            mapping.delete_sql(),
            mapping.upsert_sql(),
            ADVANCE_WATERMARK,
        ),
        Some(_) => (
            mapping.guarded_delete_sql(),
            mapping.guarded_upsert_sql(),
            ADVANCE_WATERMARK_FROM,
        ),
    };
    let [lock, delete, upsert, advance] = session
        .statements([LOCK_MAPPING, delete_sql, upsert_sql, advance_sql])
        .await
        .map_err(SyncError::target)?;
    let columns = Columns::of(&batch.upserts);
    let name = mapping.name();
    let lock_key = mapping.lock_key();
    let expected = guard.unwrap_or_default();
    let guard_params: [&(dyn ToSql + Sync); 2] = [&name, &expected];
    let guarded = guard.is_some();
    let mut upsert_params = columns.params();
    let mut delete_params: Vec<&(dyn ToSql + Sync)> = vec![&batch.deletes];
    let mut advance_params: Vec<&(dyn ToSql + Sync)> = vec![&name, &batch.last_sequence_id];
    if guarded {
        upsert_params.extend(guard_params);
        delete_params.extend(guard_params);
        advance_params.push(&expected);
    }
    let client = session.client();
    // A request is sent when its future is first polled; `biased` makes `join!` poll
    // them in this order, so the server receives them in this order. All are awaited,
    // and the first failure in statement order is the one reported (the later ones
    // only say that the transaction was aborted).
    let beginning = async {
        if guarded {
            client.batch_execute("begin").await
        } else {
            Ok(())
        }
    };
    let locking = async {
        if guarded {
            client.execute(&lock, &[&lock_key]).await.map(drop)
        } else {
            Ok(())
        }
    };
    let deleting = async {
        if batch.deletes.is_empty() {
            Ok(0)
        } else {
            client.execute(&delete, &delete_params).await
        }
    };
    let upserting = async {
        if batch.upserts.is_empty() {
            Ok(0)
        } else {
            client.execute(&upsert, &upsert_params).await
        }
    };
    let advancing = client.execute(&advance, &advance_params);
    let committing = client.batch_execute("commit");
    let (begun, locked, deleted, upserted, advanced, committed) =
        tokio::join!(biased; beginning, locking, deleting, upserting, advancing, committing);
    begun.map_err(SyncError::target)?;
    locked.map_err(SyncError::target)?;
    let deleted = deleted.map_err(SyncError::target)?;
    let upserted = upserted.map_err(SyncError::target)?;
    let advanced = advanced.map_err(SyncError::target)?;
    committed.map_err(SyncError::target)?;
    if guarded && advanced == 0 {
        return Ok(None);
    }
    Ok(Some(Applied { upserted, deleted }))
}
