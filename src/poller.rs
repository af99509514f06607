//! The poller (DESIGN.md §5): claims due sync requests from `"OutgoingRequest"`,
//! publishes them, and deletes each one only after its publish succeeded.
//!
//! Delivery is at least once. A failed publish gives the request back with exponential
//! backoff and jitter and records the error, so a request that keeps failing stays in
//! the table with its attempt count and last error instead of vanishing. A poller that
//! dies mid-flight leaves its claims behind; their leases expire and the next run takes
//! them over.

use std::time::Duration;

use sqlx::PgPool;

use crate::backoff;
use crate::db;
use crate::queue::Publisher;
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

/// What one call of [`run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollerRun {
    /// The fusebox has the poller switched off; nothing was touched.
    Disabled,
    Batch(PolledBatch),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolledBatch {
    pub claimed: u64,
    pub published: u64,
    pub failed: u64,
}

impl PollerRun {
    pub fn outcome(&self, batch_size: u32) -> Outcome {
        match self {
            PollerRun::Disabled => Outcome::Disabled,
            PollerRun::Batch(batch) if batch.claimed == 0 => Outcome::Idle,
            PollerRun::Batch(batch) => Outcome::Worked {
                n: batch.claimed,
                more: batch.claimed >= u64::from(batch_size),
            },
        }
    }
}

/// Claims up to `batch_size` due requests, publishes them, and settles each one:
/// deleted when published, given back with backoff when not.
pub async fn run_once(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &PollerSettings,
) -> Result<PollerRun, PollerError> {
    if !db::fusebox::read(pool).await?.poller_enabled {
        return Ok(PollerRun::Disabled);
    }
    let claimed = db::queue::claim(pool, settings.batch_size, settings.lease).await?;
    let mut batch = PolledBatch {
        claimed: claimed.len() as u64,
        ..PolledBatch::default()
    };
    if claimed.is_empty() {
        return Ok(PollerRun::Batch(batch));
    }
    let results = publisher.publish(&claimed).await;
    for (request, result) in claimed.iter().zip(results) {
        match result {
            Ok(()) => {
                db::queue::complete(pool, request.id).await?;
                batch.published += 1;
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
                batch.failed += 1;
            }
        }
    }
    tracing::debug!(
        claimed = batch.claimed,
        published = batch.published,
        failed = batch.failed,
        "poller batch"
    );
    Ok(PollerRun::Batch(batch))
}
