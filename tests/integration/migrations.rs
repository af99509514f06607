//! The migrations: re-applied, and applied over source tables that already hold rows.

use sqlx::PgPool;

use crate::harness::fixtures::{
    self, flagged_rows, pending_request_keys, request_key, sequence_all, user_state,
};
use crate::harness::postgres::{migrated_pool, pool, server};

async fn user_names(pool: &PgPool) -> Vec<(String, Option<i64>)> {
    sqlx::query_as(
        r#"select "displayName", "sequenceId" from "ProjectUser" order by "displayName""#,
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn trigger_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from information_schema.triggers where trigger_name like 'external_db_sync%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_reapplied_succeed_and_keep_every_row() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    let user = fixtures::user(&pool, tenancy, "Ada").await;
    fixtures::email(&pool, tenancy, user, "ada@example.com", true).await;
    fixtures::user(&pool, tenancy, "Grace").await;
    sequence_all(&pool, 100).await;
    let before = user_names(&pool).await;
    let triggers_before = trigger_count(&pool).await;

    // Applying again is a no-op for sqlx's bookkeeping...
    external_db_sync::db::migrate(&pool).await.unwrap();
    // ...and running every statement a second time (bookkeeping lost, or a migration
    // replayed by hand) must also succeed.
    sqlx::query("delete from _sqlx_migrations")
        .execute(&pool)
        .await
        .unwrap();
    external_db_sync::db::migrate(&pool).await.unwrap();

    assert_eq!(user_names(&pool).await, before);
    assert_eq!(flagged_rows(&pool).await, 0, "re-applying marks nothing");
    assert_eq!(
        trigger_count(&pool).await,
        triggers_before,
        "no trigger was doubled"
    );
    let channels: i64 = sqlx::query_scalar(r#"select count(*) from "ContactChannel""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(channels, 1);
    // The triggers still work.
    fixtures::rename_user(&pool, user, "Ada L.").await;
    assert!(user_state(&pool, tenancy, user).await.0);
}

/// The source tables as the application's ORM created them, before external-db-sync.
const EXISTING_SCHEMA: &str = r#"
create table "Tenancy" (
    "id" uuid primary key,
    "projectId" text not null,
    "branchId" text not null default 'main',
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp
);
create table "ProjectUser" (
    "tenancyId" uuid not null references "Tenancy" ("id"),
    "projectUserId" uuid not null,
    "displayName" text,
    "serverMetadata" jsonb,
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp,
    primary key ("tenancyId", "projectUserId")
);
create table "ContactChannel" (
    "tenancyId" uuid not null,
    "projectUserId" uuid not null,
    "id" uuid not null,
    "type" text not null,
    "isPrimary" boolean,
    "value" text not null,
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp,
    primary key ("tenancyId", "projectUserId", "id"),
    foreign key ("tenancyId", "projectUserId") references "ProjectUser" ("tenancyId", "projectUserId") on delete cascade
);
insert into "Tenancy" ("id", "projectId") values
    ('00000000-0000-0000-0000-0000000000a1', 'one'),
    ('00000000-0000-0000-0000-0000000000b2', 'two');
insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName") values
    ('00000000-0000-0000-0000-0000000000a1', '10000000-0000-0000-0000-000000000001', 'Existing One'),
    ('00000000-0000-0000-0000-0000000000a1', '10000000-0000-0000-0000-000000000002', 'Existing Two'),
    ('00000000-0000-0000-0000-0000000000b2', '10000000-0000-0000-0000-000000000003', 'Existing Three');
insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "isPrimary", "value") values
    ('00000000-0000-0000-0000-0000000000a1', '10000000-0000-0000-0000-000000000001',
     '20000000-0000-0000-0000-000000000001', 'EMAIL', true, 'one@example.com');
"#;

#[tokio::test]
async fn migrations_apply_over_existing_source_tables_and_keep_their_rows() {
    let pool = pool(&server().empty_database("existing").await).await;
    sqlx::raw_sql(EXISTING_SCHEMA).execute(&pool).await.unwrap();

    external_db_sync::db::migrate(&pool).await.unwrap();

    let names: Vec<String> = user_names(&pool)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names, ["Existing One", "Existing Three", "Existing Two"]);
    let channel: (String, bool, bool) = sqlx::query_as(
        r#"select "value", "isVerified", "shouldUpdateSequenceId" from "ContactChannel""#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(channel, ("one@example.com".to_owned(), false, true));
    assert_eq!(
        flagged_rows(&pool).await,
        4,
        "every existing row waits for the sequencer"
    );

    // The existing rows get sequenced and queued like new ones, for the tenancy that
    // has a tenant database (its first sync taken as done); the other one's are numbered
    // but queue nothing.
    sqlx::query(r#"update "Tenancy" set "config" = $1 where "projectId" = 'one'"#)
        .bind(fixtures::placeholder_databases())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(r#"delete from "OutgoingRequest""#)
        .execute(&pool)
        .await
        .unwrap();
    sequence_all(&pool, 100).await;
    assert_eq!(flagged_rows(&pool).await, 0);
    let numbered: i64 = sqlx::query_scalar(r#"select count("sequenceId") from "ProjectUser""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(numbered, 3);
    let one = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000a1").unwrap();
    assert_eq!(pending_request_keys(&pool).await, vec![request_key(one)]);

    // And change capture now covers them.
    sqlx::query(r#"delete from "ProjectUser" where "displayName" = 'Existing One'"#)
        .execute(&pool)
        .await
        .unwrap();
    let tombstones: i64 = sqlx::query_scalar(r#"select count(*) from "DeletedRow""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tombstones, 2, "the user and its channel");
}
