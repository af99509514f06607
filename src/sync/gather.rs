//! Reads of the changes after a known watermark, gathered across the syncs that ask at
//! the same moment into one statement on the internal database.
//!
//! The syncs a claim starts together each read their tenancy's changes first, within
//! microseconds of one another; one statement answers them all
//! ([`db::changes::next_batches`]), so the internal database runs one read per claim
//! rather than one per sync. Nothing waits for company: the reader takes what was asked
//! by the time it gets to run (it lets the other ready tasks run first, once), reads it,
//! and each group runs on its own, so a read is never queued behind another's.
//!
//! Only reads known to be small are gathered: at most [`GATHERED_CHANGES`] sequence
//! ids lie between the watermark and the tenancy's latest change, so one tenancy's
//! backlog never makes another's read longer. When the gathered statement cannot reach
//! the internal database, each sync gets that failure, as its own read would have; when
//! the statement itself fails (or the reader is gone), each sync reads alone, so a
//! failure of the group costs a sync its own read, never its result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::db;
use crate::db::warm::WarmConnections;
use crate::error::error_chain;
use crate::gathering;
use crate::mapping::{Batch, Mapping};

/// The most sequence ids between a watermark and the tenancy's latest change for a read
/// to be gathered: its batch then has at most this many changes.
pub(super) const GATHERED_CHANGES: i64 = 256;

/// The most reads one gathered statement answers.
const MOST_GATHERED: usize = 64;

/// One read asked of the reader, and where its answer goes.
struct Asked {
    tenancy_id: Uuid,
    after: i64,
    answer: oneshot::Sender<Answer>,
}

/// What the reader answers one read.
enum Answer {
    /// The batch (`None`: nothing after the watermark), read with the others.
    Read(Option<Batch>),
    /// The internal database could not be reached: the error a read alone would get.
    Unreachable(sqlx::Error),
    /// The gathered statement failed: read alone.
    ReadAlone,
}

/// The gathering reader of each mapping, started on first use.
pub(super) struct GatheredReads {
    /// The internal database; the gathered reads keep their connections warm.
    connections: WarmConnections,
    /// Changes per batch (`SYNC_BATCH_SIZE`), gathered or not.
    limit: u32,
    readers: [OnceLock<mpsc::UnboundedSender<Asked>>; Mapping::ALL.len()],
    counts: Arc<Counts>,
}

/// How many reads were answered by gathered statements, and by how many statements.
#[derive(Debug, Default)]
struct Counts {
    reads: AtomicU64,
    statements: AtomicU64,
}

/// Reads of changes answered together so far, and the statements that answered them
/// (see [`crate::sync::SyncEngine::gathered_reads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatheredCount {
    pub reads: u64,
    pub statements: u64,
}

impl GatheredReads {
    pub(super) fn new(pool: PgPool, limit: u32) -> Self {
        Self {
            connections: WarmConnections::new(pool),
            limit,
            readers: Default::default(),
            counts: Arc::default(),
        }
    }

    pub(super) fn count(&self) -> GatheredCount {
        GatheredCount {
            reads: self.counts.reads.load(Ordering::Relaxed),
            statements: self.counts.statements.load(Ordering::Relaxed),
        }
    }

    /// The next batch of `mapping` after `after` for `tenancy_id`, the same as
    /// [`db::changes::next_batch`] reads, read with whatever other syncs ask at the same
    /// moment when it is known to be small (`latest`, the tenancy's latest change of the
    /// mapping as its claim read it, is at most [`GATHERED_CHANGES`] ids ahead), alone
    /// otherwise.
    pub(super) async fn next_batch(
        &self,
        mapping: Mapping,
        tenancy_id: Uuid,
        after: i64,
        latest: Option<i64>,
    ) -> Result<Option<Batch>, sqlx::Error> {
        let small = latest.is_some_and(|latest| latest.saturating_sub(after) <= GATHERED_CHANGES);
        if small {
            let (answer, answered) = oneshot::channel();
            let asked = Asked {
                tenancy_id,
                after,
                answer,
            };
            if self.reader(mapping).send(asked).is_ok() {
                match answered.await {
                    Ok(Answer::Read(batch)) => return Ok(batch),
                    Ok(Answer::Unreachable(error)) => return Err(error),
                    // The reader went away with the runtime that ran it.
                    Ok(Answer::ReadAlone) | Err(_) => {}
                }
            }
        }
        db::changes::next_batch(
            self.connections.pool(),
            mapping,
            tenancy_id,
            after,
            self.limit,
        )
        .await
    }

    /// The reader of `mapping`, started in the current runtime on first use. A reader
    /// lives as long as this [`GatheredReads`]; one whose runtime ended answers nothing,
    /// and its askers read alone.
    fn reader(&self, mapping: Mapping) -> &mpsc::UnboundedSender<Asked> {
        self.readers[mapping.index()].get_or_init(|| {
            let (asks, asked) = mpsc::unbounded_channel();
            let reader = Reader {
                connections: self.connections.clone(),
                mapping,
                limit: self.limit,
                counts: self.counts.clone(),
            };
            tokio::spawn(reader.run(asked));
            asks
        })
    }
}

/// The reader of one mapping.
#[derive(Clone)]
struct Reader {
    connections: WarmConnections,
    mapping: Mapping,
    limit: u32,
    counts: Arc<Counts>,
}

impl Reader {
    /// Takes the first read asked, lets the other ready tasks run (the rest of a
    /// claim's syncs reach their reads), takes everything asked by then, and reads it in
    /// one statement, in a task of its own so that the next group need not wait.
    async fn run(self, mut asked: mpsc::UnboundedReceiver<Asked>) {
        while let Some(group) = gathering::next_group(&mut asked, MOST_GATHERED).await {
            tokio::spawn(self.clone().answer(group));
        }
    }

    /// [`db::changes::next_batches`] on a connection kept warm.
    async fn read(&self, after: &[(Uuid, i64)]) -> Result<Vec<Option<Batch>>, sqlx::Error> {
        let mut connection = self.connections.take().await?;
        let read =
            db::changes::next_batches(&mut *connection, self.mapping, after, self.limit).await;
        connection.settle(read)
    }

    /// Reads the batches of `group` in one statement and answers each asker: its batch,
    /// or the failure to reach the internal database, or to read alone.
    async fn answer(self, group: Vec<Asked>) {
        let after: Vec<(Uuid, i64)> = (group.iter())
            .map(|asked| (asked.tenancy_id, asked.after))
            .collect();
        match self.read(&after).await {
            Ok(batches) => {
                self.counts.statements.fetch_add(1, Ordering::Relaxed);
                (self.counts.reads).fetch_add(batches.len() as u64, Ordering::Relaxed);
                for (asked, batch) in group.into_iter().zip(batches) {
                    // An asker that went away (its sync was dropped) needs no answer.
                    let _ = asked.answer.send(Answer::Read(batch));
                }
            }
            Err(error) => {
                tracing::warn!(
                    mapping = self.mapping.name(),
                    reads = group.len(),
                    error = %error_chain(&error),
                    unreachable = gathering::unreachable(&error).is_some(),
                    "a gathered read of changes failed"
                );
                for asked in group {
                    let answer = gathering::unreachable(&error)
                        .map_or(Answer::ReadAlone, Answer::Unreachable);
                    let _ = asked.answer.send(answer);
                }
            }
        }
    }
}
