//! [`sync_tenancy`]: brings every external database of one tenancy up to date.
//!
//! For each database (several at once, up to a bound): check the target, connect,
//! prepare the schema, then for each mapping apply batches until the database is caught
//! up or the per-run batch budget is spent. A batch is applied in one transaction in the
//! tenant database, under an advisory lock, after re-reading the watermark inside that
//! lock: two runs for the same database take turns, and the later one starts from where
//! the earlier one stopped, reading the internal database after it did, so it can only
//! move the tenant's copy forward.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use sqlx::PgPool;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::error::SyncError;
use super::external_database::{self, ExternalDatabase};
use super::mapping::{self, Batch, Mapping};
use super::schema;
use super::sessions::{SessionKey, SessionPool, SessionPoolSettings};
use super::target::{self, SessionSettings, TargetPolicy};
use crate::db;
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
    /// Timeouts of every tenant-database session.
    pub session: SessionSettings,
    /// Tenant sessions kept open between syncs.
    pub pool: SessionPoolSettings,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            batch_size: 5000,
            max_batches_per_run: 20,
            database_concurrency: 4,
            session: SessionSettings {
                connect_timeout: Duration::from_secs(10),
                statement_timeout: Duration::from_secs(60),
                lock_timeout: Duration::from_secs(30),
                idle_in_transaction_timeout: Duration::from_secs(120),
            },
            pool: SessionPoolSettings::default(),
        }
    }
}

/// What the engine needs: the internal database, its settings, and the target policy.
pub struct SyncEngine {
    pool: PgPool,
    settings: SyncSettings,
    policy: TargetPolicy,
    prepared: PreparedSchemas,
    sessions: SessionPool,
}

impl SyncEngine {
    pub fn new(pool: PgPool, settings: SyncSettings, policy: TargetPolicy) -> Self {
        let sessions = SessionPool::new(settings.pool);
        Self {
            pool,
            settings,
            policy,
            prepared: PreparedSchemas::default(),
            sessions,
        }
    }

    /// Tenant sessions waiting for their next sync.
    pub fn idle_sessions(&self) -> usize {
        self.sessions.idle_count()
    }
}

/// How long a prepared tenant schema is trusted before it is checked again.
const SCHEMA_RECHECK: Duration = Duration::from_secs(60);

/// Tenant databases whose tables, ownership and privileges this process prepared
/// recently, by tenancy and configuration entry. Preparing costs a dozen statements, DDL
/// checks included; a busy tenancy syncs many times a minute. Any failure of a database
/// forgets it, so a dropped table is recreated on the next attempt.
#[derive(Default)]
struct PreparedSchemas {
    checked: Mutex<HashMap<SessionKey, Instant>>,
}

impl PreparedSchemas {
    fn is_fresh(&self, key: &SessionKey) -> bool {
        let checked = self
            .checked
            .lock()
            .expect("the lock is never held across a panic");
        checked
            .get(key)
            .is_some_and(|at| at.elapsed() < SCHEMA_RECHECK)
    }

    fn mark(&self, key: SessionKey) {
        let mut checked = self
            .checked
            .lock()
            .expect("the lock is never held across a panic");
        checked.retain(|_, at| at.elapsed() < SCHEMA_RECHECK);
        checked.insert(key, Instant::now());
    }

    fn forget(&self, key: &SessionKey) {
        let mut checked = self
            .checked
            .lock()
            .expect("the lock is never held across a panic");
        checked.remove(key);
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
    /// One entry per configured database, in id order.
    pub databases: Vec<DatabaseReport>,
    /// Whether a new sync request was queued because work was left over.
    pub requeued: bool,
}

impl TenancyReport {
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
}

/// Syncs every external database of `tenancy_id`. Failures of single databases are in
/// the report; only a failure to read the tenancy itself is an error.
pub async fn sync_tenancy(
    engine: &SyncEngine,
    tenancy_id: Uuid,
) -> Result<TenancySync, sqlx::Error> {
    let Some(config) = db::tenancy::external_databases(&engine.pool, tenancy_id).await? else {
        tracing::info!(%tenancy_id, "sync requested for an unknown tenancy; nothing to do");
        return Ok(TenancySync::UnknownTenancy);
    };
    let entries = match external_database::parse_all(&config) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%tenancy_id, %error, "unusable external database configuration");
            return Ok(TenancySync::InvalidConfig(error));
        }
    };

    let mut databases: Vec<DatabaseReport> = stream::iter(entries)
        .map(|(database_id, entry)| sync_database(engine, tenancy_id, database_id, entry))
        .buffer_unordered(engine.settings.database_concurrency.max(1))
        .collect()
        .await;
    databases.sort_by(|a, b| a.database_id.cmp(&b.database_id));

    let more_remaining = databases
        .iter()
        .any(|database| matches!(&database.result, Ok(synced) if synced.more_remaining()));
    let requeued = more_remaining
        && db::queue::enqueue_sync(&engine.pool, tenancy_id, SYNC_ENGINE_PATH).await?;
    Ok(TenancySync::Synced(TenancyReport {
        databases,
        requeued,
    }))
}

/// Syncs one database and records the outcome in `"ExternalDbSyncStatus"`.
async fn sync_database(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    database_id: String,
    entry: Result<ExternalDatabase, SyncError>,
) -> DatabaseReport {
    let target = entry
        .as_ref()
        .map(|database| database.target.describe())
        .ok();
    let result = match entry {
        Ok(database) => sync_target(engine, tenancy_id, &database).await,
        Err(error) => Err(error),
    };
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
            db::sync_status::record_success(
                &engine.pool,
                tenancy_id,
                &database_id,
                synced.synced_through(),
            )
            .await
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
    database: &ExternalDatabase,
) -> Result<DatabaseSynced, SyncError> {
    let key = SessionKey {
        tenancy_id,
        fingerprint: database.fingerprint,
    };
    let (clients, reused) = sessions(engine, &key, database, true).await?;
    match sync_on(engine, &key, database, clients).await {
        // A kept session can have been closed while it waited (the server restarted, an
        // idle timeout, a proxy). That says nothing about the database now: try once
        // more on new sessions. Safe, because a batch is all or nothing and idempotent.
        Err(error) if reused && error.is_lost_session() => {
            tracing::debug!(%tenancy_id, error = %error_chain(&error), "a kept tenant session was closed; syncing on new sessions");
            let (clients, _) = sessions(engine, &key, database, false).await?;
            sync_on(engine, &key, database, clients).await
        }
        synced => synced,
    }
}

/// Prepares the schema if needed and syncs every mapping, one session each: the
/// mappings are independent (own table, own watermark, own lock), so they are synced
/// side by side. The sessions are kept for the next sync if every transaction committed,
/// and closed otherwise (one may be mid-transaction).
async fn sync_on(
    engine: &SyncEngine,
    key: &SessionKey,
    database: &ExternalDatabase,
    mut clients: Vec<Client>,
) -> Result<DatabaseSynced, SyncError> {
    let synced = async {
        if !engine.prepared.is_fresh(key) {
            schema::prepare(&mut clients[0], key.tenancy_id, &database.read_roles).await?;
            engine.prepared.mark(*key);
        }
        futures::future::try_join_all(
            clients
                .iter_mut()
                .zip(Mapping::ALL)
                .map(|(client, mapping)| sync_mapping(engine, client, key.tenancy_id, mapping)),
        )
        .await
    }
    .await;
    match synced {
        Ok(mappings) => {
            for client in clients {
                engine.sessions.give_back(*key, client);
            }
            Ok(DatabaseSynced { mappings })
        }
        Err(error) => {
            engine.prepared.forget(key);
            Err(error)
        }
    }
}

/// One session per mapping for `key`'s database, and whether any was kept from an
/// earlier sync: kept ones first (if `reuse`), new ones for the rest. The address policy
/// is checked before connecting; a kept session is still connected to an address that
/// was checked when it was opened.
async fn sessions(
    engine: &SyncEngine,
    key: &SessionKey,
    database: &ExternalDatabase,
    reuse: bool,
) -> Result<(Vec<Client>, bool), SyncError> {
    let mut clients: Vec<Client> = if reuse {
        Mapping::ALL
            .iter()
            .map_while(|_| engine.sessions.take(key))
            .collect()
    } else {
        Vec::new()
    };
    let reused = !clients.is_empty();
    let missing = Mapping::ALL.len() - clients.len();
    if missing > 0 {
        let session = &engine.settings.session;
        let addresses = engine
            .policy
            .check(&database.target, session.connect_timeout)
            .await?;
        let opened = futures::future::try_join_all(
            (0..missing).map(|_| target::connect(&database.target, &addresses, session)),
        )
        .await?;
        clients.extend(opened);
    }
    Ok((clients, reused))
}

/// Applies batches of `mapping` until it is caught up or the batch budget is spent.
///
/// While one batch is written to the tenant database, the next one is read from the
/// internal database. The read-ahead is only used if the watermark, re-read under the
/// lock, is still where it was read from: then no other run wrote in between, and the
/// read-ahead is newer than anything written so far. Otherwise it is read again.
async fn sync_mapping(
    engine: &SyncEngine,
    client: &mut Client,
    tenancy_id: Uuid,
    mapping: Mapping,
) -> Result<MappingReport, SyncError> {
    let settings = &engine.settings;
    let mut report = MappingReport {
        mapping,
        batches: 0,
        changes: 0,
        upserted: 0,
        deleted: 0,
        watermark: -1,
        more_remaining: false,
    };
    let mut read_ahead: Option<ReadAhead> = None;
    loop {
        let transaction = client.transaction().await.map_err(SyncError::target)?;
        let watermark = lock_and_read_watermark(&transaction, mapping).await?;
        report.watermark = watermark;
        let batch = match read_ahead.take() {
            Some(ahead) if ahead.after == watermark => ahead.batch,
            _ => read_batch(engine, tenancy_id, mapping, watermark).await?,
        };
        let Some(batch) = batch else {
            transaction.commit().await.map_err(SyncError::target)?;
            break;
        };

        let full = batch.changes >= u64::from(settings.batch_size);
        let another = full && report.batches + 1 < settings.max_batches_per_run;
        let next_after = batch.last_sequence_id;
        let write = apply_batch(transaction, mapping, &batch);
        let read_next = async {
            if another {
                read_batch(engine, tenancy_id, mapping, next_after)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        let (applied, next) = tokio::join!(write, read_next);
        let applied = applied?;
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

/// A batch read before its turn, and the watermark it was read after.
struct ReadAhead {
    after: i64,
    batch: Option<Batch>,
}

/// Takes the mapping's advisory lock for the transaction, so that runs for the same
/// tenant database take turns, and reads the watermark under it.
async fn lock_and_read_watermark(
    transaction: &Transaction<'_>,
    mapping: Mapping,
) -> Result<i64, SyncError> {
    transaction
        .execute("select pg_advisory_xact_lock($1)", &[&mapping.lock_key()])
        .await
        .map_err(SyncError::target)?;
    let row = transaction
        .query_one(
            "select last_synced_sequence_id from _stack_sync_metadata where mapping_name = $1",
            &[&mapping.name()],
        )
        .await
        .map_err(SyncError::target)?;
    Ok(row.get(0))
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

/// Writes `batch`, moves the watermark forward (never back), and commits.
async fn apply_batch(
    transaction: Transaction<'_>,
    mapping: Mapping,
    batch: &Batch,
) -> Result<mapping::Applied, SyncError> {
    let applied = mapping::apply(&transaction, mapping, batch)
        .await
        .map_err(SyncError::target)?;
    transaction
        .execute(
            "update _stack_sync_metadata \
             set last_synced_sequence_id = $2, updated_at = now() \
             where mapping_name = $1 and last_synced_sequence_id < $2",
            &[&mapping.name(), &batch.last_sequence_id],
        )
        .await
        .map_err(SyncError::target)?;
    transaction.commit().await.map_err(SyncError::target)?;
    Ok(applied)
}
