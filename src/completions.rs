//! Completions of published requests, gathered across the publishes that end at the
//! same moment into one statement on the internal database.
//!
//! Each published request is deleted and its sync's statuses recorded
//! ([`db::queue::complete`]): one statement and one commit per sync, the most frequent
//! of the service's statements once the reads were gathered. A completer takes what was
//! asked, completes it in one statement ([`db::queue::complete_many`]), and while that
//! statement runs, gathers what is asked next: one statement in flight at a time, so at
//! a low rate each completion goes alone at once, and under load they go together, as
//! many as ended while the last statement ran. Nothing waits for company.
//!
//! When the gathered statement cannot reach the internal database, each asker gets that
//! failure (and retries as it would have); when the statement itself fails, each
//! completes alone, so one request can never keep another from being completed.
//!
//! A completion with nothing to write at once (its statuses kept for later, or none: a
//! publish to QStash) does not even need a statement of its own: it is left for the
//! poller's next claim, which deletes it in the same statement
//! ([`db::queue::claim_completing`]) and meanwhile leaves it out of the requests in
//! flight, so that the claim may take the request it held back. In `direct` mode the
//! sequencer's batches of `serve`'s loop claim too, as they queue requests, and carry
//! them the same way ([`db::sequencing::sequence_batch_claiming`]): under load each
//! batch carries the completions of the syncs that ended since the last one. One that
//! no claim takes within the wait (`POLLER_COMPLETION_WAIT_MS`, 20 ms) is completed by a
//! statement of its own, with the others left by then; and so are those left when the
//! poller finishes or the process stops. Until then its request still counts as in
//! flight for other processes: a change to its tenancy that one of them would claim
//! waits for that much longer.
//!
//! No durable state is added: a request is deleted when its completion commits, gathered,
//! carried by a claim or alone, and one whose process stops before is taken over when
//! its lease runs out (and synced again, finding nothing to do).
//! That is also what happens to a gathered statement still waiting
//! [`workers::STEP_GRACE_ON_SHUTDOWN`] after shutdown began (the internal database is
//! down, and the pool waits for a connection): it is dropped, its askers are answered as
//! if the database were unreachable, and stopping is not held up by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db;
use crate::db::queue::Completed;
use crate::db::sync_status::SyncedTenancy;
use crate::db::warm::WarmConnections;
use crate::error::error_chain;
use crate::gathering;
use crate::lazy_statuses::LazyStatuses;
use crate::workers;

/// The most requests one gathered statement completes.
const MOST_GATHERED: usize = 128;

/// The most completions one claim carries, or one statement of their own completes when
/// no claim took them.
const MOST_LEFT: usize = 1024;

/// How long writing the statuses kept for later may take once the process is stopping:
/// one statement, done in milliseconds when the internal database answers.
const STATUS_GRACE_ON_SHUTDOWN: Duration = Duration::from_secs(1);

/// One completion asked of the completer, and where its answer goes.
struct Asked {
    id: Uuid,
    synced: Option<SyncedTenancy>,
    answer: oneshot::Sender<Answer>,
}

/// What the completer answers one completion.
enum Answer {
    /// Completed, with the others.
    Done,
    /// The internal database could not be reached: the error a completion alone would
    /// get.
    Unreachable(sqlx::Error),
    /// The gathered statement failed: complete alone.
    Alone,
}

/// The completer of one poller, started on first use.
pub struct Completions {
    connections: WarmConnections,
    stopping: CancellationToken,
    completer: OnceLock<mpsc::UnboundedSender<Asked>>,
    counts: Arc<Counts>,
    statuses: Arc<LazyStatuses>,
    /// Completions left for the next claim, and how long one waits for it (zero: none
    /// is left).
    left: Arc<Left>,
    claim_wait: Duration,
}

#[derive(Debug, Default)]
struct Counts {
    asked: AtomicU64,
    completed: AtomicU64,
    statements: AtomicU64,
    by_claims: AtomicU64,
}

impl Counts {
    /// One statement completed `requests` requests.
    fn completed(&self, requests: usize) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        (self.completed).fetch_add(requests as u64, Ordering::Relaxed);
    }
}

/// Completions asked so far, the requests completed, the statements of their own that
/// completed them, gathered or alone, and the requests that claims completed (see
/// [`crate::poller::Poller::gathered_completions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatheredCompletions {
    pub asked: u64,
    pub completed: u64,
    pub statements: u64,
    pub by_claims: u64,
}

/// The requests whose completions wait for the next claim, oldest first; `waiting` is
/// notified when one is left, for the task that completes those no claim took.
///
/// One statement at a time completes what it took from here (`turn`): a claim, or a
/// statement of their own. Were a claim to run while such a statement has taken a
/// request and not yet committed, the claim would still see it in flight and hold its
/// tenancy's next request back, and nothing would wake the poller when it commits.
#[derive(Debug, Default)]
struct Left {
    requests: std::sync::Mutex<Vec<Uuid>>,
    waiting: tokio::sync::Notify,
    turn: tokio::sync::Mutex<()>,
}

/// Completions taken for one statement to complete (a claim's,
/// [`Completions::carried_by_claim`], or one of their own), and the turn that no other
/// statement completing them runs meanwhile. Dropped before the statement committed (it
/// failed, or was dropped when the process stopped), they are put back.
pub struct Carried<'a> {
    requests: Vec<Uuid>,
    left: &'a Left,
    _turn: tokio::sync::MutexGuard<'a, ()>,
}

impl Carried<'_> {
    pub fn requests(&self) -> &[Uuid] {
        &self.requests
    }

    /// The statement committed: how many it completed.
    fn committed(mut self) -> usize {
        std::mem::take(&mut self.requests).len()
    }
}

impl Drop for Carried<'_> {
    fn drop(&mut self) {
        self.left.put_back(std::mem::take(&mut self.requests));
    }
}

impl Left {
    fn requests(&self) -> std::sync::MutexGuard<'_, Vec<Uuid>> {
        (self.requests.lock()).expect("the completions left are never locked across a panic")
    }

    /// Takes the oldest, at most [`MOST_LEFT`].
    fn take(&self) -> Vec<Uuid> {
        let mut requests = self.requests();
        let taken = requests.len().min(MOST_LEFT);
        requests.drain(..taken).collect()
    }

    /// Takes the oldest, at most [`MOST_LEFT`], once no other statement is completing
    /// some.
    async fn carry(&self) -> Carried<'_> {
        self.carried(self.turn.lock().await)
    }

    /// [`Left::carry`], if no other statement is completing some now; `None` otherwise.
    fn carry_if_free(&self) -> Option<Carried<'_>> {
        Some(self.carried(self.turn.try_lock().ok()?))
    }

    /// Takes the oldest, at most [`MOST_LEFT`], for the statement whose `turn` it is.
    fn carried<'a>(&'a self, turn: tokio::sync::MutexGuard<'a, ()>) -> Carried<'a> {
        Carried {
            requests: self.take(),
            left: self,
            _turn: turn,
        }
    }

    /// Puts back `taken`, ahead of those left since.
    fn put_back(&self, taken: Vec<Uuid>) {
        if taken.is_empty() {
            return;
        }
        let mut requests = self.requests();
        requests.splice(0..0, taken);
        drop(requests);
        self.waiting.notify_one();
    }
}

impl Completions {
    /// Completions on the internal database, gathered ones on connections kept warm;
    /// once `stopping` is cancelled, a gathered statement gets
    /// [`workers::STEP_GRACE_ON_SHUTDOWN`] to end. A plain success is written to its
    /// database's status at most every `status_interval` ([`crate::lazy_statuses`]).
    /// A completion with nothing to write at once waits up to `claim_wait` for the next
    /// claim to carry it (zero: none waits).
    pub fn new(
        connections: WarmConnections,
        stopping: CancellationToken,
        status_interval: Duration,
        claim_wait: Duration,
    ) -> Self {
        Self {
            connections,
            stopping,
            completer: OnceLock::new(),
            counts: Arc::default(),
            statuses: Arc::new(LazyStatuses::new(status_interval)),
            left: Arc::default(),
            claim_wait,
        }
    }

    /// The completions left for the next claim ([`db::queue::claim_completing`]), at most
    /// [`MOST_LEFT`] of them, taken once no other statement is completing some: the
    /// claim tells how it went with [`Completions::claimed`]. Taken before the claim's
    /// connection, so that the statement whose turn it waits for can have one.
    pub async fn carried_by_claim(&self) -> Carried<'_> {
        self.left.carry().await
    }

    /// [`Completions::carried_by_claim`] for a statement that does not wait for its turn
    /// (a sequencer batch, which would hold every change behind it): `None` while another
    /// statement completes some. A batch that carries none then sees those requests
    /// still in flight and leaves their tenancies' new requests pending, announced, for
    /// the poller's claim, which waits for its turn.
    pub fn carried_if_free(&self) -> Option<Carried<'_>> {
        self.left.carry_if_free()
    }

    /// The claim that carried `carried` committed (`true`), or failed: then they wait
    /// again, for the next claim or the wait's end.
    pub fn claimed(&self, carried: Carried<'_>, committed: bool) {
        if committed {
            let taken = carried.committed() as u64;
            (self.counts.by_claims).fetch_add(taken, Ordering::Relaxed);
            (self.counts.completed).fetch_add(taken, Ordering::Relaxed);
        }
    }

    /// Completes at once every completion left for a claim: when the caller's publishes
    /// are all settled and no claim may follow. A failure is logged, and what failed
    /// waits again for a claim or the task that completes those no claim took; once the
    /// process stops, those requests are taken over when their leases run out, and
    /// synced again for nothing.
    pub async fn complete_left(&self) {
        let connections = &self.connections;
        complete_left_now(&self.left, connections, &self.stopping, &self.counts).await;
    }

    /// Writes every success kept for later ([`crate::lazy_statuses`]): when the caller's
    /// publishes are all settled. A failure is logged (the statuses lag; the next
    /// success of each database is written at once by the next process or pass).
    ///
    /// Once the process is stopping, it gets [`STATUS_GRACE_ON_SHUTDOWN`]: the internal
    /// database may be down, and stopping does not wait for it.
    pub async fn write_kept_statuses(&self) {
        let written = tokio::select! {
            biased;
            written = self.statuses.write_kept(&self.connections, true) => written,
            () = workers::stopped_for(&self.stopping, STATUS_GRACE_ON_SHUTDOWN) => {
                tracing::warn!("the internal database did not answer; the statuses of recent syncs are left to the next sync of each database");
                return;
            }
        };
        if let Err(error) = written {
            tracing::warn!(error = %error_chain(&error), "cannot write the statuses of recent syncs; trying again later");
        }
    }

    /// Database successes kept, not written yet.
    pub fn kept_statuses(&self) -> usize {
        self.statuses.kept()
    }

    pub fn count(&self) -> GatheredCompletions {
        GatheredCompletions {
            asked: self.counts.asked.load(Ordering::Relaxed),
            completed: self.counts.completed.load(Ordering::Relaxed),
            statements: self.counts.statements.load(Ordering::Relaxed),
            by_claims: self.counts.by_claims.load(Ordering::Relaxed),
        }
    }

    /// Deletes the published request `id` and records the statuses of `synced`, as
    /// [`db::queue::complete`] does, with whatever other completions are asked at the
    /// same moment; a plain success only if its database's was not written lately
    /// (`statuses_failing`: the claim found the tenancy with a status a success
    /// changes, so every success is written now; see [`crate::lazy_statuses`]).
    pub async fn complete(
        &self,
        id: Uuid,
        synced: Option<&SyncedTenancy>,
        statuses_failing: bool,
    ) -> Result<(), sqlx::Error> {
        // Started before anything is kept: the pass that writes it starts with it.
        let completer = self.completer();
        let synced = self.statuses.write_now(synced, statuses_failing);
        let synced = synced.as_ref();
        self.counts.asked.fetch_add(1, Ordering::Relaxed);
        if synced.is_none() && !self.claim_wait.is_zero() && !self.stopping.is_cancelled() {
            self.left.requests().push(id);
            self.left.waiting.notify_one();
            return Ok(());
        }
        let (answer, answered) = oneshot::channel();
        let asked = Asked {
            id,
            synced: synced.cloned(),
            answer,
        };
        if completer.send(asked).is_ok() {
            match answered.await {
                Ok(Answer::Done) => return Ok(()),
                Ok(Answer::Unreachable(error)) => return Err(error),
                // The completer went away with the runtime that ran it.
                Ok(Answer::Alone) | Err(_) => {}
            }
        }
        db::queue::complete(self.connections.pool(), id, synced).await?;
        self.counts.completed(1);
        Ok(())
    }

    /// The completer, started in the current runtime on first use. One whose runtime
    /// ended answers nothing, and its askers complete alone.
    fn completer(&self) -> &mpsc::UnboundedSender<Asked> {
        self.completer.get_or_init(|| {
            let (asks, asked) = mpsc::unbounded_channel();
            tokio::spawn(complete_gathered(
                self.connections.clone(),
                self.stopping.clone(),
                self.counts.clone(),
                asked,
            ));
            if !self.claim_wait.is_zero() {
                tokio::spawn(complete_left_unclaimed(
                    self.left.clone(),
                    self.connections.clone(),
                    self.stopping.clone(),
                    self.counts.clone(),
                    self.claim_wait,
                ));
            }
            if let Some(every) = self.statuses.pass_every() {
                tokio::spawn(write_kept_statuses(
                    self.statuses.clone(),
                    self.connections.clone(),
                    self.stopping.clone(),
                    every,
                ));
            }
            asks
        })
    }
}

/// Every `every`, writes the successes kept whose database's last write is an interval
/// old; once `stopping` is cancelled, writes every success at once from then on and
/// what is kept. Ends with the runtime, or once stopped.
async fn write_kept_statuses(
    statuses: Arc<LazyStatuses>,
    connections: WarmConnections,
    stopping: CancellationToken,
    every: Duration,
) {
    loop {
        tokio::select! {
            () = stopping.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        // A pass waiting for a connection when the process stops is dropped after the
        // grace (the pool would wait for a database that is down); it took nothing yet.
        let written = tokio::select! {
            biased;
            written = statuses.write_kept(&connections, false) => written,
            () = workers::stopped_for(&stopping, STATUS_GRACE_ON_SHUTDOWN) => break,
        };
        if let Err(error) = written {
            tracing::warn!(error = %error_chain(&error), "cannot write the statuses of recent syncs; trying again");
        }
    }
    statuses
        .stop_keeping(&connections, STATUS_GRACE_ON_SHUTDOWN)
        .await;
}

/// Completes the completions that no claim took within `wait` of being left (with those
/// left since), each time one is left; once `stopping` is cancelled, those left then.
/// Ends with the runtime, or once stopped.
async fn complete_left_unclaimed(
    left: Arc<Left>,
    connections: WarmConnections,
    stopping: CancellationToken,
    counts: Arc<Counts>,
    wait: Duration,
) {
    loop {
        tokio::select! {
            () = stopping.cancelled() => break,
            () = left.waiting.notified() => {}
        }
        tokio::select! {
            () = stopping.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        if !complete_left_now(&left, &connections, &stopping, &counts).await {
            // The internal database did not answer: not again at once.
            tokio::select! {
                () = stopping.cancelled() => break,
                () = tokio::time::sleep(wait.max(UNANSWERED_PAUSE)) => {}
            }
        }
    }
    complete_left_now(&left, &connections, &stopping, &counts).await;
}

/// How long the completions left wait after their statement failed before the next.
const UNANSWERED_PAUSE: Duration = Duration::from_millis(100);

/// Completes the completions left by now, in statements of at most [`MOST_LEFT`], in
/// turn with claims; whether all went. What a failed statement took is put back, for a
/// claim or the next try. Once `stopping` is cancelled, all of it gets
/// [`STATUS_GRACE_ON_SHUTDOWN`], waiting for its turn included (the internal database
/// may be down, and stopping does not wait for it).
async fn complete_left_now(
    left: &Left,
    connections: &WarmConnections,
    stopping: &CancellationToken,
    counts: &Counts,
) -> bool {
    let completing = async {
        loop {
            let carried = left.carry().await;
            if carried.requests().is_empty() {
                return Ok(());
            }
            let completed: Vec<Completed<'_>> = (carried.requests().iter())
                .map(|&id| Completed { id, synced: None })
                .collect();
            complete_many(connections, &completed).await?;
            counts.completed(carried.committed());
        }
    };
    let completed = tokio::select! {
        biased;
        completed = completing => completed,
        () = workers::stopped_for(stopping, STATUS_GRACE_ON_SHUTDOWN) => {
            Err(sqlx::Error::PoolTimedOut)
        }
    };
    if let Err(error) = &completed {
        tracing::warn!(
            requests = left.requests().len(),
            error = %error_chain(error),
            "cannot complete synced requests; trying again (or their leases run out)"
        );
    }
    completed.is_ok()
}

/// Takes the first completion asked, lets the other ready tasks run (publishes that
/// ended together reach their completions), takes everything asked by then, and
/// completes it in one statement; then the next group, gathered meanwhile.
async fn complete_gathered(
    connections: WarmConnections,
    stopping: CancellationToken,
    counts: Arc<Counts>,
    mut asked: mpsc::UnboundedReceiver<Asked>,
) {
    // One moment for every group: the grace after shutdown began.
    let stopped_a_while_ago =
        async move { workers::stopped_for(&stopping, workers::STEP_GRACE_ON_SHUTDOWN).await }
            .boxed()
            .shared();
    while let Some(group) = gathering::next_group(&mut asked, MOST_GATHERED).await {
        let completed: Vec<Completed<'_>> = (group.iter())
            .map(|asked| Completed {
                id: asked.id,
                synced: asked.synced.as_ref(),
            })
            .collect();
        let completing = tokio::select! {
            biased;
            completing = complete_many(&connections, &completed) => completing,
            // Dropping the statement rolls it back; the askers leave their requests to
            // their leases, as they would with the database unreachable.
            () = stopped_a_while_ago.clone() => Err(sqlx::Error::PoolTimedOut),
        };
        match completing {
            Ok(()) => {
                counts.completed(group.len());
                for asked in group {
                    // An asker that went away (its publish was dropped) needs no answer.
                    let _ = asked.answer.send(Answer::Done);
                }
            }
            Err(error) => {
                tracing::warn!(
                    requests = group.len(),
                    error = %error_chain(&error),
                    unreachable = gathering::unreachable(&error).is_some(),
                    "a gathered completion of requests failed"
                );
                for asked in group {
                    let answer =
                        gathering::unreachable(&error).map_or(Answer::Alone, Answer::Unreachable);
                    let _ = asked.answer.send(answer);
                }
            }
        }
    }
}

/// [`db::queue::complete_many`] on a connection kept warm.
async fn complete_many(
    connections: &WarmConnections,
    completed: &[Completed<'_>],
) -> Result<(), sqlx::Error> {
    let mut connection = connections.take().await?;
    let completing = db::queue::complete_many(&mut *connection, completed).await;
    connection.settle(completing)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::postgres::PgPoolOptions;
    use sqlx::PgPool;

    use super::*;

    /// A pool on a port nothing listens on: each acquire keeps retrying the connection
    /// until its timeout, a minute, as it does while the internal database is down.
    fn pool_of_a_database_that_is_down() -> PgPool {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(60))
            .connect_lazy(&format!("postgres://nobody@127.0.0.1:{port}/nothing"))
            .unwrap()
    }

    #[test]
    fn completions_a_failed_claim_carried_wait_again_ahead_of_those_left_since() {
        let left = Left::default();
        let ids: Vec<Uuid> = (0..MOST_LEFT + 3).map(|_| Uuid::new_v4()).collect();
        left.requests().extend(&ids[..MOST_LEFT + 1]);
        let taken = left.take();
        assert_eq!(taken, ids[..MOST_LEFT], "the oldest, at most MOST_LEFT");
        left.requests().extend(&ids[MOST_LEFT + 1..]);
        left.put_back(taken);
        let mut again = left.take();
        again.extend(left.take());
        assert_eq!(again, ids);
        assert!(left.take().is_empty());
    }

    #[tokio::test]
    async fn a_gathered_completion_waiting_for_a_database_that_is_down_gives_up_after_the_shutdown_grace(
    ) {
        let pool = pool_of_a_database_that_is_down();
        let stopping = CancellationToken::new();
        let completions = Arc::new(Completions::new(
            WarmConnections::new(pool.clone()),
            stopping.clone(),
            Duration::ZERO,
            Duration::ZERO,
        ));
        let completing = tokio::spawn({
            let completions = completions.clone();
            async move { completions.complete(Uuid::new_v4(), None, false).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!completing.is_finished(), "it waits for the database");

        let stopped_at = Instant::now();
        stopping.cancel();
        let answer = tokio::time::timeout(Duration::from_secs(10), completing)
            .await
            .expect("the completion gave up within 10 s of the shutdown")
            .unwrap();
        assert!(
            matches!(answer, Err(sqlx::Error::PoolTimedOut)),
            "answered as unreachable: {answer:?}"
        );
        assert!(stopped_at.elapsed() >= workers::STEP_GRACE_ON_SHUTDOWN);
        // Nothing is left waiting for a connection, so the pool closes at once.
        tokio::time::timeout(Duration::from_secs(2), pool.close())
            .await
            .expect("the pool closed within 2 s");
    }
}
