//! Writing source rows the way the application would: plain SQL on the internal tables.

use std::time::Duration;

use external_db_sync::sequencer;
use external_db_sync::sequencer::SequencerSettings;
use external_db_sync::workers::Outcome;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

pub async fn tenancy(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(r#"insert into "Tenancy" ("id", "projectId") values ($1, 'test-project')"#)
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    id
}

/// A tenancy with one tenant database in its configuration (a placeholder nothing
/// listens on), whose first sync is taken as done: the request that adding the database
/// queued is removed. Its changes are queued like any tenancy's with databases; those of
/// a [`tenancy`] without databases are numbered but queue nothing.
pub async fn tenancy_with_placeholder_database(pool: &PgPool) -> Uuid {
    let id = tenancy(pool).await;
    sqlx::query(r#"update "Tenancy" set "config" = $2 where "id" = $1"#)
        .bind(id)
        .bind(placeholder_databases())
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(r#"delete from "OutgoingRequest" where "deduplicationKey" = $1"#)
        .bind(request_key(id))
        .execute(pool)
        .await
        .unwrap();
    id
}

/// `"Tenancy"."config"` naming one tenant database that nothing listens on.
pub fn placeholder_databases() -> serde_json::Value {
    json!({ "dbSync": { "externalDatabases": { "main": {
        "type": "postgres",
        "connectionString": "postgres://nobody@127.0.0.1:1/placeholder"
    } } } })
}

pub async fn user(pool: &PgPool, tenancy: Uuid, display_name: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName", "serverMetadata")
           values ($1, $2, $3, $4)"#,
    )
    .bind(tenancy)
    .bind(id)
    .bind(display_name)
    .bind(json!({ "plan": "pro" }))
    .execute(pool)
    .await
    .unwrap();
    id
}

pub async fn email(pool: &PgPool, tenancy: Uuid, user: Uuid, value: &str, primary: bool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        r#"insert into "ContactChannel"
               ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth", "value")
           values ($1, $2, $3, 'EMAIL', $4, true, $5)"#,
    )
    .bind(tenancy)
    .bind(user)
    .bind(id)
    .bind(primary.then_some(true))
    .bind(value)
    .execute(pool)
    .await
    .unwrap();
    id
}

pub async fn rename_user(pool: &PgPool, user: Uuid, name: &str) {
    sqlx::query(r#"update "ProjectUser" set "displayName" = $1 where "projectUserId" = $2"#)
        .bind(name)
        .bind(user)
        .execute(pool)
        .await
        .unwrap();
}

/// `("shouldUpdateSequenceId", "sequenceId")` of a user.
pub async fn user_state(pool: &PgPool, tenancy: Uuid, user: Uuid) -> (bool, Option<i64>) {
    sqlx::query_as(
        r#"select "shouldUpdateSequenceId", "sequenceId" from "ProjectUser"
           where "tenancyId" = $1 and "projectUserId" = $2"#,
    )
    .bind(tenancy)
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// How another transaction holds a user's row: as an update of the user holds it, or as
/// its delete (or `select … for update`) does. The second also makes a channel insert's
/// foreign key check wait, as it does without this service.
#[derive(Clone, Copy, Debug)]
pub enum UserLock {
    AsAnUpdate,
    AsADelete,
}

/// A transaction that holds `user`'s row until it ends.
pub async fn hold_user(
    pool: &PgPool,
    user: Uuid,
    lock: UserLock,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let strength = match lock {
        UserLock::AsAnUpdate => "no key update",
        UserLock::AsADelete => "update",
    };
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(&format!(
        r#"select from "ProjectUser" where "projectUserId" = $1 for {strength}"#
    ))
    .bind(user)
    .execute(&mut *holder)
    .await
    .unwrap();
    holder
}

/// `("shouldUpdateSequenceId", "sequenceId")` of a contact channel.
pub async fn channel_state(pool: &PgPool, channel: Uuid) -> (bool, Option<i64>) {
    sqlx::query_as(
        r#"select "shouldUpdateSequenceId", "sequenceId" from "ContactChannel" where "id" = $1"#,
    )
    .bind(channel)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The sequence id of the tenancy's tombstone (the first found, if it has several).
pub async fn tombstone(pool: &PgPool, tenancy: Uuid) -> i64 {
    sqlx::query_scalar(r#"select "sequenceId" from "DeletedRow" where "tenancyId" = $1"#)
        .bind(tenancy)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows of the three source tables that still wait for the sequencer, and owners whose
/// mark a channel write deferred (migration 16).
pub async fn flagged_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        r#"select (select count(*) from "ProjectUser" where "shouldUpdateSequenceId")
                + (select count(*) from "ContactChannel" where "shouldUpdateSequenceId")
                + (select count(*) from "DeletedRow" where "shouldUpdateSequenceId")
                + (select count(*) from "ExternalDbSyncOwnerMark")"#,
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Deduplication keys of the pending (not yet claimed) sync requests, sorted.
pub async fn pending_request_keys(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        r#"select "deduplicationKey" from "OutgoingRequest"
           where "startedFulfillingAt" is null order by 1"#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

pub fn request_key(tenancy: Uuid) -> String {
    format!("external-db-sync:{tenancy}")
}

/// Runs sequencer batches of `batch_size` until one finds nothing; returns how many
/// batches did work.
pub async fn sequence_all(pool: &PgPool, batch_size: u32) -> u32 {
    let settings = SequencerSettings {
        batch_size,
        idle_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let mut batches = 0;
    loop {
        let run = sequencer::run_once(pool, &settings).await.unwrap();
        match run.outcome(batch_size) {
            Outcome::Worked { .. } => batches += 1,
            Outcome::Idle => return batches,
            Outcome::Disabled => panic!("the sequencer is switched off"),
            Outcome::Waiting | Outcome::Recheck(_) => {
                unreachable!("a one-off batch neither waits nor rechecks")
            }
        }
    }
}

pub async fn delete_user(pool: &PgPool, user: Uuid) {
    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
        .bind(user)
        .execute(pool)
        .await
        .unwrap();
}

/// Makes `channel` the primary one of its type (clearing the previous primary first,
/// as the unique index demands), or not primary.
pub async fn set_primary(pool: &PgPool, channel: Uuid, primary: bool) {
    let mut transaction = pool.begin().await.unwrap();
    if primary {
        sqlx::query(
            r#"update "ContactChannel" as other set "isPrimary" = null
               from "ContactChannel" as this
               where this."id" = $1 and other."tenancyId" = this."tenancyId"
                 and other."projectUserId" = this."projectUserId"
                 and other."type" = this."type" and other."id" <> this."id""#,
        )
        .bind(channel)
        .execute(&mut *transaction)
        .await
        .unwrap();
    }
    sqlx::query(r#"update "ContactChannel" set "isPrimary" = $2 where "id" = $1"#)
        .bind(channel)
        .bind(primary.then_some(true))
        .execute(&mut *transaction)
        .await
        .unwrap();
    transaction.commit().await.unwrap();
}

pub async fn verify_channel(pool: &PgPool, channel: Uuid) {
    sqlx::query(r#"update "ContactChannel" set "isVerified" = true where "id" = $1"#)
        .bind(channel)
        .execute(pool)
        .await
        .unwrap();
}

pub async fn delete_channel(pool: &PgPool, channel: Uuid) {
    sqlx::query(r#"delete from "ContactChannel" where "id" = $1"#)
        .bind(channel)
        .execute(pool)
        .await
        .unwrap();
}

/// A tenant database: an empty database on the test server and a pool on it.
pub async fn tenant_database() -> (String, PgPool) {
    let url = super::postgres::server().empty_database("tenant").await;
    let pool = super::postgres::pool(&url).await;
    (url, pool)
}

/// `count` users of `tenancy` without e-mails, named `prefix` and their number, in one
/// statement.
pub async fn users(pool: &PgPool, tenancy: Uuid, count: i32, prefix: &str) {
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
           select $1, gen_random_uuid(), $3 || n from generate_series(1, $2) n"#,
    )
    .bind(tenancy)
    .bind(count)
    .bind(prefix)
    .execute(pool)
    .await
    .unwrap();
}

/// `count` users of `tenancy`, each with a primary e-mail, in one statement per table.
pub async fn import(pool: &PgPool, tenancy: Uuid, count: i32, prefix: &str) {
    sqlx::query(
        r#"with users as (
               insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName",
                   "clientMetadata", "signedUpAt")
               select $1, gen_random_uuid(), $3 || n, jsonb_build_object('n', n),
                      now() - make_interval(secs => n)
               from generate_series(1, $2) n
               returning "projectUserId", "displayName")
           insert into "ContactChannel"
               ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth",
                "isVerified", "value")
           select $1, "projectUserId", gen_random_uuid(), 'EMAIL', true, true, true,
                  replace(lower("displayName"), ' ', '.') || '@example.com'
           from users"#,
    )
    .bind(tenancy)
    .bind(count)
    .bind(prefix)
    .execute(pool)
    .await
    .unwrap();
}
