//! The internal database: connecting, migrating, and the queries the rest of the
//! service runs against it. SQL lives here and nowhere else.

pub mod changes;
pub mod fusebox;
pub mod identity;
pub mod queue;
pub mod sequencing;
pub mod sync_status;
pub mod tenancy;
pub mod tombstones;

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::config::DatabaseSettings;

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens the connection pool and checks that the database answers.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
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
