//! Changes that once went missing: a sequencer batch that committed while a claim ran,
//! a watermark left behind by a re-created row, and writes the triggers did not see
//! (changed keys, TRUNCATE). Each test failed before its fix.

use std::time::Duration;

use external_db_sync::db::{queue, sequencing};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{
    delete_user, email, hold_user, rename_user, request_key, sequence_all, tenancy, tombstone,
    user, UserLock,
};
use crate::harness::polling::{direct_poller, poll_once};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, engine, external_channels, external_users, latest_change,
    sync_ok, tenancy_with_database, watermark,
};
use crate::harness::wait;
use crate::harness::wait::promptly;

/// The advisory lock the claim's stall point waits on.
const CLAIM_STALL_LOCK: i64 = 16_001;

/// A pool on the same database whose sessions plan joins as nested loops, so that the
/// claim locks and updates one request before it reads the next (with a hash join it
/// would lock them all first, and the stall point below would come too late).
async fn nested_loop_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options()).clone().options([
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        ("enable_material", "off"),
    ]);
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// A named stall point inside the claim statement: a trigger that makes the claim of
/// `decoy` wait on [`CLAIM_STALL_LOCK`]. The claim's statement snapshot is taken by
/// then; the requests after the decoy are not read yet.
async fn stall_claims_of(pool: &PgPool, decoy: Uuid) {
    sqlx::raw_sql(&format!(
        r#"
        create function test_claim_stall() returns trigger language plpgsql as $$
        begin
            if old."id" = '{decoy}' and new."startedFulfillingAt" is not null then
                perform pg_advisory_xact_lock_shared({CLAIM_STALL_LOCK});
            end if;
            return new;
        end;
        $$;
        create trigger test_claim_stall before update on "OutgoingRequest"
            for each row execute function test_claim_stall();
        "#
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Whether a session is waiting on an advisory lock in the middle of a claim.
async fn claim_is_stalled(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        r#"select exists (
               select from pg_stat_activity
               where datname = current_database() and wait_event_type = 'Lock'
                 and wait_event = 'advisory' and query like '%"startedFulfillingAt"%')"#,
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Issue 16, first case. A sequencer batch relies on the tenancy's pending request
/// (and holds it locked) and commits after the claim's snapshot was taken but before
/// the claim reaches the request. The claim must not hand the sync "latest change"
/// values that predate the batch, or the sync skips the batch's mapping and deletes the
/// only request that covered it.
#[tokio::test]
async fn a_batch_that_commits_while_the_claim_runs_is_not_skipped() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let owner = user(&pool, tenancy_id, "owner").await;
    let channel = email(&pool, tenancy_id, owner, "old@example.com", true).await;
    let poller = direct_poller(&nested_loop_pool(&pool).await, 4);
    sequence_all(&pool, 1000).await;
    assert_eq!(poll_once(&poller).await.published, 1);
    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;

    // A decoy request, due before the tenancy's, whose claim stalls; then the
    // tenancy's pending request.
    let decoy_tenancy = tenancy(&pool).await;
    assert!(queue::enqueue_sync(&pool, decoy_tenancy).await.unwrap());
    let decoy: Uuid = sqlx::query_scalar(
        r#"update "OutgoingRequest" set "nextAttemptAt" = current_timestamp - interval '1 minute'
           where "deduplicationKey" = $1 returning "id""#,
    )
    .bind(request_key(decoy_tenancy))
    .fetch_one(&pool)
    .await
    .unwrap();
    stall_claims_of(&pool, decoy).await;
    rename_user(&pool, owner, "renamed").await;
    sequence_all(&pool, 1000).await;

    // A batch numbers a channel change and relies on the pending request; it stays open.
    sqlx::query(r#"update "ContactChannel" set "value" = 'new@example.com' where "id" = $1"#)
        .bind(channel)
        .execute(&pool)
        .await
        .unwrap();
    let mut batch = pool.begin().await.unwrap();
    let sequenced = sequencing::sequence_batch(&mut *batch, 1000, sequencing::Wakefulness::OneOff)
        .await
        .unwrap()
        .expect("the sequencer is switched on");
    assert_eq!(
        (sequenced.contact_channels, sequenced.requests_enqueued),
        (1, 0)
    );

    // The claim starts (its snapshot predates the batch's commit) and stalls on the
    // decoy; the batch commits; the claim goes on and reaches the tenancy's request.
    let mut stall = pool.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock($1)")
        .bind(CLAIM_STALL_LOCK)
        .execute(&mut *stall)
        .await
        .unwrap();
    let polling = tokio::spawn(async move { poll_once(&poller).await });
    wait::until(
        "the claim stalled at the decoy",
        Duration::from_secs(10),
        || async { claim_is_stalled(&pool).await.then_some(()) },
    )
    .await;
    batch.commit().await.unwrap();
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(CLAIM_STALL_LOCK)
        .execute(&mut *stall)
        .await
        .unwrap();
    let polled = polling.await.unwrap();

    assert_eq!(
        (polled.claimed, polled.published),
        (2, 2),
        "the claim took the tenancy's request after the batch committed"
    );
    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    let channels = external_channels(&tenant).await;
    assert_eq!(channels[0].value, "new@example.com");
}

/// Issue 16, second case. A user deleted and created again with the same id: the live
/// row is numbered before the tombstone, both land in one batch, and the batch writes
/// the live row only. The watermark must still reach the tombstone's id.
#[tokio::test]
async fn a_watermark_reaches_the_tombstone_of_a_row_created_again() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    let reborn = user(&pool, tenancy_id, "reborn").await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    // Deleted, with its tombstone held back from the sequencer for a moment...
    delete_user(&pool, reborn).await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(r#"select from "DeletedRow" where "shouldUpdateSequenceId" for update"#)
        .execute(&mut *holder)
        .await
        .unwrap();
    // ...and created again, numbered first; then the tombstone is numbered after it.
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
           values ($1, $2, 'reborn again')"#,
    )
    .bind(tenancy_id)
    .bind(reborn)
    .execute(&pool)
    .await
    .unwrap();
    sequence_all(&pool, 1000).await;
    holder.rollback().await.unwrap();
    let report = sync_ok(&pool, &sync_engine, tenancy_id).await;

    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    let latest = latest_change(&pool, tenancy_id, "ProjectUser").await;
    let tombstone = tombstone(&pool, tenancy_id).await;
    assert_eq!(latest, tombstone, "the tombstone is the latest change");
    assert_eq!(watermark(&tenant, "users").await, latest);
    assert_eq!(
        report.databases[0].result.as_ref().unwrap().mappings[0].watermark,
        latest
    );
}

/// Issue 16, third case: a changed key deletes the row under its old key.
#[tokio::test]
async fn a_changed_channel_id_removes_the_old_channel() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    let owner = user(&pool, tenancy_id, "owner").await;
    let channel = email(&pool, tenancy_id, owner, "owner@example.com", true).await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    let new_id = Uuid::new_v4();
    sqlx::query(r#"update "ContactChannel" set "id" = $2 where "id" = $1"#)
        .bind(channel)
        .bind(new_id)
        .execute(&pool)
        .await
        .unwrap();
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    let ids: Vec<Uuid> = external_channels(&tenant)
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [new_id]);
}

#[tokio::test]
async fn a_changed_user_id_or_tenancy_removes_the_old_user() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let (other_tenancy, other_tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    let renumbered = user(&pool, tenancy_id, "renumbered").await;
    let moving = user(&pool, tenancy_id, "moving").await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    assert_eq!(external_users(&tenant).await.len(), 2);

    let new_id = Uuid::new_v4();
    sqlx::query(r#"update "ProjectUser" set "projectUserId" = $2 where "projectUserId" = $1"#)
        .bind(renumbered)
        .bind(new_id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(r#"update "ProjectUser" set "tenancyId" = $2 where "projectUserId" = $1"#)
        .bind(moving)
        .bind(other_tenancy)
        .execute(&pool)
        .await
        .unwrap();
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    sync_ok(&pool, &sync_engine, other_tenancy).await;

    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    assert_tenant_matches_source(&pool, other_tenancy, &other_tenant).await;
    let ids: Vec<Uuid> = external_users(&tenant).await.iter().map(|u| u.id).collect();
    assert_eq!(ids, [new_id]);
    let moved: Vec<Uuid> = external_users(&other_tenant)
        .await
        .iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(moved, [moving]);
}

/// TRUNCATE fires no delete trigger; it is captured as a tombstone per row all the
/// same, and truncated channels take their users' primary e-mail with them.
#[tokio::test]
async fn truncating_the_source_tables_empties_the_tenant_tables() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    for name in ["ada", "grace"] {
        let id = user(&pool, tenancy_id, name).await;
        email(&pool, tenancy_id, id, &format!("{name}@example.com"), true).await;
    }
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    sqlx::raw_sql(r#"truncate "ContactChannel""#)
        .execute(&pool)
        .await
        .unwrap();
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    assert!(external_channels(&tenant).await.is_empty());
    let users = external_users(&tenant).await;
    assert_eq!(users.len(), 2);
    assert!(
        users.iter().all(|synced| synced.primary_email.is_none()),
        "{users:?}"
    );
    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;

    sqlx::raw_sql(r#"truncate "ProjectUser" cascade"#)
        .execute(&pool)
        .await
        .unwrap();
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    assert!(external_users(&tenant).await.is_empty());
    assert_eq!(
        watermark(&tenant, "users").await,
        latest_change(&pool, tenancy_id, "ProjectUser").await
    );
}

/// An application that takes a user's row first and its e-mail after (a user's delete:
/// the cascade deletes the channels after the user) beside one that changes the e-mail
/// alone: the capture's mark of the e-mail's owner used to wait for the user's row while
/// holding the e-mail's, and PostgreSQL aborted one of the two. Now neither waits in a
/// circle, both commit, and the tenant database ends equal to the source.
#[tokio::test]
async fn deleting_a_user_while_its_email_changes_deadlocks_neither() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    let doomed = user(&pool, tenancy_id, "doomed").await;
    let channel = email(&pool, tenancy_id, doomed, "doomed@example.com", true).await;
    user(&pool, tenancy_id, "bystander").await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    let mut deleting = pool.begin().await.unwrap();
    sqlx::query(r#"update "ProjectUser" set "displayName" = 'leaving' where "projectUserId" = $1"#)
        .bind(doomed)
        .execute(&mut *deleting)
        .await
        .unwrap();
    let mut changing = pool.begin().await.unwrap();
    let change = sqlx::query(r#"update "ContactChannel" set "isVerified" = true where "id" = $1"#)
        .bind(channel)
        .execute(&mut *changing);
    promptly("the e-mail's change beside its held owner", change)
        .await
        .unwrap();
    // The delete's cascade waits for the e-mail's row until the change commits.
    let delete = tokio::spawn(async move {
        sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
            .bind(doomed)
            .execute(&mut *deleting)
            .await?;
        deleting.commit().await
    });
    changing.commit().await.unwrap();
    promptly("the delete, once the change committed", delete)
        .await
        .unwrap()
        .unwrap();

    sequence_all(&pool, 1000).await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    assert_eq!(external_users(&tenant).await.len(), 1);
}

/// A user's e-mail changed while another transaction holds the user's row (and changes
/// nothing of it): the owner's mark is deferred, and once the row is free the sequencer
/// numbers the user again, so the tenant database gets its new primary e-mail. Without
/// the deferred mark the user would keep its old e-mail there.
#[tokio::test]
async fn an_email_changed_while_its_user_is_held_reaches_the_tenant_database() {
    let pool = migrated_pool().await;
    let (tenancy_id, tenant) = tenancy_with_database(&pool).await;
    let sync_engine = engine(&pool);
    let owner = user(&pool, tenancy_id, "owner").await;
    let channel = email(&pool, tenancy_id, owner, "old@example.com", true).await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    let holder = hold_user(&pool, owner, UserLock::AsAnUpdate).await;
    let change =
        sqlx::query(r#"update "ContactChannel" set "value" = 'new@example.com' where "id" = $1"#)
            .bind(channel)
            .execute(&pool);
    promptly("the change beside its held owner", change)
        .await
        .unwrap();
    sequence_all(&pool, 1000).await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;
    holder.commit().await.unwrap();
    sequence_all(&pool, 1000).await;
    sync_ok(&pool, &sync_engine, tenancy_id).await;

    assert_tenant_matches_source(&pool, tenancy_id, &tenant).await;
    let emails: Vec<Option<String>> = external_users(&tenant)
        .await
        .into_iter()
        .map(|user| user.primary_email)
        .collect();
    assert_eq!(emails, [Some("new@example.com".to_owned())]);
}
