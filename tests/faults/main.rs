//! Fault injection: real servers and links broken while the service works, each case
//! ending with every tenant database equal to its source.
//!
//! A binary of its own: these tests kill and restart PostgreSQL servers and `serve`
//! processes (their own, never the shared cluster's), cut connections through a proxy,
//! and wait out leases and stall limits.
//!
//! ```text
//! cargo test --test faults
//! ```

#[allow(dead_code)]
#[path = "../integration/harness/mod.rs"]
mod harness;

mod proxy;

mod failing_databases;
mod internal_pool;
mod internal_restart;
mod qstash;
mod serve_killed;
mod tampering;
mod tenant_link;
mod tenant_server;
mod warm_connections;
