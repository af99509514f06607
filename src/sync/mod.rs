//! The sync engine (DESIGN.md §6): copies a tenancy's users and contact channels into
//! each of the tenancy's own PostgreSQL databases.
//!
//! - [`engine`]: [`engine::sync_tenancy`], the entry point the webhook, the queue and
//!   tests call;
//! - [`external_database`]: the tenancy's `dbSync.externalDatabases` configuration;
//! - [`target`]: connection strings, the address policy, connecting;
//! - [`tls`]: `sslmode` with rustls;
//! - [`sessions`]: tenant sessions kept open between syncs;
//! - [`schema`]: the tables in the tenant database, ownership and privileges;
//! - [`mapping`]: the two mappings, their statements and parameters;
//! - [`error`]: what went wrong, and whether a retry can help.

pub mod engine;
pub mod error;
pub mod external_database;
pub mod mapping;
pub mod schema;
pub mod sessions;
pub mod target;
pub mod tls;

pub use engine::{
    sync_claimed_tenancy, sync_tenancy, ClaimedTenancy, SyncEngine, SyncSettings, TenancySync,
};
pub use error::SyncError;
