//! The sync engine against real tenant databases: what arrives, in which shape, and what
//! never does. Every test drives sequencer → `sync_tenancy` directly.

use std::collections::BTreeSet;

use chrono::NaiveDateTime;
use external_db_sync::mapping::Mapping;
use external_db_sync::sync::SyncSettings;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{
    delete_channel, delete_user, email, pending_request_keys, rename_user, sequence_all,
    set_primary, user, verify_channel,
};
use crate::harness::postgres::migrated_pool;
use crate::harness::sync::{
    assert_tenant_matches_source, engine, engine_with, expected_channels, expected_users,
    external_channels, external_users, hold_mapping_lock, sync, sync_ok, sync_only, table_exists,
    tenancy_with_database, test_settings, watermark, ExternalUser, PrivateTargets,
};

async fn user_count(tenant: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from users")
        .fetch_one(tenant)
        .await
        .unwrap()
}

async fn emails(tenant: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar("select primary_email from users where primary_email is not null")
        .fetch_all(tenant)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn first_sync_creates_the_tables_and_copies_an_insert_with_every_column() {
    // Arrange
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let created_at: NaiveDateTime = "2026-01-02T03:04:05.678".parse().unwrap();
    let id = Uuid::new_v4();
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName",
               "profileImageUrl", "clientReadOnlyMetadata", "isAnonymous", "createdAt")
           values ($1, $2, 'Ada', 'https://img.example/ada.png', '{"tier": 2}', true, $3)"#,
    )
    .bind(tenancy)
    .bind(id)
    .bind(created_at)
    .execute(&pool)
    .await
    .unwrap();
    let primary = email(&pool, tenancy, id, "ada@example.com", true).await;
    verify_channel(&pool, primary).await;
    email(&pool, tenancy, id, "ada.other@example.com", false).await;
    assert!(!table_exists(&tenant, "users").await);
    assert!(!table_exists(&tenant, "contact_channels").await);

    // Act
    sync_ok(&pool, &engine(&pool), tenancy).await;

    // Assert
    assert!(table_exists(&tenant, "_stack_sync_metadata").await);
    assert_eq!(
        external_users(&tenant).await,
        [ExternalUser {
            id,
            display_name: Some("Ada".into()),
            profile_image_url: Some("https://img.example/ada.png".into()),
            primary_email: Some("ada@example.com".into()),
            primary_email_verified: true,
            // No "signedUpAt": the creation time stands in.
            signed_up_at: created_at,
            client_metadata: json!({}),
            client_read_only_metadata: json!({ "tier": 2 }),
            server_metadata: json!({}),
            is_anonymous: true,
        }]
    );
    let channels = external_channels(&tenant).await;
    assert_eq!(channels, expected_channels(&pool, tenancy).await);
    assert_eq!(channels.len(), 2);
    let secondary = channels.iter().find(|c| !c.is_primary).unwrap();
    assert_eq!(secondary.value, "ada.other@example.com");
    assert!(!secondary.is_verified);
    assert!(secondary.used_for_auth);
}

#[tokio::test]
async fn an_update_is_reflected() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let id = user(&pool, tenancy, "Before").await;
    sync_ok(&pool, &engine, tenancy).await;

    rename_user(&pool, id, "After").await;
    sqlx::query(r#"update "ProjectUser" set "clientMetadata" = '{"theme": "dark"}' where "projectUserId" = $1"#)
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    sync_ok(&pool, &engine, tenancy).await;

    let users = external_users(&tenant).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].display_name.as_deref(), Some("After"));
    assert_eq!(users[0].client_metadata, json!({ "theme": "dark" }));
    assert_eq!(users, expected_users(&pool, tenancy).await);
}

#[tokio::test]
async fn a_delete_removes_the_row() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let kept = user(&pool, tenancy, "Kept").await;
    let gone = user(&pool, tenancy, "Gone").await;
    email(&pool, tenancy, gone, "gone@example.com", true).await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(user_count(&tenant).await, 2);

    delete_user(&pool, gone).await;
    sync_ok(&pool, &engine, tenancy).await;

    let ids: Vec<Uuid> = external_users(&tenant).await.iter().map(|u| u.id).collect();
    assert_eq!(ids, [kept]);
    // The user's channels went with it (cascade), and so did their copies.
    assert!(external_channels(&tenant).await.is_empty());
}

#[tokio::test]
async fn a_user_lives_its_whole_life_in_the_tenant_database() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);

    let id = user(&pool, tenancy, "Grace").await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(
        external_users(&tenant).await,
        expected_users(&pool, tenancy).await
    );
    assert_eq!(user_count(&tenant).await, 1);

    rename_user(&pool, id, "Grace Hopper").await;
    email(&pool, tenancy, id, "grace@example.com", true).await;
    sync_ok(&pool, &engine, tenancy).await;
    let users = external_users(&tenant).await;
    assert_eq!(users[0].display_name.as_deref(), Some("Grace Hopper"));
    assert_eq!(users[0].primary_email.as_deref(), Some("grace@example.com"));

    delete_user(&pool, id).await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(user_count(&tenant).await, 0);
    assert!(external_channels(&tenant).await.is_empty());
}

#[tokio::test]
async fn the_primary_email_follows_the_primary_contact_channel() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let id = user(&pool, tenancy, "Linus").await;
    let first = email(&pool, tenancy, id, "first@example.com", true).await;
    let second = email(&pool, tenancy, id, "second@example.com", false).await;
    sync_ok(&pool, &engine, tenancy).await;
    let primary = |users: Vec<ExternalUser>| {
        assert_eq!(users.len(), 1, "exactly one users row");
        (
            users[0].primary_email.clone(),
            users[0].primary_email_verified,
        )
    };
    assert_eq!(
        primary(external_users(&tenant).await),
        (Some("first@example.com".into()), false)
    );
    assert_eq!(external_channels(&tenant).await.len(), 2);

    // Another channel becomes primary.
    set_primary(&pool, second, true).await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(
        primary(external_users(&tenant).await),
        (Some("second@example.com".into()), false)
    );

    // It gets verified.
    verify_channel(&pool, second).await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(
        primary(external_users(&tenant).await),
        (Some("second@example.com".into()), true)
    );

    // It is deleted: no primary e-mail is left.
    delete_channel(&pool, second).await;
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(primary(external_users(&tenant).await), (None, false));
    let channels = external_channels(&tenant).await;
    assert_eq!(channels.iter().map(|c| c.id).collect::<Vec<_>>(), [first]);
    assert!(!channels[0].is_primary);
    assert_eq!(channels, expected_channels(&pool, tenancy).await);
}

#[tokio::test]
async fn the_watermark_is_set_by_the_first_sync_and_grows_with_each_change() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let id = user(&pool, tenancy, "One").await;
    sync_ok(&pool, &engine, tenancy).await;
    let first = watermark(&tenant, "users").await;
    assert!(first > 0, "{first}");

    rename_user(&pool, id, "Two").await;
    let report = sync_ok(&pool, &engine, tenancy).await;

    let second = watermark(&tenant, "users").await;
    assert!(second > first, "{second} > {first}");
    let synced = report.databases[0].result.as_ref().unwrap();
    assert_eq!(synced.mappings[0].watermark, second);
}

#[tokio::test]
async fn syncing_again_changes_nothing_and_keeps_row_ids() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    for n in 0..5 {
        let id = user(&pool, tenancy, &format!("user {n}")).await;
        email(&pool, tenancy, id, &format!("u{n}@example.com"), true).await;
    }
    sync_ok(&pool, &engine, tenancy).await;
    let versions = |tenant: PgPool| async move {
        sqlx::query_as::<_, (Uuid, String)>("select id, xmin::text from users order by id")
            .fetch_all(&tenant)
            .await
            .unwrap()
    };
    let before_users = external_users(&tenant).await;
    let before_versions = versions(tenant.clone()).await;

    // The same run again finds nothing to do.
    let report = sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(
        report.databases[0].result.as_ref().unwrap().mappings[0].changes,
        0
    );

    // A full re-sync from scratch rewrites nothing either: same rows, same ids, and no
    // new row versions. (A new engine: a running one trusts the watermark it last
    // committed for a minute, see `an_external_watermark_reset_is_noticed`.)
    sqlx::query("update _stack_sync_metadata set last_synced_sequence_id = -1")
        .execute(&tenant)
        .await
        .unwrap();
    let report = sync_ok(&pool, &crate::harness::sync::engine(&pool), tenancy).await;
    let users_mapping = &report.databases[0].result.as_ref().unwrap().mappings[0];
    assert_eq!(users_mapping.changes, 5);
    assert_eq!(
        users_mapping.upserted, 0,
        "unchanged rows are not rewritten"
    );
    assert_eq!(external_users(&tenant).await, before_users);
    assert_eq!(versions(tenant.clone()).await, before_versions);
}

#[tokio::test]
async fn special_characters_round_trip_exactly() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let name = "O'Connor 🚀 用户 \"Test\" \\ back\\slash; drop table users; --";
    let metadata = json!({
        "quote": "she said \"hi\" and 'bye'",
        "nested": { "emoji": "🚀", "cjk": "用户", "list": [1, "two", { "three": null }] },
        "escapes": "tab\tnewline\nbackslash\\",
    });
    let id = user(&pool, tenancy, name).await;
    sqlx::query(r#"update "ProjectUser" set "serverMetadata" = $2 where "projectUserId" = $1"#)
        .bind(id)
        .bind(&metadata)
        .execute(&pool)
        .await
        .unwrap();
    email(&pool, tenancy, id, "o'connor+用户@example.com", true).await;

    sync_ok(&pool, &engine(&pool), tenancy).await;

    let users = external_users(&tenant).await;
    assert_eq!(users[0].display_name.as_deref(), Some(name));
    assert_eq!(users[0].server_metadata, metadata);
    assert_eq!(
        users[0].primary_email.as_deref(),
        Some("o'connor+用户@example.com")
    );
    assert_eq!(users, expected_users(&pool, tenancy).await);
}

#[tokio::test]
async fn only_the_last_state_of_a_row_is_synced() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);

    // Several updates between two syncs: the last one wins.
    let id = user(&pool, tenancy, "v1").await;
    sequence_all(&pool, 1000).await;
    rename_user(&pool, id, "v2").await;
    sequence_all(&pool, 1000).await;
    rename_user(&pool, id, "v3").await;
    // Created, updated and deleted before the first sync: never reaches the tenant.
    let ephemeral = user(&pool, tenancy, "ephemeral").await;
    email(&pool, tenancy, ephemeral, "ephemeral@example.com", true).await;
    sequence_all(&pool, 1000).await;
    rename_user(&pool, ephemeral, "ephemeral 2").await;
    delete_user(&pool, ephemeral).await;
    let report = sync_ok(&pool, &engine, tenancy).await;

    let users = external_users(&tenant).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].display_name.as_deref(), Some("v3"));
    let users_mapping = &report.databases[0].result.as_ref().unwrap().mappings[0];
    assert_eq!(users_mapping.upserted, 1, "one write for three versions");
    assert!(external_channels(&tenant).await.is_empty());

    // An e-mail deleted and then created again is a new channel with a new id.
    let old = email(&pool, tenancy, id, "again@example.com", true).await;
    sync_ok(&pool, &engine, tenancy).await;
    delete_channel(&pool, old).await;
    let new = email(&pool, tenancy, id, "again@example.com", true).await;
    sync_ok(&pool, &engine, tenancy).await;
    let channels = external_channels(&tenant).await;
    assert_eq!(channels.iter().map(|c| c.id).collect::<Vec<_>>(), [new]);
    assert_ne!(old, new);
    assert_eq!(
        external_users(&tenant).await[0].primary_email.as_deref(),
        Some("again@example.com")
    );
}

#[tokio::test]
async fn interleaved_inserts_and_deletes_end_with_exactly_the_expected_users() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let mut users = Vec::new();
    for n in 0..50 {
        let id = user(&pool, tenancy, &format!("u{n}")).await;
        email(&pool, tenancy, id, &format!("u{n}@example.com"), true).await;
        users.push(id);
    }
    sync_ok(&pool, &engine, tenancy).await;

    for id in &users[..10] {
        delete_user(&pool, *id).await;
    }
    for n in 50..60 {
        let id = user(&pool, tenancy, &format!("u{n}")).await;
        email(&pool, tenancy, id, &format!("u{n}@example.com"), true).await;
    }
    sync_ok(&pool, &engine, tenancy).await;

    let expected: BTreeSet<String> = (10..60).map(|n| format!("u{n}@example.com")).collect();
    assert_eq!(emails(&tenant).await, expected);
    assert_eq!(user_count(&tenant).await, 50);
    assert_eq!(
        external_users(&tenant).await,
        expected_users(&pool, tenancy).await
    );
}

/// Inserts `count` users with one primary e-mail each in one statement.
async fn many_users(pool: &PgPool, tenancy: Uuid, count: i32) {
    sqlx::query(
        r#"with users as (
               insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
               select $1, gen_random_uuid(), 'bulk ' || n from generate_series(1, $2) n
               returning "projectUserId", "displayName")
           insert into "ContactChannel"
               ("tenancyId", "projectUserId", "id", "type", "isPrimary", "value")
           select $1, "projectUserId", gen_random_uuid(), 'EMAIL', true,
                  replace("displayName", ' ', '') || '@example.com'
           from users"#,
    )
    .bind(tenancy)
    .bind(count)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn more_rows_than_one_batch_all_arrive() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    // A first sync (into empty tables, which goes by COPY), then the batches.
    many_users(&pool, tenancy, 1).await;
    let engine = engine(&pool);
    sync_ok(&pool, &engine, tenancy).await;
    many_users(&pool, tenancy, 1500).await;

    let report = sync_ok(&pool, &engine, tenancy).await;

    let users_mapping = &report.databases[0].result.as_ref().unwrap().mappings[0];
    assert_eq!(users_mapping.batches, 2, "1500 users in batches of 1000");
    assert_eq!(user_count(&tenant).await, 1501);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_delete_at_a_batch_boundary_is_not_lost() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    many_users(&pool, tenancy, 300).await;
    sequence_all(&pool, 1000).await;
    // The user whose change is the 100th of the tenancy: the last of the first batch.
    let boundary: Uuid = sqlx::query_scalar(
        r#"select "projectUserId" from "ProjectUser" where "tenancyId" = $1
           order by "sequenceId" offset 99 limit 1"#,
    )
    .bind(tenancy)
    .fetch_one(&pool)
    .await
    .unwrap();
    let settings = SyncSettings {
        batch_size: 100,
        ..test_settings()
    };
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(user_count(&tenant).await, 300);

    delete_user(&pool, boundary).await;
    many_users(&pool, tenancy, 150).await;
    sync_ok(&pool, &engine, tenancy).await;

    assert_eq!(user_count(&tenant).await, 449);
    let ids: BTreeSet<Uuid> = external_users(&tenant).await.iter().map(|u| u.id).collect();
    assert!(!ids.contains(&boundary));
    assert_eq!(
        external_users(&tenant).await,
        expected_users(&pool, tenancy).await
    );
}

#[tokio::test]
async fn a_run_stops_after_its_batch_budget_and_requeues_the_tenancy() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    // Batches of upserts only: staged batches count against the budget too
    // (`staged::staged_batches_count_against_the_budget_of_a_run`).
    let settings = SyncSettings {
        batch_size: 100,
        staged_batch_size: 0,
        max_batches_per_run: 2,
        ..test_settings()
    };
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    // A first sync (into empty tables, which goes by COPY), then the batches.
    many_users(&pool, tenancy, 1).await;
    sync_ok(&pool, &engine, tenancy).await;
    many_users(&pool, tenancy, 250).await;
    sequence_all(&pool, 1000).await;
    // The sequencer queued the tenancy; a worker would claim that request before the
    // sync runs, so take it out of the way.
    sqlx::query(r#"delete from "OutgoingRequest""#)
        .execute(&pool)
        .await
        .unwrap();

    let report = sync_only(&engine, tenancy).await;

    assert!(report.requeued);
    assert_eq!(user_count(&tenant).await, 201);
    let pending: Vec<serde_json::Value> = sqlx::query_scalar(
        r#"select "qstashOptions" from "OutgoingRequest" where "startedFulfillingAt" is null"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["body"]["tenancyId"], json!(tenancy.to_string()));

    assert_eq!(
        external_channels(&tenant).await.len(),
        201,
        "each mapping has its own budget"
    );

    // The next run finishes both mappings and does not queue again.
    sqlx::query(r#"delete from "OutgoingRequest""#)
        .execute(&pool)
        .await
        .unwrap();
    let report = sync_only(&engine, tenancy).await;
    assert!(!report.requeued);
    assert_eq!(user_count(&tenant).await, 251);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    assert!(pending_request_keys(&pool).await.is_empty());
}

#[tokio::test]
async fn an_uncommitted_transaction_is_invisible_until_it_commits() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    user(&pool, tenancy, "committed").await;
    let mut open = pool.begin().await.unwrap();
    let pending = Uuid::new_v4();
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
           values ($1, $2, 'pending')"#,
    )
    .bind(tenancy)
    .bind(pending)
    .execute(&mut *open)
    .await
    .unwrap();

    sync_ok(&pool, &engine, tenancy).await;
    let names: Vec<Option<String>> = external_users(&tenant)
        .await
        .into_iter()
        .map(|u| u.display_name)
        .collect();
    assert_eq!(names, [Some("committed".to_owned())]);

    open.commit().await.unwrap();
    sync_ok(&pool, &engine, tenancy).await;
    assert_eq!(user_count(&tenant).await, 2);
    assert_eq!(
        external_users(&tenant).await,
        expected_users(&pool, tenancy).await
    );
}

/// The engine trusts a schema it prepared a moment ago, but a failure makes it check
/// again: a table dropped behind its back costs one failed sync, not a minute of them.
#[tokio::test]
async fn a_dropped_table_is_created_and_filled_again_by_the_next_sync() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let id = user(&pool, tenancy, "survivor").await;
    user(&pool, tenancy, "untouched").await;
    sync_ok(&pool, &engine, tenancy).await;
    sqlx::query("drop table users")
        .execute(&tenant)
        .await
        .unwrap();
    rename_user(&pool, id, "survivor again").await;

    // The engine had prepared the schema a moment ago; the write fails on the missing
    // table, and the same sync prepares it again and fills it.
    let report = sync_ok(&pool, &engine, tenancy).await;

    assert!(table_exists(&tenant, "users").await);
    let synced = report.databases[0].result.as_ref().unwrap();
    assert!(synced.mappings[0].repair.is_some(), "{synced:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_mapping_with_nothing_new_leaves_the_tenant_database_alone() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let mut settings = test_settings();
    settings.session.lock_timeout = std::time::Duration::from_secs(2);
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    let id = user(&pool, tenancy, "first").await;
    sync_ok(&pool, &engine, tenancy).await;

    // Someone holds the contact channels' lock; only users change.
    let blocker = hold_mapping_lock(&tenant, Mapping::ContactChannels).await;
    rename_user(&pool, id, "second").await;
    let report = sync_ok(&pool, &engine, tenancy).await;

    let mappings = &report.databases[0].result.as_ref().unwrap().mappings;
    assert_eq!((mappings[0].changes, mappings[1].changes), (1, 0));
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    blocker.rollback().await.unwrap();
}

#[tokio::test]
async fn an_external_watermark_reset_is_noticed_with_the_next_change() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(user(&pool, tenancy, &format!("user {n}")).await);
    }
    sync_ok(&pool, &engine, tenancy).await;

    // The tenant empties the table and resets its watermark behind the engine's back.
    sqlx::raw_sql(
        "delete from users; update _stack_sync_metadata set last_synced_sequence_id = -1",
    )
    .execute(&tenant)
    .await
    .unwrap();
    rename_user(&pool, ids[0], "changed").await;
    let report = sync_ok(&pool, &engine, tenancy).await;

    assert_eq!(
        report.databases[0].result.as_ref().unwrap().mappings[0].changes,
        3,
        "everything after the real watermark, not only the new change"
    );
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

#[tokio::test]
async fn a_batch_the_tenant_database_rejects_is_kept_whole_or_not_at_all() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    let engine = engine(&pool);
    let gone = user(&pool, tenancy, "to be deleted").await;
    let kept = user(&pool, tenancy, "kept").await;
    sync_ok(&pool, &engine, tenancy).await;
    let before = external_users(&tenant).await;
    let watermark_before = watermark(&tenant, "users").await;

    // One batch: a delete, an accepted change and a change the tenant's own constraint
    // rejects. The delete and the upsert are sent together with the watermark and the
    // commit; the failure must take all of them back.
    sqlx::query("alter table users add constraint no_rejects check (display_name <> 'rejected')")
        .execute(&tenant)
        .await
        .unwrap();
    delete_user(&pool, gone).await;
    rename_user(&pool, kept, "rejected").await;
    let report = sync(&pool, &engine, tenancy).await;

    let error = report.databases[0].result.as_ref().unwrap_err();
    assert!(error.to_string().contains("no_rejects"), "{error}");
    assert_eq!(external_users(&tenant).await, before);
    assert_eq!(watermark(&tenant, "users").await, watermark_before);

    // The tenant drops the constraint: the next sync applies the batch whole.
    sqlx::query("alter table users drop constraint no_rejects")
        .execute(&tenant)
        .await
        .unwrap();
    sync_ok(&pool, &engine, tenancy).await;
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}
