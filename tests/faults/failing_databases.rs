//! A failing tenant database is attempted on its own schedule, not once per change, and
//! heals by itself once it works again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use external_db_sync::db::queue::{claim, Claimant};
use external_db_sync::db::sync_status::schedule_retry;
use external_db_sync::publish::direct::DirectPublisher;
use external_db_sync::publish::Publisher;
use external_db_sync::sync::SyncSettings;
use sqlx::PgPool;

use crate::harness::binary::serve_logging_to;
use crate::harness::fixtures::{email, rename_user, sequence_all, tenancy, tenant_database, user};
use crate::harness::postgres::{migrated_pool, pool, server};
use crate::harness::sync::{
    attach, engine_with, recorded_error, sync, sync_ok, test_settings, wait_until_equal,
    PrivateTargets,
};
use crate::harness::wait;

/// Sessions the server has seen open to `database` (`pg_stat_database.sessions`).
async fn sessions_opened(any: &PgPool, database: &str) -> i64 {
    sqlx::query_scalar("select sessions from pg_stat_database where datname = $1")
        .bind(database)
        .fetch_one(any)
        .await
        .unwrap()
}

/// Waits until the service has no session open to `database` (the last one may be
/// ending).
async fn wait_until_no_session(any: &PgPool, database: &str) {
    wait::until(
        "no session of the service open to the tenant database",
        Duration::from_secs(30),
        || async move {
            let open: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity \
                 where datname = $1 and application_name = 'external-db-sync'",
            )
            .bind(database)
            .fetch_one(any)
            .await
            .unwrap();
            (open == 0).then_some(())
        },
    )
    .await;
}

/// `(nextAttemptAt - lastErrorAt)` of a database's status, in milliseconds.
async fn recorded_retry_delay_ms(internal: &PgPool, database_id: &str) -> Option<f64> {
    sqlx::query_scalar(
        r#"select extract(epoch from "nextAttemptAt" - "lastErrorAt")::float8 * 1000
           from "ExternalDbSyncStatus" where "databaseId" = $1"#,
    )
    .bind(database_id)
    .fetch_one(internal)
    .await
    .unwrap()
}

/// A way a tenant database stops accepting the service's writes, until someone fixes
/// it: the SQLSTATE it fails with needs a person.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    /// `default_transaction_read_only` (25006); the service's kept sessions are ended.
    ReadOnly,
    /// The service's role loses `INSERT`, `UPDATE` and `DELETE` on the synced tables
    /// (42501).
    PrivilegesLost,
}

impl Breakage {
    fn sqlstate(self) -> &'static str {
        match self {
            Breakage::ReadOnly => "25006",
            Breakage::PrivilegesLost => "42501",
        }
    }

    /// Breaks the database `name`, through a superuser session on it (`admin`);
    /// `role` is the service's.
    async fn apply(self, admin: &PgPool, name: &str, role: &str) {
        match self {
            Breakage::ReadOnly => {
                server()
                    .admin_execute(&format!(
                        "alter database \"{name}\" set default_transaction_read_only = on"
                    ))
                    .await;
                server()
                    .admin_execute(&format!(
                        "select pg_terminate_backend(pid) from pg_stat_activity \
                         where datname = '{name}' and application_name = 'external-db-sync'"
                    ))
                    .await;
            }
            Breakage::PrivilegesLost => {
                sqlx::raw_sql(&format!(
                    "revoke insert, update, delete on users, contact_channels from \"{role}\""
                ))
                .execute(admin)
                .await
                .unwrap();
            }
        }
    }

    async fn repair(self, admin: &PgPool, name: &str, role: &str) {
        match self {
            Breakage::ReadOnly => {
                server()
                    .admin_execute(&format!(
                        "alter database \"{name}\" reset default_transaction_read_only"
                    ))
                    .await;
            }
            Breakage::PrivilegesLost => {
                sqlx::raw_sql(&format!(
                    "grant insert, update, delete on users, contact_channels to \"{role}\""
                ))
                .execute(admin)
                .await
                .unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_read_only_database_is_retried_on_its_schedule_and_heals_without_a_new_change() {
    a_database_that_needs_someone_is_retried_on_its_schedule(Breakage::ReadOnly).await;
}

#[tokio::test]
async fn a_database_whose_privileges_are_revoked_is_retried_on_its_schedule_and_heals() {
    a_database_that_needs_someone_is_retried_on_its_schedule(Breakage::PrivilegesLost).await;
}

/// The service writes to the flaky database as a role of its own (not a superuser, so
/// that privileges apply), which owns that database.
async fn a_database_that_needs_someone_is_retried_on_its_schedule(breakage: Breakage) {
    let database_url = server().migrated_database().await;
    let internal = pool(&database_url).await;
    let tenancy_id = tenancy(&internal).await;
    let (healthy_url, healthy) = tenant_database().await;
    let (flaky_admin_url, flaky) = tenant_database().await;
    let flaky_name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&flaky)
        .await
        .unwrap();
    let role = format!("eds_syncer_{}", &flaky_name[flaky_name.len() - 8..]);
    server()
        .admin_execute(&format!(
            "create role \"{role}\" login; alter database \"{flaky_name}\" owner to \"{role}\""
        ))
        .await;
    let mut flaky_url = url::Url::parse(&flaky_admin_url).unwrap();
    flaky_url.set_username(&role).unwrap();
    let flaky_url = flaky_url.to_string();
    attach(
        &internal,
        tenancy_id,
        &[("healthy", &healthy_url), ("flaky", &flaky_url)],
    )
    .await;
    let ada = user(&internal, tenancy_id, "ada").await;
    email(&internal, tenancy_id, ada, "ada@example.com", true).await;

    let log = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let (mut child, address) = serve_logging_to(
        &database_url,
        &[
            ("SYNC_PERMANENT_RETRY_FIRST_MS", "2000"),
            ("SYNC_PERMANENT_RETRY_MAX_MS", "4000"),
        ],
        &log,
    )
    .await;
    wait_until_equal(&internal, tenancy_id, &flaky).await;
    wait_until_equal(&internal, tenancy_id, &healthy).await;

    // The flaky database stops accepting the service's writes.
    breakage.apply(&flaky, &flaky_name, &role).await;
    if let Breakage::ReadOnly = breakage {
        // Its kept sessions were ended. Revoked privileges leave them open: the first
        // attempt fails on one of them and closes it.
        wait_until_no_session(&internal, &flaky_name).await;
    }
    let sessions_before = sessions_opened(&internal, &flaky_name).await;

    // Its tenancy changes continuously for 20 s.
    let started = Instant::now();
    let mut changes = 0;
    while started.elapsed() < Duration::from_secs(20) {
        changes += 1;
        rename_user(&internal, ada, &format!("ada {changes}")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The healthy database kept up meanwhile.
    wait_until_equal(&internal, tenancy_id, &healthy).await;
    // Counted by the tenant's server: a failed attempt closes its sessions. It opened
    // one if it failed preparing the schema (read-only), two if it got as far as the
    // mappings, which run side by side on a session each (revoked privileges).
    wait_until_no_session(&internal, &flaky_name).await;
    let sessions = sessions_opened(&internal, &flaky_name).await - sessions_before;
    let (error, retryable, failures) = recorded_error(&internal, tenancy_id, "flaky").await;
    assert!(error.unwrap().contains(breakage.sqlstate()), "{breakage:?}");
    assert_eq!(retryable, Some(false));
    // 20 s at 1 to 2 s, then 2 to 4 s apart: a handful of attempts, not one per change.
    assert!(
        (2..=12).contains(&failures) && sessions <= 2 * i64::from(failures),
        "{sessions} sessions and {failures} failed attempts for {changes} changes"
    );
    let delay = recorded_retry_delay_ms(&internal, "flaky").await.unwrap();
    assert!(
        (1000.0..=4001.0).contains(&delay),
        "next attempt {delay} ms after the error"
    );
    // Status shows it: the error, the failures, and when the next attempt is.
    let status: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{address}/api/latest/internal/external-db-sync/status?tenancyId={tenancy_id}"
        ))
        .bearer_auth(crate::harness::app::CRON_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let flaky_status = status["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|database| database["databaseId"] == "flaky")
        .unwrap();
    assert!(
        flaky_status["consecutiveFailures"].as_i64().unwrap() >= 2,
        "{status}"
    );
    assert!(flaky_status["nextAttemptAt"].is_string(), "{status}");
    assert_eq!(status["ok"], false, "{status}");

    // Fixed: it catches up with no further change to its tenancy.
    breakage.repair(&flaky, &flaky_name, &role).await;
    wait_until_equal(&internal, tenancy_id, &flaky).await;
    // The success is recorded as the request completes, just after the data commits.
    let internal = &internal;
    wait::until(
        "the success to be recorded",
        Duration::from_secs(30),
        || async move {
            let (_, _, failures) = recorded_error(internal, tenancy_id, "flaky").await;
            (failures == 0).then_some(())
        },
    )
    .await;
    child.kill().await.unwrap();
    assert_eq!(recorded_retry_delay_ms(internal, "flaky").await, None);
}

/// A database that failed is reserved for the sync that attempts it. If that sync
/// succeeds with work left over, the run it queues (which a poller may claim before the
/// first run's request is completed) must find the database synced, not reserved:
/// otherwise it left the database alone, and the rest waited for the reservation to run
/// out (found by the fault test of a tenant server killed mid-batch).
#[tokio::test]
async fn the_next_run_of_a_database_that_healed_with_work_left_over_finds_it_due() {
    let internal = migrated_pool().await;
    let tenancy_id = tenancy(&internal).await;
    let (url, _tenant) = tenant_database().await;
    attach(&internal, tenancy_id, &[("main", &url)]).await;
    // Synced once (later runs go by batches, not by an initial copy), then 30 more.
    user(&internal, tenancy_id, "first").await;
    sync_ok(
        &internal,
        &engine_with(&internal, test_settings(), PrivateTargets::Allowed),
        tenancy_id,
    )
    .await;
    for n in 0..30 {
        user(&internal, tenancy_id, &format!("user {n}")).await;
    }
    sequence_all(&internal, 1000).await;
    // It failed a moment ago (it refused connections), and is due again now.
    let database = url.rsplit('/').next().unwrap();
    let allow =
        |allowed: bool| format!(r#"alter database "{database}" allow_connections = {allowed}"#);
    server().admin_execute(&allow(false)).await;
    let engine = engine_with(&internal, test_settings(), PrivateTargets::Allowed);
    let report = sync(&internal, &engine, tenancy_id).await;
    assert!(report.databases[0].result.is_err(), "{report:?}");
    server().admin_execute(&allow(true)).await;
    // Its retry request is what runs first (a change's request has another key, so the
    // two may run side by side).
    sqlx::query(r#"delete from "OutgoingRequest""#)
        .execute(&internal)
        .await
        .unwrap();
    schedule_retry(&internal, tenancy_id, &["main"])
        .await
        .unwrap();
    // One batch of ten per run: the run leaves work over.
    let settings = SyncSettings {
        batch_size: 10,
        max_batches_per_run: 1,
        ..test_settings()
    };
    let publisher = DirectPublisher::new(Arc::new(engine_with(
        &internal,
        settings,
        PrivateTargets::Allowed,
    )));

    let first = claim(&internal, 10, Duration::from_secs(60), Claimant::Syncer)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        first[0].databases.not_due_databases.is_empty(),
        "due, and reserved"
    );
    let results = publisher.publish(&first).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    // The run it queued, claimed before the first request is completed.
    let next = claim(&internal, 10, Duration::from_secs(60), Claimant::Syncer)
        .await
        .unwrap();
    assert_eq!(next.len(), 1, "work was left over");
    assert_eq!(
        next[0].databases.not_due_databases,
        Vec::<String>::new(),
        "the database healed: the next run syncs it"
    );
}
