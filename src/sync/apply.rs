//! Applying a mapping's changes to a tenant database: batches read from the internal
//! database, each written in one transaction under the mapping's advisory lock, with
//! the watermark moved forward in the same transaction.

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::database::Sessions;
use super::engine::SyncEngine;
use super::error::SyncError;
use super::initial_copy;
use super::report::{MappingReport, Repair};
use super::resync;
use super::sessions::TenantSession;
use super::staged::{self, Staged, StagedRead};
use super::statements::{self, Applied, Columns};
use crate::db;
use crate::mapping::{Batch, Mapping};

/// Applies batches of `mapping` until it is caught up or the batch budget is spent.
///
/// While one batch is written to the tenant database, the next one is read from the
/// internal database. A batch read ahead (or before the session was open) is only used
/// if the watermark, re-read under the lock, is still where it was read from: then no
/// other run wrote in between, and the batch is newer than anything written so far.
/// Otherwise it is read again.
pub(super) async fn apply_batches(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    mut read_ahead: Option<ReadAhead>,
) -> Result<MappingReport, SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let settings = &engine.settings;
    let mut report = MappingReport::nothing_after(mapping, -1);
    if let Some(ahead) = &read_ahead {
        match apply_small_batch(sessions, session, mapping, ahead).await? {
            SmallBatch::Applied(report) => return Ok(report),
            SmallBatch::Stale => read_ahead = None,
            SmallBatch::NotSmall => {}
        }
    }
    let mut watermark_checked = false;
    let mut copy_considered = false;
    let mut staging = Staging::default();
    loop {
        let known_before = engine.known.watermarks(key);
        let watermarks = begin_locked(session, mapping).await?;
        let watermark = watermarks.of(mapping)?;
        look_again_if_another_went_back(sessions, mapping, &known_before, &watermarks, &mut report);
        report.watermark = watermark;
        if !watermark_checked {
            watermark_checked = true;
            if let Some(repair) = repair_if_needed(sessions, session, mapping, watermark).await? {
                report.repair = Some(repair);
                read_ahead = None;
                continue;
            }
        }
        if staging.on {
            match apply_staged(
                sessions,
                session,
                mapping,
                watermark,
                &mut staging,
                &mut report,
            )
            .await?
            {
                Step::Next => continue,
                Step::Done => break,
            }
        }
        // A first sync of more than one batch: an empty table gets every row by `COPY`;
        // a small one, or a table that holds rows, goes by batches, and costs no more
        // than the end of its first batch read first (not its rows: a copy drops them).
        if watermark == -1 && !copy_considered {
            copy_considered = true;
            let full = match &read_ahead {
                Some(ahead) if ahead.after == watermark => ahead
                    .batch
                    .as_ref()
                    .is_some_and(|batch| fills_a_batch(engine, batch.changes)),
                _ => first_batch_is_full(engine, key.tenancy_id, mapping).await?,
            };
            // No slot free: the batches fill the table instead.
            let copied = match full.then(|| engine.copy_slots.try_acquire()) {
                Some(Ok(_slot)) => {
                    initial_copy::copy_if_empty(&engine.pool, session, mapping, key.tenancy_id)
                        .await?
                }
                Some(Err(_)) | None => None,
            };
            if let Some(copied) = copied {
                advance_and_commit(session, mapping, copied.through).await?;
                engine.known.set_watermark(key, mapping, copied.through);
                report.add_copy(copied.rows, copied.through);
                read_ahead = None;
                continue;
            }
        }
        let batch = match read_ahead.take() {
            Some(ahead) if ahead.after == watermark => ahead.batch,
            _ => read_batch(engine, key.tenancy_id, mapping, watermark).await?,
        };
        let Some(batch) = batch else {
            commit(session).await?;
            engine.known.set_watermark(key, mapping, watermark);
            break;
        };

        let full = fills_a_batch(engine, batch.changes);
        // After a full batch, the next ones go staged (when staging is on): nothing is
        // read ahead for them.
        let stage_next = full && settings.staged_batch_size > 0 && !staging.refused;
        let another = full && !stage_next && report.batches + 1 < settings.max_batches_per_run;
        if stage_next && report.batches + 1 < settings.max_batches_per_run {
            staging.ahead = Some(StagedRead::start(
                &engine.pool,
                mapping,
                key.tenancy_id,
                batch.last_sequence_id,
                settings.staged_batch_size,
            ));
        }
        let (applied, next) =
            write_reading_next(sessions, session, mapping, &batch, another).await?;
        read_ahead = next;
        report.add_batch(&batch, applied);
        if !full {
            break;
        }
        staging.on = stage_next;
        if report.batches >= settings.max_batches_per_run {
            report.more_remaining = true;
            break;
        }
    }
    Ok(report)
}

/// Where a run stands with the staging path (see [`staged`]).
#[derive(Default)]
struct Staging {
    /// The next batch goes staged: the run applied a full batch.
    on: bool,
    /// The tenant database refused a staging table: not again in this run.
    refused: bool,
    /// The next staged batch, read ahead.
    ahead: Option<StagedRead>,
}

/// What the loop of [`apply_batches`] does after a staged batch.
enum Step {
    /// Another transaction: the next batch.
    Next,
    /// The mapping is caught up, or the run's budget is spent.
    Done,
}

/// In the transaction that holds the mapping's lock, with `watermark` read under it:
/// applies the next staged batch (the one read ahead if it was read after `watermark`),
/// reading the one after it meanwhile if more may follow. A database that refuses the
/// staging table turns staging off for the run.
async fn apply_staged(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    watermark: i64,
    staging: &mut Staging,
    report: &mut MappingReport,
) -> Result<Step, SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let settings = &engine.settings;
    let limit = settings.staged_batch_size;
    let start = |after| StagedRead::start(&engine.pool, mapping, key.tenancy_id, after, limit);
    let mut read = match staging.ahead.take() {
        Some(read) if read.after() == watermark => read,
        _ => start(watermark),
    };
    let Some(cutoff) = read.cutoff().await? else {
        commit(session).await?;
        engine.known.set_watermark(key, mapping, watermark);
        return Ok(Step::Done);
    };
    let full = cutoff.changes >= u64::from(limit);
    if full && report.batches + 1 < settings.max_batches_per_run {
        staging.ahead = Some(start(cutoff.last_sequence_id));
    }
    match staged::apply_staged_batch(session, mapping, read, cutoff).await? {
        Staged::Applied(applied) => {
            engine
                .known
                .set_watermark(key, mapping, cutoff.last_sequence_id);
            report.add_staged(cutoff, applied);
            if !full {
                return Ok(Step::Done);
            }
            if report.batches >= settings.max_batches_per_run {
                report.more_remaining = true;
                return Ok(Step::Done);
            }
            Ok(Step::Next)
        }
        Staged::Refused => {
            tracing::warn!(
                tenancy_id = %key.tenancy_id,
                database_id = sessions.database_id,
                mapping = mapping.name(),
                "the tenant database does not allow temporary tables; large batches go as upserts"
            );
            rollback(session).await?;
            *staging = Staging {
                on: false,
                refused: true,
                ahead: None,
            };
            Ok(Step::Next)
        }
    }
}

/// Writes `batch` in the transaction that holds the lock and commits it, while the batch
/// after it is read from the internal database (if `read_next`).
async fn write_reading_next(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    batch: &Batch,
    read_next: bool,
) -> Result<(Applied, Option<ReadAhead>), SyncError> {
    let (engine, key) = (sessions.engine, &sessions.key);
    let after = batch.last_sequence_id;
    let write = write_batch(session, mapping, batch, None);
    let read = async {
        if read_next {
            read_batch(engine, key.tenancy_id, mapping, after)
                .await
                .map(Some)
        } else {
            Ok(None)
        }
    };
    let (applied, next) = tokio::join!(write, read);
    let applied = applied?.applied.expect("an unguarded write always applies");
    engine.known.set_watermark(key, mapping, after);
    let next = next?.map(|batch| ReadAhead { after, batch });
    Ok((applied, next))
}

/// What became of a batch read after the known watermark.
enum SmallBatch {
    /// It was small, and applied: the mapping is caught up.
    Applied(MappingReport),
    /// Another run moved the watermark meanwhile; nothing was written.
    Stale,
    /// A full batch (more may follow) or none: it goes the locked way.
    NotSmall,
}

/// A small batch read after the known watermark is written in one round trip, guarded
/// by that watermark. If another run moved it meanwhile, nothing is written, and the
/// caller reads again under the lock.
async fn apply_small_batch(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    ahead: &ReadAhead,
) -> Result<SmallBatch, SyncError> {
    let Some(batch) = &ahead.batch else {
        return Ok(SmallBatch::NotSmall);
    };
    if batch.changes >= u64::from(sessions.engine.settings.batch_size) {
        return Ok(SmallBatch::NotSmall);
    }
    let known_before = sessions.engine.known.watermarks(&sessions.key);
    let written = write_batch(session, mapping, batch, Some(ahead.after)).await?;
    let Some(applied) = written.applied else {
        return Ok(SmallBatch::Stale);
    };
    sessions
        .engine
        .known
        .set_watermark(&sessions.key, mapping, batch.last_sequence_id);
    let mut report = MappingReport::nothing_after(mapping, ahead.after);
    report.add_batch(batch, applied);
    if let Some(watermarks) = &written.watermarks {
        look_again_if_another_went_back(sessions, mapping, &known_before, watermarks, &mut report);
    }
    Ok(SmallBatch::Applied(report))
}

/// In the transaction [`begin_locked`] opened, with the `watermark` read under the lock:
/// if the database missed deletions whose tombstones are pruned (it was away), or its
/// watermark is behind what was recorded (the guard of [`super::schema`] took it back
/// after a write from outside, the table was created again, the database was restored
/// from a backup or replaced), removes every row the source does not have and commits.
/// Then the caller replays the changes after the watermark, which brings back every row
/// the table lacks or holds differently. Recorded by the caller, once every mapping of
/// the database has decided (see [`super::database`]).
async fn repair_if_needed(
    sessions: &Sessions<'_>,
    session: &mut TenantSession,
    mapping: Mapping,
    watermark: i64,
) -> Result<Option<Repair>, SyncError> {
    let (pool, tenancy_id, database_id) = (
        &sessions.engine.pool,
        sessions.key.tenancy_id,
        sessions.database_id,
    );
    let table = mapping.source_table();
    let check =
        db::tombstones::check_watermark(pool, tenancy_id, database_id, table, watermark).await?;
    let reason = if check.went_back(watermark) {
        let recorded = check.recorded_through.unwrap_or(-1);
        db::tombstones::record_watermark_back(pool, tenancy_id, database_id, table, watermark)
            .await?;
        format!(
            "the {} watermark went back from {recorded} to {watermark}: the table was \
             changed outside the sync or created again, or the database was restored or \
             replaced",
            mapping.name()
        )
    } else if check.missed_pruned_deletions {
        format!(
            "{} missed deletions whose tombstones were pruned",
            mapping.name()
        )
    } else {
        return Ok(None);
    };
    tracing::warn!(
        %tenancy_id,
        database_id,
        mapping = mapping.name(),
        %reason,
        "bringing a tenant database back to the source"
    );
    let (removed, complete_through) =
        resync::remove_rows_not_in_source(sessions, session, mapping).await?;
    Ok(Some(Repair {
        removed,
        complete_through,
        reason,
    }))
}

/// Commits the transaction that holds the mapping's lock.
pub(super) async fn commit(session: &TenantSession) -> Result<(), SyncError> {
    session
        .client()
        .batch_execute("commit")
        .await
        .map_err(SyncError::target)
}

/// Ends the transaction that holds the mapping's lock without keeping anything.
pub(super) async fn rollback(session: &TenantSession) -> Result<(), SyncError> {
    session
        .client()
        .batch_execute("rollback")
        .await
        .map_err(SyncError::target)
}

/// In the transaction that holds the mapping's lock: moves the watermark forward to
/// `through` and commits, in one round trip.
async fn advance_and_commit(
    session: &mut TenantSession,
    mapping: Mapping,
    through: i64,
) -> Result<(), SyncError> {
    let [advance] = session
        .statements([ADVANCE_WATERMARK])
        .await
        .map_err(SyncError::target)?;
    let name = mapping.name();
    let params: [&(dyn ToSql + Sync); 2] = [&name, &through];
    let client = session.client();
    let (advanced, committed) = tokio::join!(
        biased;
        client.execute(&advance, &params),
        client.batch_execute("commit"),
    );
    advanced.map_err(SyncError::target)?;
    committed.map_err(SyncError::target)
}

/// A batch read before its turn, and the watermark it was read after.
pub(super) struct ReadAhead {
    pub(super) after: i64,
    pub(super) batch: Option<Batch>,
}

/// Opens a transaction, takes the mapping's advisory lock in it, so that runs for the
/// same tenant database take turns, and reads the watermarks under the lock: one round
/// trip of two messages, the read on a statement prepared once per session. The answer
/// is bounded whatever the tenant did to its table (see [`READ_WATERMARKS`]).
pub(super) async fn begin_locked(
    session: &mut TenantSession,
    mapping: Mapping,
) -> Result<Watermarks, SyncError> {
    let [read] = session
        .statements([READ_WATERMARKS])
        .await
        .map_err(SyncError::target)?;
    let names = Mapping::names();
    let client = session.client();
    let read_params: [&(dyn ToSql + Sync); 1] = [&names];
    let (locked, rows) = tokio::join!(
        biased;
        client.batch_execute(statements::begin_and_lock(mapping)),
        client.query(&read, &read_params),
    );
    locked.map_err(SyncError::target)?;
    Watermarks::read(&rows.map_err(SyncError::target)?)
}

/// Every mapping's watermark, as `_stack_sync_metadata` holds them.
pub(super) struct Watermarks(Vec<(String, Option<i64>)>);

impl Watermarks {
    fn read(rows: &[tokio_postgres::Row]) -> Result<Self, SyncError> {
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map(Watermarks)
            .map_err(|_| unreadable())
    }

    /// The answer of [`ADVANCE_WATERMARK_FROM_READING`]: whether the advance moved the
    /// watermark, and the watermark rows read with it.
    fn read_advanced(rows: &[tokio_postgres::Row]) -> Result<(bool, Self), SyncError> {
        let mut moved = false;
        let mut watermarks = Vec::with_capacity(rows.len());
        for row in rows {
            let name: Option<String> = row.try_get(0).map_err(|_| unreadable())?;
            let rows_moved: i64 = row.try_get(2).map_err(|_| unreadable())?;
            moved |= rows_moved > 0;
            if let Some(name) = name {
                watermarks.push((name, row.try_get(1).map_err(|_| unreadable())?));
            }
        }
        Ok((moved, Watermarks(watermarks)))
    }

    /// The watermark of `mapping`.
    pub(super) fn of(&self, mapping: Mapping) -> Result<i64, SyncError> {
        let name = mapping.name();
        let mut rows = self.0.iter().filter(|(row, _)| row == name);
        match (rows.next(), rows.next()) {
            (None, _) => Err(SyncError::MissingWatermark(name)),
            (Some((_, Some(watermark))), None) => Ok(*watermark),
            (Some((_, None)), None) => Err(SyncError::Malformed(format!(
                "the watermark of {name} in _stack_sync_metadata is null"
            ))),
            (Some(_), Some(_)) => Err(SyncError::Malformed(format!(
                "_stack_sync_metadata holds more than one row for {name}; its primary key is gone"
            ))),
        }
    }

    /// Whether a mapping other than `mapping` has a watermark behind the one this
    /// process knew before these were read (`known_before`), or none: it went back
    /// (the guard of [`super::schema`] took it back after a write from outside), and
    /// that mapping may be skipped as caught up without a look at the tenant database.
    /// The caller forgets what it knows and has the tenancy synced again, which looks.
    ///
    /// Compared with what was known before the read, not after: the other mapping's
    /// run goes on meanwhile, and what it commits after this read was taken must not
    /// look like a watermark gone back.
    fn another_went_back(&self, known_before: &KnownWatermarks, mapping: Mapping) -> bool {
        Mapping::ALL
            .into_iter()
            .filter(|other| *other != mapping)
            .any(|other| {
                known_before[other.index()]
                    .is_some_and(|known| self.of(other).map_or(true, |now| now < known))
            })
    }
}

/// What this process knew of every mapping's watermark at one moment.
type KnownWatermarks = [Option<i64>; Mapping::ALL.len()];

/// If another mapping's watermark went back (see [`Watermarks::another_went_back`]):
/// forgets what this process knows of the database and asks for another run.
fn look_again_if_another_went_back(
    sessions: &Sessions<'_>,
    mapping: Mapping,
    known_before: &KnownWatermarks,
    watermarks: &Watermarks,
    report: &mut MappingReport,
) {
    if watermarks.another_went_back(known_before, mapping) {
        tracing::warn!(
            tenancy_id = %sessions.key.tenancy_id,
            database_id = sessions.database_id,
            "a watermark of a tenant database went back; syncing it again"
        );
        sessions.engine.known.forget(&sessions.key);
        report.more_remaining = true;
    }
}

pub(super) async fn read_batch(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    mapping: Mapping,
    after: i64,
) -> Result<Option<Batch>, SyncError> {
    let batch_size = engine.settings.batch_size;
    Ok(db::changes::next_batch(&engine.pool, mapping, tenancy_id, after, batch_size).await?)
}

/// Whether a mapping's first batch (after the watermark `-1`) would hold a full batch of
/// changes: the end of that batch alone is read, not its rows.
async fn first_batch_is_full(
    engine: &SyncEngine,
    tenancy_id: Uuid,
    mapping: Mapping,
) -> Result<bool, SyncError> {
    let batch_size = engine.settings.batch_size;
    let cutoff =
        db::changes::batch_cutoff(&engine.pool, mapping, tenancy_id, -1, batch_size).await?;
    Ok(cutoff.is_some_and(|cutoff| fills_a_batch(engine, cutoff.changes)))
}

/// Whether `changes` make a full batch (`SYNC_BATCH_SIZE`): more may follow.
fn fills_a_batch(engine: &SyncEngine, changes: u64) -> bool {
    changes >= u64::from(engine.settings.batch_size)
}

const ADVANCE_WATERMARK: &str = "update _stack_sync_metadata \
     set last_synced_sequence_id = $2, updated_at = pg_catalog.now() \
     where mapping_name = $1 and last_synced_sequence_id < $2";

/// The rows of the mappings named in `$1`: at most two per mapping (more than one is
/// reported), each a name and an `int8` converted by the server. Whatever the tenant
/// did to the table (dropped its key, changed the column's type, filled it), the answer
/// stays small.
const READ_WATERMARKS: &str = "select mapping_name::pg_catalog.text, \
            last_synced_sequence_id::pg_catalog.int8 \
     from _stack_sync_metadata \
     where mapping_name::pg_catalog.text = any($1::pg_catalog.text[]) \
     limit 4";

/// Moves the mapping's (`$1`) watermark to `$2` if it is `$3`, and reads in the same
/// statement what [`READ_WATERMARKS`] reads (the names in `$4`): one row per watermark
/// row, at least one row whatever the table holds (then with a null name), each with how
/// many rows the advance moved (0 or 1). The read sees the table as it was when the
/// statement began: the advanced mapping's own row shows its watermark before the
/// advance; the other mappings' rows are what [`Watermarks::another_went_back`]
/// compares.
const ADVANCE_WATERMARK_FROM_READING: &str = "with advanced as ( \
         update _stack_sync_metadata \
         set last_synced_sequence_id = $2, updated_at = pg_catalog.now() \
         where mapping_name = $1 and last_synced_sequence_id = $3 \
         returning 1), \
     moved as (select pg_catalog.count(*) as rows from advanced) \
     select watermarks.name, watermarks.watermark, moved.rows \
     from moved left join ( \
         select mapping_name::pg_catalog.text as name, \
                last_synced_sequence_id::pg_catalog.int8 as watermark \
         from _stack_sync_metadata \
         where mapping_name::pg_catalog.text = any($4::pg_catalog.text[]) \
         limit 4) as watermarks on true";

/// Writes `batch` (one delete and one upsert statement, whatever the batch size), moves
/// the watermark forward, and commits: sent together, in one round trip, on statements
/// prepared once per session. The server runs them in order; if one fails, the
/// transaction is aborted, the rest fail or roll back, and the first error is returned:
/// nothing of the batch is kept.
///
/// Without a `guard`, the transaction is already open, holds the mapping's lock, and
/// the watermark was checked under it; the watermark never moves back. With
/// `guard: Some(expected)`, the transaction is opened and the lock taken in the same
/// round trip (one message, [`statements::begin_and_lock`]), every statement does its
/// part only if the watermark is `expected`, and the advance reads every mapping's
/// watermark in the same statement; `None` is returned when the watermark was not
/// `expected` (another run moved it), and then nothing was written.
///
/// Longer than most functions here on purpose: the requests of the round trip are built
/// side by side and polled in one `join!`, which is what pipelines them.
async fn write_batch(
    session: &mut TenantSession,
    mapping: Mapping,
    batch: &Batch,
    guard: Option<i64>,
) -> Result<Written, SyncError> {
    let (delete_sql, upsert_sql, advance_sql) = match guard {
        None => (
            statements::delete(mapping),
            statements::upsert(mapping),
            ADVANCE_WATERMARK,
        ),
        Some(_) => (
            statements::guarded_delete(mapping),
            statements::guarded_upsert(mapping),
            ADVANCE_WATERMARK_FROM_READING,
        ),
    };
    let [delete, upsert, advance] = session
        .statements([delete_sql, upsert_sql, advance_sql])
        .await
        .map_err(SyncError::target)?;
    let names = Mapping::names();
    let columns = Columns::of(&batch.upserts);
    let name = mapping.name();
    let expected = guard.unwrap_or_default();
    let guard_params: [&(dyn ToSql + Sync); 2] = [&name, &expected];
    let guarded = guard.is_some();
    let mut upsert_params = columns.params();
    let mut delete_params: Vec<&(dyn ToSql + Sync)> = vec![&batch.deletes];
    let mut advance_params: Vec<&(dyn ToSql + Sync)> = vec![&name, &batch.last_sequence_id];
    if guarded {
        upsert_params.extend(guard_params);
        delete_params.extend(guard_params);
        advance_params.extend([&expected as &(dyn ToSql + Sync), &names]);
    }
    let client = session.client();
    // A request is sent when its future is first polled; `biased` makes `join!` poll
    // them in this order, so the server receives them in this order. All are awaited,
    // and the first failure in statement order is the one reported (the later ones
    // only say that the transaction was aborted).
    let locking = async {
        if guarded {
            client
                .batch_execute(statements::begin_and_lock(mapping))
                .await
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
    let advancing = async {
        if guarded {
            client
                .query(&advance, &advance_params)
                .await
                .map(Advanced::Read)
        } else {
            client
                .execute(&advance, &advance_params)
                .await
                .map(|_| Advanced::Moved)
        }
    };
    let committing = client.batch_execute("commit");
    let (locked, deleted, upserted, advanced, committed) = tokio::join!(
        biased;
        locking, deleting, upserting, advancing, committing
    );
    locked.map_err(SyncError::target)?;
    let deleted = deleted.map_err(SyncError::target)?;
    let upserted = upserted.map_err(SyncError::target)?;
    let advanced = advanced.map_err(SyncError::target)?;
    committed.map_err(SyncError::target)?;
    let applied = Some(Applied { upserted, deleted });
    match advanced {
        Advanced::Moved => Ok(Written {
            applied,
            watermarks: None,
        }),
        Advanced::Read(rows) => {
            let (moved, watermarks) = Watermarks::read_advanced(&rows)?;
            Ok(Written {
                applied: applied.filter(|_| moved),
                watermarks: Some(watermarks),
            })
        }
    }
}

/// What the advance of [`write_batch`] answered: unguarded, nothing to look at (under
/// the lock it moves the watermark forward or finds it there already); guarded, the rows
/// of [`ADVANCE_WATERMARK_FROM_READING`].
enum Advanced {
    Moved,
    Read(Vec<tokio_postgres::Row>),
}

fn unreadable() -> SyncError {
    SyncError::Malformed("unreadable _stack_sync_metadata".to_owned())
}

/// What [`write_batch`] did: the batch applied (`None`: its guard did not hold, nothing
/// was written), and, when guarded, every mapping's watermark after it.
struct Written {
    applied: Option<Applied>,
    watermarks: Option<Watermarks>,
}
