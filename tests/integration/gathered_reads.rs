//! Reads of changes gathered across syncs: one statement for the small reads that the
//! syncs of one claim ask at the same moment, answering each exactly as its own read
//! would.

use std::sync::Arc;

use external_db_sync::db::changes;
use external_db_sync::mapping::Mapping;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{
    delete_channel, delete_user, email, rename_user, sequence_all, tenancy, user,
};
use crate::harness::plans;
use crate::harness::polling::{direct_poller_on, poll_once};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{assert_tenant_matches_source, engine, tenancy_with_database};

/// The highest sequence id the tenancy's rows and tombstones have so far.
async fn latest_sequence_id(pool: &PgPool, tenancy: Uuid) -> i64 {
    sqlx::query_scalar(
        r#"select coalesce(max(s), -1) from (
               select max("sequenceId") as s from "ProjectUser" where "tenancyId" = $1
               union all select max("sequenceId") from "ContactChannel" where "tenancyId" = $1
               union all select max("sequenceId") from "DeletedRow" where "tenancyId" = $1
           ) as all_ids"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Each batch read together is the batch read alone: from the start, after a watermark
/// with only deletions behind it, with nothing left, and cut at the limit; live rows,
/// tombstones, and rows created again after their tombstone.
#[tokio::test]
async fn batches_read_together_are_the_batches_read_one_by_one() {
    let pool = migrated_pool().await;
    // Many changes: the limit cuts its batch.
    let busy = tenancy(&pool).await;
    for n in 0..5 {
        let id = user(&pool, busy, &format!("busy {n}")).await;
        email(&pool, busy, id, &format!("busy{n}@example.com"), true).await;
    }
    // Only deletions after the watermark (a user and a channel).
    let deleting = tenancy(&pool).await;
    let gone = user(&pool, deleting, "gone").await;
    let kept = user(&pool, deleting, "kept").await;
    let channel = email(&pool, deleting, kept, "kept@example.com", true).await;
    sequence_all(&pool, 1000).await;
    let deleting_watermark = latest_sequence_id(&pool, deleting).await;
    delete_user(&pool, gone).await;
    delete_channel(&pool, channel).await;
    // Nothing after the watermark.
    let quiet = tenancy(&pool).await;
    user(&pool, quiet, "quiet").await;
    // Renamed after the watermark, and a user deleted whose tombstone comes first.
    let renaming = tenancy(&pool).await;
    let renamed = user(&pool, renaming, "before").await;
    let removed = user(&pool, renaming, "removed").await;
    sequence_all(&pool, 1000).await;
    let renaming_watermark = latest_sequence_id(&pool, renaming).await;
    delete_user(&pool, removed).await;
    rename_user(&pool, renamed, "after").await;
    sequence_all(&pool, 1000).await;
    let quiet_watermark = latest_sequence_id(&pool, quiet).await;

    let asked = [
        (busy, -1),
        (deleting, deleting_watermark),
        (quiet, quiet_watermark),
        (renaming, renaming_watermark),
        (Uuid::new_v4(), -1),
        (busy, 3),
    ];
    for mapping in Mapping::ALL {
        for limit in [3, 1000] {
            let together = changes::next_batches(&pool, mapping, &asked, limit)
                .await
                .unwrap();
            let mut alone = Vec::new();
            for (tenancy, after) in asked {
                alone.push(
                    changes::next_batch(&pool, mapping, tenancy, after, limit)
                        .await
                        .unwrap(),
                );
            }
            assert_eq!(together, alone, "{} with limit {limit}", mapping.name());
        }
    }
    // The cases are what they claim to be.
    let users = |limit| changes::next_batches(&pool, Mapping::Users, &asked, limit);
    let batches = users(3).await.unwrap();
    assert_eq!(batches[0].as_ref().map(|batch| batch.changes), Some(3));
    assert_eq!(
        batches[1].as_ref().map(|batch| batch.deletes.len()),
        Some(1)
    );
    assert!(batches[2].is_none() && batches[4].is_none());
    assert_eq!(
        batches[3].as_ref().map(|batch| batch.deletes.len()),
        Some(1)
    );
}

/// The syncs one claim starts read their small batches together (a few statements for
/// all twelve reads); each tenancy ends equal to the source, deletions included.
#[tokio::test]
async fn syncs_started_together_end_equal_to_the_source() {
    let pool = migrated_pool().await;
    let mut tenancies = Vec::new();
    for n in 0..6 {
        let (tenancy, tenant) = tenancy_with_database(&pool).await;
        let first = user(&pool, tenancy, &format!("first {n}")).await;
        let channel = email(
            &pool,
            tenancy,
            first,
            &format!("first{n}@example.com"),
            true,
        )
        .await;
        let second = user(&pool, tenancy, &format!("second {n}")).await;
        tenancies.push((tenancy, tenant, first, channel, second));
    }
    sequence_all(&pool, 1000).await;
    let engine = Arc::new(engine(&pool));
    let poller = direct_poller_on(&pool, engine.clone(), 8);
    assert_eq!(poll_once(&poller).await.published, 6);
    let before = engine.gathered_reads();

    // One change or more of each kind in every tenancy; one claim takes them all.
    for (n, (tenancy, _, first, channel, second)) in tenancies.iter().enumerate() {
        rename_user(&pool, *first, &format!("renamed {n}")).await;
        delete_channel(&pool, *channel).await;
        delete_user(&pool, *second).await;
        let third = user(&pool, *tenancy, &format!("third {n}")).await;
        email(
            &pool,
            *tenancy,
            third,
            &format!("third{n}@example.com"),
            true,
        )
        .await;
    }
    sequence_all(&pool, 1000).await;
    let batch = poll_once(&poller).await;

    assert_eq!((batch.claimed, batch.published, batch.failed), (6, 6, 0));
    let after = engine.gathered_reads();
    let (reads, statements) = (
        after.reads - before.reads,
        after.statements - before.statements,
    );
    assert_eq!(reads, 12, "each tenancy read both mappings' changes");
    assert!(
        statements <= 4,
        "{reads} reads took {statements} statements"
    );
    for (tenancy, tenant, ..) in &tenancies {
        assert_tenant_matches_source(&pool, *tenancy, tenant).await;
    }
}

/// A session plans the gathered read once and keeps that plan: planned anew for each
/// read's values, it cost seven times the read itself. Counted by the server for the
/// statement the session prepared (`pg_prepared_statements`, PostgreSQL 14 and newer).
#[tokio::test]
async fn a_session_keeps_one_plan_for_its_gathered_reads() {
    let pool = migrated_pool().await;
    let mut asked = Vec::new();
    for n in 0..3 {
        let tenancy = tenancy(&pool).await;
        let id = user(&pool, tenancy, &format!("planned {n}")).await;
        email(&pool, tenancy, id, &format!("planned{n}@example.com"), true).await;
        asked.push((tenancy, -1));
    }
    sequence_all(&pool, 1000).await;
    let mut session = pool.acquire().await.unwrap();

    // Reads of one to three tenancies, as claims ask them.
    for read in 0..12 {
        let these = &asked[..1 + read % asked.len()];
        let batches = changes::next_batches(&mut *session, Mapping::Users, these, 256)
            .await
            .unwrap();
        assert!(batches.iter().all(|batch| batch.is_some()));
    }

    let Some((generic, custom)) = plans::of_statement(&mut session, "batch_position").await else {
        return;
    };
    assert!(
        custom <= 5 && generic + custom == 12,
        "12 reads: {custom} planned for their values, {generic} on the kept plan"
    );
}
