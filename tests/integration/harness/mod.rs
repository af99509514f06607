//! Shared test support: a real PostgreSQL server (and a TLS-only one), the real app on a
//! random port, QStash-style signing, and helpers to write source rows, drive the sync
//! engine and wait on conditions.

pub mod app;
pub mod binary;
pub mod fixtures;
pub mod notifications;
pub mod plans;
pub mod polling;
pub mod postgres;
pub mod qstash;
pub mod qstash_standin;
pub mod reads;
pub mod sync;
pub mod tls;
pub mod wait;
