//! Syncing one tenant database: its sessions, its schema, and its mappings side by side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::apply::{apply_batches, ReadAhead};
use super::connect;
use super::engine::{LatestChange, MappingFacts, SyncEngine};
use super::error::SyncError;
use super::external_database::ExternalDatabase;
use super::framing::MessageBound;
use super::report::{DatabaseSynced, MappingReport};
use super::schema;
use super::sessions::{SessionKey, TenantSession};
use crate::db;
use crate::error::error_chain;
use crate::mapping::Mapping;
use uuid::Uuid;

/// Syncs one database of a tenancy: on kept sessions first, and once more on new ones if
/// a kept session turns out to be closed.
pub(super) async fn sync_target(
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
    let kept = Sessions::new(engine, key, database_id, database, SessionSource::KeptFirst);
    match sync_on(&kept, facts).await {
        // A kept session can have been closed while it waited (the server restarted, an
        // idle timeout, a proxy). That says nothing about the database now: try once
        // more on new sessions. Safe, because a batch is all or nothing and idempotent.
        Err(error) if kept.reused() && error.is_lost_session() => {
            tracing::debug!(%tenancy_id, error = %error_chain(&error), "a kept tenant session was closed; syncing on new sessions");
            let new = Sessions::new(engine, key, database_id, database, SessionSource::New);
            sync_on(&new, facts).await
        }
        // A synced table (or the watermark's row) dropped since this process last
        // prepared the schema: the failure made it forget, so the next try prepares it
        // again, which creates what is missing and takes the watermark back.
        Err(error) if error.is_missing_table() => {
            tracing::warn!(%tenancy_id, error = %error_chain(&error), "a synced table of a tenant database is gone; preparing its schema again");
            let new = Sessions::new(engine, key, database_id, database, SessionSource::New);
            sync_on(&new, facts).await
        }
        synced => synced,
    }
}

/// Where [`Sessions`] takes a session from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionSource {
    /// A kept session of the database if there is one, a new one otherwise.
    KeptFirst,
    /// Always a new session.
    New,
}

/// Where a sync of one database gets its sessions, as its [`SessionSource`] says. The
/// address policy is checked before connecting; a kept session is still connected to an
/// address that was checked when it was opened.
pub(super) struct Sessions<'a> {
    pub(super) engine: &'a SyncEngine,
    pub(super) key: SessionKey,
    pub(super) database_id: &'a str,
    database: &'a ExternalDatabase,
    source: SessionSource,
    reused: AtomicBool,
    /// The bounds of the sessions handed out, asked when a sync fails.
    bounds: Mutex<Vec<MessageBound>>,
}

impl<'a> Sessions<'a> {
    pub(super) fn new(
        engine: &'a SyncEngine,
        key: SessionKey,
        database_id: &'a str,
        database: &'a ExternalDatabase,
        source: SessionSource,
    ) -> Self {
        Self {
            engine,
            key,
            database_id,
            database,
            source,
            reused: AtomicBool::new(false),
            bounds: Mutex::default(),
        }
    }

    pub(super) async fn open(&self) -> Result<TenantSession, SyncError> {
        if self.source == SessionSource::KeptFirst {
            if let Some(session) = self.engine.sessions.take(&self.key) {
                self.reused.store(true, Ordering::Relaxed);
                self.remember(&session);
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
        let session =
            connect::connect(&self.database.target, &addresses, settings, internal).await?;
        self.remember(&session);
        Ok(session)
    }

    fn remember(&self, session: &TenantSession) {
        self.bounds
            .lock()
            .expect("the lock is never held across a panic")
            .push(session.bound().clone());
    }

    /// `error`, or [`SyncError::MessageTooLarge`] if a session handed out failed its
    /// connection for what its server sent: the requests on it only saw it close.
    pub(super) fn explain(&self, error: SyncError) -> SyncError {
        let bounds = self
            .bounds
            .lock()
            .expect("the lock is never held across a panic");
        match bounds.iter().find(|bound| bound.tripped().is_some()) {
            Some(bound) => error.explained_by(bound),
            None => error,
        }
    }

    /// Keeps a session whose last transaction committed for the next sync.
    pub(super) fn give_back(&self, session: TenantSession) {
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
                let latest = facts.latest(mapping);
                let pruned_through = facts.pruned_through[mapping.index()];
                sync_mapping(sessions, mapping, session, latest, pruned_through)
            },
        ))
        .await?;
        // Repairs after pruned tombstones are recorded once every mapping has decided
        // whether it needed one: the record says that the database has every deletion
        // through a point, and a mapping that read it before its own check would skip
        // its repair.
        for repair in mappings
            .iter()
            .filter_map(|mapping| mapping.repair.as_ref())
        {
            db::tombstones::record_resync(
                &engine.pool,
                key.tenancy_id,
                sessions.database_id,
                repair.complete_through,
                &repair.reason,
            )
            .await?;
        }
        Ok(DatabaseSynced { mappings })
    }
    .await
    .map_err(|error| sessions.explain(error));
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
    latest: LatestChange,
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
            LatestChange::At(latest) => latest <= watermark,
            LatestChange::None => true,
            LatestChange::Unknown => false,
        };
        let latest = match latest {
            LatestChange::At(latest) => Some(latest),
            LatestChange::None | LatestChange::Unknown => None,
        };
        let batch = if caught_up {
            None
        } else {
            (engine.reads)
                .next_batch(mapping, key.tenancy_id, watermark, latest)
                .await
                .map_err(SyncError::from)?
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
