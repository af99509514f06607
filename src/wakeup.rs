//! Waking the in-process loops when there is work, through PostgreSQL `LISTEN`.
//!
//! Triggers notify `external_db_sync_changes` when a source table changes and
//! `external_db_sync_requests` when a sync request is queued (see the migrations). One
//! listener connection per process turns those into [`Notify`] permits; a loop that is
//! idle waits for its permit or its timer, whichever comes first. A permit given while
//! the loop is busy is kept, so no wake-up is lost; and if the listener's connection
//! drops, notifications may be missed, so both loops are woken after it reconnects and
//! their timers remain the safety net.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::error::error_chain;

pub const CHANGES_CHANNEL: &str = "external_db_sync_changes";
pub const REQUESTS_CHANNEL: &str = "external_db_sync_requests";

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

/// Listens until `shutdown`, reconnecting with backoff when the connection fails.
pub async fn listen(pool: PgPool, wakeups: Wakeups, shutdown: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match listen_once(&pool, &wakeups, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = backoff::delay(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                );
                tracing::warn!(error = %error_chain(&error), retry_in_ms = wait.as_millis() as u64, "change listener failed; loops fall back to their timers");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn listen_once(
    pool: &PgPool,
    wakeups: &Wakeups,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([CHANGES_CHANNEL, REQUESTS_CHANNEL])
        .await?;
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
