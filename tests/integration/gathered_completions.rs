//! Completions of published requests gathered across publishes: the requests whose
//! syncs end while one completion statement runs are completed together by the next,
//! each deleted and each database's status recorded as a completion alone would.

use std::sync::Arc;
use std::time::Duration;

use external_db_sync::db::queue::{self, Completed};
use external_db_sync::db::sync_status::{SyncSuccess, SyncedTenancy};
use external_db_sync::poller::PollerSettings;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{rename_user, sequence_all, tenancy, user};
use crate::harness::plans;
use crate::harness::polling::{direct_poller_settled, poll_once};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{assert_tenant_matches_source, latest_change, tenancy_with_database};
use crate::harness::wait;

/// A request queued for `tenancy` under a key of its own (`n`), not for publishing.
async fn queued_request(pool: &PgPool, tenancy: Uuid, n: usize) -> Uuid {
    sqlx::query_scalar(
        r#"insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
           values ($1, '{}'::jsonb) returning "id""#,
    )
    .bind(format!("test-{tenancy}-{n}"))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// How many of the requests `ids` are still queued (pending or in flight).
async fn requests_left(pool: &PgPool, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(r#"select count(*) from "OutgoingRequest" where "id" = any($1)"#)
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn pending_requests(pool: &PgPool, tenancies: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        r#"select count(*) from "OutgoingRequest"
           where ("qstashOptions" #>> '{body,tenancyId}')::uuid = any($1)"#,
    )
    .bind(tenancies)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What `"ExternalDbSyncStatus"` records of the tenancy's database `main`: how far its
/// users are synced, and its failures in a row.
async fn users_synced_through(pool: &PgPool, tenancy: Uuid) -> (i64, i32) {
    sqlx::query_as(
        r#"select "usersSyncedThrough", "consecutiveFailures" from "ExternalDbSyncStatus"
           where "tenancyId" = $1 and "databaseId" = 'main'"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// While the first completion statement waits (a lock on the statuses it records), the
/// other syncs end and ask; the next statement completes all of them. Every request is
/// deleted, every database's status records the sync, every tenant database is equal to
/// the source.
#[tokio::test]
async fn requests_whose_syncs_end_while_a_completion_runs_are_completed_together() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for n in 0..6 {
        let (tenancy, tenant) = tenancy_with_database(&pool).await;
        let id = user(&pool, tenancy, &format!("user {n}")).await;
        tenancies.push((tenancy, tenant, id));
    }
    sequence_all(&pool, 1000).await;
    // Every success written with its completion (not kept for later, see
    // `lazy_statuses`): the status rows locked below are what holds the first statement.
    let poller = Arc::new(direct_poller_settled(
        &pool,
        PollerSettings {
            sync_concurrency: 8,
            status_interval: Duration::ZERO,
            ..PollerSettings::default()
        },
    ));
    assert_eq!(poll_once(&poller).await.published, 6);
    let ids: Vec<Uuid> = tenancies.iter().map(|(tenancy, ..)| *tenancy).collect();

    for (n, (_, _, id)) in tenancies.iter().enumerate() {
        rename_user(&pool, *id, &format!("renamed {n}")).await;
    }
    sequence_all(&pool, 1000).await;
    // Every status row of these tenancies locked: a completion that records one waits.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(r#"select 1 from "ExternalDbSyncStatus" where "tenancyId" = any($1) for update"#)
        .bind(&ids)
        .execute(&mut *holder)
        .await
        .unwrap();
    let before = poller.gathered_completions();
    let polling = tokio::spawn({
        let poller = poller.clone();
        async move { poll_once(&poller).await }
    });
    wait::until(
        "every sync to ask for its completion",
        Duration::from_secs(30),
        || {
            let asked = poller.gathered_completions().asked - before.asked;
            async move { (asked == 6).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        pending_requests(&pool, &ids).await,
        6,
        "nothing is completed while the first statement waits"
    );
    holder.commit().await.unwrap();
    let batch = polling.await.unwrap();

    assert_eq!((batch.claimed, batch.published, batch.failed), (6, 6, 0));
    let after = poller.gathered_completions();
    let (completed, statements) = (
        after.completed - before.completed,
        after.statements - before.statements,
    );
    assert_eq!(completed, 6);
    assert!(
        statements <= 2,
        "{completed} completions took {statements} statements"
    );
    assert_eq!(pending_requests(&pool, &ids).await, 0);
    for (tenancy, tenant, _) in &tenancies {
        let latest = latest_change(&pool, *tenancy, "ProjectUser").await;
        assert_eq!(users_synced_through(&pool, *tenancy).await, (latest, 0));
        assert_tenant_matches_source(&pool, *tenancy, tenant).await;
    }
}

/// Two completions recorded together that name the same database (a request taken over
/// after its lease, and the one that took it over) record it once, with the furthest
/// watermarks of the two, and delete both requests.
#[tokio::test]
async fn completions_of_the_same_database_together_record_the_furthest() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let mut requests = Vec::new();
    for n in 0..2 {
        requests.push(queued_request(&pool, tenancy, n).await);
    }
    let synced = |through: i64, users: i64, channels: i64| SyncedTenancy {
        tenancy_id: tenancy,
        databases: vec![SyncSuccess {
            database_id: "main".to_owned(),
            last_synced_sequence_id: through,
            watermarks: [users, channels],
        }],
    };
    let (older, newer) = (synced(10, 10, 7), synced(12, 9, 12));
    queue::complete_many(
        &pool,
        &[
            Completed {
                id: requests[0],
                synced: Some(&older),
            },
            Completed {
                id: requests[1],
                synced: Some(&newer),
            },
        ],
    )
    .await
    .unwrap();

    let (through, users, channels): (i64, i64, i64) = sqlx::query_as(
        r#"select "lastSyncedSequenceId", "usersSyncedThrough", "contactChannelsSyncedThrough"
           from "ExternalDbSyncStatus" where "tenancyId" = $1 and "databaseId" = 'main'"#,
    )
    .bind(tenancy)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((through, users, channels), (12, 10, 12));
    assert_eq!(requests_left(&pool, &requests).await, 0);
}

/// A session plans each completion statement once and keeps that plan, whether the
/// completions record databases' successes or only delete their requests: planned anew
/// for each call's values, the completion's planning cost the source nearly as much as
/// running it (`cost`). Counted by the server for the statements the session prepared.
#[tokio::test]
async fn a_session_keeps_one_plan_for_its_completions() {
    let pool = migrated_pool().await;
    let tenancies = [
        tenancy(&pool).await,
        tenancy(&pool).await,
        tenancy(&pool).await,
    ];
    // The queue's pages as its churn leaves them in service (every request inserted,
    // claimed and deleted, the pages kept until a vacuum): the planner then takes the
    // queue for large, and a plan for any ten requests for dearer than one for two.
    for churn in [
        r#"insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
           select 'churn-' || n, '{}'::jsonb from generate_series(1, 2000) as n"#,
        r#"delete from "OutgoingRequest" where "deduplicationKey" like 'churn-%'"#,
    ] {
        sqlx::query(churn).execute(&pool).await.unwrap();
    }
    let mut session = pool.acquire().await.unwrap();
    // Completions of one to three requests, as they are gathered: twelve that record
    // successes, twelve that do not.
    for call in 0..24 {
        let these = &tenancies[..1 + call % tenancies.len()];
        let mut requests = Vec::new();
        for (n, tenancy) in these.iter().enumerate() {
            requests.push(queued_request(&pool, *tenancy, call * 10 + n).await);
        }
        let through = call as i64 + 1;
        let synced: Vec<SyncedTenancy> = (these.iter())
            .map(|tenancy| SyncedTenancy {
                tenancy_id: *tenancy,
                databases: vec![SyncSuccess {
                    database_id: "main".to_owned(),
                    last_synced_sequence_id: through,
                    watermarks: [through, through],
                }],
            })
            .collect();
        let completed: Vec<Completed> = (requests.iter().zip(&synced))
            .map(|(id, synced)| Completed {
                id: *id,
                synced: (call < 12).then_some(synced),
            })
            .collect();
        queue::complete_many(&mut *session, &completed)
            .await
            .unwrap();
        assert_eq!(requests_left(&pool, &requests).await, 0);
    }
    // Each tenancy's status as its last recording completion (the twelfth) left it.
    let recorded: Vec<i64> = sqlx::query_scalar(
        r#"select "lastSyncedSequenceId" from "ExternalDbSyncStatus"
           where "tenancyId" = any($1) and "databaseId" = 'main' order by "tenancyId""#,
    )
    .bind(&tenancies[..])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(recorded, [12, 12, 12]);

    for (marker, what) in [
        ("recorded as", "completions that record successes"),
        (
            r#"^\s*delete from "OutgoingRequest""#,
            "completions that only delete",
        ),
    ] {
        let Some((generic, custom)) = plans::of_statement(&mut session, marker).await else {
            return;
        };
        assert!(
            custom <= 5 && generic + custom == 12,
            "12 {what}: {custom} planned for their values, {generic} on the kept plan"
        );
    }
}
