//! Large batches into a populated tenant database go by the staging path: `COPY` into a
//! staging table, then a set-based merge. They end equal to the source, a deletion wins
//! over an older write of the same row, and a database that refuses temporary tables
//! gets batches of upserts instead.

use external_db_sync::mapping::Mapping;
use external_db_sync::sync::{SyncEngine, SyncSettings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::fixtures::{self, sequence_all, tenancy, tenant_database};
use crate::harness::postgres::{migrated_pool, pool as open_pool, server, short_id};
use crate::harness::sync::{
    assert_tenant_matches_source, attach, engine_with, latest_change, mapping_report, sync_only,
    tenancy_with_database, test_settings, watermark, PrivateTargets,
};

/// Batches of 10 changes, and staged batches of 100 once a batch was full.
fn staged_batches() -> SyncSettings {
    SyncSettings {
        batch_size: 10,
        staged_batch_size: 100,
        max_batches_per_run: 1000,
        ..test_settings()
    }
}

async fn users_of(pool: &PgPool, tenancy: Uuid) -> Vec<Uuid> {
    sqlx::query_scalar(
        r#"select "projectUserId" from "ProjectUser" where "tenancyId" = $1
           order by "projectUserId""#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A tenancy of `count` imported users, synced into its database by `engine`.
struct Populated {
    pool: PgPool,
    tenancy: Uuid,
    tenant: PgPool,
    engine: SyncEngine,
}

async fn populated(count: i32, settings: SyncSettings) -> Populated {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    fixtures::import(&pool, tenancy, count, "Imported ").await;
    sequence_all(&pool, 1000).await;
    let engine = engine_with(&pool, settings, PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    Populated {
        pool,
        tenancy,
        tenant,
        engine,
    }
}

/// Renames every user of `tenancy`, and numbers the renames.
async fn rename_every_user(pool: &PgPool, tenancy: Uuid) {
    let users = users_of(pool, tenancy).await;
    rename(pool, tenancy, &users, "renamed").await;
    sequence_all(pool, 1000).await;
}

/// Renames the users of `tenancy` whose ids are in `users`.
async fn rename(pool: &PgPool, tenancy: Uuid, users: &[Uuid], name: &str) {
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = $3 || ' ' || "projectUserId"
           where "tenancyId" = $1 and "projectUserId" = any($2)"#,
    )
    .bind(tenancy)
    .bind(users)
    .bind(name)
    .execute(pool)
    .await
    .unwrap();
}

/// Every kind of change at once into a database that holds rows: renames, deletions,
/// new users, e-mails changed and removed. The first batch (10 changes) goes by upserts,
/// the rest by staged batches of up to 100 changes, and the database ends equal to the
/// source.
#[tokio::test]
async fn a_bulk_update_of_a_populated_database_goes_staged_and_ends_equal() {
    let Populated {
        pool,
        tenancy,
        tenant,
        engine,
    } = populated(400, staged_batches()).await;
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;

    let users = users_of(&pool, tenancy).await;
    rename(&pool, tenancy, &users[..300], "renamed").await;
    for user in &users[300..340] {
        fixtures::delete_user(&pool, *user).await;
    }
    fixtures::import(&pool, tenancy, 50, "New ").await;
    sqlx::query(
        r#"update "ContactChannel" set "value" = 'changed.' || "value"
           where "tenancyId" = $1 and "projectUserId" = any($2)"#,
    )
    .bind(tenancy)
    .bind(&users[340..360])
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        r#"delete from "ContactChannel" where "tenancyId" = $1 and "projectUserId" = any($2)"#,
    )
    .bind(tenancy)
    .bind(&users[360..380])
    .execute(&pool)
    .await
    .unwrap();
    sequence_all(&pool, 1000).await;
    let changes_before: i64 = latest_change(&pool, tenancy, "ProjectUser").await;

    let report = sync_only(&engine, tenancy).await;

    let users_synced = mapping_report(&report, Mapping::Users);
    // 300 renamed, 40 deleted, 50 new, 40 whose primary e-mail changed or went away.
    assert_eq!(users_synced.changes, 430, "{users_synced:?}");
    assert_eq!(
        users_synced.batches, 6,
        "one batch of 10, then staged batches of 100 (batches of 10 alone would take 43): \
         {users_synced:?}"
    );
    assert_eq!(users_synced.deleted, 40, "{users_synced:?}");
    assert_eq!(watermark(&tenant, "users").await, changes_before);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// In one staged batch: users renamed, then deleted (a deletion after an older write of
/// the same row); one deleted and then created again with the same id (the new row
/// after the older deletion). The deletions win where they came last, the new row where
/// it did.
#[tokio::test]
async fn a_deletion_wins_over_an_older_write_of_the_same_row_in_a_staged_batch() {
    let Populated {
        pool,
        tenancy,
        tenant,
        engine,
    } = populated(60, staged_batches()).await;
    let users = users_of(&pool, tenancy).await;
    // Ten changes first, numbered on their own: they fill the batch of upserts, and
    // what follows goes staged.
    rename(&pool, tenancy, &users[50..60], "first").await;
    sequence_all(&pool, 1000).await;
    rename(&pool, tenancy, &users[..40], "renamed").await;
    sequence_all(&pool, 1000).await;
    for user in &users[..10] {
        fixtures::delete_user(&pool, *user).await;
    }
    let reborn = users[10];
    fixtures::delete_user(&pool, reborn).await;
    sqlx::query(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName", "signedUpAt")
           values ($1, $2, 'born again', now())"#,
    )
    .bind(tenancy)
    .bind(reborn)
    .execute(&pool)
    .await
    .unwrap();
    sequence_all(&pool, 1000).await;

    let report = sync_only(&engine, tenancy).await;

    let users_synced = mapping_report(&report, Mapping::Users);
    assert_eq!(users_synced.batches, 2, "{users_synced:?}");
    assert_eq!(users_synced.deleted, 10, "{users_synced:?}");
    let gone: i64 = sqlx::query_scalar("select count(*) from users where id = any($1)")
        .bind(&users[..10])
        .fetch_one(&tenant)
        .await
        .unwrap();
    assert_eq!(gone, 0, "the deletions came last");
    let name: String = sqlx::query_scalar("select display_name from users where id = $1")
        .bind(reborn)
        .fetch_one(&tenant)
        .await
        .unwrap();
    assert_eq!(name, "born again");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A tenant database whose owner revoked the right to create temporary tables still
/// gets every change: the large batches go as upserts.
#[tokio::test]
async fn a_database_without_temporary_tables_gets_large_batches_as_upserts() {
    let pool = migrated_pool().await;
    let tenancy = tenancy(&pool).await;
    let (url, _) = tenant_database().await;
    let role = format!("no_temp_{}", short_id());
    let database = url.rsplit('/').next().unwrap().to_owned();
    server()
        .admin_execute(&format!(
            r#"create role "{role}" login;
               alter database "{database}" owner to "{role}";
               revoke temporary on database "{database}" from public, "{role}""#
        ))
        .await;
    let role_url = url.replacen("postgres@", &format!("{role}@"), 1);
    attach(&pool, tenancy, &[("main", &role_url)]).await;
    let tenant = open_pool(&role_url).await;
    let refused = sqlx::query("create temporary table probe (n int)")
        .execute(&tenant)
        .await;
    assert!(refused.is_err(), "the role cannot create temporary tables");
    fixtures::import(&pool, tenancy, 100, "Imported ").await;
    sequence_all(&pool, 1000).await;
    let engine = engine_with(&pool, staged_batches(), PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    rename_every_user(&pool, tenancy).await;

    let report = sync_only(&engine, tenancy).await;

    let users_synced = mapping_report(&report, Mapping::Users);
    assert_eq!(
        (users_synced.batches, users_synced.changes),
        (10, 100),
        "batches of 10 after the staged one was refused: {users_synced:?}"
    );
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// Staged batches count against a run's budget of batches: a run that spent it leaves
/// the rest to the next run, which goes on from where it stopped.
#[tokio::test]
async fn staged_batches_count_against_the_budget_of_a_run() {
    let settings = SyncSettings {
        batch_size: 10,
        staged_batch_size: 20,
        max_batches_per_run: 3,
        ..test_settings()
    };
    let Populated {
        pool,
        tenancy,
        tenant,
        engine,
    } = populated(100, settings).await;
    rename_every_user(&pool, tenancy).await;

    let report = sync_only(&engine, tenancy).await;

    let users_synced = mapping_report(&report, Mapping::Users);
    assert_eq!(
        (
            users_synced.batches,
            users_synced.changes,
            users_synced.more_remaining
        ),
        (3, 50, true),
        "10, then 20 and 20 staged: {users_synced:?}"
    );
    let report = sync_only(&engine, tenancy).await;
    let users_synced = mapping_report(&report, Mapping::Users);
    assert_eq!(users_synced.changes, 50, "{users_synced:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A staged batch's rows are read with the cutoff read before them in the same
/// snapshot, not computed again: batch after batch, across deletions, renames and a row
/// created and deleted since, with cuts between any two of them, each reads exactly the
/// changes, and the ids present or gone, of the upsert path's batch.
#[tokio::test]
async fn a_staged_read_with_its_cutoff_given_is_the_batch_of_the_upsert_path() {
    use external_db_sync::db::changes;

    let pool = migrated_pool().await;
    let (tenancy, _) = tenancy_with_database(&pool).await;
    fixtures::import(&pool, tenancy, 12, "Imported ").await;
    sequence_all(&pool, 1000).await;
    let users = users_of(&pool, tenancy).await;
    for (n, user) in users.iter().enumerate() {
        match n % 4 {
            0 => fixtures::delete_user(&pool, *user).await,
            1 => fixtures::rename_user(&pool, *user, "Renamed").await,
            _ => {}
        }
        // Numbered one by one, so that the batches' cuts fall between them.
        sequence_all(&pool, 1000).await;
    }
    let again = fixtures::user(&pool, tenancy, "Created again").await;
    fixtures::delete_user(&pool, again).await;
    sequence_all(&pool, 1000).await;

    let mut connection = pool.acquire().await.unwrap();
    let (mut after, mut batches) = (-1, 0);
    loop {
        sqlx::query("begin isolation level repeatable read, read only")
            .execute(&mut *connection)
            .await
            .unwrap();
        let batch = changes::next_batch(&mut *connection, Mapping::Users, tenancy, after, 3)
            .await
            .unwrap();
        let cutoff = changes::batch_cutoff(&mut *connection, Mapping::Users, tenancy, after, 3)
            .await
            .unwrap();
        let (Some(batch), Some(cutoff)) = (batch, cutoff) else {
            assert!(cutoff.is_none(), "no batch, no cutoff");
            break;
        };
        assert_eq!(
            (cutoff.changes, cutoff.last_sequence_id),
            (batch.changes, batch.last_sequence_id)
        );
        let copy = changes::copy_batch(Mapping::Users, tenancy, after, cutoff);
        let rows = copy
            .strip_prefix("copy (")
            .and_then(|copy| copy.strip_suffix(") to stdout (format binary)"))
            .expect("a copy of one query");
        let read: Vec<(Uuid, bool)> =
            sqlx::query_as(&format!("select id, present from ({rows}) as b"))
                .fetch_all(&mut *connection)
                .await
                .unwrap();
        let external_db_sync::mapping::Upserts::Users(upserts) = &batch.upserts else {
            unreachable!("a batch of users")
        };
        let mut expected: Vec<(Uuid, bool)> = (upserts.iter().map(|row| (row.id, true)))
            .chain(batch.deletes.iter().map(|id| (*id, false)))
            .collect();
        expected.sort();
        assert_eq!(read, expected, "the batch after {after}");
        sqlx::query("commit")
            .execute(&mut *connection)
            .await
            .unwrap();
        after = cutoff.last_sequence_id;
        batches += 1;
    }
    assert!(batches >= 4, "{batches} batches");
}
