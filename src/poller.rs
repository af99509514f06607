//! The poller (DESIGN.md §5): claims due sync requests from `"OutgoingRequest"`,
//! publishes them, and deletes each one only after its publish succeeded.
//!
//! Delivery is at least once. A failed publish gives the request back with exponential
//! backoff and jitter and records the error, so a request that keeps failing stays in
//! the table with its attempt count and last error instead of vanishing. A poller that
//! dies mid-flight leaves its claims behind; their leases expire and the next run takes
//! them over.
//!
//! In `direct` mode the sequencer's batches of `serve`'s loop claim most requests
//! themselves, as they queue them, for this process's poller: they take its free slots
//! ([`Poller::slots_for_enqueue`]) and the publishes start in the loop's [`InFlight`]
//! ([`Poller::claimed_at_enqueue`]), settled like any other. The poller claims the rest:
//! requests of tenancies that were busy or failing, retries, leases run out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::completions::{Completions, GatheredCompletions};
use crate::db;
use crate::db::queue::ClaimedRequest;
use crate::db::warm::WarmConnections;
use crate::error::error_chain;
use crate::instruments;
use crate::publish::{FailureReason, PublishError, PublishResult, Publisher};
use crate::workers::{self, Outcome};

/// Tuning of the poller.
#[derive(Debug, Clone)]
pub struct PollerSettings {
    /// Requests claimed per run (`POLLER_BATCH_SIZE`).
    pub batch_size: u32,
    /// How long a claim holds, unrenewed, before another poller may take the request
    /// over (`POLLER_LEASE_SECS`). A publish renews its claims every third of it, so a
    /// sync may take longer; a process that died leaves them for this long.
    pub lease: Duration,
    /// How long the in-process loop waits when idle and no request notification arrives
    /// (`POLLER_IDLE_INTERVAL_MS`): the safety net behind `LISTEN`.
    pub idle_interval: Duration,
    /// Publishes running at the same time in this process (`POLLER_SYNC_CONCURRENCY`):
    /// in `direct` mode each is one tenancy's sync; through QStash, one batch call.
    pub sync_concurrency: usize,
    /// Smallest and largest wait before a failed request is tried again.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// How often a database's plain success is written to its status at most
    /// (`POLLER_STATUS_INTERVAL_MS`); zero writes every success with its completion.
    /// A change of state is written at once (see [`crate::completions`]).
    pub status_interval: Duration,
    /// How long a completion with nothing to write at once waits for the next claim to
    /// carry it, before it goes in a statement of its own
    /// (`POLLER_COMPLETION_WAIT_MS`); zero completes each at once (see
    /// [`crate::completions`]).
    pub completion_wait: Duration,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(30),
            idle_interval: Duration::from_secs(5),
            sync_concurrency: 32,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(300),
            status_interval: Duration::from_secs(2),
            completion_wait: Duration::from_millis(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("poller database error")]
    Database(#[from] sqlx::Error),
}

/// What one call of [`Poller::run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollerRun {
    /// The fusebox has the poller switched off; nothing was claimed.
    Disabled,
    Batch(PolledBatch),
}

/// Requests claimed by one step, and publishes that ended since the step before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolledBatch {
    pub claimed: u64,
    /// Published and deleted.
    pub published: u64,
    /// Given back to the queue.
    pub failed: u64,
    /// Publishes of the caller still running after the step (`direct` mode).
    pub in_flight: u64,
}

impl PolledBatch {
    /// Adds the counts of a later step to these; `in_flight`, a state rather than a
    /// count, becomes the later step's.
    pub fn add(&mut self, other: &PolledBatch) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.failed += other.failed;
        self.in_flight = other.in_flight;
    }

    fn count(&mut self, settled: Settled) {
        self.published += settled.published;
        self.failed += settled.released;
    }
}

impl PollerRun {
    pub fn outcome(&self, batch_size: u32) -> Outcome {
        match self {
            PollerRun::Disabled => Outcome::Disabled,
            PollerRun::Batch(batch) if batch.claimed > 0 => Outcome::Worked {
                n: batch.claimed,
                more: batch.claimed >= u64::from(batch_size),
            },
            PollerRun::Batch(batch) if batch.in_flight > 0 => Outcome::Waiting,
            PollerRun::Batch(_) => Outcome::Idle,
        }
    }
}

/// How the requests of one publish ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Settled {
    /// Published and deleted.
    published: u64,
    /// Given back to the queue.
    released: u64,
    /// A sync of the publish queued a retry request for when a failing database comes
    /// due (see [`crate::publish::Published::queued_retry`]).
    retries_queued: bool,
}

/// What one claim started.
#[derive(Debug, Clone, Copy)]
struct Started {
    /// Requests claimed (and publishes started for them).
    claimed: u64,
    /// They filled the claim's limit: more may be due.
    filled: bool,
    /// The claim found a due request held back by its tenancy's request in flight
    /// ([`ClaimedRequest::held_back`]).
    held_back: bool,
}

/// The poller of one process. It claims requests, publishes them, and settles each one:
/// deleted when published, given back with backoff when not.
///
/// Each publish runs in a task of its own, holding one of the process's slots: the
/// poller claims as many requests as its free slots take ([`Publisher::batch_limit`]
/// each), and settles a publish's requests the moment it ends, while the others go on.
/// In `direct` mode a publish is one tenancy's sync, so a busy tenancy never waits for
/// a slow one, and a slot is refilled as soon as it frees; through QStash it is one
/// HTTP call for the whole batch.
pub struct Poller {
    /// The internal database; the claims and completions keep their connections warm.
    connections: WarmConnections,
    publisher: Arc<dyn Publisher>,
    settings: PollerSettings,
    /// Free publish slots of this process, shared by every caller (`serve`'s loop and
    /// any cron call), so that together they stay within `sync_concurrency`.
    slots: Arc<Semaphore>,
    /// Cancelled when the process stops: publishes still running a grace period later
    /// are dropped and their requests given back, and settling stops retrying.
    stopping: CancellationToken,
    /// Completions of published requests, gathered across publishes that end together.
    completions: Arc<Completions>,
}

/// The publishes one caller started and has not yet counted. Each caller has its own,
/// so a cron call waits for its own syncs only.
pub struct InFlight {
    tasks: Mutex<JoinSet<Result<Settled, sqlx::Error>>>,
    /// Notified when one of the publishes ends and the caller should know (see
    /// [`Ends`]): it may claim again, or count what ended.
    ended: Arc<Notify>,
    ends: Arc<Mutex<Ends>>,
}

/// How soon the in-process loop looks again after a claim that took nothing while a due
/// request that nothing holds back was there ([`db::queue::AfterEmptyClaim::claimable`]).
/// Short, since a sync may wait on it; not zero, since a row skipped because a
/// sequencer batch holds it locked stays so until that batch commits (which then
/// notifies), and each look costs the internal database two statements.
const UNCLAIMED_PAUSE: Duration = Duration::from_millis(10);

/// When the in-process loop should look again, besides its wake-ups.
enum LookAgain {
    /// Only when woken (a request queued, a publish ended that may have freed work).
    OnWake,
    /// At once.
    Now,
    /// When the next pending request comes due.
    After(Duration),
}

/// When the end of a publish notifies its caller.
///
/// A cron call waits for its own publishes, so each end notifies it. The in-process
/// loop is woken by an end only when the end may have made work claimable: a claim
/// (one that took requests or one that found nothing) saw a due request held back by
/// its tenancy's request in flight, which becomes claimable when that one is settled;
/// or the publish gave requests back, or its sync queued a retry request (the loop
/// reads when they come due: a retry moved earlier is an update, which notifies
/// nobody). Every other way work appears wakes the loop itself: a request inserted
/// notifies, and so does a sequencer batch that relied on a pending request. An end
/// that woke the loop for nothing would cost a claim that finds nothing and the read
/// after it: two statements on the internal database per sync.
#[derive(Debug, Default)]
struct Ends {
    /// Publishes that ended so far.
    count: u64,
    /// A claim since the last notification saw work that an end may free.
    wanted: bool,
    /// Every end notifies: a cron call's publishes, or the loop's once it is finishing.
    always: bool,
}

impl Ends {
    /// One publish ended (`made_work`: some of its requests went back to the queue,
    /// its sync queued a retry, or settling failed); whether to notify the caller.
    fn ended(&mut self, made_work: bool) -> bool {
        self.count += 1;
        let notify = self.always || self.wanted || made_work;
        self.wanted = false;
        notify
    }

    /// The next end notifies. False when an end came after `since` (the count when the
    /// claim began): it may have freed work that the claim's snapshot did not see, and
    /// it did not notify for it.
    fn want_next(&mut self, since: u64) -> bool {
        self.wanted = true;
        self.count == since
    }
}

impl InFlight {
    /// `ended` is notified each time one of the caller's publishes ends.
    pub fn new(ended: Arc<Notify>) -> Self {
        Self {
            tasks: Mutex::new(JoinSet::new()),
            ended,
            ends: Arc::new(Mutex::new(Ends {
                always: true,
                ..Ends::default()
            })),
        }
    }

    /// For the in-process loop: `wake` is notified when one of its publishes ends and a
    /// claim may now find work it could not take before (see [`Ends`]), not on every end.
    pub fn for_loop(wake: Arc<Notify>) -> Self {
        let in_flight = Self::new(wake);
        in_flight.ends().always = false;
        in_flight
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, Ends> {
        lock(&self.ends)
    }

    /// What is notified when one of the caller's publishes ends.
    pub fn ended(&self) -> &Notify {
        &self.ended
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<Result<Settled, sqlx::Error>>> {
        lock(&self.tasks)
    }

    /// Counts the publishes that ended. A failure to settle one (the internal database
    /// is unreachable) is returned after the others are counted; that request keeps its
    /// claim until the lease expires, and is then taken over.
    fn reap(&self, batch: &mut PolledBatch) -> Result<(), PollerError> {
        let mut first_error = None;
        let mut tasks = self.tasks();
        while let Some(joined) = tasks.try_join_next() {
            match joined {
                Ok(Ok(settled)) => batch.count(settled),
                Ok(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Err(join_error) => {
                    tracing::error!(error = %join_error, "a publish task panicked; its lease will expire");
                    batch.failed += 1;
                }
            }
        }
        batch.in_flight = tasks.len() as u64;
        first_error.map_or(Ok(()), |error| Err(error.into()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("the in-flight locks are never held across a panic")
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new(Arc::new(Notify::new()))
    }
}

impl Drop for InFlight {
    /// A caller that goes away (a cron client hung up) leaves its publishes running:
    /// each settles its own request, instead of leaving it claimed until the lease runs
    /// out.
    fn drop(&mut self) {
        self.tasks().detach_all();
    }
}

impl Poller {
    pub fn new(pool: PgPool, publisher: Arc<dyn Publisher>, settings: PollerSettings) -> Self {
        let slots = Arc::new(Semaphore::new(settings.sync_concurrency.max(1)));
        let stopping = CancellationToken::new();
        let connections = WarmConnections::new(pool);
        let completions = Arc::new(Completions::new(
            connections.clone(),
            stopping.clone(),
            settings.status_interval,
            settings.completion_wait,
        ));
        Self {
            connections,
            publisher,
            settings,
            slots,
            stopping,
            completions,
        }
    }

    /// Completions asked so far, and the statements that made them, gathered or alone
    /// (see [`crate::completions`]).
    pub fn gathered_completions(&self) -> GatheredCompletions {
        self.completions.count()
    }

    /// Database successes whose statuses are kept for later, not written yet (see
    /// [`crate::lazy_statuses`]).
    pub fn kept_statuses(&self) -> usize {
        self.completions.kept_statuses()
    }

    /// The process's shutdown signal: once it is cancelled, publishes get
    /// [`workers::STEP_GRACE_ON_SHUTDOWN`] to end, and a failed settle (retried up to
    /// [`SETTLE_ATTEMPTS`] times otherwise) is left to the request's lease, as is a
    /// gathered completion that outlasts that grace.
    pub fn stopping_on(mut self, stopping: CancellationToken) -> Self {
        self.completions = Arc::new(Completions::new(
            self.connections.clone(),
            stopping.clone(),
            self.settings.status_interval,
            self.settings.completion_wait,
        ));
        self.stopping = stopping;
        self
    }

    pub fn settings(&self) -> &PollerSettings {
        &self.settings
    }

    /// One step: waits for a free publish slot, claims as many due requests as the free
    /// slots take, and starts their publishes in `in_flight`; then counts the caller's
    /// publishes that ended.
    ///
    /// The claim itself checks the fusebox (one round trip for both); only a claim that
    /// found nothing reads the fusebox again, to tell "switched off" from "idle".
    /// Switched off, the step returns without counting: publishes that ended stay in
    /// `in_flight` for the next step or [`Poller::finish`].
    pub async fn run_once(&self, in_flight: &InFlight) -> Result<PollerRun, PollerError> {
        self.step(in_flight).await.map(|(run, _)| run)
    }

    /// [`Poller::run_once`], and when the in-process loop should look again besides its
    /// wake-ups.
    async fn step(&self, in_flight: &InFlight) -> Result<(PollerRun, LookAgain), PollerError> {
        let ends_before = in_flight.ends().count;
        let started = self.start_publishes(in_flight).await?;
        let mut batch = PolledBatch {
            claimed: started.claimed,
            ..PolledBatch::default()
        };
        let mut look_again = LookAgain::OnWake;
        if started.claimed > 0 {
            // A claim that found a request held back by its tenancy's request in flight
            // wants the next end (perhaps that one's). A claim that took all its free
            // slots could take more once one frees (the next step waits for it); a
            // publish that ended during the claim may have freed a slot or a request
            // that the claim's snapshot did not see, and it woke nobody: either way the
            // caller looks again at once.
            let mut ends = in_flight.ends();
            let quiet = match started.held_back {
                true => ends.want_next(ends_before),
                false => ends.count == ends_before,
            };
            drop(ends);
            if started.filled || !quiet {
                look_again = LookAgain::Now;
            }
        } else {
            let mut connection = self.connections.take().await?;
            let after = db::queue::after_empty_claim(&mut *connection, self.settings.lease).await;
            let after = connection.settle(after)?;
            if !after.enabled {
                return Ok((PollerRun::Disabled, LookAgain::OnWake));
            }
            if let Some(due_in) = after.next_due_in {
                look_again = LookAgain::After(due_in);
            }
            if after.held_back && !in_flight.ends().want_next(ends_before) {
                // A publish ended during the claim, perhaps the one holding the request
                // back, and did not wake the caller.
                look_again = LookAgain::Now;
            } else if after.claimable {
                // Due, held back by nothing, and not taken: its holder was settled
                // between the claim and this read (the end that followed asked by no
                // one), or the claim skipped it locked. Nothing promises a wake-up.
                let due_in = after.next_due_in.unwrap_or(UNCLAIMED_PAUSE);
                look_again = LookAgain::After(due_in.min(UNCLAIMED_PAUSE));
            }
        }
        in_flight.reap(&mut batch)?;
        tracing::debug!(
            claimed = batch.claimed,
            published = batch.published,
            failed = batch.failed,
            in_flight = batch.in_flight,
            "poller step"
        );
        Ok((PollerRun::Batch(batch), look_again))
    }

    /// One step of the in-process loop: [`Poller::run_once`], and when it found nothing
    /// to claim but a pending request comes due before the loop's idle timer would end
    /// (a retry, a request given back with backoff), the loop is told to look again
    /// then. (A cron call keeps to [`Poller::run_once`]: idle is idle, and it does not
    /// read when the next request comes due.)
    ///
    /// A step that claimed fewer requests than its free slots take, with no publish
    /// ending meanwhile, took every due one: the loop waits for the next wake-up (a
    /// request queued, a publish ended that may have freed work, see
    /// [`InFlight::for_loop`]) rather than claiming again at once, which would find
    /// nothing and cost the internal database two statements per request. A step that
    /// filled its free slots goes on at once (the next waits for a slot to free).
    pub async fn loop_step(&self, in_flight: &InFlight) -> Result<Outcome, PollerError> {
        let (run, look_again) = self.step(in_flight).await?;
        let outcome = run.outcome(self.settings.batch_size);
        Ok(match (outcome, look_again) {
            (Outcome::Worked { n, .. }, LookAgain::Now) => Outcome::Worked { n, more: true },
            (Outcome::Worked { .. }, _) => Outcome::Waiting,
            (Outcome::Idle | Outcome::Waiting, LookAgain::Now) => Outcome::Recheck(Duration::ZERO),
            (Outcome::Idle | Outcome::Waiting, LookAgain::After(pause))
                if pause < self.settings.idle_interval =>
            {
                Outcome::Recheck(pause)
            }
            (outcome, _) => outcome,
        })
    }

    /// Waits for every publish in `in_flight` to end and counts them, then writes the
    /// statuses kept for later ([`crate::lazy_statuses`]).
    pub async fn finish(&self, in_flight: &InFlight) -> Result<PolledBatch, PollerError> {
        let mut batch = PolledBatch::default();
        let mut first_error = None;
        // From here on every end notifies, so that this waits for each.
        in_flight.ends().always = true;
        loop {
            // Counted as they end: a task that ends while we wait is found on the next
            // round, because `ended` keeps a notification for a waiter that comes late.
            if let Err(error) = in_flight.reap(&mut batch) {
                first_error.get_or_insert(error);
            }
            if batch.in_flight == 0 {
                break;
            }
            in_flight.ended().notified().await;
        }
        // Every publish is settled: their completions left for a claim go now, and the
        // statuses of their successes, and of any others kept for later, are written
        // now, not at the next pass.
        tokio::join!(
            self.completions.complete_left(),
            self.completions.write_kept_statuses()
        );
        first_error.map_or(Ok(batch), Err)
    }

    /// Claims what the free slots take and starts one publish per slot used.
    async fn start_publishes(&self, in_flight: &InFlight) -> Result<Started, PollerError> {
        let per_slot = self.publisher.batch_limit().max(1);
        let slots = self.free_slots(per_slot).await;
        let limit = slots
            .len()
            .saturating_mul(per_slot)
            .min(self.settings.batch_size as usize);
        let claiming = std::time::Instant::now();
        let claimed = self.claim(limit as u32).await?;
        let started = Started {
            claimed: claimed.len() as u64,
            filled: claimed.len() >= limit,
            held_back: claimed.first().is_some_and(|request| request.held_back),
        };
        instruments::requests_claimed(started.claimed, claiming.elapsed());
        self.spawn_publishes(in_flight, slots, claimed);
        Ok(started)
    }

    /// Starts one publish per slot for the `claimed` requests (as many to a slot as the
    /// publisher takes); the slots left over are freed.
    fn spawn_publishes(
        &self,
        in_flight: &InFlight,
        slots: Vec<OwnedSemaphorePermit>,
        claimed: Vec<ClaimedRequest>,
    ) {
        let per_slot = self.publisher.batch_limit().max(1);
        let mut tasks = in_flight.tasks();
        let mut claimed = claimed.into_iter();
        for slot in slots {
            let mut requests: Vec<ClaimedRequest> = claimed.by_ref().take(per_slot).collect();
            if requests.is_empty() {
                break;
            }
            let (pool, publisher, settings, stopping, completions) = (
                self.connections.pool().clone(),
                self.publisher.clone(),
                self.settings.clone(),
                self.stopping.clone(),
                self.completions.clone(),
            );
            let (ended, ends) = (in_flight.ended.clone(), in_flight.ends.clone());
            tasks.spawn(async move {
                let started = std::time::Instant::now();
                let leases = LeaseKeeper::start(&pool, &requests, settings.lease);
                // When the process stops, a publish gets the workers' grace to end; then
                // it is dropped (a sync's transaction in a tenant database is rolled
                // back with its session), and its requests given back below, so that
                // another process takes them at once rather than when their lease ends.
                let results = tokio::select! {
                    biased;
                    results = publisher.publish(&requests) => results,
                    () = workers::stopped_for(&stopping, workers::STEP_GRACE_ON_SHUTDOWN) => {
                        let stopped = || Err(PublishError::new(
                            FailureReason::Stopping,
                            "the process stopped before the publish ended",
                        ));
                        requests.iter().map(|_| stopped()).collect()
                    }
                };
                let took = started.elapsed();
                // The slot is free as soon as the publish is: settling is quick queries.
                drop(slot);
                leases.stop(&mut requests).await;
                let settling = Settling {
                    pool: &pool,
                    completions: &completions,
                    settings: &settings,
                    stopping: &stopping,
                };
                let settled = settle_all(&settling, &requests, results, took).await;
                let made_work = settled.as_ref().map_or(true, |settled| {
                    settled.released > 0 || settled.retries_queued
                });
                if lock(&ends).ended(made_work) {
                    ended.notify_one();
                }
                settled
            });
        }
    }

    /// Free slots for a sequencer batch to claim the requests it queues for
    /// ([`Poller::claimed_at_enqueue`]), taken without waiting: in `direct` mode only (a
    /// publish to QStash is claimed by the poller, which gathers them), and none once
    /// the process is stopping.
    pub fn slots_for_enqueue(&self) -> Vec<OwnedSemaphorePermit> {
        let direct = self.publisher.claimant() == db::queue::Claimant::Syncer
            && self.publisher.batch_limit() == 1;
        let mut slots = Vec::new();
        while direct
            && !self.stopping.is_cancelled()
            && slots.len() < self.settings.batch_size as usize
        {
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        slots
    }

    /// The completions left for the next claim, which a sequencer batch that claims
    /// carries like one, unless another statement is completing some now
    /// ([`crate::completions::Completions::carried_if_free`]).
    pub fn carried_if_free(&self) -> Option<crate::completions::Carried<'_>> {
        self.completions.carried_if_free()
    }

    /// What follows a sequencer batch that claimed at enqueue: what it carried is
    /// completed when it `committed`, and the publishes of the requests it `claimed`
    /// start in `in_flight` on the `slots` taken for it ([`Poller::slots_for_enqueue`]);
    /// the slots they do not use are freed.
    pub fn claimed_at_enqueue(
        &self,
        in_flight: &InFlight,
        carried: Option<crate::completions::Carried<'_>>,
        committed: bool,
        slots: Vec<OwnedSemaphorePermit>,
        claimed: Vec<ClaimedRequest>,
    ) {
        if let Some(carried) = carried {
            self.completions.claimed(carried, committed);
        }
        if !claimed.is_empty() {
            instruments::requests_claimed_at_enqueue(claimed.len() as u64);
        }
        self.spawn_publishes(in_flight, slots, claimed);
    }

    /// Waits for one free slot, then takes the others that are free, as many as the
    /// batch size needs.
    async fn free_slots(&self, per_slot: usize) -> Vec<OwnedSemaphorePermit> {
        let first = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        let wanted = (self.settings.batch_size as usize).div_ceil(per_slot);
        let mut slots = vec![first];
        while slots.len() < wanted {
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        slots
    }

    /// Claims up to `limit` requests, and completes those whose completions were left
    /// for it ([`crate::completions`]) in the same statement.
    async fn claim(&self, limit: u32) -> Result<Vec<ClaimedRequest>, sqlx::Error> {
        let claimant = self.publisher.claimant();
        // What it carries goes back for the next claim unless this one commits.
        let carried = self.completions.carried_by_claim().await;
        let mut connection = self.connections.take().await?;
        let (lease, completed) = (self.settings.lease, carried.requests());
        let claimed =
            db::queue::claim_completing(&mut *connection, limit, lease, claimant, completed).await;
        let claimed = connection.settle(claimed);
        self.completions.claimed(carried, claimed.is_ok());
        claimed
    }
}

/// Longest wait for one renewal of a publish's leases: one short statement.
const RENEWAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the leases of one publish's requests while it runs: every third of the lease it
/// renews them ([`db::queue::renew`]), so a sync may run longer than the lease and still
/// not be taken over, while the requests of a process that died are taken over one lease
/// after its last renewal.
struct LeaseKeeper {
    done: CancellationToken,
    task: tokio::task::JoinHandle<Vec<(uuid::Uuid, chrono::NaiveDateTime)>>,
}

impl LeaseKeeper {
    fn start(pool: &PgPool, requests: &[ClaimedRequest], lease: Duration) -> Self {
        let done = CancellationToken::new();
        let mut held: Vec<_> = requests.iter().map(|r| (r.id, r.claimed_at)).collect();
        let (pool, stop) = (pool.clone(), done.clone());
        let every = lease / 3;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return held,
                    () = tokio::time::sleep(every) => {}
                }
                // Bounded, so that stopping never waits long on an internal database
                // that does not answer (settling could not reach it either). A renewal
                // cut short may have moved a token without our knowing: that request's
                // release then finds it no longer ours, and it is taken over when the
                // lease runs out. Two more tries come before the lease would.
                let renewing = db::queue::renew(&pool, &held);
                match tokio::time::timeout(every.min(RENEWAL_TIMEOUT), renewing).await {
                    Ok(Ok(renewed)) => {
                        for (id, token) in renewed {
                            if let Some(entry) = held.iter_mut().find(|(held, _)| *held == id) {
                                entry.1 = token;
                            }
                        }
                    }
                    Ok(Err(error)) => tracing::warn!(
                        error = %error_chain(&error),
                        "cannot renew the leases of a publish; trying again"
                    ),
                    Err(_) => tracing::warn!(
                        "renewing the leases of a publish took too long; trying again"
                    ),
                }
            }
        });
        Self { done, task }
    }

    /// Stops renewing, and gives each request its latest token for settling.
    async fn stop(self, requests: &mut [ClaimedRequest]) {
        self.done.cancel();
        let Ok(held) = self.task.await else {
            return;
        };
        for (request, (_, token)) in requests.iter_mut().zip(held) {
            request.claimed_at = token;
        }
    }
}

/// How many times settling one request is tried when the internal database fails it
/// (about 25 s in all, with backoff). Until it is settled, a request stays claimed, and
/// no newer request of its tenancy can be claimed before its lease runs out
/// (`POLLER_LEASE_SECS`): a blip of the internal database right after a sync should not
/// hold that tenancy's next changes for so long.
const SETTLE_ATTEMPTS: u32 = 15;

/// How long settling may still take once the process stops (after the publish's own
/// grace): a statement, done in milliseconds when the internal database answers.
const SETTLE_GRACE_ON_SHUTDOWN: Duration = Duration::from_secs(1);

/// What settling needs: the internal database, the retry settings, and the signal that
/// the process is stopping (then a failed settle is left to the lease).
struct Settling<'a> {
    pool: &'a PgPool,
    completions: &'a Completions,
    settings: &'a PollerSettings,
    stopping: &'a CancellationToken,
}

/// Settles each request of one publish by its result, all at once (the completions of
/// a batch go together, see [`crate::completions`]). A publisher that answered fewer
/// results than requests (it never should) has the rest given back, as failed.
async fn settle_all(
    settling: &Settling<'_>,
    requests: &[ClaimedRequest],
    results: Vec<PublishResult>,
    took: std::time::Duration,
) -> Result<Settled, sqlx::Error> {
    let mut results = results.into_iter();
    let results: Vec<PublishResult> = (requests.iter())
        .map(|_| {
            results.next().unwrap_or_else(|| {
                Err(PublishError::new(
                    FailureReason::NoResult,
                    "the publisher gave no result for this request",
                ))
            })
        })
        .collect();
    let mut settled = Settled::default();
    for (request, result) in requests.iter().zip(&results) {
        match result {
            Ok(_) => {
                let queued = std::time::Duration::try_from_secs_f64(request.queued_seconds)
                    .unwrap_or_default();
                instruments::request_published(queued + took);
            }
            Err(error) => instruments::request_failed(error.reason.label()),
        }
        settled.retries_queued |= matches!(result, Ok(published) if published.queued_retry);
    }
    let settling_each = (requests.iter().zip(&results))
        .map(|(request, result)| settle_retrying(settling, request, result));
    for published in futures::future::join_all(settling_each).await {
        if published? {
            settled.published += 1;
        } else {
            settled.released += 1;
        }
    }
    Ok(settled)
}

/// [`settle`], tried again with backoff while the internal database fails it, up to
/// [`SETTLE_ATTEMPTS`] times or until the process stops.
async fn settle_retrying(
    settling: &Settling<'_>,
    request: &ClaimedRequest,
    result: &PublishResult,
) -> Result<bool, sqlx::Error> {
    let mut failures = 0;
    loop {
        // An attempt under way when the process stops gets a short grace, no more: the
        // internal database may be down, and the pool would wait for it.
        let attempt = tokio::select! {
            biased;
            attempt = settle(settling, request, result) => attempt,
            () = workers::stopped_for(settling.stopping, SETTLE_GRACE_ON_SHUTDOWN) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "stopping, and the internal database does not answer",
                )));
            }
        };
        let error = match attempt {
            Ok(published) => return Ok(published),
            Err(error) => error,
        };
        failures += 1;
        if failures >= SETTLE_ATTEMPTS || settling.stopping.is_cancelled() {
            return Err(error);
        }
        let wait = backoff::delay(failures, Duration::from_millis(100), Duration::from_secs(2));
        tracing::warn!(
            request_id = %request.id,
            error = %error_chain(&error),
            retry_in_ms = wait.as_millis() as u64,
            "cannot settle a sync request; trying again"
        );
        tokio::select! {
            () = settling.stopping.cancelled() => return Err(error),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Deletes a published request (recording, in the same statement, the statuses of the
/// databases a direct sync brought up to date), or gives a failed one back with
/// backoff and its error. Returns whether the request was published.
async fn settle(
    settling: &Settling<'_>,
    request: &ClaimedRequest,
    result: &PublishResult,
) -> Result<bool, sqlx::Error> {
    let (pool, settings) = (settling.pool, settling.settings);
    match result {
        Ok(published) => {
            (settling.completions)
                .complete(
                    request.id,
                    published.synced.as_ref(),
                    request.statuses_failing,
                )
                .await?;
            Ok(true)
        }
        Err(error) => {
            let attempts = u32::try_from(request.attempts).unwrap_or(1);
            let retry_in = backoff::delay(attempts, settings.retry_base, settings.retry_cap);
            tracing::warn!(
                request_id = %request.id,
                key = %request.deduplication_key,
                attempts,
                retry_in_ms = retry_in.as_millis() as u64,
                %error,
                "publish failed; the request stays queued"
            );
            db::queue::release(pool, request, &error.to_string(), retry_in).await?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ends;

    #[test]
    fn a_loops_publish_notifies_its_end_only_when_a_claim_wanted_it_or_it_made_work() {
        let mut ends = Ends::default();
        assert!(!ends.ended(false), "nobody wanted this end");
        assert!(
            ends.ended(true),
            "requests given back or a retry queued: the loop reads when they come due"
        );

        let since = ends.count;
        assert!(ends.want_next(since), "no end since the claim began");
        assert!(ends.ended(false), "the wanted end notifies");
        assert!(
            !ends.ended(false),
            "only the first end after the claim does"
        );

        let since = ends.count;
        ends.ended(false);
        assert!(
            !ends.want_next(since),
            "an end during the claim is reported: the claim may not have seen what it freed"
        );
        assert!(ends.ended(false), "and the next end notifies all the same");
    }

    #[test]
    fn a_cron_calls_publishes_notify_every_end() {
        let mut ends = Ends {
            always: true,
            ..Ends::default()
        };
        assert!(ends.ended(false));
        assert!(ends.ended(false));
        assert_eq!(ends.count, 2);
    }
}
