//! A mapping's first sync into an empty table, when it is more than one batch: every row
//! streamed with binary `COPY`, from the internal database straight into the tenant's
//! table, instead of batches of upserts. It is what makes adding a database to a large tenancy (or importing many
//! users at once) run at close to the speed PostgreSQL ingests data.
//!
//! The rows are read in one `REPEATABLE READ` snapshot of the internal database, with
//! the mapping's latest change in that snapshot. Because the sequencer commits sequence
//! ids in order (DESIGN.md §4), every change up to that id is in the snapshot, and every
//! later one gets a higher id: that id is the watermark the copy leaves, and the batches
//! go on from it. Rows not numbered yet are left out; they are numbered after it.
//!
//! Memory holds one chunk (about [`CHUNK_BYTES`]): the bytes are passed on as they come,
//! never parsed, and `COPY` waits for the tenant database as it takes them.
//!
//! The rows go into the table without its primary key, which is built once after them
//! (see [`drop_key_if_alone`]): written row by row, in the random order of uuids, the
//! key costs a `COPY` about as much as the rows themselves.

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, Stream, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::SimpleQueryMessage;

use super::error::SyncError;
use super::sessions::TenantSession;
use super::statements;
use crate::db;
use crate::mapping::Mapping;

/// How many bytes of `COPY` data are passed to the tenant database at a time.
pub(super) const CHUNK_BYTES: usize = 256 * 1024;

/// The tenant session's statement timeout for the one `COPY` statement that carries a
/// whole table, in this transaction only: ten minutes, where a batch's statements get
/// the session's (`SessionSettings::statement_timeout`, a minute by default).
const COPY_STATEMENT_TIMEOUT: &str = "600s";

/// What a copy wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Copied {
    pub(super) rows: u64,
    /// The mapping's latest change in the copied snapshot: the new watermark.
    pub(super) through: i64,
}

/// In the transaction that holds the mapping's lock, with the watermark read under it
/// as `-1` (never synced): if the table is empty and the source has changes, copies
/// every row into it and returns what it wrote, leaving the transaction open for the
/// caller to move the watermark and commit. `None` when it did nothing: the table holds
/// rows (the batches upsert them), or the source has no change yet.
pub(super) async fn copy_if_empty(
    pool: &sqlx::PgPool,
    session: &mut TenantSession,
    mapping: Mapping,
    tenancy_id: uuid::Uuid,
) -> Result<Option<Copied>, SyncError> {
    let [has_rows] = session
        .statements([statements::has_rows(mapping)])
        .await
        .map_err(SyncError::target)?;
    let no_params: [&(dyn ToSql + Sync); 0] = [];
    let row = session
        .client()
        .query_one(&has_rows, &no_params)
        .await
        .map_err(SyncError::target)?;
    if row.try_get::<_, bool>(0).map_err(SyncError::target)? {
        return Ok(None);
    }

    let mut internal = pool.acquire().await?;
    // Closed once the copy is done, never given back to the pool: a copy may stop
    // mid-`COPY` or mid-transaction, when it fails or when its future is dropped (the
    // other mapping's sync failed first), and a connection left in the read-only
    // transaction would fail the statements of whoever took it next. One connection per
    // initial copy of a mapping.
    internal.close_on_drop();
    copy_snapshot(&mut internal, session, mapping, tenancy_id).await
}

/// Streams binary `COPY` data from `source` into the tenant's `COPY … FROM STDIN` of
/// `target_sql`, a chunk of about [`CHUNK_BYTES`] at a time, and returns how many rows
/// the tenant database took. The bytes are passed on as they come, never parsed: the
/// source and the target must agree on columns and types.
pub(super) async fn pipe(
    source: impl Stream<Item = Result<Bytes, SyncError>>,
    session: &TenantSession,
    target_sql: &str,
) -> Result<u64, SyncError> {
    let sink = session
        .client()
        .copy_in::<_, Bytes>(target_sql)
        .await
        .map_err(SyncError::target)?;
    futures::pin_mut!(sink);
    futures::pin_mut!(source);
    let mut chunk = BytesMut::with_capacity(CHUNK_BYTES);
    while let Some(data) = source.try_next().await? {
        chunk.extend_from_slice(&data);
        if chunk.len() >= CHUNK_BYTES {
            sink.send(chunk.split().freeze())
                .await
                .map_err(SyncError::target)?;
        }
    }
    if !chunk.is_empty() {
        sink.send(chunk.freeze()).await.map_err(SyncError::target)?;
    }
    sink.as_mut().finish().await.map_err(SyncError::target)
}

async fn copy_snapshot(
    internal: &mut sqlx::PgConnection,
    session: &TenantSession,
    mapping: Mapping,
    tenancy_id: uuid::Uuid,
) -> Result<Option<Copied>, SyncError> {
    sqlx::query("begin isolation level repeatable read, read only")
        .execute(&mut *internal)
        .await?;
    let Some(through) = db::changes::latest_change(&mut *internal, mapping, tenancy_id).await?
    else {
        sqlx::query("rollback").execute(&mut *internal).await?;
        return Ok(None);
    };
    db::changes::plan_bulk_read(&mut *internal).await?;
    let source_sql = db::changes::copy_current_rows(mapping, tenancy_id);
    let timeout: &(dyn ToSql + Sync) = &COPY_STATEMENT_TIMEOUT;
    session
        .client()
        .execute(
            "select pg_catalog.set_config('statement_timeout', $1, true)",
            &[timeout],
        )
        .await
        .map_err(SyncError::target)?;
    let key_dropped = drop_key_if_alone(session, mapping).await?;
    let rows = {
        let source = internal.copy_out_raw(&source_sql).await?;
        pipe(
            source.map_err(SyncError::from),
            session,
            statements::copy_in(mapping),
        )
        .await?
    };
    if key_dropped {
        session
            .client()
            .batch_execute(statements::add_key(mapping))
            .await
            .map_err(SyncError::target)?;
    }
    sqlx::query("commit").execute(&mut *internal).await?;
    Ok(Some(Copied { rows, through }))
}

/// Takes the mapping's empty table for this transaction alone and drops its primary key,
/// so that the copy writes the rows without it and [`statements::add_key`] builds it
/// once after them, from a sort. Readers of the table wait for the commit meanwhile, and
/// then see it filled, with its key; nothing outside the transaction ever sees the table
/// without it.
///
/// Where that cannot be done as planned, every part of it is undone and the copy writes
/// through the key, as it would have: another session holds the table (a reader in an
/// open transaction, autovacuum: never waited for), the key is not the one this service
/// creates, another table refers to it, or the role may not alter the table. Only a
/// broken session is an error.
async fn drop_key_if_alone(session: &TenantSession, mapping: Mapping) -> Result<bool, SyncError> {
    let client = session.client();
    let refused = match client
        .simple_query(statements::take_table_for_load(mapping))
        .await
    {
        Ok(answer) => {
            let alone = answer.iter().any(|message| {
                matches!(message, SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
            });
            if alone {
                match client.batch_execute(statements::drop_key(mapping)).await {
                    Ok(()) => return Ok(true),
                    Err(error) if error.as_db_error().is_some() => error.code().cloned(),
                    Err(error) => return Err(SyncError::target(error)),
                }
            } else {
                None
            }
        }
        Err(error) if error.as_db_error().is_some() => error.code().cloned(),
        Err(error) => return Err(SyncError::target(error)),
    };
    tracing::debug!(
        mapping = mapping.name(),
        sqlstate = refused.as_ref().map(|code| code.code()),
        "the initial copy writes through the table's primary key"
    );
    client
        .batch_execute(statements::BACK_TO_LOAD_SAVEPOINT)
        .await
        .map_err(SyncError::target)?;
    Ok(false)
}
