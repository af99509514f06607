//! Every metric the service exports at `GET /metrics` (Prometheus text): its name, help
//! and labels, and the one function that records it. No label carries a tenant or
//! database identifier: the number of series stays the same however many tenancies
//! there are.
//!
//! The recorder is process-wide (the `metrics` facade has one), installed the first
//! time [`handle`] is called. The gauges of the queue and of lag are read from the
//! internal database when `/metrics` is scraped ([`record_backlog`]).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::db::backlog::Backlog;

const ROWS_SEQUENCED: &str = "external_db_sync_rows_sequenced_total";
const REQUESTS_CLAIMED: &str = "external_db_sync_requests_claimed_total";
const REQUESTS_PUBLISHED: &str = "external_db_sync_requests_published_total";
const REQUESTS_FAILED: &str = "external_db_sync_requests_failed_total";
const DATABASE_SYNCS: &str = "external_db_sync_database_syncs_total";
const ROWS_UPSERTED: &str = "external_db_sync_rows_upserted_total";
const ROWS_DELETED: &str = "external_db_sync_rows_deleted_total";
const SYNC_DURATION: &str = "external_db_sync_database_sync_duration_seconds";
const REQUEST_LAG: &str = "external_db_sync_request_lag_seconds";
const SEQUENCER_BATCH_DURATION: &str = "external_db_sync_sequencer_batch_duration_seconds";
const POLLER_CLAIM_DURATION: &str = "external_db_sync_poller_claim_duration_seconds";
const QUEUE_DEPTH: &str = "external_db_sync_queue_depth";
const OLDEST_PENDING: &str = "external_db_sync_oldest_pending_request_age_seconds";
const WORST_LAG: &str = "external_db_sync_worst_database_lag_seconds";
const DATABASES_FAILING: &str = "external_db_sync_databases_failing";
const BACKLOG_READ_OK: &str = "external_db_sync_backlog_read_ok";

/// Histogram buckets, in seconds: from a few milliseconds (a steady-state sync) to ten
/// minutes (a tenant database that was away).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

/// The process's recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &BUCKETS)
        .expect("the buckets are not empty")
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("another metrics recorder is installed; /metrics will stay empty");
    }
    describe();
    handle
}

fn describe() {
    describe_counter!(
        ROWS_SEQUENCED,
        "Changed rows (users, contact channels, tombstones) given a sequence id"
    );
    describe_counter!(
        REQUESTS_CLAIMED,
        "Sync requests claimed by the poller, or by a sequencer batch as it queued them"
    );
    describe_counter!(
        REQUESTS_PUBLISHED,
        "Sync requests published (direct: synced; qstash: handed to QStash)"
    );
    describe_counter!(
        REQUESTS_FAILED,
        "Sync requests whose publish failed and went back to the queue, by reason"
    );
    describe_counter!(
        DATABASE_SYNCS,
        "Syncs of one tenant database, by outcome (ok, retryable_failure, permanent_failure)"
    );
    describe_counter!(ROWS_UPSERTED, "Rows written to tenant databases");
    describe_counter!(ROWS_DELETED, "Rows deleted from tenant databases");
    describe_histogram!(
        SYNC_DURATION,
        Unit::Seconds,
        "Time to sync one tenant database"
    );
    describe_histogram!(
        REQUEST_LAG,
        Unit::Seconds,
        "From a sync request being queued (its tenancy's oldest unsynced change was \
         sequenced, normally milliseconds after its commit) to its publish ending: in \
         direct mode the changes are then applied, with QStash handed over"
    );
    describe_histogram!(
        SEQUENCER_BATCH_DURATION,
        Unit::Seconds,
        "Time of one sequencer batch (one round trip: number changed rows, queue requests)"
    );
    describe_histogram!(
        POLLER_CLAIM_DURATION,
        Unit::Seconds,
        "Time of one poller claim (one round trip: take due requests and what their \
         syncs need), not counting the wait for a free publish slot"
    );
    describe_gauge!(QUEUE_DEPTH, "Sync requests waiting to be claimed");
    describe_gauge!(
        OLDEST_PENDING,
        Unit::Seconds,
        "Age of the oldest sync request waiting to be claimed"
    );
    describe_gauge!(
        WORST_LAG,
        Unit::Seconds,
        "The longest any tenant database has lacked a change: for a failing one, the time \
         since its last success; for a healthy one that is behind, the age of its tenancy's \
         oldest outstanding sync request"
    );
    describe_gauge!(DATABASES_FAILING, "Tenant databases whose last sync failed");
    describe_gauge!(
        BACKLOG_READ_OK,
        "1 when the last reading of the queue and lag gauges from the internal database \
         succeeded, 0 when it failed (they then keep their earlier values)"
    );
}

/// Keeps histograms bounded between scrapes; `serve` calls it every few seconds.
pub fn run_upkeep() {
    handle().run_upkeep();
}

/// A sequencer batch that numbered `rows`, in `took`.
pub fn sequencer_batch(rows: u64, took: Duration) {
    counter!(ROWS_SEQUENCED).increment(rows);
    histogram!(SEQUENCER_BATCH_DURATION).record(took.as_secs_f64());
}

/// A poller claim that took `requests`, in `took`.
pub fn requests_claimed(requests: u64, took: Duration) {
    counter!(REQUESTS_CLAIMED).increment(requests);
    histogram!(POLLER_CLAIM_DURATION).record(took.as_secs_f64());
}

/// Requests a sequencer batch claimed as it queued them (`direct` mode): counted with
/// the poller's claims; the batch's time is the sequencer's.
pub fn requests_claimed_at_enqueue(requests: u64) {
    counter!(REQUESTS_CLAIMED).increment(requests);
}

/// A request published, `lag` after it was queued.
pub fn request_published(lag: Duration) {
    counter!(REQUESTS_PUBLISHED).increment(1);
    histogram!(REQUEST_LAG).record(lag.as_secs_f64());
}

pub fn request_failed(reason: &'static str) {
    counter!(REQUESTS_FAILED, "reason" => reason).increment(1);
}

/// How a sync of one tenant database ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    Ok,
    RetryableFailure,
    PermanentFailure,
}

pub fn database_synced(outcome: SyncOutcome, duration: Duration, upserted: u64, deleted: u64) {
    let outcome = match outcome {
        SyncOutcome::Ok => "ok",
        SyncOutcome::RetryableFailure => "retryable_failure",
        SyncOutcome::PermanentFailure => "permanent_failure",
    };
    counter!(DATABASE_SYNCS, "outcome" => outcome).increment(1);
    histogram!(SYNC_DURATION).record(duration.as_secs_f64());
    counter!(ROWS_UPSERTED).increment(upserted);
    counter!(ROWS_DELETED).increment(deleted);
}

/// The queue and lag gauges, as read at a scrape; `None` when they could not be read
/// (they keep their last values).
pub fn record_backlog(backlog: Option<&Backlog>) {
    gauge!(BACKLOG_READ_OK).set(if backlog.is_some() { 1.0 } else { 0.0 });
    let Some(backlog) = backlog else {
        return;
    };
    gauge!(QUEUE_DEPTH).set(backlog.queue_depth as f64);
    gauge!(OLDEST_PENDING).set(backlog.oldest_pending_seconds);
    gauge!(WORST_LAG).set(backlog.worst_lag_seconds);
    gauge!(DATABASES_FAILING).set(backlog.databases_failing as f64);
}
