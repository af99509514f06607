//! external-db-sync: keeps each tenant's user data continuously copied from the internal
//! PostgreSQL into PostgreSQL databases that the tenants own.
//!
//! The flow (DESIGN.md §1): triggers flag changed rows; the [`sequencer`] numbers them
//! and queues one request per dirty tenancy ([`db::queue`]); the [`poller`] publishes
//! those requests through a [`publish::Publisher`]; the [`sync`] engine applies each
//! tenancy's changes to its databases. [`wakeup`] lets the in-process loops sleep until
//! there is work.
//!
//! Layers point down: the entry points ([`cli`], [`startup`], [`config`], [`embedded`]) assemble
//! everything; [`routes`] and [`auth`] are the HTTP layer; below them the loops
//! ([`wakeup`], [`workers`], [`poller`], [`sequencer`]), then [`publish`], [`sync`],
//! [`db`], and at the bottom [`mapping`], [`telemetry`], [`backoff`] and [`error`]. No
//! module imports one above it.

pub mod auth;
pub mod backoff;
pub mod cli;
pub mod completions;
pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod error;
pub mod gathering;
pub mod instruments;
pub mod lazy_statuses;
pub mod mapping;
pub mod poller;
pub mod publish;
pub mod routes;
pub mod sequencer;
pub mod startup;
pub mod sync;
pub mod telemetry;
pub mod wakeup;
pub mod workers;
