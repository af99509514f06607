//! The poller (DESIGN.md §5): claims due sync requests from `"OutgoingRequest"`,
//! publishes them, and deletes each one only after its publish succeeded.
//!
//! Delivery is at least once. A failed publish gives the request back with exponential
//! backoff and jitter and records the error, so a request that keeps failing stays in
//! the table with its attempt count and last error instead of vanishing. A poller that
//! dies mid-flight leaves its claims behind; their leases expire and the next run takes
//! them over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::backoff;
use crate::db;
use crate::db::queue::ClaimedRequest;
use crate::db::sync_status::SyncedTenancy;
use crate::queue::{PublishError, Publisher};
use crate::workers::Outcome;

/// Tuning of the poller.
#[derive(Debug, Clone)]
pub struct PollerSettings {
    /// Requests claimed per run (`POLLER_BATCH_SIZE`).
    pub batch_size: u32,
    /// How long a claim holds before another poller may take the request over
    /// (`POLLER_LEASE_SECS`). Longer than any publish, a direct sync included.
    pub lease: Duration,
    /// How long the in-process loop waits when idle and no request notification arrives
    /// (`POLLER_IDLE_INTERVAL_MS`): the safety net behind `LISTEN`.
    pub idle_interval: Duration,
    /// Tenancies synced at the same time by this process in `direct` mode
    /// (`POLLER_SYNC_CONCURRENCY`).
    pub sync_concurrency: usize,
    /// Smallest and largest wait before a failed request is tried again.
    pub retry_base: Duration,
    pub retry_cap: Duration,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(300),
            idle_interval: Duration::from_secs(5),
            sync_concurrency: 32,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(300),
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
    /// Adds up what two steps did.
    pub fn add(&mut self, other: &PolledBatch) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.failed += other.failed;
        self.in_flight = other.in_flight;
    }

    fn count(&mut self, settled: Settled) {
        match settled {
            Settled::Published => self.published += 1,
            Settled::Released => self.failed += 1,
        }
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

/// How a claimed request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Published,
    Released,
}

/// The poller of one process. It claims requests, publishes them, and settles each one:
/// deleted when published, given back with backoff when not.
///
/// In `direct` mode a publish is a whole sync, so each runs in its own task: the poller
/// claims as many requests as it has free sync slots, and settles each one the moment
/// its sync ends, while the others go on. A busy tenancy therefore never waits for a
/// slow one, and a slot is refilled as soon as it frees. In `qstash` mode a publish is
/// one quick HTTP call for a whole batch, made inside the step.
pub struct Poller {
    pool: PgPool,
    publisher: Arc<Publisher>,
    settings: PollerSettings,
    /// Free sync slots of this process, shared by every caller (`serve`'s loop and any
    /// cron call), so that together they stay within `sync_concurrency`.
    slots: Arc<Semaphore>,
}

/// The publishes one caller started and has not yet counted. Each caller has its own,
/// so a cron call waits for its own syncs only.
pub struct InFlight {
    tasks: Mutex<JoinSet<Result<Settled, sqlx::Error>>>,
    /// Notified each time one of the publishes ends: the caller may claim again (a
    /// request it skipped because its tenancy was in flight is now due).
    ended: Arc<Notify>,
}

impl InFlight {
    /// `ended` is notified each time one of the caller's publishes ends.
    pub fn new(ended: Arc<Notify>) -> Self {
        Self {
            tasks: Mutex::new(JoinSet::new()),
            ended,
        }
    }

    /// What is notified when one of the caller's publishes ends.
    pub fn ended(&self) -> &Notify {
        &self.ended
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<Result<Settled, sqlx::Error>>> {
        self.tasks
            .lock()
            .expect("the in-flight lock is never held across a panic")
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
    pub fn new(pool: PgPool, publisher: Arc<Publisher>, settings: PollerSettings) -> Self {
        let slots = Arc::new(Semaphore::new(settings.sync_concurrency.max(1)));
        Self {
            pool,
            publisher,
            settings,
            slots,
        }
    }

    pub fn settings(&self) -> &PollerSettings {
        &self.settings
    }

    /// One step: claims due requests and publishes them, then counts the caller's
    /// publishes that ended. In `direct` mode it first waits for a free sync slot,
    /// claims at most as many requests as slots are free, and starts their syncs in
    /// `in_flight`.
    ///
    /// The claim itself checks the fusebox (one round trip for both); only a claim that
    /// found nothing reads the fusebox again, to tell "switched off" from "idle".
    /// Switched off, the step returns without counting: publishes that ended stay in
    /// `in_flight` for the next step or [`Poller::finish`].
    pub async fn run_once(&self, in_flight: &InFlight) -> Result<PollerRun, PollerError> {
        let mut batch = PolledBatch::default();
        match &*self.publisher {
            Publisher::Direct(_) => self.start_syncs(in_flight, &mut batch).await?,
            Publisher::Qstash(qstash) => {
                let claimed = self.claim(self.settings.batch_size).await?;
                batch.claimed = claimed.len() as u64;
                if !claimed.is_empty() {
                    let results = qstash.publish(&claimed).await;
                    for (request, result) in claimed.iter().zip(results) {
                        let result = result.map(|()| None);
                        batch.count(settle(&self.pool, &self.settings, request, result).await?);
                    }
                }
            }
        }
        if batch.claimed == 0 && !db::fusebox::read(&self.pool).await?.poller_enabled {
            return Ok(PollerRun::Disabled);
        }
        in_flight.reap(&mut batch)?;
        tracing::debug!(
            claimed = batch.claimed,
            published = batch.published,
            failed = batch.failed,
            in_flight = batch.in_flight,
            "poller step"
        );
        Ok(PollerRun::Batch(batch))
    }

    /// Waits for every publish in `in_flight` to end and counts them.
    pub async fn finish(&self, in_flight: &InFlight) -> Result<PolledBatch, PollerError> {
        let mut batch = PolledBatch::default();
        let mut first_error = None;
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
        first_error.map_or(Ok(batch), Err)
    }

    async fn start_syncs(
        &self,
        in_flight: &InFlight,
        batch: &mut PolledBatch,
    ) -> Result<(), PollerError> {
        let Publisher::Direct(_) = &*self.publisher else {
            unreachable!("start_syncs is only called in direct mode")
        };
        let first = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        let mut slots = vec![first];
        while slots.len() < self.settings.batch_size as usize {
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        let claimed = self.claim(slots.len() as u32).await?;
        batch.claimed = claimed.len() as u64;
        let mut tasks = in_flight.tasks();
        for (request, slot) in claimed.into_iter().zip(slots) {
            let (pool, publisher, settings) = (
                self.pool.clone(),
                self.publisher.clone(),
                self.settings.clone(),
            );
            let ended = in_flight.ended.clone();
            tasks.spawn(async move {
                let Publisher::Direct(direct) = &*publisher else {
                    unreachable!("checked above")
                };
                let result = direct.sync(&request).await;
                // The slot is free as soon as the sync is: settling is a quick query.
                drop(slot);
                let settled = settle(&pool, &settings, &request, result).await;
                ended.notify_one();
                settled
            });
        }
        Ok(())
    }

    async fn claim(&self, limit: u32) -> Result<Vec<ClaimedRequest>, sqlx::Error> {
        db::queue::claim(&self.pool, limit, self.settings.lease).await
    }
}

/// Deletes a published request (recording, in the same statement, the statuses of the
/// databases a direct sync brought up to date), or gives a failed one back with
/// backoff and its error.
async fn settle(
    pool: &PgPool,
    settings: &PollerSettings,
    request: &ClaimedRequest,
    result: Result<Option<SyncedTenancy>, PublishError>,
) -> Result<Settled, sqlx::Error> {
    match result {
        Ok(synced) => {
            db::queue::complete(pool, request.id, synced.as_ref()).await?;
            Ok(Settled::Published)
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
            Ok(Settled::Released)
        }
    }
}
