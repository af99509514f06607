//! `GET /metrics`: Prometheus text that a parser reads, whose counters move as the
//! service works, whose gauges follow the queue and the failing databases, and whose
//! labels never name a tenant.

use prometheus_parse::{Scrape, Value};
use reqwest::Method;
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{tenancy, tenant_database, user};
use crate::harness::sync::{attach, engine, sync};

/// The metrics as the service renders them, parsed.
async fn scrape(app: &TestApp) -> Scrape {
    let answer = app.request(Method::GET, "/metrics", None).await;
    assert_eq!(answer.status(), 200);
    let content_type = answer.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = answer.text().await.unwrap();
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("Prometheus text")
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
    let app = TestApp::spawn_with(&[("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let tenancy = tenancy(&app.pool).await;
    let (tenant_url, _tenant) = tenant_database().await;
    attach(&app.pool, tenancy, &[("main", &tenant_url)]).await;
    for name in ["ana", "bo", "cy"] {
        user(&app.pool, tenancy, name).await;
    }
    let before = scrape(&app).await;
    assert_eq!(
        value(&before, "external_db_sync_backlog_read_ok", None),
        1.0
    );

    app.run_sequencer("maxDurationMs=0").await;
    let sequenced = scrape(&app).await;
    let rows = "external_db_sync_rows_sequenced_total";
    assert_eq!(
        value(&sequenced, rows, None) - value(&before, rows, None),
        3.0
    );
    assert_eq!(value(&sequenced, "external_db_sync_queue_depth", None), 1.0);
    assert!(
        value(
            &sequenced,
            "external_db_sync_oldest_pending_request_age_seconds",
            None
        ) >= 0.0
    );

    app.run_poller("stopWhenIdle=true").await;
    let synced = scrape(&app).await;
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
    assert_eq!(value(&synced, "external_db_sync_queue_depth", None), 0.0);
    assert_eq!(
        value(&synced, "external_db_sync_databases_failing", None),
        0.0
    );

    // A database that refuses connections: a failed sync, and a failing database.
    let broken = crate::harness::fixtures::tenancy(&app.pool).await;
    attach(
        &app.pool,
        broken,
        &[("gone", "postgres://nobody@127.0.0.1:1/db")],
    )
    .await;
    user(&app.pool, broken, "dee").await;
    // One sync, from the test (the poller would keep retrying it).
    sync(&app.pool, &engine(&app.pool), broken).await;
    let failed = scrape(&app).await;
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
    assert_eq!(
        value(&failed, "external_db_sync_databases_failing", None),
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
    app.stop().await.unwrap();
}
