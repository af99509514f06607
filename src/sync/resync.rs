//! Bringing a tenant database that missed deletions back to the source: when the
//! tombstones of deletions it had not applied were pruned, the rows the source no longer
//! has are found by comparing ids.

use super::database::Sessions;
use super::error::SyncError;
use super::sessions::TenantSession;
use crate::db;
use crate::mapping::Mapping;

/// Ids of the source's live rows sent to the tenant database at once during a resync.
const RESYNC_PAGE: i64 = 10_000;

/// Brings a database that missed deletions (their tombstones are pruned) back to the
/// source: in the transaction [`super::apply::begin_locked`] opened, removes every row of `mapping`
/// whose id the source no longer has, and commits. The ids go to a temporary table a
/// page at a time; memory stays bounded however large the tenancy. The watermark stays:
/// every live row changed after it is still after it in the source. Then the database
/// is recorded as having every deletion up to the latest sequence id applied.
pub(super) async fn remove_rows_not_in_source(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<u64, SyncError> {
    let (engine, tenancy_id) = (sessions.engine, sessions.key.tenancy_id);
    // Read first: a deletion numbered later comes with a tombstone after this.
    let complete_through = db::tombstones::latest_sequence_id(&engine.pool).await?;
    let client = session.client();
    send_live_ids(sessions, client, mapping).await?;
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
