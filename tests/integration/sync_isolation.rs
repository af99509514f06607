//! Tenancies and databases that must not affect each other: isolation between tenants,
//! ownership of a database, a broken database beside a good one, and concurrent runs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use external_db_sync::mapping::Mapping;
use external_db_sync::sync::{SyncError, SyncSettings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::binary::free_address;
use crate::harness::fixtures::{
    delete_user, email, rename_user, sequence_all, tenancy, tenant_database, user,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine, engine_with, external_users, recorded_error,
    recorded_status, sync, sync_ok, sync_only, tenancy_with_database, test_settings, watermark,
    PrivateTargets,
};
use crate::harness::wait;

fn as_refs(config: &[(String, String)]) -> Vec<(&str, &str)> {
    config
        .iter()
        .map(|(id, url)| (id.as_str(), url.as_str()))
        .collect()
}

async fn user_ids(tenant: &PgPool) -> BTreeSet<Uuid> {
    external_users(tenant).await.iter().map(|u| u.id).collect()
}

#[tokio::test]
async fn each_tenancy_sees_only_its_own_users_in_its_own_databases() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let (a, b) = (tenancy(&pool).await, tenancy(&pool).await);
    let mut a_databases = Vec::new();
    for _ in 0..2 {
        a_databases.push(tenant_database().await);
    }
    let mut b_databases = Vec::new();
    for _ in 0..3 {
        b_databases.push(tenant_database().await);
    }
    let ids = |databases: &[(String, PgPool)], prefix: &str| {
        databases
            .iter()
            .enumerate()
            .map(|(n, (url, _))| (format!("{prefix}{n}"), url.clone()))
            .collect::<Vec<_>>()
    };
    let a_config = ids(&a_databases, "a");
    let b_config = ids(&b_databases, "b");
    attach(&pool, a, &as_refs(&a_config)).await;
    attach(&pool, b, &as_refs(&b_config)).await;
    let mut a_users = BTreeSet::new();
    let mut b_users = BTreeSet::new();
    for n in 0..4 {
        a_users.insert(user(&pool, a, &format!("a{n}")).await);
        b_users.insert(user(&pool, b, &format!("b{n}")).await);
    }
    b_users.insert(user(&pool, b, "b-extra").await);

    sync_ok(&pool, &engine, a).await;
    sync_ok(&pool, &engine, b).await;

    for (_, tenant) in &a_databases {
        assert_eq!(user_ids(tenant).await, a_users);
    }
    for (_, tenant) in &b_databases {
        assert_eq!(user_ids(tenant).await, b_users);
    }
}

#[tokio::test]
async fn a_database_already_owned_by_another_tenancy_is_refused() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let (a, b) = (tenancy(&pool).await, tenancy(&pool).await);
    let (shared_url, shared) = tenant_database().await;
    let (b_own_url, b_own) = tenant_database().await;
    attach(&pool, a, &[("shared", &shared_url)]).await;
    attach(&pool, b, &[("own", &b_own_url), ("shared", &shared_url)]).await;
    let a_user = user(&pool, a, "belongs to A").await;
    let b_user = user(&pool, b, "belongs to B").await;
    sync_ok(&pool, &engine, a).await;
    let a_state = external_users(&shared).await;

    let report = sync(&pool, &engine, b).await;

    let shared_result = report
        .databases
        .iter()
        .find(|database| database.database_id == "shared")
        .unwrap();
    let error = shared_result.result.as_ref().unwrap_err();
    assert!(matches!(error, SyncError::ForeignOwner(_)), "{error}");
    assert!(!error.is_retryable());
    assert!(!report.has_retryable_failure());
    // A's data is untouched and B's own database got B's user.
    assert_eq!(external_users(&shared).await, a_state);
    assert_eq!(user_ids(&shared).await, BTreeSet::from([a_user]));
    assert_eq!(user_ids(&b_own).await, BTreeSet::from([b_user]));
    let (recorded, retryable, failures) = recorded_error(&pool, b, "shared").await;
    assert!(recorded.unwrap().contains("another tenancy"));
    assert_eq!((retryable, failures), (Some(false), 1));
}

/// A database that cannot be reached fails alone: the good one beside it is synced, the
/// failure is recorded (without the password) and counted, and it is retryable, since
/// a server that refuses connections now may accept them later.
///
/// The broken database is a loopback port that was free a moment ago: connecting is
/// refused at once, with no name to resolve. The engine allows private targets, so the
/// failure is the refused connection, not the target policy.
#[tokio::test]
async fn a_broken_database_does_not_stop_a_good_one() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let tenancy = tenancy(&pool).await;
    let (good_url, good) = tenant_database().await;
    let bad_url = format!("postgresql://sync:s3cr3t-pass@{}/gone", free_address());
    attach(&pool, tenancy, &[("bad", &bad_url), ("good", &good_url)]).await;
    let id = user(&pool, tenancy, "arrives anyway").await;

    let report = sync(&pool, &engine, tenancy).await;

    assert_eq!(user_ids(&good).await, BTreeSet::from([id]));
    let results: Vec<(&str, bool)> = report
        .databases
        .iter()
        .map(|database| (database.database_id.as_str(), database.result.is_ok()))
        .collect();
    assert_eq!(results, [("bad", false), ("good", true)]);
    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(matches!(error, SyncError::Connect { .. }), "{error:?}");
    assert!(
        error.is_retryable(),
        "a refused connection may be accepted later: {error}"
    );
    assert!(report.has_retryable_failure());
    let (recorded, retryable, failures) = recorded_error(&pool, tenancy, "bad").await;
    let recorded = recorded.unwrap();
    assert!(recorded.contains("refused"), "{recorded}");
    assert!(
        !recorded.contains("s3cr3t-pass"),
        "no password in the record"
    );
    assert_eq!((retryable, failures), (Some(true), 1));
    sync(&pool, &engine, tenancy).await;
    assert_eq!(
        recorded_error(&pool, tenancy, "bad").await.2,
        2,
        "failures add up"
    );
}

#[tokio::test]
async fn success_is_recorded_in_the_status_table() {
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let id = user(&pool, tenancy, "someone").await;
    email(&pool, tenancy, id, "someone@example.com", true).await;

    sync_ok(&pool, &engine, tenancy).await;

    let (synced, succeeded, failures) = recorded_status(&pool, tenancy, "main").await;
    let lowest_watermark = watermark(&tenant, "users")
        .await
        .min(watermark(&tenant, "contact_channels").await);
    assert_eq!(synced, Some(lowest_watermark));
    assert!(succeeded);
    assert_eq!(failures, 0);
}

/// Two runs for the same database, both looping while a writer keeps changing users.
/// Each user's last change lands at a different moment, so a run that wrote an older
/// state over a newer one would leave it there for good: the final comparison catches
/// it. Small batches make the two runs interleave often.
#[tokio::test]
async fn concurrent_runs_for_one_tenancy_converge_on_the_source() {
    const USERS: usize = 60;
    const ROUNDS: usize = 20;
    let pool = migrated_pool().await;
    let settings = SyncSettings {
        batch_size: 7,
        max_batches_per_run: 1000,
        ..test_settings()
    };
    let engine = Arc::new(engine_with(&pool, settings, PrivateTargets::Allowed));
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let mut users = Vec::new();
    for n in 0..USERS {
        let id = user(&pool, tenancy, &format!("user {n}")).await;
        email(&pool, tenancy, id, &format!("user{n}@example.com"), true).await;
        users.push(id);
    }
    sync_ok(&pool, &engine, tenancy).await;

    let writing = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (tenant, writing) = (tenant.clone(), writing.clone());
        async move {
            let mut seen = Vec::new();
            while writing.load(Ordering::Relaxed) {
                seen.push(watermark(&tenant, "users").await);
            }
            seen
        }
    });
    let syncers: Vec<_> = (0..2)
        .map(|_| {
            let (engine, writing) = (engine.clone(), writing.clone());
            tokio::spawn(async move {
                let mut runs = 0;
                while writing.load(Ordering::Relaxed) {
                    for database in sync_only(&engine, tenancy).await.databases {
                        database
                            .result
                            .expect("concurrent runs wait for each other");
                    }
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    // User n changes in rounds 0..=n % ROUNDS, so last changes are spread over the run;
    // every seventh user is deleted in its last round instead.
    for round in 0..ROUNDS {
        for (n, id) in users.iter().enumerate() {
            let last_round = n % ROUNDS;
            if round < last_round || (round == last_round && n % 7 != 0) {
                rename_user(&pool, *id, &format!("user {n} round {round}")).await;
            } else if round == last_round {
                delete_user(&pool, *id).await;
            }
        }
        sequence_all(&pool, 1000).await;
    }
    writing.store(false, Ordering::Relaxed);
    for syncer in syncers {
        assert!(syncer.await.unwrap() > 0);
    }
    let seen = watcher.await.unwrap();
    sync_ok(&pool, &engine, tenancy).await;

    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    assert_eq!(
        external_users(&tenant).await.len(),
        USERS - USERS.div_ceil(7)
    );
    assert!(seen.len() > 1);
    assert!(
        seen.windows(2).all(|pair| pair[0] <= pair[1]),
        "the watermark never moves back: {seen:?}"
    );
}

/// The serialization itself, made deterministic: while another session holds the
/// mapping's lock, a run waits; the other session moves the watermark (as a run that
/// finished meanwhile would) and lets go; the waiting run must then start from the new
/// watermark, not from the one it could have read before waiting.
#[tokio::test]
async fn a_run_waits_for_the_mapping_lock_and_reads_the_watermark_under_it() {
    let pool = migrated_pool().await;
    let engine = Arc::new(engine(&pool));
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let id = user(&pool, tenancy, "before").await;
    sync_ok(&pool, &engine, tenancy).await;
    rename_user(&pool, id, "after").await;
    sequence_all(&pool, 1000).await;
    let newest: i64 =
        sqlx::query_scalar(r#"select max("sequenceId") from "ProjectUser" where "tenancyId" = $1"#)
            .bind(tenancy)
            .fetch_one(&pool)
            .await
            .unwrap();

    let mut holder = tenant.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(external_db_sync::sync::statements::lock_key(Mapping::Users))
        .execute(&mut *holder)
        .await
        .unwrap();
    let run = tokio::spawn({
        let engine = engine.clone();
        async move { sync_only(&engine, tenancy).await }
    });
    wait::until(
        "the run to wait for the lock",
        Duration::from_secs(10),
        || {
            let tenant = tenant.clone();
            async move {
                let waiting: bool = sqlx::query_scalar(
                    "select exists (select 1 from pg_locks where locktype = 'advisory' \
                 and not granted and database = (select oid from pg_database \
                 where datname = current_database()))",
                )
                .fetch_one(&tenant)
                .await
                .unwrap();
                waiting.then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        external_users(&tenant).await[0].display_name.as_deref(),
        Some("before"),
        "nothing is written while another run holds the lock"
    );
    sqlx::query(
        "update _stack_sync_metadata set last_synced_sequence_id = $1 where mapping_name = 'users'",
    )
    .bind(newest)
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();

    let report = run.await.unwrap();
    let users_mapping = &report.databases[0].result.as_ref().unwrap().mappings[0];
    assert_eq!(
        users_mapping.changes, 0,
        "it started from the moved watermark"
    );
    assert_eq!(users_mapping.watermark, newest);
    assert_eq!(
        external_users(&tenant).await[0].display_name.as_deref(),
        Some("before")
    );
}
