//! The sync engine (DESIGN.md §6): copies a tenancy's users and contact channels into
//! each of the tenancy's own PostgreSQL databases.
//!
//! From the top down:
//! - [`engine`]: [`sync_tenancy`], the entry point the publishers, the webhook and tests
//!   call: a tenancy's due databases, what to queue next, the statuses;
//! - `database`: one database: its sessions, its schema, its mappings side by side;
//! - `apply`: a mapping's batches, each in one transaction under the mapping's lock;
//! - `initial_copy`: a large first sync into an empty table, streamed with `COPY`;
//! - `staged`: a large batch into a table that holds rows, streamed with `COPY` into
//!   a staging table and merged;
//! - `resync`: a database that missed pruned deletions, brought back to the source;
//! - `known`: the watermarks and prepared schemas this process remembers; `gather`:
//!   small reads of changes that syncs ask at the same moment, made in one statement;
//! - [`report`]: what a sync did; [`summary`]: the same as the webhook answers it;
//! - [`statements`]: the tenant SQL of each mapping; [`schema`]: tables, ownership and
//!   privileges;
//! - [`external_database`]: the tenancy's `dbSync.externalDatabases` configuration;
//!   [`target`]: a connection string; [`policy`]: which addresses may be reached;
//!   [`connect`]: opening a session; [`tls`]: `sslmode` with rustls; [`sessions`]:
//!   sessions kept open between syncs; [`stall`]: a tenant database that stops
//!   answering; [`framing`]: the bound on what a tenant server may send;
//! - [`error`]: what went wrong, and whether a retry can help.

mod apply;
pub mod connect;
mod database;
pub mod engine;
pub mod error;
pub mod external_database;
pub mod framing;
mod gather;
mod initial_copy;
mod known;
pub mod policy;
pub mod report;
pub mod resync;
pub mod schema;
pub mod sessions;
mod staged;
pub mod stall;
pub mod statements;
pub mod summary;
pub mod target;
pub mod tls;
pub mod verify;

pub use engine::{
    sync_claimed_tenancy, sync_tenancy, sync_tenancy_now, ClaimedTenancy, SyncEngine, SyncSettings,
};
pub use error::SyncError;
pub use gather::GatheredCount;
pub use report::{TenancyReport, TenancySync};
