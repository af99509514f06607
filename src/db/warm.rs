//! Connections kept out of the pool between the statements of the service's busiest
//! loops: the sequencer's batches, the poller's claims and completions, and the
//! gathered reads of changes.
//!
//! sqlx pings every connection that comes back to its pool (unconditionally, in 0.8), a
//! round trip that wakes the server's backend and this process once more per statement:
//! a third of `serve`'s sends at 400 changes/s, and the next statement on that connection
//! waits for it. A loop that takes a connection from here and gives it back settled
//! keeps it instead, and its next statement goes out at once on it.
//!
//! What is kept stays safe to hand out:
//! - only a connection whose statement ended, and not with a failure that may have come
//!   from the link (anything but an error the server answered): one dropped mid-statement
//!   (its future cancelled) or cut goes back to the pool, which pings it and closes it if
//!   the ping fails;
//! - only while it is warm: one unused for [`PING_IDLE_AFTER`] goes back to the pool
//!   (the pool pings it before handing it out again), by the next take or by a sweep
//!   every [`SWEEP_EVERY`];
//! - only [`MOST_KEPT`] at a time, and only while the pool still has a connection for
//!   everyone else: a connection settled while the pool has none goes back to it, and
//!   so do the other kept ones when a take finds the pool out of connections.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use super::PING_IDLE_AFTER;

/// The most connections one [`WarmConnections`] keeps.
pub const MOST_KEPT: usize = 2;

/// How often kept connections that went cold are given back to the pool.
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Connections kept warm for one component's statements; clones share them.
#[derive(Clone)]
pub struct WarmConnections {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    connections: Vec<KeptConnection>,
    sweeping: bool,
}

struct KeptConnection {
    connection: PoolConnection<Postgres>,
    since: Instant,
}

impl KeptConnection {
    fn is_warm(&self) -> bool {
        self.since.elapsed() < PING_IDLE_AFTER
    }
}

impl WarmConnections {
    pub fn new(pool: PgPool) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                kept: Mutex::default(),
            }),
        }
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// How many connections are kept now.
    pub fn kept(&self) -> usize {
        self.shared.lock().connections.len()
    }

    /// The connection used last, if it is still warm; one from the pool otherwise. When
    /// the pool has no connection left for anyone else, the other kept ones go back to
    /// it.
    pub async fn take(&self) -> Result<WarmConnection, sqlx::Error> {
        let pool_can_spare = self.shared.pool_can_spare();
        let (warm, given_back) = {
            let mut kept = self.shared.lock();
            let mut given_back = kept.take_cold();
            let warm = kept.connections.pop();
            if !pool_can_spare {
                given_back.append(&mut kept.connections);
            }
            (warm, given_back)
        };
        // Back to the pool (dropped), outside the lock.
        drop(given_back);
        let connection = match warm {
            Some(kept) => kept.connection,
            None => self.shared.pool.acquire().await?,
        };
        Ok(WarmConnection {
            connection: Some(connection),
            home: self.shared.clone(),
        })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the pool has a connection for whoever asks next (an idle one, or room to
    /// open one), so that nobody waits for the connections kept here.
    fn pool_can_spare(&self) -> bool {
        let max = self.pool.options().get_max_connections();
        !self.pool.is_closed() && (self.pool.num_idle() > 0 || self.pool.size() < max)
    }

    /// Keeps `connection` if there is room and the pool can spare it; gives it back to
    /// the pool otherwise (it is dropped).
    fn keep(self: &Arc<Self>, connection: PoolConnection<Postgres>) {
        // Counted with this connection out of the pool, as it is now.
        let pool_can_spare = self.pool_can_spare();
        let mut kept = self.lock();
        if kept.connections.len() >= MOST_KEPT || !pool_can_spare {
            // Dropped after the lock: back to the pool.
            return;
        }
        kept.connections.push(KeptConnection {
            connection,
            since: Instant::now(),
        });
        let start_sweeping = !std::mem::replace(&mut kept.sweeping, true);
        drop(kept);
        if start_sweeping {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

impl Kept {
    fn take_cold(&mut self) -> Vec<KeptConnection> {
        let (warm, cold) = std::mem::take(&mut self.connections)
            .into_iter()
            .partition(KeptConnection::is_warm);
        self.connections = warm;
        cold
    }
}

/// Gives kept connections that went cold back to the pool, every [`SWEEP_EVERY`] while
/// any is kept, and every one at once when the pool closes (closing waits for them);
/// ends when none is kept, or when their owner is gone (they went back with it).
async fn sweep(shared: Weak<Shared>) {
    loop {
        let Some(closed) = shared.upgrade().map(|shared| shared.pool.close_event()) else {
            return;
        };
        let closing = tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => false,
            () = closed => true,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let (given_back, sweeping) = {
            let mut kept = shared.lock();
            let given_back = match closing {
                true => std::mem::take(&mut kept.connections),
                false => kept.take_cold(),
            };
            kept.sweeping = !kept.connections.is_empty();
            (given_back, kept.sweeping)
        };
        drop(given_back);
        if !sweeping {
            return;
        }
    }
}

/// A connection taken from [`WarmConnections`]. Give it back with [`settle`](Self::settle)
/// once its statement ended; dropped otherwise, it goes back to the pool.
pub struct WarmConnection {
    connection: Option<PoolConnection<Postgres>>,
    home: Arc<Shared>,
}

impl WarmConnection {
    /// Keeps the connection warm unless `outcome` is a failure that may have come from
    /// the link, and passes `outcome` on.
    pub fn settle<T>(mut self, outcome: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let sound = match &outcome {
            Ok(_) => true,
            // The server answered: the session is as sound as before the statement (the
            // statements run here are their own transactions).
            Err(sqlx::Error::Database(_)) => true,
            Err(_) => false,
        };
        if let (true, Some(connection)) = (sound, self.connection.take()) {
            self.home.keep(connection);
        }
        outcome
    }
}

impl Deref for WarmConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.connection.as_deref().expect("taken only by settle")
    }
}

impl DerefMut for WarmConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection
            .as_deref_mut()
            .expect("taken only by settle")
    }
}
