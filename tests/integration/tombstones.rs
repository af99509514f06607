//! Tombstone retention: `"DeletedRow"` holds keys only, tombstones go once every
//! database of their tenancy synced past them, and a database that missed pruned ones
//! is brought back to the source exactly.

use external_db_sync::db::tombstones;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{delete_user, email, tenancy, tenant_database, user};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine, external_users, sync, sync_ok,
};

/// `(tombstones of the tenancy, tombstones of it that hold row data)`.
async fn tombstones_of(pool: &PgPool, tenancy: Uuid) -> (i64, i64) {
    sqlx::query_as(r#"select count(*), count("data") from "DeletedRow" where "tenancyId" = $1"#)
        .bind(tenancy)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `(resyncCount, whether lastResyncAt is set)` of a database: how many times one of
/// its tables was brought back to the source.
async fn resyncs(pool: &PgPool, tenancy: Uuid, database_id: &str) -> (i32, bool) {
    sqlx::query_as(
        r#"select "resyncCount", "lastResyncAt" is not null from "ExternalDbSyncStatus"
           where "tenancyId" = $1 and "databaseId" = $2"#,
    )
    .bind(tenancy)
    .bind(database_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// One pruning pass; how many it pruned is left aside, since the sequencer of the
/// same process may have pruned some first.
async fn prune(pool: &PgPool) -> i32 {
    tombstones::prune(pool, tombstones::PRUNE_BATCH, tombstones::PRUNE_TENANCIES)
        .await
        .unwrap()
}

#[tokio::test]
async fn tombstones_go_once_every_database_passed_them_and_a_database_that_missed_them_is_repaired()
{
    let pool = migrated_pool().await;
    let engine = engine(&pool);
    let tenancy = tenancy(&pool).await;
    let (first_url, first) = tenant_database().await;
    let (second_url, second) = tenant_database().await;
    attach(
        &pool,
        tenancy,
        &[("first", &first_url), ("second", &second_url)],
    )
    .await;
    let stays = user(&pool, tenancy, "stays").await;
    let goes = user(&pool, tenancy, "goes").await;
    email(&pool, tenancy, stays, "stays@example.com", true).await;
    email(&pool, tenancy, goes, "goes-secret@example.com", true).await;
    sync_ok(&pool, &engine, tenancy).await;

    // A deletion leaves tombstones that hold the keys and nothing else.
    delete_user(&pool, goes).await;
    assert_eq!(tombstones_of(&pool, tenancy).await, (2, 0));

    // The second database is down: it has not passed them, so they stay.
    attach(
        &pool,
        tenancy,
        &[
            ("first", &first_url),
            ("second", "postgres://sync@127.0.0.1:1/down"),
        ],
    )
    .await;
    let report = sync(&pool, &engine, tenancy).await;
    assert!(report.databases[0].result.is_ok() && report.databases[1].result.is_err());
    prune(&pool).await;
    assert_eq!(tombstones_of(&pool, tenancy).await.0, 2);

    // Dropped from the configuration, it holds nothing back any more.
    attach(&pool, tenancy, &[("first", &first_url)]).await;
    prune(&pool).await;
    assert_eq!(tombstones_of(&pool, tenancy).await.0, 0);

    // Added back, with its watermark from before the deletion: it gets no tombstone for
    // the deleted user, yet ends equal to the source, and the repair is recorded.
    assert_eq!(external_users(&second).await.len(), 2);
    attach(
        &pool,
        tenancy,
        &[("first", &first_url), ("second", &second_url)],
    )
    .await;
    let report = sync_ok(&pool, &engine, tenancy).await;
    let removed: Vec<Option<u64>> = report.databases[1]
        .result
        .as_ref()
        .unwrap()
        .mappings
        .iter()
        .map(|mapping| mapping.repair.as_ref().map(|repair| repair.removed))
        .collect();
    assert_eq!(removed, [Some(1), Some(1)]);
    assert_tenant_matches_source(&pool, tenancy, &second).await;
    assert_tenant_matches_source(&pool, tenancy, &first).await;
    // Counted per table brought back.
    assert_eq!(resyncs(&pool, tenancy, "second").await, (2, true));

    // Repaired once: later syncs go on as usual.
    user(&pool, tenancy, "later").await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_tenant_matches_source(&pool, tenancy, &second).await;
    assert_eq!(resyncs(&pool, tenancy, "second").await.0, 2);
}

#[tokio::test]
async fn a_tenancy_without_databases_keeps_no_tombstones() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let id = user(&pool, tenancy, "brief").await;
    delete_user(&pool, id).await;
    crate::harness::fixtures::sequence_all(&pool, 1000).await;

    // (An idle sequencer prunes too, every few seconds; this pass makes sure.)
    prune(&pool).await;
    assert_eq!(tombstones_of(&pool, tenancy).await.0, 0);
}
