//! Integration tests: the real service against a real PostgreSQL server.
//!
//! One test binary (rather than one per file) so that every test shares one throwaway
//! PostgreSQL cluster and the crate is linked once.

mod harness;

mod bulk;
mod claims_at_enqueue;
mod cli_sync;
mod cli_tenancy;
mod command_line;
mod completions_in_claims;
mod demo;
mod embedded;
mod gathered_completions;
mod gathered_reads;
mod guarded_writes;
mod hostile_tenants;
mod http;
mod interleavings;
mod lazy_statuses;
mod log_hygiene;
mod lost_changes;
mod metrics;
mod migrations;
mod oversized_messages;
mod poller;
mod qstash;
mod sequencer;
mod soak;
mod staged;
mod status;
mod sync_engine;
mod sync_errors;
mod sync_isolation;
mod sync_sessions;
mod sync_targets;
mod sync_webhook;
mod table_guard;
mod tenancy_routes;
mod tombstones;
mod triggers;
mod verify;
mod wakeups;
