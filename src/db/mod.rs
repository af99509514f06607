//! The internal database: connecting, migrating, and the queries the rest of the
//! service runs against it. SQL lives here and nowhere else.

pub mod backlog;
pub mod changes;
pub mod fusebox;
pub mod identity;
pub mod queue;
pub mod sequencing;
pub mod status;
pub mod sync_status;
pub mod tenancy;
pub mod tombstones;
pub mod verify;
pub mod warm;

use std::fmt;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

/// The `NOTIFY` channel of the change triggers: source rows changed (migrations 5 and 8;
/// see [`crate::wakeup`]).
pub const CHANGES_CHANNEL: &str = "external_db_sync_changes";
/// The `NOTIFY` channel of `"OutgoingRequest"` inserts: a sync request was queued.
pub const REQUESTS_CHANNEL: &str = "external_db_sync_requests";

/// The internal database (`DATABASE_URL`).
#[derive(Clone)]
pub struct DatabaseSettings {
    /// Parsed connection options; they contain the password, hence no `Debug` derive.
    pub connect_options: PgConnectOptions,
    pub max_connections: u32,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.connect_options.get_host())
            .field("port", &self.connect_options.get_port())
            .field("database", &self.connect_options.get_database())
            .field("username", &self.connect_options.get_username())
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl DatabaseSettings {
    /// Where the internal database is, for the sync engine's target policy.
    pub fn location(&self) -> InternalDatabase {
        let options = &self.connect_options;
        InternalDatabase {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            dbname: options
                .get_database()
                .unwrap_or_else(|| options.get_username())
                .to_owned(),
        }
    }
}

/// Where the internal database lives, as `DATABASE_URL` says.
#[derive(Debug, Clone)]
pub struct InternalDatabase {
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pooled connection idle for at least this long is pinged before it is handed out.
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Opens the connection pool and checks that the database answers.
///
/// sqlx pings every connection it hands out by default: a round trip of its own before
/// each statement run on the pool (1.6 per change synced at 400 changes/s), which woke
/// the server's backend and this process once more each time. Only a connection idle
/// for [`PING_IDLE_AFTER`] is pinged now, so that one the server or the network dropped
/// while it waited (a restart in a quiet hour) is replaced rather than handed out; a
/// connection in steady use fails its next statement instead, as a statement in flight
/// fails when the server goes away, and the pool drops it.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|connection, metadata| {
            Box::pin(async move {
                if metadata.idle_for >= PING_IDLE_AFTER {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(settings.connect_options.clone())
        .await
}

/// Applies every migration that the database has not seen yet. Safe to call from
/// several replicas at once: sqlx serializes them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether the database answers a trivial query within `timeout`.
pub async fn is_reachable(pool: &PgPool, timeout: Duration) -> bool {
    let ping = sqlx::query_scalar::<_, i32>("select 1").fetch_one(pool);
    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(1)))
}
