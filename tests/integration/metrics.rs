//! `GET /metrics`: Prometheus text that a parser reads, whose counters move as the
//! service works, whose gauges follow the queue and the failing databases, and whose
//! labels never name a tenant.
//!
//! The service runs as a process of its own: the metrics recorder is process-wide, and
//! other tests' in-process services would move its counters.

use std::process::Stdio;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use tokio::process::Child;
use uuid::Uuid;

use crate::harness::app::{CRON_SECRET, PREFIX};
use crate::harness::binary::{command, free_address, wait_until_healthy};
use crate::harness::fixtures::{sequence_all, tenancy, tenant_database, user};
use crate::harness::postgres::{migrated_pool, pool, server};
use crate::harness::sync::{attach, engine, sync_ok, tenancy_with_database};
use crate::harness::wait;

/// `serve` on `database_url` with its loops off: each stage runs when a test calls it.
struct Service {
    address: String,
    client: reqwest::Client,
    _child: Child,
}

impl Service {
    async fn start(database_url: &str) -> Service {
        let address = free_address();
        let mut child = command(
            &["serve"],
            &[
                ("DATABASE_URL", database_url),
                ("CRON_SECRET", CRON_SECRET),
                ("BIND_ADDR", &address),
                ("RUN_WORKERS", "false"),
                ("ALLOW_PRIVATE_TARGETS", "true"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        wait_until_healthy(&address, &mut child).await;
        Service {
            address,
            client: reqwest::Client::new(),
            _child: child,
        }
    }

    /// A cron route, or a tenancy's, with the bearer.
    async fn post(&self, path: &str) -> Json {
        let answer = self
            .client
            .post(format!("http://{}{PREFIX}{path}", self.address))
            .bearer_auth(CRON_SECRET)
            .send()
            .await
            .unwrap();
        answer.json().await.unwrap()
    }
}

/// The metrics as the service renders them, parsed.
async fn scrape(service: &Service) -> Scrape {
    let answer = service
        .client
        .get(format!("http://{}/metrics", service.address))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let content_type = answer.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = answer.text().await.unwrap();
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("Prometheus text")
}

/// Scrapes until `check` holds (ten seconds at most).
async fn scrape_until(service: &Service, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    wait::until(what, Duration::from_secs(10), || async {
        let scrape = scrape(service).await;
        check(&scrape).then_some(scrape)
    })
    .await
}

/// The value of `name` with `label` (if given), summed over its other labels; a
/// histogram counts its observations. 0 when it is not there yet.
fn value(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| label.map_or(true, |(key, wanted)| sample.labels.get(key) == Some(wanted)))
        .map(|sample| match &sample.value {
            Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => *value,
            Value::Histogram(buckets) => buckets
                .iter()
                .map(|bucket| bucket.count)
                .fold(0.0, f64::max),
            Value::Summary(_) => panic!("{name} is a summary, not a histogram"),
        })
        .sum()
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_as_work_is_done() {
    let url = server().migrated_database().await;
    let internal = pool(&url).await;
    let service = Service::start(&url).await;
    let tenancy = tenancy(&internal).await;
    let (tenant_url, _tenant) = tenant_database().await;
    attach(&internal, tenancy, &[("main", &tenant_url)]).await;
    for name in ["ana", "bo", "cy"] {
        user(&internal, tenancy, name).await;
    }
    let before = scrape(&service).await;
    assert_eq!(
        value(&before, "external_db_sync_backlog_read_ok", None),
        1.0
    );

    service.post("/sequencer?maxDurationMs=0").await;
    // The gauges are read from the database at most once a second: wait for a reading.
    let queue = "external_db_sync_queue_depth";
    let sequenced = scrape_until(&service, "a queue of one request", |scrape| {
        value(scrape, queue, None) == 1.0
    })
    .await;
    let rows = "external_db_sync_rows_sequenced_total";
    assert_eq!(
        value(&sequenced, rows, None) - value(&before, rows, None),
        3.0
    );
    // Other tests in this process may run batches too: at least this one is counted.
    let batches = "external_db_sync_sequencer_batch_duration_seconds";
    assert!(value(&sequenced, batches, None) - value(&before, batches, None) >= 1.0);
    assert!(
        value(
            &sequenced,
            "external_db_sync_oldest_pending_request_age_seconds",
            None
        ) >= 0.0
    );

    service.post("/poller?stopWhenIdle=true").await;
    let failing = "external_db_sync_databases_failing";
    let synced = scrape_until(&service, "an empty queue", |scrape| {
        value(scrape, queue, None) == 0.0
    })
    .await;
    let moved = |name: &str, label: Option<(&str, &str)>| {
        value(&synced, name, label) - value(&sequenced, name, label)
    };
    assert_eq!(moved("external_db_sync_requests_claimed_total", None), 1.0);
    assert_eq!(
        moved("external_db_sync_requests_published_total", None),
        1.0
    );
    assert_eq!(
        moved(
            "external_db_sync_database_syncs_total",
            Some(("outcome", "ok"))
        ),
        1.0
    );
    assert_eq!(moved("external_db_sync_rows_upserted_total", None), 3.0);
    assert_eq!(
        moved("external_db_sync_database_sync_duration_seconds", None),
        1.0
    );
    assert_eq!(moved("external_db_sync_request_lag_seconds", None), 1.0);
    assert!(moved("external_db_sync_poller_claim_duration_seconds", None) >= 1.0);
    assert_eq!(value(&synced, failing, None), 0.0);

    // A database that refuses connections: a failed sync, and a failing database.
    let broken = crate::harness::fixtures::tenancy(&internal).await;
    attach(
        &internal,
        broken,
        &[("gone", "postgres://nobody@127.0.0.1:1/db")],
    )
    .await;
    user(&internal, broken, "dee").await;
    service.post("/sequencer?maxDurationMs=0").await;
    // One sync (the poller would retry it until its route's time is up).
    let answer = service.post(&format!("/tenancies/{broken}/sync")).await;
    assert_eq!(answer["ok"], false, "{answer}");
    let failed = scrape_until(&service, "one failing database", |scrape| {
        value(scrape, failing, None) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &failed,
            "external_db_sync_database_syncs_total",
            Some(("outcome", "retryable_failure"))
        ) - value(
            &synced,
            "external_db_sync_database_syncs_total",
            Some(("outcome", "retryable_failure"))
        ),
        1.0
    );

    // Histograms have buckets (not quantiles), every metric has its help, and no label
    // value names a tenancy.
    assert!(failed
        .docs
        .contains_key("external_db_sync_request_lag_seconds"));
    for sample in &failed.samples {
        for (label, label_value) in sample.labels.iter() {
            assert!(
                label_value.parse::<Uuid>().is_err(),
                "{} has a label {label}={label_value}",
                sample.metric
            );
        }
    }
}

/// The worst-lag gauge of a healthy database that lacks a change is the age of its
/// tenancy's oldest outstanding sync request, whether that request is pending or in
/// flight (each kind is looked up through its own partial index on the key).
#[tokio::test]
async fn the_worst_lag_is_the_age_of_the_oldest_request_pending_or_in_flight() {
    let pool = migrated_pool().await;
    let (tenancy, _tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    user(&pool, tenancy, "First").await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(
        worst_lag(&pool).await,
        0.0,
        "a database with every change lags not"
    );

    user(&pool, tenancy, "Second").await;
    sequence_all(&pool, 1000).await;
    let age_requests_by = |seconds: i32| {
        sqlx::query(
            r#"update "OutgoingRequest"
               set "createdAt" = "createdAt" - make_interval(secs => $1)"#,
        )
        .bind(f64::from(seconds))
    };
    age_requests_by(60).execute(&pool).await.unwrap();
    let pending = worst_lag(&pool).await;
    assert!(
        (60.0..90.0).contains(&pending),
        "pending for a minute: {pending}"
    );

    sqlx::query(r#"update "OutgoingRequest" set "startedFulfillingAt" = clock_timestamp()"#)
        .execute(&pool)
        .await
        .unwrap();
    age_requests_by(60).execute(&pool).await.unwrap();
    let in_flight = worst_lag(&pool).await;
    assert!(
        (120.0..150.0).contains(&in_flight),
        "queued two minutes ago, in flight: {in_flight}"
    );
}

/// The worst-lag gauge's value, as `/metrics` reads it.
async fn worst_lag(pool: &sqlx::PgPool) -> f64 {
    external_db_sync::db::backlog::read(pool)
        .await
        .unwrap()
        .worst_lag_seconds
}
