//! Bringing a tenant database back to the source.
//!
//! Two ways: [`remove_rows_not_in_source`], which a sync runs on its own when the
//! tombstones of deletions the database had not applied were pruned (the rows the source
//! no longer has are found by comparing ids); and [`resync_tenancy`], which an operator
//! runs (`resync`) to make a database exactly the source again, whatever was done to it.

use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::apply::{self, begin_locked, read_batch};
use super::database::{SessionSource, Sessions};
use super::engine::SyncEngine;
use super::error::SyncError;
use super::external_database::ExternalDatabase;
use super::schema;
use super::sessions::{SessionKey, TenantSession};
use super::statements::{self, Columns};
use crate::db;
use crate::error::error_chain;
use crate::mapping::Mapping;

/// Ids of the source's live rows sent to the tenant database at once during a resync.
const RESYNC_PAGE: i64 = 10_000;

/// Brings a database that missed deletions (their tombstones are pruned) back to the
/// source: in the transaction [`super::apply::begin_locked`] opened, removes every row of `mapping`
/// whose id the source no longer has, and commits. The ids go to a temporary table a
/// page at a time; memory stays bounded however large the tenancy. The watermark stays:
/// every live row changed after it is still after it in the source. Returns how many
/// rows it removed, and the sequence id through which the mapping now has every
/// deletion; the caller records that once every mapping of the database has decided
/// whether it needed this (see [`super::database`]): recorded at once, it would tell
/// the other mapping, still to decide, that its deletions are complete too.
pub(super) async fn remove_rows_not_in_source(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<(u64, i64), SyncError> {
    let (engine, tenancy_id) = (sessions.engine, sessions.key.tenancy_id);
    // Read first: a deletion numbered later comes with a tombstone after this.
    let complete_through = db::tombstones::latest_sequence_id(&engine.pool).await?;
    let removed = delete_rows_not_in_source(sessions, session.client(), mapping).await?;
    apply::commit(session).await?;
    tracing::info!(
        %tenancy_id,
        database_id = sessions.database_id,
        mapping = mapping.name(),
        removed,
        "removed the rows of a tenant database that the source does not have"
    );
    Ok((removed, complete_through))
}

/// In an open transaction of the tenant session: deletes every row of `mapping` whose
/// id the source no longer has, and returns how many. An empty table costs one query.
async fn delete_rows_not_in_source(
    sessions: &Sessions<'_>,
    client: &tokio_postgres::Client,
    mapping: Mapping,
) -> Result<u64, SyncError> {
    let holds_rows: bool = client
        .query_one(
            &format!("select exists (select from {})", mapping.name()),
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(SyncError::target)?;
    if !holds_rows {
        return Ok(0);
    }
    send_live_ids(sessions, client, mapping).await?;
    client
        .execute(
            &format!(
                "delete from {} as target where not exists \
                 (select from pg_temp._stack_sync_keep as keep where keep.id = target.id)",
                mapping.name()
            ),
            &[],
        )
        .await
        .map_err(SyncError::target)
}

/// Sends the ids of the source's live rows of `mapping` to a temporary table of the
/// tenant session (dropped at commit), a page at a time.
async fn send_live_ids(
    sessions: &Sessions<'_>,
    client: &tokio_postgres::Client,
    mapping: Mapping,
) -> Result<(), SyncError> {
    client
        .batch_execute(
            "create temporary table _stack_sync_keep (id uuid primary key) on commit drop",
        )
        .await
        .map_err(SyncError::target)?;
    let mut after = None;
    loop {
        let ids = db::tombstones::live_ids(
            &sessions.engine.pool,
            sessions.key.tenancy_id,
            mapping.source_table(),
            after,
            RESYNC_PAGE,
        )
        .await?;
        let Some(last) = ids.last().copied() else {
            return Ok(());
        };
        client
            .execute(
                "insert into pg_temp._stack_sync_keep select pg_catalog.unnest($1::uuid[])",
                &[&ids],
            )
            .await
            .map_err(SyncError::target)?;
        if ids.len() < RESYNC_PAGE as usize {
            return Ok(());
        }
        after = Some(last);
    }
}

/// Every database of a tenancy brought back to its source: what `resync --json` prints
/// and `POST …/tenancies/{id}/resync` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenancyResync {
    pub tenancy_id: Uuid,
    /// Every database brought back.
    pub ok: bool,
    pub databases: Vec<DatabaseResync>,
}

impl TenancyResync {
    pub fn new(tenancy_id: Uuid, databases: Vec<DatabaseResync>) -> Self {
        Self {
            tenancy_id,
            ok: databases.iter().all(|database| database.ok),
            databases,
        }
    }
}

/// One database of a tenancy brought back to its source by [`resync_tenancy`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseResync {
    pub database_id: String,
    /// Every mapping was brought back.
    pub ok: bool,
    pub mappings: Vec<MappingResync>,
    /// Why the database could not be brought back (its configuration, its server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
}

/// What a resync changed in one mapping's table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MappingResync {
    pub mapping: &'static str,
    /// Rows the source does not have, deleted.
    pub removed: u64,
    /// Rows missing or different from the source, written.
    pub written: u64,
    /// The watermark the tenant database had.
    pub watermark_before: i64,
    /// The watermark it has now: the last change it holds.
    pub watermark: i64,
}

/// Brings every database of `tenancy_id` (or only `only`) back to the source exactly;
/// `None` when there is no such tenancy. A database that cannot be brought back is
/// reported with its error; the others are still done.
///
/// Each mapping is rewritten in one transaction on the tenant database, under the
/// mapping's lock (syncs of that database wait): rows the source does not have are
/// deleted, every change of the source is replayed from the start a batch at a time
/// (rows already equal are left untouched, missing and differing ones written), and
/// the watermark is set to the last change replayed, even if it was ahead. Readers see
/// the table as it was until the commit, then as the source is: never a partial or
/// empty table. Memory holds one batch, whatever the tenancy's size.
pub async fn resync_tenancy(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    only: Option<&str>,
) -> Result<Option<Vec<DatabaseResync>>, sqlx::Error> {
    let Some(entries) = engine.configured_databases(tenancy_id, only).await? else {
        return Ok(None);
    };
    let mut results = Vec::new();
    for (database_id, entry) in entries {
        let result = match entry {
            Ok(database) => resync_database(engine, tenancy_id, &database_id, &database).await,
            Err(error) => Err(error),
        };
        results.push(match result {
            Ok(mappings) => DatabaseResync {
                database_id,
                ok: true,
                mappings,
                error: None,
                code: None,
            },
            Err(error) => {
                tracing::warn!(%tenancy_id, %database_id, error = %error_chain(&error), "resync failed");
                DatabaseResync {
                    database_id,
                    ok: false,
                    mappings: Vec::new(),
                    error: Some(error.to_string()),
                    code: Some(error.code()),
                }
            }
        });
    }
    Ok(Some(results))
}

async fn resync_database(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    database_id: &str,
    database: &ExternalDatabase,
) -> Result<Vec<MappingResync>, SyncError> {
    let key = SessionKey {
        tenancy_id,
        fingerprint: database.fingerprint,
    };
    let sessions = Sessions::new(engine, key, database_id, database, SessionSource::New);
    // What this process remembers of the database (its watermarks) is about to change.
    engine.known.forget(&key);
    let resynced = async {
        let mut session = sessions.open().await?;
        schema::prepare(session.client_mut(), tenancy_id, &database.read_roles).await?;
        // Read first: a deletion numbered later comes with a tombstone after this.
        let complete_through = db::tombstones::latest_sequence_id(&engine.pool).await?;
        let mut mappings = Vec::new();
        for mapping in Mapping::ALL {
            mappings.push(resync_mapping(&sessions, &mut session, mapping).await?);
        }
        db::tombstones::record_resync(
            &engine.pool,
            tenancy_id,
            database_id,
            complete_through,
            "resync requested by an operator",
        )
        .await?;
        // A resync may take a watermark back (to the last change the source still has):
        // what is recorded follows, or the next sync would take it for a watermark
        // gone back and repair the database again.
        for (mapping, resynced) in Mapping::ALL.into_iter().zip(&mappings) {
            db::tombstones::record_watermark_back(
                &engine.pool,
                tenancy_id,
                database_id,
                mapping.source_table(),
                resynced.watermark,
            )
            .await?;
        }
        Ok(mappings)
    }
    .await
    .map_err(|error| sessions.explain(error));
    engine.known.forget(&key);
    resynced
}

/// One mapping, in one transaction: see [`resync_tenancy`].
async fn resync_mapping(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<MappingResync, SyncError> {
    let watermark_before = begin_locked(session, mapping).await?.of(mapping)?;
    let removed = delete_rows_not_in_source(sessions, session.client(), mapping).await?;
    let replayed = replay_source(sessions, session, mapping).await?;
    let watermark = replayed.last_change;
    let client = session.client();
    let name = mapping.name();
    let params: [&(dyn ToSql + Sync); 2] = [&name, &watermark];
    client
        .execute(SET_WATERMARK, &params)
        .await
        .map_err(SyncError::target)?;
    apply::commit(session).await?;
    Ok(MappingResync {
        mapping: name,
        removed: removed + replayed.deleted,
        written: replayed.written,
        watermark_before,
        watermark,
    })
}

/// Sets the watermark whichever way it moves (a resync may take it back).
const SET_WATERMARK: &str = "update _stack_sync_metadata \
     set last_synced_sequence_id = $2, updated_at = pg_catalog.now() \
     where mapping_name = $1";

/// What replaying the source wrote.
#[derive(Default)]
struct Replayed {
    written: u64,
    deleted: u64,
    /// The id of the last change replayed (-1: none).
    last_change: i64,
}

/// In the open transaction: writes every change of `mapping` in the source from the
/// start, a batch at a time.
async fn replay_source(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<Replayed, SyncError> {
    let (engine, tenancy_id) = (sessions.engine, sessions.key.tenancy_id);
    let [delete, upsert] = session
        .statements([statements::delete(mapping), statements::upsert(mapping)])
        .await
        .map_err(SyncError::target)?;
    let client = session.client();
    let mut replayed = Replayed {
        last_change: -1,
        ..Replayed::default()
    };
    loop {
        let Some(batch) = read_batch(engine, tenancy_id, mapping, replayed.last_change).await?
        else {
            return Ok(replayed);
        };
        if !batch.deletes.is_empty() {
            // Rows deleted since the ids were sent.
            replayed.deleted += client
                .execute(&delete, &[&batch.deletes])
                .await
                .map_err(SyncError::target)?;
        }
        if !batch.upserts.is_empty() {
            let columns = Columns::of(&batch.upserts);
            replayed.written += client
                .execute(&upsert, &columns.params())
                .await
                .map_err(SyncError::target)?;
        }
        replayed.last_change = batch.last_sequence_id;
        if batch.changes < u64::from(engine.settings.batch_size) {
            return Ok(replayed);
        }
    }
}
