//! Large batches into a tenant database that holds rows: each streamed with binary
//! `COPY` into a staging table of its transaction, then merged with one set-based
//! statement per kind of write, instead of being read into memory and sent back as
//! arrays of parameters.
//!
//! A staged batch is the one [`crate::db::changes::next_batch`] would read (the same
//! query, so the same rows), only larger: `SYNC_STAGED_BATCH_SIZE` changes. It is read
//! in one `REPEATABLE READ` snapshot of the internal database: first where it ends (its
//! [`Cutoff`]), then its rows as `COPY` data. Knowing the end first lets the next batch
//! be read while this one is merged ([`StagedRead`]), as the batches of upserts read
//! ahead. The rows pass through this process a chunk at a time, never parsed: memory
//! holds at most [`READ_AHEAD_CHUNKS`] chunks per read, whatever the batch size.
//!
//! The staging table lives in the tenant session's temporary schema and is dropped with
//! the transaction, committed or not, so a batch that fails halfway leaves nothing
//! behind: not its rows, not the table, not a watermark moved.

use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures::{Stream, TryStreamExt};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;
use uuid::Uuid;

use super::apply;
use super::error::SyncError;
use super::initial_copy::{self, CHUNK_BYTES};
use super::sessions::TenantSession;
use super::statements::{self, Applied};
use crate::db;
use crate::db::changes::Cutoff;
use crate::mapping::Mapping;

/// Chunks (of about [`CHUNK_BYTES`]) a read may hold before the tenant database takes
/// them: 8 MiB. A read ahead of its turn stops there and waits (and so does the internal
/// database's `COPY`).
pub(super) const READ_AHEAD_CHUNKS: usize = 32;

/// What became of a staged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Staged {
    /// Applied and committed: the rows its delete and its upsert changed.
    Applied(Applied),
    /// The tenant database does not let this service create temporary tables (its
    /// `TEMPORARY` privilege was revoked): the transaction is aborted, and the caller
    /// goes on with batches of upserts.
    Refused,
}

/// A staged batch being read from the internal database, by a task of its own: where it
/// ends, then its rows as `COPY` data, as they come.
pub(super) struct StagedRead {
    after: i64,
    messages: mpsc::Receiver<ReadMessage>,
}

enum ReadMessage {
    Cutoff(Option<Cutoff>),
    Chunk(Bytes),
    /// Every row was sent and the snapshot ended well. Rows that end without it (the
    /// task stopped) are an error, never a batch that looks complete.
    End,
    Failed(sqlx::Error),
}

impl StagedRead {
    /// Starts reading the first `limit` changes of `mapping` for `tenancy_id` after
    /// `after`. Dropping the read stops it.
    pub(super) fn start(
        pool: &sqlx::PgPool,
        mapping: Mapping,
        tenancy_id: Uuid,
        after: i64,
        limit: u32,
    ) -> StagedRead {
        let (sender, messages) = mpsc::channel(READ_AHEAD_CHUNKS);
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut connection = match pool.acquire().await {
                Ok(connection) => connection,
                Err(error) => {
                    sender.send(ReadMessage::Failed(error)).await.ok();
                    return;
                }
            };
            let read =
                read_staged_batch(&mut connection, mapping, tenancy_id, after, limit, &sender);
            match read.await {
                Ok(true) => {}
                Ok(false) => connection.close_on_drop(),
                Err(error) => {
                    // It may have stopped mid-`COPY`: not worth cleaning up.
                    connection.close_on_drop();
                    sender.send(ReadMessage::Failed(error)).await.ok();
                }
            }
        });
        StagedRead { after, messages }
    }

    /// The watermark the batch is read after.
    pub(super) fn after(&self) -> i64 {
        self.after
    }

    /// Where the batch ends; `None` when nothing is left after the watermark.
    pub(super) async fn cutoff(&mut self) -> Result<Option<Cutoff>, SyncError> {
        match self.messages.recv().await {
            Some(ReadMessage::Cutoff(cutoff)) => Ok(cutoff),
            Some(ReadMessage::Failed(error)) => Err(error.into()),
            Some(ReadMessage::Chunk(_) | ReadMessage::End) | None => Err(ended_early()),
        }
    }

    /// The batch's rows, as binary `COPY` data, after [`StagedRead::cutoff`].
    fn rows(&mut self) -> impl Stream<Item = Result<Bytes, SyncError>> + '_ {
        let mut ended = false;
        futures::stream::poll_fn(move |context| {
            if ended {
                return Poll::Ready(None);
            }
            self.messages
                .poll_recv(context)
                .map(|message| match message {
                    Some(ReadMessage::Chunk(chunk)) => Some(Ok(chunk)),
                    Some(ReadMessage::End) => {
                        ended = true;
                        None
                    }
                    Some(ReadMessage::Failed(error)) => {
                        ended = true;
                        Some(Err(error.into()))
                    }
                    Some(ReadMessage::Cutoff(_)) | None => {
                        ended = true;
                        Some(Err(ended_early()))
                    }
                })
        })
    }
}

fn ended_early() -> SyncError {
    SyncError::Internal(sqlx::Error::Protocol(
        "the read of a staged batch ended early".to_owned(),
    ))
}

/// Reads a staged batch in one snapshot and passes it to `sender`; false when the
/// reader went away (the connection is then in no state to be reused).
async fn read_staged_batch(
    connection: &mut sqlx::PgConnection,
    mapping: Mapping,
    tenancy_id: Uuid,
    after: i64,
    limit: u32,
    sender: &mpsc::Sender<ReadMessage>,
) -> Result<bool, sqlx::Error> {
    sqlx::query("begin isolation level repeatable read, read only")
        .execute(&mut *connection)
        .await?;
    let cutoff =
        db::changes::batch_cutoff(&mut *connection, mapping, tenancy_id, after, limit).await?;
    if sender.send(ReadMessage::Cutoff(cutoff)).await.is_err() {
        return Ok(false);
    }
    if let Some(cutoff) = cutoff {
        let sql = db::changes::copy_batch(mapping, tenancy_id, after, cutoff);
        let mut source = connection.copy_out_raw(&sql).await?;
        let mut chunk = BytesMut::with_capacity(CHUNK_BYTES);
        while let Some(data) = source.try_next().await? {
            chunk.extend_from_slice(&data);
            if chunk.len() >= CHUNK_BYTES {
                let full = ReadMessage::Chunk(chunk.split().freeze());
                if sender.send(full).await.is_err() {
                    return Ok(false);
                }
            }
        }
        if !chunk.is_empty()
            && sender
                .send(ReadMessage::Chunk(chunk.freeze()))
                .await
                .is_err()
        {
            return Ok(false);
        }
    }
    sqlx::query("commit").execute(&mut *connection).await?;
    sender.send(ReadMessage::End).await.ok();
    Ok(true)
}

/// In the transaction that holds the mapping's lock, with the watermark read under it
/// equal to `read.after()`: stages the batch `read` brings (which ends at `cutoff`),
/// applies it, moves the watermark to the batch's last sequence id and commits once
/// the merge answered.
pub(super) async fn apply_staged_batch(
    session: &mut TenantSession,
    mapping: Mapping,
    mut read: StagedRead,
    cutoff: Cutoff,
) -> Result<Staged, SyncError> {
    if let Err(error) = session
        .client()
        .batch_execute(statements::create_stage(mapping))
        .await
    {
        if error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            return Ok(Staged::Refused);
        }
        return Err(SyncError::target(error));
    }
    initial_copy::pipe(read.rows(), session, statements::copy_into_stage(mapping)).await?;
    let answer = session
        .client()
        .simple_query(&statements::merge_stage(mapping, cutoff.last_sequence_id))
        .await
        .map_err(SyncError::target)?;
    let mut counts = answer.iter().filter_map(|message| match message {
        SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
        _ => None,
    });
    let (Some(deleted), Some(upserted)) = (counts.next(), counts.next()) else {
        return Err(SyncError::Malformed(
            "the merge of a staged batch did not answer as every server does".to_owned(),
        ));
    };
    apply::commit(session).await?;
    Ok(Staged::Applied(Applied { upserted, deleted }))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn read_of(messages: Vec<ReadMessage>, end_with_drop: bool) -> StagedRead {
        let (sender, receiver) = mpsc::channel(messages.len() + 1);
        for message in messages {
            assert!(sender.try_send(message).is_ok(), "room for every message");
        }
        if !end_with_drop {
            std::mem::forget(sender);
        }
        StagedRead {
            after: 0,
            messages: receiver,
        }
    }

    #[tokio::test]
    async fn rows_that_stop_without_their_end_are_an_error_not_a_shorter_batch() {
        let cutoff = Cutoff {
            changes: 2,
            last_sequence_id: 7,
        };
        let chunk = Bytes::from_static(b"rows");
        let mut read = read_of(
            vec![
                ReadMessage::Cutoff(Some(cutoff)),
                ReadMessage::Chunk(chunk.clone()),
            ],
            true,
        );
        assert_eq!(read.cutoff().await.unwrap(), Some(cutoff));
        let rows: Vec<_> = read.rows().collect().await;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].as_ref().unwrap(), &chunk);
        assert!(rows[1].is_err(), "{:?}", rows[1]);
    }

    #[tokio::test]
    async fn rows_that_end_well_end_the_stream() {
        let chunk = Bytes::from_static(b"rows");
        let mut read = read_of(
            vec![
                ReadMessage::Cutoff(None),
                ReadMessage::Chunk(chunk.clone()),
                ReadMessage::End,
            ],
            false,
        );
        assert_eq!(read.cutoff().await.unwrap(), None);
        let rows: Vec<_> = read.rows().collect().await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].as_ref().unwrap(), &chunk);
    }
}
