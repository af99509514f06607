//! Change capture: the triggers of the internal schema (DESIGN.md §3).

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::fixtures::{
    self, channel_state, hold_user, sequence_all, user_state, UserLock,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::wait::promptly;

#[tokio::test]
async fn new_rows_are_flagged_for_the_sequencer() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;

    assert_eq!(user_state(&pool, tenancy, user).await, (true, None));
    assert_eq!(channel_state(&pool, channel).await, (true, None));
}

#[tokio::test]
async fn the_sequencers_own_update_does_not_mark_rows_again() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;

    sequence_all(&pool, 100).await;

    let (user_flag, user_sequence) = user_state(&pool, tenancy, user).await;
    let (channel_flag, channel_sequence) = channel_state(&pool, channel).await;
    assert!(!user_flag && !channel_flag);
    assert!(user_sequence.is_some() && channel_sequence.is_some());
    // A second pass finds nothing: sequencing did not flag anything again.
    assert_eq!(sequence_all(&pool, 100).await, 0);
    assert_eq!(
        user_state(&pool, tenancy, user).await,
        (false, user_sequence)
    );
}

#[tokio::test]
async fn updating_a_sequenced_user_marks_it_again() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    sequence_all(&pool, 100).await;
    let (_, sequence_before) = user_state(&pool, tenancy, user).await;

    fixtures::rename_user(&pool, user, "Ada L.").await;

    assert_eq!(
        user_state(&pool, tenancy, user).await,
        (true, sequence_before)
    );
    sequence_all(&pool, 100).await;
    let (flag, sequence_after) = user_state(&pool, tenancy, user).await;
    assert!(!flag);
    assert!(sequence_after > sequence_before);
}

#[tokio::test]
async fn updating_a_sequenced_contact_channel_marks_it_again() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    sequence_all(&pool, 100).await;

    sqlx::query(r#"update "ContactChannel" set "isVerified" = true where "id" = $1"#)
        .bind(channel)
        .execute(&pool)
        .await
        .unwrap();

    assert!(channel_state(&pool, channel).await.0);
}

async fn assert_channel_change_marks_user(change: &str) {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    sequence_all(&pool, 100).await;
    assert!(!user_state(&pool, tenancy, user).await.0);

    let statement = match change {
        "insert" => {
            r#"insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
                       values ($1, $2, gen_random_uuid(), 'EMAIL', 'second@example.com')"#
        }
        "update" => {
            r#"update "ContactChannel" set "value" = 'new@example.com'
                       where "tenancyId" = $1 and "projectUserId" = $2"#
        }
        "delete" => {
            r#"delete from "ContactChannel" where "tenancyId" = $1 and "projectUserId" = $2"#
        }
        other => panic!("unknown change {other}"),
    };
    sqlx::query(statement)
        .bind(tenancy)
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();

    assert!(
        user_state(&pool, tenancy, user).await.0,
        "{change} of a channel marks its user"
    );
    let _ = channel;
}

#[tokio::test]
async fn inserting_a_contact_channel_marks_its_user() {
    assert_channel_change_marks_user("insert").await;
}

#[tokio::test]
async fn updating_a_contact_channel_marks_its_user() {
    assert_channel_change_marks_user("update").await;
}

#[tokio::test]
async fn deleting_a_contact_channel_marks_its_user() {
    assert_channel_change_marks_user("delete").await;
}

#[tokio::test]
async fn moving_a_contact_channel_marks_both_users() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let first = fixtures::user(&pool, tenancy, "First").await;
    let second = fixtures::user(&pool, tenancy, "Second").await;
    let channel = fixtures::email(&pool, tenancy, first, "moving@example.com", false).await;
    sequence_all(&pool, 100).await;

    sqlx::query(r#"update "ContactChannel" set "projectUserId" = $1 where "id" = $2"#)
        .bind(second)
        .bind(channel)
        .execute(&pool)
        .await
        .unwrap();

    assert!(user_state(&pool, tenancy, first).await.0);
    assert!(user_state(&pool, tenancy, second).await.0);
}

/// `("primaryKey", "data")` of the tombstones of `table`.
/// `("primaryKey", "data")` of the tombstones of `table`.
async fn tombstones(pool: &sqlx::PgPool, table: &str) -> Vec<(Value, Option<Value>)> {
    sqlx::query_as(
        r#"select "primaryKey", "data" from "DeletedRow" where "tableName" = $1 order by "deletedAt", "id""#,
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn deleting_a_user_writes_tombstones_for_it_and_its_channels() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "O'Connor 🚀").await;
    let channel = fixtures::email(&pool, tenancy, user, "oc@example.com", true).await;

    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();

    let users = tombstones(&pool, "ProjectUser").await;
    assert_eq!(users.len(), 1);
    let (primary_key, data) = &users[0];
    assert_eq!(
        primary_key,
        &json!({ "tenancyId": tenancy, "projectUserId": user })
    );
    // The key only: a deleted user's name, e-mail and metadata are not kept.
    assert_eq!(*data, None);

    let channels = tombstones(&pool, "ContactChannel").await;
    assert_eq!(
        channels.len(),
        1,
        "the cascade deletes the channel, and records it"
    );
    assert_eq!(
        channels[0].0,
        json!({ "tenancyId": tenancy, "projectUserId": user, "id": channel })
    );
    assert_eq!(channels[0].1, None);

    let (tenancy_column, flagged): (Uuid, bool) = sqlx::query_as(
        r#"select "tenancyId", "shouldUpdateSequenceId" from "DeletedRow" where "tableName" = 'ProjectUser'"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((tenancy_column, flagged), (tenancy, true));
}

#[tokio::test]
async fn deleting_a_contact_channel_writes_a_tombstone() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;

    sqlx::query(r#"delete from "ContactChannel" where "id" = $1"#)
        .bind(channel)
        .execute(&pool)
        .await
        .unwrap();

    let channels = tombstones(&pool, "ContactChannel").await;
    assert_eq!(channels.len(), 1);
    assert_eq!(
        channels[0].0,
        json!({ "tenancyId": tenancy, "projectUserId": user, "id": channel })
    );
    assert_eq!(channels[0].1, None, "the e-mail address is not kept");
    assert!(tombstones(&pool, "ProjectUser").await.is_empty());
}

#[tokio::test]
async fn a_rolled_back_delete_leaves_no_tombstone() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;

    let mut transaction = pool.begin().await.unwrap();
    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
        .bind(user)
        .execute(&mut *transaction)
        .await
        .unwrap();
    let inside: i64 = sqlx::query_scalar(r#"select count(*) from "DeletedRow""#)
        .fetch_one(&mut *transaction)
        .await
        .unwrap();
    transaction.rollback().await.unwrap();

    assert_eq!(
        inside, 2,
        "the tombstones are written in the deleting transaction"
    );
    let after: i64 = sqlx::query_scalar(r#"select count(*) from "DeletedRow""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, 0);
    assert!(
        user_state(&pool, tenancy, user).await.0,
        "the user is still there"
    );
}

/// What this service's triggers run for each row inserted into the tables an import or
/// a sequencer batch inserts into: nothing. Marking owners and waking the loops happen
/// once per statement (transition tables say which rows), so a NOTIFY is sent at most
/// once per statement.
#[tokio::test]
async fn no_trigger_of_the_service_runs_per_inserted_row() {
    let pool = migrated_pool().await;
    // pg_trigger.tgtype: 1 = for each row, 4 = on insert.
    let per_row_on_insert: Vec<String> = sqlx::query_scalar(
        r#"select tgrelid::regclass::text || ' ' || tgname from pg_catalog.pg_trigger
           where tgname like 'external_db_sync%'
             and tgrelid in ('"ProjectUser"'::regclass, '"ContactChannel"'::regclass,
                             '"OutgoingRequest"'::regclass)
             and tgtype & 1 = 1 and tgtype & 4 = 4
           order by 1"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_row_on_insert, Vec::<String>::new());
}

/// Deferred owner marks (migration 16) waiting for the sequencer, per user.
async fn deferred_marks(pool: &sqlx::PgPool, user: Uuid) -> i64 {
    sqlx::query_scalar(
        r#"select count(*) from "ExternalDbSyncOwnerMark" where "projectUserId" = $1"#,
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A channel write marks its owner without waiting for another transaction that holds
/// the owner's row (waiting deadlocked with an application that takes the user first and
/// its channels after, as a user's delete does): the mark is deferred, kept while the
/// row is held, and applied by the sequencer once it is free, which numbers the owner
/// again.
#[tokio::test]
async fn a_channel_write_never_waits_for_a_transaction_holding_its_owner() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    sequence_all(&pool, 100).await;
    let numbered = user_state(&pool, tenancy, user).await.1.unwrap();

    // Held as an update of the user holds it (a delete's lock would also make the
    // insert's foreign key check wait, as it does without this service).
    let holder = hold_user(&pool, user, UserLock::AsAnUpdate).await;
    for statement in [
        r#"insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
           values ($1, $2, gen_random_uuid(), 'EMAIL', 'second@example.com')"#,
        r#"update "ContactChannel" set "value" = 'new@example.com'
           where "tenancyId" = $1 and "projectUserId" = $2 and "isPrimary""#,
        r#"delete from "ContactChannel"
           where "tenancyId" = $1 and "projectUserId" = $2 and "value" = 'second@example.com'"#,
    ] {
        let write = sqlx::query(statement)
            .bind(tenancy)
            .bind(user)
            .execute(&pool);
        promptly(
            &format!("the write beside a held owner: {statement}"),
            write,
        )
        .await
        .unwrap();
    }
    assert_eq!(deferred_marks(&pool, user).await, 3);

    // Held still: the sequencer keeps the marks.
    sequence_all(&pool, 100).await;
    assert_eq!(
        user_state(&pool, tenancy, user).await,
        (false, Some(numbered))
    );
    assert_eq!(deferred_marks(&pool, user).await, 3);

    holder.commit().await.unwrap();
    sequence_all(&pool, 100).await;
    let (flagged, renumbered) = user_state(&pool, tenancy, user).await;
    assert!(!flagged && renumbered > Some(numbered), "{renumbered:?}");
    assert_eq!(deferred_marks(&pool, user).await, 0);
}

/// A deferred mark whose owner is deleted before the sequencer comes is dropped.
#[tokio::test]
async fn a_deferred_mark_of_a_deleted_owner_is_dropped() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    sequence_all(&pool, 100).await;

    let mut deleting = hold_user(&pool, user, UserLock::AsADelete).await;
    let change = sqlx::query(r#"update "ContactChannel" set "isVerified" = true where "id" = $1"#)
        .bind(channel)
        .execute(&pool);
    promptly("the change beside a held owner", change)
        .await
        .unwrap();
    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
        .bind(user)
        .execute(&mut *deleting)
        .await
        .unwrap();
    deleting.commit().await.unwrap();
    assert_eq!(deferred_marks(&pool, user).await, 1);

    sequence_all(&pool, 100).await;
    assert_eq!(deferred_marks(&pool, user).await, 0);
}

/// The service's `SECURITY DEFINER` functions, which any role may call, look names up in
/// the caller's temporary schema last: a temporary table named like the service's
/// cannot take its place (with a trigger of its own there, it would run with the
/// functions' owner's rights).
#[tokio::test]
async fn security_definer_functions_ignore_the_callers_temporary_tables() {
    let pool = migrated_pool().await;
    let role = format!("caller_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("create role {role}"))
        .execute(&pool)
        .await
        .unwrap();
    let mut caller = pool.begin().await.unwrap();
    sqlx::raw_sql(&format!(
        r#"set local role {role};
           create temporary table "ExternalDbSyncOwnerMark" ("tenancyId" uuid, "projectUserId" uuid);
           create temporary table external_db_sync_sequencer_awake_until (last_value bigint);
           insert into external_db_sync_sequencer_awake_until values (9223372036854775807);"#
    ))
    .execute(&mut *caller)
    .await
    .unwrap();
    let user = Uuid::new_v4();
    sqlx::query("select external_db_sync_defer_owner_marks(array[$1::uuid], array[$1::uuid])")
        .bind(user)
        .execute(&mut *caller)
        .await
        .unwrap();
    let awake: bool = sqlx::query_scalar("select external_db_sync_sequencer_awake()")
        .fetch_one(&mut *caller)
        .await
        .unwrap();
    let in_temporary: i64 =
        sqlx::query_scalar(r#"select count(*) from pg_temp."ExternalDbSyncOwnerMark""#)
            .fetch_one(&mut *caller)
            .await
            .unwrap();
    caller.commit().await.unwrap();

    assert!(
        !awake,
        "the lease was read from the caller's temporary table"
    );
    assert_eq!(
        in_temporary, 0,
        "the mark went to the caller's temporary table"
    );
    assert_eq!(deferred_marks(&pool, user).await, 1);
}

/// A publication of every table (logical replication of the internal database) needs a
/// key to replicate deletes: the sequencer's delete of the marks it applied works under
/// one.
#[tokio::test]
async fn deferred_marks_are_applied_under_a_publication_of_every_table() {
    let pool = migrated_pool().await;
    sqlx::query("create publication everything for all tables")
        .execute(&pool)
        .await
        .unwrap();
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    let channel = fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    sequence_all(&pool, 100).await;
    let holder = hold_user(&pool, user, UserLock::AsAnUpdate).await;
    sqlx::query(r#"update "ContactChannel" set "isVerified" = true where "id" = $1"#)
        .bind(channel)
        .execute(&pool)
        .await
        .unwrap();
    holder.commit().await.unwrap();
    assert_eq!(deferred_marks(&pool, user).await, 1);

    sequence_all(&pool, 100).await;
    assert_eq!(deferred_marks(&pool, user).await, 0);
}

/// A session plans the trigger's statements once. One that wrote 2,000 channels in a
/// statement first (an import) and one at a time afterwards must still look each owner
/// up by its key: under migration 13 the plan made for the import (a hash join over the
/// whole of `"ProjectUser"`) served every later write of the session. The plans are
/// read from `auto_explain`'s notices.
#[tokio::test]
async fn channel_writes_after_an_import_in_the_same_session_look_owners_up_by_key() {
    let url = crate::harness::postgres::server().migrated_database().await;
    let pool = crate::harness::postgres::pool(&url).await;
    let tenancy = fixtures::tenancy(&pool).await;
    fixtures::import(&pool, tenancy, 2_000, "imported").await;
    sequence_all(&pool, 10_000).await;
    let single = fixtures::user(&pool, tenancy, "single").await;
    sequence_all(&pool, 100).await;

    let (client, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (notices, mut plans) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notice(notice)) = message {
                let _ = notices.send(notice.message().to_owned());
            }
        }
    });
    // The import's statement, in this session, rolled back.
    client
        .batch_execute(
            r#"begin;
               insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
               select "tenancyId", "projectUserId", gen_random_uuid(), 'EMAIL', 'again'
               from "ProjectUser";
               rollback;
               load 'auto_explain';
               set auto_explain.log_min_duration = 0;
               set auto_explain.log_nested_statements = on;
               set auto_explain.log_level = notice;"#,
        )
        .await
        .unwrap();
    client
        .execute(
            r#"insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
               values ($1, $2, gen_random_uuid(), 'EMAIL', 'single@example.com')"#,
            &[&tenancy, &single],
        )
        .await
        .unwrap();
    client
        .batch_execute("reset auto_explain.log_min_duration")
        .await
        .unwrap();

    let mut scans = Vec::new();
    while let Ok(plan) = plans.try_recv() {
        if plan.contains(r#"on "ProjectUser""#) {
            scans.push(plan);
        }
    }
    assert!(
        !scans.is_empty(),
        "no plan of the trigger's statements was seen"
    );
    for plan in &scans {
        assert!(!plan.contains(r#"Seq Scan on "ProjectUser""#), "{plan}");
    }
    assert!(
        user_state(&pool, tenancy, single).await.0,
        "the owner is marked"
    );
}
