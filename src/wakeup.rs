//! The wake-up and lease protocol: how the in-process loops sleep until there is work,
//! without making the application's writes pay for it.
//!
//! **Notifications.** Triggers on the source tables notify [`CHANGES_CHANNEL`] when a
//! row changes (migrations 5 and 8), and a trigger on `"OutgoingRequest"` notifies
//! [`REQUESTS_CHANNEL`] when a sync request is inserted. One listener connection per
//! process ([`listen`]) turns them into [`Notify`] permits ([`Wakeups`]); an idle loop
//! waits for its permit or its timer (`*_IDLE_INTERVAL_MS`), whichever comes first. A
//! permit given while the loop is busy is kept, so no wake-up is lost; when the
//! listener's connection drops, notifications may be missed, so both loops are woken
//! after it reconnects, and their timers remain the safety net. Switching a stage on in
//! the fusebox notifies too ([`crate::db::fusebox`]).
//!
//! **The lease.** A `NOTIFY` is not free: PostgreSQL serializes the commits of notifying
//! transactions. An awake sequencer does not need notifications, since it runs another
//! batch as soon as the last one ends; so while awake it holds a lease ("awake until",
//! kept in a sequence, renewed by its batches), and writers that see it stay quiet. To
//! go to sleep, the sequencer's batch must find nothing *and* take, at once, the
//! exclusive side of an advisory lock whose shared side every writer holds from the
//! moment it looks at the lease until it commits; it then checks that no flagged row is
//! left and clears the lease, in the same transaction. So a writer that saw the lease
//! and stayed quiet is either committed (and its row seen) or still holding the lock (and
//! the sequencer stays awake). The SQL is migration 8's (now in migration 21's
//! `external_db_sync_sequence_and_claim`), called through
//! [`crate::db::sequencing::sequence_batch`] with a [`Wakefulness`].
//!
//! **The sequencer's loop** ([`SequencerLoop`]) stays awake after work for a few short
//! pauses (the next write is rarely further away), then asks to sleep at every batch;
//! refused, it looks again after pauses that double up to 50 ms; asleep, it waits for a
//! notification. A loop that dies keeps writers quiet only until its lease runs out
//! ([`WAKE_LEASE`]); one that stops gives the lease up. **The poller's loop** is woken by
//! request notifications and by the end of the publishes it started.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::db::sequencing::Wakefulness;
use crate::db::warm::WarmConnections;
use crate::db::{CHANGES_CHANNEL, REQUESTS_CHANNEL};
use crate::error::error_chain;
use crate::sequencer::{self, ClaimFor, SequencerError, SequencerRun, SequencerSettings};
use crate::workers::Outcome;

/// The permits the listener hands out.
#[derive(Clone, Default)]
pub struct Wakeups {
    /// Source rows changed: the sequencer has work.
    pub changes: Arc<Notify>,
    /// A sync request was queued: the poller has work.
    pub requests: Arc<Notify>,
}

impl Wakeups {
    fn wake_all(&self) {
        self.changes.notify_one();
        self.requests.notify_one();
    }
}

/// The longest wait between two attempts to connect the listener again. Short: while
/// it is away, notifications are missed and the loops wait for their timers, and an
/// attempt costs one connection.
const LISTENER_RETRY_LONGEST: Duration = Duration::from_secs(2);

/// Listens until `shutdown`, reconnecting with backoff when the connection fails. The
/// backoff starts over once a connection was listening: an outage late in a process's
/// life is waited out as briefly as the first one.
pub async fn listen(pool: PgPool, wakeups: Wakeups, shutdown: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listening = false;
        // Connecting waits for the pool (its acquire timeout) while the database is down:
        // stopping does not.
        let listened = tokio::select! {
            () = shutdown.cancelled() => return,
            listened = listen_once(&pool, &wakeups, &shutdown, &mut listening) => listened,
        };
        match listened {
            Ok(()) => return,
            Err(error) => {
                failures = if listening {
                    1
                } else {
                    failures.saturating_add(1)
                };
                let wait =
                    backoff::delay(failures, Duration::from_millis(200), LISTENER_RETRY_LONGEST);
                tracing::warn!(error = %error_chain(&error), retry_in_ms = wait.as_millis() as u64, "change listener failed; loops fall back to their timers");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Listens on one connection until it fails (sets `listening` once it did listen) or
/// until `shutdown`.
async fn listen_once(
    pool: &PgPool,
    wakeups: &Wakeups,
    shutdown: &CancellationToken,
    listening: &mut bool,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([CHANGES_CHANNEL, REQUESTS_CHANNEL])
        .await?;
    *listening = true;
    tracing::debug!("listening for change notifications");
    // Anything that happened before the listener was up went unheard.
    wakeups.wake_all();
    loop {
        let notification = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            notification = listener.try_recv() => notification?,
        };
        match notification {
            Some(notification) if notification.channel() == CHANGES_CHANNEL => {
                wakeups.changes.notify_one();
            }
            Some(notification) if notification.channel() == REQUESTS_CHANNEL => {
                wakeups.requests.notify_one();
            }
            Some(_) => {}
            // The connection was lost and re-established: notifications may be missed.
            None => wakeups.wake_all(),
        }
    }
}

/// How long the loop's lease keeps writers quiet. Renewed by every batch once half of it
/// passed, so it only matters when the loop stops without giving it up (the process
/// died): writers notify again this long after.
pub const WAKE_LEASE: Duration = Duration::from_secs(2);

/// The pauses of an awake loop after batches that found nothing, before it tries to
/// sleep (about 30 ms in all). Under a steady stream of writes the next change is
/// rarely further away than that; a loop that slept at the first empty batch would be
/// woken by the very next writer, who pays for the notification. A write that comes
/// during a pause waits for the pause's end, so they stay short.
const AWAKE_PAUSES_MS: [u64; 6] = [1, 2, 4, 8, 8, 8];
/// Once the loop tries to sleep, it may not while a writer that saw its lease has not
/// committed (a transaction left open after its write), or while a flagged row is held
/// locked by another transaction; it then looks again after pauses that double up to
/// this.
const REFUSED_PAUSE_LONGEST: Duration = Duration::from_millis(50);

/// How far a sequencer loop's batches grow while a backlog lasts: a batch that came back
/// full is followed by one twice its size, up to this many times `SEQUENCER_BATCH_SIZE`
/// (and never over [`GROWN_BATCH_MOST`] rows per table); a batch that was not full
/// brings it back to the configured size. Larger batches spend less per row on the
/// round trip and the commit; the cap keeps a batch short enough that the changes of
/// small tenancies, queued behind it, still arrive within a fraction of a second.
const BATCH_GROWTH_LIMIT: u32 = 8;
const GROWN_BATCH_MOST: u32 = 10_000;

/// A backlog of at least this many rows, numbered in full batches one after another, is
/// followed by an `ANALYZE` of the source tables once it is gone. Right after a bulk
/// import the planner's statistics say that most rows are flagged, and it scans whole
/// tables to find the few that are; autovacuum corrects them only a minute or more
/// later, and every batch and sleep check meanwhile paid for a full scan (latency at
/// 1,000 changes/s went from about 0.1 s to 1.4 s after a two-million-row import).
const ANALYZE_AFTER_BACKLOG: u64 = 20_000;

/// Refreshes the planner's statistics of the source tables (see
/// [`ANALYZE_AFTER_BACKLOG`]). A failure (the service's role does not own the tables,
/// say) is logged, not returned: autovacuum does the same work later.
async fn analyze_source_tables(pool: &PgPool) {
    let started = std::time::Instant::now();
    match sqlx::query(r#"analyze "ProjectUser", "ContactChannel", "DeletedRow""#)
        .execute(pool)
        .await
    {
        Ok(_) => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "a large backlog was numbered; refreshed the source tables' statistics"
        ),
        Err(error) => tracing::warn!(
            error = %error_chain(&error),
            "cannot analyze the source tables after a large backlog; autovacuum will"
        ),
    }
}

/// The sequencer as a loop in `serve`: one [`SequencerLoop::step`] per batch. It sleeps
/// (waits for a change notification, or its timer) only once the database agreed that
/// writers notify again; until then it looks again after a short pause.
#[derive(Debug)]
pub struct SequencerLoop {
    /// Batches in a row that found nothing while awake. From `AWAKE_PAUSES_MS.len()`
    /// on, each batch tries to go to sleep; asleep, the count stays there, so that a
    /// wake-up with nothing to do goes back to sleep at once.
    empty_looks: usize,
    /// The next batch's size, as a multiple of the configured one (see
    /// [`BATCH_GROWTH_LIMIT`]).
    growth: u32,
    /// Rows numbered by the current run of full batches (see [`ANALYZE_AFTER_BACKLOG`]).
    backlog: u64,
}

impl Default for SequencerLoop {
    /// A new loop starts as if asleep: on an idle system its first batch goes to sleep.
    fn default() -> Self {
        SequencerLoop {
            empty_looks: AWAKE_PAUSES_MS.len(),
            growth: 1,
            backlog: 0,
        }
    }
}

impl SequencerLoop {
    /// Runs one batch and tells the loop what to do next.
    pub async fn step(
        &mut self,
        connections: &WarmConnections,
        settings: &SequencerSettings,
        claim_for: Option<&ClaimFor<'_>>,
    ) -> Result<Outcome, SequencerError> {
        let lease = WAKE_LEASE;
        let wakefulness = if self.empty_looks >= AWAKE_PAUSES_MS.len() {
            Wakefulness::Sleepy { lease }
        } else {
            Wakefulness::Awake { lease }
        };
        let batch_size = self.batch_size(settings.batch_size);
        let grown = SequencerSettings {
            batch_size,
            ..settings.clone()
        };
        let run = sequencer::run_batch(connections, &grown, wakefulness, claim_for).await?;
        let worked = run.outcome(batch_size);
        self.grow(&worked);
        if self.backlog_drained(&worked) {
            analyze_source_tables(connections.pool()).await;
        }
        Ok(self.after(run, batch_size, settings.gather_pause))
    }

    /// Counts the rows of a run of full batches; true once such a run of at least
    /// [`ANALYZE_AFTER_BACKLOG`] rows ended with a batch that was not full.
    fn backlog_drained(&mut self, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Worked { n, more: true } => {
                self.backlog = self.backlog.saturating_add(*n);
                false
            }
            Outcome::Worked { n, more: false } => {
                let drained = self.backlog.saturating_add(*n) >= ANALYZE_AFTER_BACKLOG;
                self.backlog = 0;
                drained
            }
            _ => {
                let drained = self.backlog >= ANALYZE_AFTER_BACKLOG;
                self.backlog = 0;
                drained
            }
        }
    }

    /// After a full batch, the next one is twice as large (up to the limit); after any
    /// other, back to the configured size.
    fn grow(&mut self, outcome: &Outcome) {
        self.growth = match outcome {
            Outcome::Worked { more: true, .. } => (self.growth * 2).min(BATCH_GROWTH_LIMIT),
            _ => 1,
        };
    }

    /// The size of the next batch, from the configured one.
    fn batch_size(&self, configured: u32) -> u32 {
        let grown = configured.saturating_mul(self.growth);
        if grown > configured {
            grown.min(GROWN_BATCH_MOST.max(configured))
        } else {
            configured
        }
    }

    /// Gives the lease up as the loop ends, so that writers notify the other replicas at
    /// once instead of when the lease runs out. It keeps trying (a writer mid-commit, or
    /// work found) for as long as the lease would last anyway.
    pub async fn give_up_lease(&self, connections: &WarmConnections, settings: &SequencerSettings) {
        let deadline = tokio::time::Instant::now() + WAKE_LEASE;
        let sleepy = Wakefulness::Sleepy { lease: WAKE_LEASE };
        while tokio::time::Instant::now() < deadline {
            // Bounded by the lease itself: a database that does not answer (it is down,
            // the pool waits for a connection) is not waited for any longer.
            let batch = tokio::time::timeout_at(
                deadline,
                sequencer::run_batch(connections, settings, sleepy, None),
            );
            let Ok(batch) = batch.await else {
                tracing::warn!(
                    "the database did not answer; the sequencer's lease runs out on its own"
                );
                return;
            };
            match batch {
                Ok(SequencerRun::Batch(batch)) if !batch.sleeping => {
                    tokio::time::sleep(Duration::from_millis(AWAKE_PAUSES_MS[0])).await;
                }
                // Asleep, or switched off (which gives the lease up too).
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot give the sequencer's lease up; it runs out on its own");
                    return;
                }
            }
        }
    }

    /// What the loop does after `run`: `gather` is how long it waits after a batch that
    /// numbered what there was ([`SequencerSettings::gather_pause`]): under a steady
    /// stream of writes every batch would otherwise number one change, and each batch
    /// costs the internal database a transaction and a commit whatever its size.
    fn after(&mut self, run: SequencerRun, batch_size: u32, gather: Duration) -> Outcome {
        let outcome = run.outcome(batch_size);
        let sleeping = matches!(run, SequencerRun::Batch(batch) if batch.sleeping);
        match outcome {
            // A batch that was not full took everything flagged: the next one waits a
            // moment, so that it numbers the changes of that moment together (one
            // statement, one commit) instead of one change each.
            Outcome::Worked { more: false, .. } => {
                self.empty_looks = 0;
                return Outcome::Recheck(gather);
            }
            Outcome::Worked { .. } => self.empty_looks = 0,
            Outcome::Idle if !sleeping => {
                self.empty_looks = self.empty_looks.saturating_add(1);
                let pause = match AWAKE_PAUSES_MS.get(self.empty_looks - 1) {
                    Some(&ms) => Duration::from_millis(ms),
                    None => {
                        let refusals = (self.empty_looks - AWAKE_PAUSES_MS.len()).min(16) as u32;
                        let last = AWAKE_PAUSES_MS[AWAKE_PAUSES_MS.len() - 1];
                        Duration::from_millis(last << refusals).min(REFUSED_PAUSE_LONGEST)
                    }
                };
                return Outcome::Recheck(pause);
            }
            _ => self.empty_looks = AWAKE_PAUSES_MS.len(),
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::sequencing::SequencedBatch;
    use crate::sequencer::tests::batch;

    #[test]
    fn batches_grow_while_they_come_back_full_and_shrink_back_after() {
        let mut worker = SequencerLoop::default();
        let full = Outcome::Worked { n: 1, more: true };
        let mut sizes = Vec::new();
        for _ in 0..5 {
            sizes.push(worker.batch_size(1000));
            worker.grow(&full);
        }
        assert_eq!(sizes, [1000, 2000, 4000, 8000, 8000]);
        worker.grow(&Outcome::Worked { n: 1, more: false });
        assert_eq!(worker.batch_size(1000), 1000);

        // Never over GROWN_BATCH_MOST, and never under the configured size.
        for _ in 0..5 {
            worker.grow(&full);
        }
        assert_eq!(worker.batch_size(5000), 10_000);
        assert_eq!(worker.batch_size(50_000), 50_000);
        worker.grow(&Outcome::Idle);
        assert_eq!(worker.batch_size(5000), 5000);
    }

    #[test]
    fn a_large_backlog_that_is_gone_asks_for_fresh_statistics_once() {
        let mut worker = SequencerLoop::default();
        let full = Outcome::Worked {
            n: 8_000,
            more: true,
        };
        assert!(!worker.backlog_drained(&full));
        assert!(!worker.backlog_drained(&full));
        assert!(worker.backlog_drained(&Outcome::Worked {
            n: 5_000,
            more: false
        }));
        assert!(!worker.backlog_drained(&Outcome::Idle), "once");

        // Small work, however long it goes on, asks for nothing.
        for _ in 0..100 {
            assert!(!worker.backlog_drained(&Outcome::Worked {
                n: 900,
                more: false
            }));
        }
        assert!(!worker.backlog_drained(&full));
        assert!(
            !worker.backlog_drained(&Outcome::Idle),
            "8,000 rows is no backlog"
        );
    }

    #[test]
    fn the_worker_stays_awake_briefly_then_sleeps_only_when_the_batch_says_so() {
        let idle = |sleeping| {
            SequencerRun::Batch(SequencedBatch {
                sleeping,
                ..SequencedBatch::default()
            })
        };
        let recheck = |ms| Outcome::Recheck(Duration::from_millis(ms));
        // The pause after a batch that took everything is the setting's.
        const GATHER: Duration = Duration::from_millis(7);
        let mut worker = SequencerLoop::default();
        assert_eq!(worker.empty_looks, AWAKE_PAUSES_MS.len(), "starts sleepy");

        assert_eq!(
            worker.after(batch(2, 0, 0), 10, GATHER),
            Outcome::Recheck(GATHER),
            "a batch that took everything is followed after a pause that gathers more"
        );
        assert_eq!(
            worker.after(batch(10, 0, 0), 10, GATHER),
            Outcome::Worked { n: 10, more: true },
            "a full batch is followed at once"
        );
        // Awake: short pauses, without trying to sleep...
        for ms in AWAKE_PAUSES_MS {
            assert!(worker.empty_looks < AWAKE_PAUSES_MS.len(), "stays awake");
            assert_eq!(worker.after(idle(false), 10, GATHER), recheck(ms));
        }
        // ...then it tries at every look; refused, it looks again ever later.
        for ms in [16, 32, 50, 50] {
            assert!(
                worker.empty_looks >= AWAKE_PAUSES_MS.len(),
                "tries to sleep"
            );
            assert_eq!(worker.after(idle(false), 10, GATHER), recheck(ms));
        }
        assert_eq!(worker.after(idle(true), 10, GATHER), Outcome::Idle);
        assert!(
            worker.empty_looks >= AWAKE_PAUSES_MS.len(),
            "woken with nothing to do, it goes back to sleep"
        );
        assert_eq!(
            worker.after(batch(1, 0, 0), 10, GATHER),
            Outcome::Recheck(GATHER)
        );
        assert_eq!(
            worker.after(idle(false), 10, GATHER),
            recheck(1),
            "short again"
        );
        assert_eq!(
            worker.after(SequencerRun::Disabled, 10, GATHER),
            Outcome::Disabled
        );
        assert!(worker.empty_looks >= AWAKE_PAUSES_MS.len());
    }
}
