//! The sequencer (DESIGN.md §4): numbering, queueing, serialization.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use external_db_sync::db::queue::SYNC_ENGINE_PATH;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::fixtures::{
    self, flagged_rows, pending_request_keys, request_key, sequence_all, user_state,
};
use crate::harness::postgres::migrated_pool;

/// Every sequence id currently committed in the three source tables, read in one
/// statement (one snapshot).
async fn committed_sequence_ids(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar(
        r#"select "sequenceId" from "ProjectUser" where "sequenceId" is not null
           union all select "sequenceId" from "ContactChannel" where "sequenceId" is not null
           union all select "sequenceId" from "DeletedRow" where "sequenceId" is not null"#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn sequences_every_flagged_row_once_and_queues_one_request_per_tenancy() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for _ in 0..3 {
        let tenancy = fixtures::tenancy_with_placeholder_database(&pool).await;
        for n in 0..10 {
            let user = fixtures::user(&pool, tenancy, &format!("user {n}")).await;
            fixtures::email(&pool, tenancy, user, &format!("u{n}@example.com"), true).await;
        }
        tenancies.push(tenancy);
    }
    // One deletion in the first tenancy: a user tombstone plus a channel tombstone. The
    // tenancy has a database that never synced, so an idle sequencer's pruning keeps
    // them.
    crate::harness::sync::attach(
        &pool,
        tenancies[0],
        &[("never", "postgres://sync@127.0.0.1:1/never")],
    )
    .await;
    sqlx::query(
        r#"delete from "ProjectUser" where "projectUserId" =
           (select "projectUserId" from "ProjectUser" where "tenancyId" = $1 limit 1)"#,
    )
    .bind(tenancies[0])
    .execute(&pool)
    .await
    .unwrap();
    let total_rows = 29 + 29 + 2;

    // A batch size that does not divide the row counts, so batches end mid-table.
    let batches = sequence_all(&pool, 7).await;

    assert!(
        batches >= 5,
        "29 rows per table take five batches of 7, got {batches}"
    );
    assert_eq!(flagged_rows(&pool).await, 0);
    let ids = committed_sequence_ids(&pool).await;
    assert_eq!(ids.len(), total_rows);
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        total_rows,
        "sequence ids are unique across tables"
    );
    assert_eq!(
        ids.iter().max().copied(),
        Some(total_rows as i64),
        "each row was numbered exactly once: no value of the sequence was spent twice"
    );

    let mut expected: Vec<String> = tenancies.iter().copied().map(request_key).collect();
    expected.sort();
    assert_eq!(pending_request_keys(&pool).await, expected);
    let options: Value = sqlx::query_scalar(
        r#"select "qstashOptions" from "OutgoingRequest" where "deduplicationKey" = $1"#,
    )
    .bind(request_key(tenancies[1]))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        options,
        json!({ "url": SYNC_ENGINE_PATH, "body": { "tenancyId": tenancies[1] } })
    );

    // Nothing left: a further run numbers nothing and queues nothing.
    assert_eq!(sequence_all(&pool, 7).await, 0);
    assert_eq!(committed_sequence_ids(&pool).await.len(), total_rows);
}

#[tokio::test]
async fn concurrent_runs_number_each_row_once_and_never_queue_two_requests() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for _ in 0..5 {
        let tenancy = fixtures::tenancy_with_placeholder_database(&pool).await;
        for n in 0..40 {
            let user = fixtures::user(&pool, tenancy, &format!("user {n}")).await;
            fixtures::email(&pool, tenancy, user, &format!("u{n}@example.com"), true).await;
        }
        tenancies.push(tenancy);
    }
    let total_rows = 5 * 40 * 2;

    let runs = (0..6).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { sequence_all(&pool, 7).await })
    });
    let batches: u32 = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();

    assert!(batches >= 29, "400 rows in batches of 7 per table");
    assert_eq!(flagged_rows(&pool).await, 0);
    let ids = committed_sequence_ids(&pool).await;
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!((ids.len(), distinct.len()), (total_rows, total_rows));
    assert_eq!(ids.iter().max().copied(), Some(total_rows as i64));
    let mut expected: Vec<String> = tenancies.into_iter().map(request_key).collect();
    expected.sort();
    assert_eq!(pending_request_keys(&pool).await, expected);
}

/// The heart of correctness (DESIGN.md §4): a reader that saw `max(sequenceId) = M` must
/// never later see a newly committed id below M, or a sync that advanced its watermark
/// to M would skip that row forever. Several sequencers race while writers keep adding
/// and changing rows; a reader polls the committed ids throughout.
///
/// Without the sequencer's advisory lock this test fails: overlapping batches commit out
/// of order and the reader catches a late, smaller id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_sequence_ids_always_form_a_prefix_under_concurrency() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for _ in 0..4 {
        tenancies.push(fixtures::tenancy(&pool).await);
    }
    let writers_done = Arc::new(AtomicBool::new(false));
    let sequencers_done = Arc::new(AtomicBool::new(false));

    let writers = tenancies.iter().copied().map(|tenancy| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut users = Vec::new();
            for n in 0..150 {
                let user = fixtures::user(&pool, tenancy, &format!("user {n}")).await;
                fixtures::email(&pool, tenancy, user, &format!("u{n}@example.com"), true).await;
                users.push(user);
                if n % 3 == 0 {
                    // Re-mark an earlier, probably sequenced, user.
                    sqlx::query(r#"update "ProjectUser" set "displayName" = 'changed' where "projectUserId" = $1"#)
                        .bind(users[n / 2])
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            }
        })
    });
    let writers = futures::future::join_all(writers);

    let sequencers = (0..4).map(|_| {
        let pool = pool.clone();
        let writers_done = writers_done.clone();
        tokio::spawn(async move {
            let mut batches = 0u32;
            loop {
                let finished = writers_done.load(Ordering::SeqCst);
                let worked = sequence_all(&pool, 5).await;
                batches += worked;
                if finished && worked == 0 {
                    return batches;
                }
            }
        })
    });
    let sequencers = futures::future::join_all(sequencers);

    let reader = {
        let pool = pool.clone();
        let sequencers_done = sequencers_done.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut high_water = 0i64;
            let mut violations = Vec::new();
            let mut polls = 0u32;
            loop {
                let finished = sequencers_done.load(Ordering::SeqCst);
                let ids = committed_sequence_ids(&pool).await;
                polls += 1;
                let mut newest = high_water;
                for id in ids {
                    if seen.insert(id) {
                        if id < high_water {
                            violations.push((id, high_water));
                        }
                        newest = newest.max(id);
                    }
                }
                high_water = newest;
                if finished {
                    return (violations, polls, seen.len());
                }
            }
        })
    };

    writers.await.into_iter().for_each(|joined| joined.unwrap());
    writers_done.store(true, Ordering::SeqCst);
    let batches: u32 = sequencers.await.into_iter().map(Result::unwrap).sum();
    sequencers_done.store(true, Ordering::SeqCst);
    let (violations, polls, ids_seen) = reader.await.unwrap();

    assert!(
        violations.is_empty(),
        "ids committed after a larger one was visible (id, visible max): {:?}",
        &violations[..violations.len().min(10)]
    );
    assert_eq!(flagged_rows(&pool).await, 0);
    // The race really happened: many batches, and the reader watched them land.
    assert!(batches >= 100, "only {batches} batches ran");
    assert!(polls >= 20, "the reader polled only {polls} times");
    assert!(ids_seen >= 1200, "the reader saw only {ids_seen} ids");
}

#[tokio::test]
async fn a_row_locked_by_an_open_transaction_is_skipped_until_it_commits() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let busy = fixtures::user(&pool, tenancy, "Busy").await;
    let free = fixtures::user(&pool, tenancy, "Free").await;

    let mut application = pool.begin().await.unwrap();
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = 'Busy, edited' where "projectUserId" = $1"#,
    )
    .bind(busy)
    .execute(&mut *application)
    .await
    .unwrap();

    sequence_all(&pool, 100).await;
    assert_eq!(
        user_state(&pool, tenancy, busy).await,
        (true, None),
        "skipped, not waited for"
    );
    let (free_flag, free_sequence) = user_state(&pool, tenancy, free).await;
    assert!(!free_flag && free_sequence.is_some());

    application.commit().await.unwrap();
    sequence_all(&pool, 100).await;
    let (busy_flag, busy_sequence) = user_state(&pool, tenancy, busy).await;
    assert!(!busy_flag);
    assert!(busy_sequence > free_sequence);
}

#[tokio::test]
async fn a_change_while_a_request_is_in_flight_queues_exactly_one_new_request() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy_with_placeholder_database(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    sequence_all(&pool, 100).await;
    assert_eq!(
        pending_request_keys(&pool).await,
        vec![request_key(tenancy)]
    );

    // More changes while the request is pending: still one request.
    fixtures::rename_user(&pool, user, "Ada 2").await;
    sequence_all(&pool, 100).await;
    assert_eq!(count_requests(&pool).await, 1);

    // A poller claims it (in flight); a new change must still leave a pending request.
    sqlx::query(r#"update "OutgoingRequest" set "startedFulfillingAt" = current_timestamp"#)
        .execute(&pool)
        .await
        .unwrap();
    fixtures::rename_user(&pool, user, "Ada 3").await;
    fixtures::rename_user(&pool, user, "Ada 4").await;
    sequence_all(&pool, 100).await;
    fixtures::rename_user(&pool, user, "Ada 5").await;
    sequence_all(&pool, 100).await;

    assert_eq!(
        pending_request_keys(&pool).await,
        vec![request_key(tenancy)]
    );
    assert_eq!(count_requests(&pool).await, 2, "one in flight, one pending");
}

async fn count_requests(pool: &PgPool) -> i64 {
    sqlx::query_scalar(r#"select count(*) from "OutgoingRequest""#)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A tenancy without tenant databases costs no sync: its changes are numbered, but no
/// request is queued for it. Adding a database queues one at once, in the adding
/// transaction, and the sync fills the database from the beginning.
#[tokio::test]
async fn a_tenancy_without_databases_is_numbered_but_queues_nothing_until_one_is_added() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;

    sequence_all(&pool, 100).await;

    assert_eq!(flagged_rows(&pool).await, 0, "its rows are numbered");
    assert!(fixtures::user_state(&pool, tenancy, user).await.1.is_some());
    assert!(
        pending_request_keys(&pool).await.is_empty(),
        "no request for a tenancy without databases"
    );

    // Other configuration changes queue nothing either.
    sqlx::query(r#"update "Tenancy" set "config" = '{"dbSync": {"externalDatabases": {}}}'"#)
        .execute(&pool)
        .await
        .unwrap();
    assert!(pending_request_keys(&pool).await.is_empty());

    let (url, tenant) = crate::harness::fixtures::tenant_database().await;
    crate::harness::sync::attach(&pool, tenancy, &[("main", &url)]).await;
    assert_eq!(pending_request_keys(&pool).await, [request_key(tenancy)]);
    let options: Value = sqlx::query_scalar(
        r#"select "qstashOptions" from "OutgoingRequest" where "deduplicationKey" = $1"#,
    )
    .bind(request_key(tenancy))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        options,
        json!({ "url": SYNC_ENGINE_PATH,
                "body": { "tenancyId": tenancy } }),
        "the trigger queues the request the sequencer would"
    );

    // The request's sync brings everything over, from the beginning.
    let engine = crate::harness::sync::engine(&pool);
    crate::harness::sync::sync_only(&engine, tenancy).await;
    crate::harness::sync::assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}
