//! Tenant-database sessions kept open between syncs.
//!
//! A busy tenancy syncs several times a second. Opening a session costs a TCP (and
//! maybe TLS) handshake, authentication and a server process, which is most of a small
//! sync's time. So a session that finished a sync cleanly waits here, and the next sync
//! of the same database takes it instead of connecting again.
//!
//! Sessions are keyed by tenancy and by the fingerprint of the whole configuration
//! entry: a changed password, host, `sslmode` or root certificate gives a new key, so a
//! session opened under old settings is never used under new ones; it just expires. Only
//! sessions whose last transaction committed come back; one that failed in any way is
//! closed. The pool is bounded per database and in total, and idle sessions are closed
//! after the idle timeout, so a tenancy that stops syncing holds no session open.
//!
//! A session keeps the statements prepared on it, so a sync on a kept session sends
//! no statement text and the server reuses its plans.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::framing::MessageBound;
use super::stall::StallWatch;

/// An open session to a tenant database and the statements prepared on it.
pub struct TenantSession {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
    /// Watches the connection for a server that stopped answering while in use.
    watch: StallWatch,
    /// Bounds what the server sends, and says whether it tripped.
    bound: MessageBound,
}

impl TenantSession {
    /// A new session, in use.
    pub fn new(client: Client, watch: StallWatch, bound: MessageBound) -> Self {
        Self {
            client,
            prepared: HashMap::new(),
            watch,
            bound,
        }
    }

    /// The bound on what the session's server sends.
    pub fn bound(&self) -> &MessageBound {
        &self.bound
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// `sql`'s statements, prepared on this session: the first time in one round trip
    /// for all of them, then from the session's cache.
    pub async fn statements<const N: usize>(
        &mut self,
        sql: [&'static str; N],
    ) -> Result<[Statement; N], tokio_postgres::Error> {
        let missing: Vec<&'static str> = sql
            .iter()
            .copied()
            .filter(|text| !self.prepared.contains_key(text))
            .collect();
        if !missing.is_empty() {
            let client = &self.client;
            let prepared =
                futures::future::try_join_all(missing.iter().map(|text| client.prepare(text)))
                    .await?;
            self.prepared.extend(missing.into_iter().zip(prepared));
        }
        Ok(sql.map(|text| self.prepared[text].clone()))
    }
}

/// The database a session belongs to and the configuration it was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub tenancy_id: Uuid,
    /// SHA-256 of the database's configuration entry.
    pub fingerprint: [u8; 32],
}

/// How many idle sessions to keep, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPoolSettings {
    /// Idle sessions kept for one database (`SYNC_IDLE_SESSIONS_PER_DATABASE`). Zero
    /// turns keeping sessions off: every sync connects afresh.
    pub per_database: usize,
    /// Idle sessions kept over all databases (`SYNC_MAX_IDLE_SESSIONS`).
    pub total: usize,
    /// How long a session may wait unused before it is closed (`SYNC_SESSION_IDLE_SECS`).
    pub idle_timeout: Duration,
}

impl Default for SessionPoolSettings {
    fn default() -> Self {
        Self {
            per_database: 2,
            total: 200,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Idle tenant sessions, ready for the next sync of their database.
pub struct SessionPool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: SessionPoolSettings,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_key: HashMap<SessionKey, Vec<IdleSession>>,
    count: usize,
}

struct IdleSession {
    session: TenantSession,
    since: Instant,
}

impl SessionPool {
    /// A pool with `settings`. Inside a Tokio runtime it also starts a task that closes
    /// expired sessions, so they do not wait for the next sync to be noticed; the task
    /// ends with the pool.
    pub fn new(settings: SessionPoolSettings) -> Self {
        let inner = Arc::new(Inner {
            settings,
            idle: Mutex::new(Idle::default()),
        });
        if settings.per_database > 0 {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(close_expired(Arc::downgrade(&inner)));
            }
        }
        Self { inner }
    }

    /// An idle session of `key`'s database that is still open, if there is one.
    pub fn take(&self, key: &SessionKey) -> Option<TenantSession> {
        let mut idle = self.inner.lock();
        let sessions = idle.by_key.get_mut(key)?;
        let timeout = self.inner.settings.idle_timeout;
        let mut found = None;
        let mut removed = 0;
        // The most recently used session first: it is the least likely to have been
        // closed by the server or a middlebox meanwhile. Unusable ones on the way are
        // dropped.
        while let Some(session) = sessions.pop() {
            removed += 1;
            if session.is_usable(timeout) {
                session.session.watch.set_in_use(true);
                found = Some(session.session);
                break;
            }
        }
        if sessions.is_empty() {
            idle.by_key.remove(key);
        }
        idle.count -= removed;
        found
    }

    /// Keeps `session` for the next sync of `key`'s database. The caller gives back only
    /// a session whose last transaction ended cleanly. Beyond the bounds, the session is
    /// closed instead.
    pub fn give_back(&self, key: SessionKey, session: TenantSession) {
        let settings = self.inner.settings;
        if session.client.is_closed() {
            return;
        }
        let mut idle = self.inner.lock();
        if idle.count >= settings.total {
            idle.remove_expired(settings.idle_timeout);
        }
        let count = idle.count;
        let sessions = idle.by_key.entry(key).or_default();
        if sessions.len() >= settings.per_database || count >= settings.total {
            return;
        }
        // Kept, it is silent by right until the next sync takes it.
        session.watch.set_in_use(false);
        sessions.push(IdleSession {
            session,
            since: Instant::now(),
        });
        idle.count += 1;
    }

    /// Idle sessions right now, over all databases.
    pub fn idle_count(&self) -> usize {
        self.inner.lock().count
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .expect("the idle-session lock is never held across a panic")
    }
}

impl Idle {
    /// Takes out the sessions idle for `timeout` or closed by the other side. Dropping
    /// them ends their sessions.
    fn remove_expired(&mut self, timeout: Duration) -> Vec<IdleSession> {
        let mut expired = Vec::new();
        for sessions in self.by_key.values_mut() {
            let (keep, gone) = std::mem::take(sessions)
                .into_iter()
                .partition(|session| session.is_usable(timeout));
            *sessions = keep;
            expired.extend(gone);
        }
        self.by_key.retain(|_, sessions| !sessions.is_empty());
        self.count -= expired.len();
        expired
    }
}

impl IdleSession {
    fn is_usable(&self, timeout: Duration) -> bool {
        !self.session.client.is_closed() && self.since.elapsed() < timeout
    }
}

/// Closes expired sessions every half timeout until the pool is gone.
async fn close_expired(pool: Weak<Inner>) {
    let Some(timeout) = pool.upgrade().map(|inner| inner.settings.idle_timeout) else {
        return;
    };
    let mut ticks = tokio::time::interval((timeout / 2).max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let expired = inner.lock().remove_expired(timeout);
        if !expired.is_empty() {
            tracing::debug!(closed = expired.len(), "closed idle tenant sessions");
        }
    }
}
