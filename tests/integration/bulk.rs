//! Bulk work: a first sync into empty tables goes by `COPY`, and a large import while
//! small tenancies keep writing leaves every tenant database equal to its source.

use std::time::Duration;

use external_db_sync::db::sequencing::{sequence_batch, SequencedBatch, Wakefulness};
use external_db_sync::mapping::Mapping;
use external_db_sync::sync::{SyncEngine, SyncSettings};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::harness::app::TestApp;
use crate::harness::fixtures::{self, sequence_all};
use crate::harness::postgres::migrated_pool;
use crate::harness::reads::{self, TableReads};
use crate::harness::sync::{
    assert_tenant_matches_source, engine_with, latest_change, mapping_report, sync_only,
    table_exists, tenancy_with_database, test_settings, wait_until_equal, watermark,
    PrivateTargets,
};

/// Batches of 100 upserts, never staged (the staging path has tests of its own).
fn small_batches() -> SyncSettings {
    SyncSettings {
        batch_size: 100,
        staged_batch_size: 0,
        max_batches_per_run: 1000,
        ..test_settings()
    }
}

/// The first sync of a database whose tables are empty copies every numbered row in one
/// go (one "batch" per mapping, where batches of 100 would take 25), and leaves the
/// watermark at the latest change it copied; rows not numbered yet are left for the
/// batches that follow.
#[tokio::test]
async fn a_first_sync_into_empty_tables_copies_every_numbered_row_at_once() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    fixtures::import(&pool, tenancy, 2_500, "Imported ").await;
    sqlx::query(
        r#"delete from "ProjectUser" where "tenancyId" = $1
           and "projectUserId" in (select "projectUserId" from "ProjectUser"
                                   where "tenancyId" = $1 limit 10)"#,
    )
    .bind(tenancy)
    .execute(&pool)
    .await
    .unwrap();
    // A primary e-mail beside another, and another alone: one row per user, with its
    // primary e-mail or none.
    let two_emails = fixtures::user(&pool, tenancy, "Two e-mails").await;
    fixtures::email(&pool, tenancy, two_emails, "primary@example.com", true).await;
    fixtures::email(&pool, tenancy, two_emails, "other@example.com", false).await;
    let no_primary = fixtures::user(&pool, tenancy, "No primary").await;
    fixtures::email(&pool, tenancy, no_primary, "secondary@example.com", false).await;
    sequence_all(&pool, 1000).await;
    // Changed after numbering: the copy takes the row as it is now.
    fixtures::rename_user(&pool, first_user(&pool, tenancy).await, "Renamed since").await;
    // Not numbered yet: left out of the copy.
    let late = fixtures::user(&pool, tenancy, "Late").await;
    let engine = engine_with(&pool, small_batches(), PrivateTargets::Allowed);

    let report = sync_only(&engine, tenancy).await;

    let users = mapping_report(&report, Mapping::Users);
    let channels = mapping_report(&report, Mapping::ContactChannels);
    assert_eq!((users.batches, users.upserted), (1, 2_492), "{users:?}");
    assert_eq!(
        (channels.batches, channels.upserted),
        (1, 2_493),
        "{channels:?}"
    );
    let emails: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "select id, primary_email from users where id = any($1) order by display_name desc",
    )
    .bind([two_emails, no_primary])
    .fetch_all(&tenant)
    .await
    .unwrap();
    assert_eq!(
        emails,
        [
            (two_emails, Some("primary@example.com".to_owned())),
            (no_primary, None)
        ]
    );
    assert_eq!(
        watermark(&tenant, "users").await,
        latest_change(&pool, tenancy, "ProjectUser").await
    );
    let names: Vec<String> =
        sqlx::query_scalar("select display_name from users where display_name like 'Renamed%' or display_name = 'Late'")
            .fetch_all(&tenant)
            .await
            .unwrap();
    assert_eq!(
        names,
        ["Renamed since"],
        "the copy is of the rows as they are now"
    );

    // The batches go on from the copy's watermark.
    sequence_all(&pool, 1000).await;
    let report = sync_only(&engine, tenancy).await;
    let users = mapping_report(&report, Mapping::Users);
    // The renamed user was copied as it is now: only the late one is written.
    assert_eq!(users.upserted, 1, "{users:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    fixtures::delete_user(&pool, late).await;
    sequence_all(&pool, 1000).await;
    sync_only(&engine, tenancy).await;
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

async fn first_user(pool: &PgPool, tenancy: Uuid) -> Uuid {
    sqlx::query_scalar(
        r#"select "projectUserId" from "ProjectUser" where "tenancyId" = $1
           order by "sequenceId" limit 1"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The tenant's `table`: the name, index and definition of its primary key.
async fn primary_key(tenant: &PgPool, table: &str) -> (String, i64, String) {
    sqlx::query_as(
        "select conname::text, conindid::int8, pg_get_constraintdef(oid) from pg_constraint
         where conrelid = $1::text::regclass and contype = 'p'",
    )
    .bind(table)
    .fetch_one(tenant)
    .await
    .unwrap()
}

/// The first sync of a tenancy with no change yet: the tables are created, empty.
async fn empty_tables(pool: &PgPool) -> (Uuid, PgPool, SyncEngine) {
    let (tenancy, tenant) = tenancy_with_database(pool).await;
    let engine = engine_with(pool, small_batches(), PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    assert!(table_exists(&tenant, "users").await);
    (tenancy, tenant, engine)
}

/// An initial copy writes the rows without the table's primary key and builds the key
/// once after them, in the same transaction: the key is there after, as the service
/// creates it, on an index built anew.
#[tokio::test]
async fn an_initial_copy_builds_each_tables_primary_key_after_its_rows() {
    let pool = migrated_pool().await;
    let (tenancy, tenant, engine) = empty_tables(&pool).await;
    let users_key = primary_key(&tenant, "users").await;
    let channels_key = primary_key(&tenant, "contact_channels").await;
    fixtures::import(&pool, tenancy, 300, "Imported ").await;
    sequence_all(&pool, 1000).await;

    let report = sync_only(&engine, tenancy).await;

    let users = mapping_report(&report, Mapping::Users);
    assert_eq!((users.batches, users.upserted), (1, 300), "{users:?}");
    for (table, (name, index, _)) in [("users", users_key), ("contact_channels", channels_key)] {
        let (name_after, index_after, definition) = primary_key(&tenant, table).await;
        assert_eq!(
            (name_after, definition.as_str()),
            (name, "PRIMARY KEY (id)"),
            "{table}"
        );
        assert_ne!(index_after, index, "{table}: its key was built again");
    }
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// Whether a first sync copies is decided before any row is read, from where its first
/// batch would end: a full batch of changes (tombstones count) is copied, one change
/// fewer goes by batches. (A copy builds the table's key anew; batches do not.)
#[tokio::test]
async fn a_first_sync_copies_from_a_full_first_batch_on() {
    let pool = migrated_pool().await;
    for (users, copied) in [(99, true), (98, false)] {
        let (tenancy, tenant, engine) = empty_tables(&pool).await;
        let key = primary_key(&tenant, "users").await;
        fixtures::import(&pool, tenancy, users, "Imported ").await;
        let gone = fixtures::user(&pool, tenancy, "Gone").await;
        fixtures::delete_user(&pool, gone).await;
        sequence_all(&pool, 1000).await;

        let report = sync_only(&engine, tenancy).await;

        let mapping = mapping_report(&report, Mapping::Users);
        assert_eq!(
            mapping.upserted,
            u64::from(users.unsigned_abs()),
            "{mapping:?}"
        );
        assert_eq!(
            primary_key(&tenant, "users").await.1 != key.1,
            copied,
            "{users} users and a tombstone, batches of 100: copied {copied}"
        );
        assert_tenant_matches_source(&pool, tenancy, &tenant).await;
    }
}

/// A tenant's reader in an open transaction holds the empty `users` table: the initial
/// copy does not wait for it (nor makes the tenant's next readers queue behind a lock it
/// waits for), and writes through the table's key; `contact_channels`, held by nobody,
/// gets its key built after its rows.
#[tokio::test]
async fn an_initial_copy_does_not_wait_for_a_reader_holding_the_table() {
    let pool = migrated_pool().await;
    let (tenancy, tenant, engine) = empty_tables(&pool).await;
    let users_key = primary_key(&tenant, "users").await;
    let channels_key = primary_key(&tenant, "contact_channels").await;
    fixtures::import(&pool, tenancy, 300, "Imported ").await;
    sequence_all(&pool, 1000).await;
    let mut reader = tenant.begin().await.unwrap();
    sqlx::query("select count(*) from users")
        .execute(&mut *reader)
        .await
        .unwrap();

    // The sessions' lock timeout is 30 s: a copy that waited would still be waiting.
    let report = tokio::time::timeout(Duration::from_secs(20), sync_only(&engine, tenancy))
        .await
        .expect("the copy did not wait for the reader");

    assert!(report.databases[0].result.is_ok(), "{report:?}");
    let users = mapping_report(&report, Mapping::Users);
    assert_eq!((users.batches, users.upserted), (1, 300), "{users:?}");
    assert_eq!(primary_key(&tenant, "users").await, users_key);
    assert_ne!(
        primary_key(&tenant, "contact_channels").await.1,
        channels_key.1
    );
    reader.commit().await.unwrap();
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A table of the tenant's refers to `users`: the initial copy leaves the key it refers
/// to as it is and writes through it, and the reference stays.
#[tokio::test]
async fn an_initial_copy_keeps_a_key_another_table_refers_to() {
    let pool = migrated_pool().await;
    let (tenancy, tenant, engine) = empty_tables(&pool).await;
    sqlx::query("create table orders (id bigint primary key, user_id uuid references users (id))")
        .execute(&tenant)
        .await
        .unwrap();
    let users_key = primary_key(&tenant, "users").await;
    fixtures::import(&pool, tenancy, 300, "Imported ").await;
    sequence_all(&pool, 1000).await;

    let report = sync_only(&engine, tenancy).await;

    assert!(report.databases[0].result.is_ok(), "{report:?}");
    let users = mapping_report(&report, Mapping::Users);
    assert_eq!((users.batches, users.upserted), (1, 300), "{users:?}");
    assert_eq!(primary_key(&tenant, "users").await, users_key);
    let references: i64 = sqlx::query_scalar(
        "select count(*) from pg_constraint
         where conrelid = 'orders'::regclass and confrelid = 'users'::regclass",
    )
    .fetch_one(&tenant)
    .await
    .unwrap();
    assert_eq!(references, 1);
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A table that already holds rows is never copied into, even with a watermark at the
/// start (its owner set it back): the batches upsert over what is there.
#[tokio::test]
async fn a_table_that_holds_rows_goes_by_batches_even_from_the_start() {
    let pool = migrated_pool().await;
    let (tenancy, tenant) = tenancy_with_database(&pool).await;
    fixtures::import(&pool, tenancy, 300, "Imported ").await;
    sequence_all(&pool, 1000).await;
    let engine = engine_with(&pool, small_batches(), PrivateTargets::Allowed);
    sync_only(&engine, tenancy).await;
    sqlx::query("update _stack_sync_metadata set last_synced_sequence_id = -1")
        .execute(&tenant)
        .await
        .unwrap();
    sqlx::query("update users set display_name = 'edited by hand'")
        .execute(&tenant)
        .await
        .unwrap();
    // This process must not trust the watermark it remembers.
    let engine = engine_with(&pool, small_batches(), PrivateTargets::Allowed);

    let report = sync_only(&engine, tenancy).await;

    let users = mapping_report(&report, Mapping::Users);
    assert_eq!(users.batches, 3, "300 users in batches of 100: {users:?}");
    assert_tenant_matches_source(&pool, tenancy, &tenant).await;
}

/// A large import into one tenancy while small tenancies keep writing, with `serve`
/// syncing: every tenant database ends equal to its source.
#[tokio::test]
async fn a_bulk_import_while_small_tenancies_write_leaves_every_database_equal() {
    let app =
        TestApp::spawn_with(&[("RUN_WORKERS", "true"), ("ALLOW_PRIVATE_TARGETS", "true")]).await;
    let pool = app.pool.clone();
    let (big, big_tenant) = tenancy_with_database(&pool).await;
    let mut small = Vec::new();
    for _ in 0..3 {
        small.push(tenancy_with_database(&pool).await);
    }

    let writers = small.iter().map(|(tenancy, _)| {
        let (pool, tenancy) = (pool.clone(), *tenancy);
        async move {
            let mut users = Vec::new();
            for n in 0..60 {
                let user = fixtures::user(&pool, tenancy, &format!("small {n}")).await;
                fixtures::email(&pool, tenancy, user, &format!("s{n}@example.com"), true).await;
                users.push(user);
                if n % 3 == 2 {
                    fixtures::rename_user(&pool, users[n / 2], &format!("renamed {n}")).await;
                }
                if n % 5 == 4 {
                    fixtures::delete_user(&pool, users.remove(0)).await;
                }
            }
        }
    });
    let importing = fixtures::import(&pool, big, 20_000, "Imported ");
    tokio::join!(importing, futures::future::join_all(writers));

    wait_until_equal_within(&pool, big, &big_tenant, Duration::from_secs(120)).await;
    for (tenancy, tenant) in &small {
        wait_until_equal(&pool, *tenancy, tenant).await;
    }
    assert_tenant_matches_source(&pool, big, &big_tenant).await;
    app.stop().await.unwrap();
}

/// Waits for the import's users to arrive (longer than [`wait_until_equal`] allows on a
/// loaded machine), then for the tenant database to equal its source.
async fn wait_until_equal_within(pool: &PgPool, tenancy: Uuid, tenant: &PgPool, limit: Duration) {
    crate::harness::wait::until("the imported tenancy to arrive", limit, || async move {
        let count: i64 = sqlx::query_scalar("select count(*) from users")
            .fetch_one(tenant)
            .await
            .unwrap_or(0);
        (count >= 20_000).then_some(())
    })
    .await;
    wait_until_equal(pool, tenancy, tenant).await;
}

/// A sequencer loop that numbered a large backlog refreshes the source tables'
/// statistics once the backlog is gone, so that its next batches use the partial
/// indexes instead of scanning tables the stale statistics say are all flagged.
#[tokio::test]
async fn a_sequencer_loop_analyzes_the_source_tables_after_a_large_backlog() {
    let pool = migrated_pool().await;
    let tenancy = fixtures::tenancy(&pool).await;
    fixtures::users(&pool, tenancy, 30_000, "backlog ").await;
    let last_analyze = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            r#"select last_analyze from pg_stat_user_tables where relname = 'ProjectUser'"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(last_analyze().await, None);
    let settings = external_db_sync::sequencer::SequencerSettings {
        batch_size: 1000,
        idle_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let mut sequencer = external_db_sync::wakeup::SequencerLoop::default();
    let connections = external_db_sync::db::warm::WarmConnections::new(pool.clone());

    let mut steps = 0;
    while fixtures::flagged_rows(&pool).await > 0 {
        sequencer.step(&connections, &settings, None).await.unwrap();
        steps += 1;
        assert!(steps < 100, "the backlog is numbered in growing batches");
    }
    // The batch that finds the backlog gone analyzes.
    sequencer.step(&connections, &settings, None).await.unwrap();

    assert!(last_analyze().await.is_some(), "the tables were analyzed");
}

/// One sequencer batch on `session`, in a transaction of its own, and what it read of
/// each source table (in name order, [`reads`]).
async fn batch_reading(session: &mut PgConnection) -> (SequencedBatch, Vec<TableReads>) {
    sqlx::query("begin").execute(&mut *session).await.unwrap();
    let before = reads::counts(session, &SOURCE_TABLES).await;
    let batch = sequence_batch(&mut *session, 1000, Wakefulness::OneOff)
        .await
        .unwrap()
        .expect("the sequencer is on");
    let reads = reads::since(session, before).await;
    sqlx::query("commit").execute(&mut *session).await.unwrap();
    (batch, reads)
}

/// The source tables a sequencer batch reads.
const SOURCE_TABLES: [&str; 3] = ["ContactChannel", "DeletedRow", "ProjectUser"];

/// The sequencer's batch keeps one plan per session that is right whatever the
/// statistics say (migration 19). Analyzed while an import's 3,000 users and e-mails were
/// all flagged, the tables look all flagged to the planner; after that backlog is numbered
/// on one session, a batch that finds one change still reads no source table whole (with
/// a plan made for each call from those statistics, each such batch read every user and
/// every e-mail), and the batch is never compiled (JIT).
#[tokio::test]
async fn a_batch_after_an_import_finds_its_rows_by_index_whatever_the_statistics_say() {
    let pool = migrated_pool().await;
    sqlx::raw_sql(
        r#"alter table "ProjectUser" set (autovacuum_enabled = false);
           alter table "ContactChannel" set (autovacuum_enabled = false)"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let (tenancy, _) = tenancy_with_database(&pool).await;
    fixtures::import(&pool, tenancy, 3_000, "Imported ").await;
    sqlx::query(r#"analyze "ProjectUser", "ContactChannel""#)
        .execute(&pool)
        .await
        .unwrap();

    let mut session = pool.acquire().await.unwrap();
    let mut numbered = 0;
    loop {
        let batch = sequence_batch(&mut *session, 1000, Wakefulness::OneOff)
            .await
            .unwrap()
            .expect("the sequencer is on");
        if batch.project_users + batch.contact_channels == 0 {
            break;
        }
        numbered += batch.project_users + batch.contact_channels;
    }
    assert_eq!(numbered, 6_000, "the import was numbered");
    let user = first_user(&pool, tenancy).await;
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = 'Renamed'
           where "tenancyId" = $1 and "projectUserId" = $2"#,
    )
    .bind(tenancy)
    .bind(user)
    .execute(&pool)
    .await
    .unwrap();

    let (batch, reads) = batch_reading(&mut session).await;

    assert_eq!(batch.project_users, 1, "the rename was numbered");
    let whole: Vec<(&str, i64)> = (reads.iter())
        .filter(|read| read.whole > 0)
        .map(|read| (read.table.as_str(), read.whole))
        .collect();
    assert_eq!(whole, [], "scans of whole tables by the batch");
    let settings: Option<Vec<String>> = sqlx::query_scalar(
        "select proconfig from pg_proc where oid = \
         'external_db_sync_sequence_and_claim(bigint, text, text, bigint, boolean, bigint, uuid[])'\
         ::regprocedure",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        settings.unwrap_or_default().contains(&"jit=off".to_owned()),
        "the batch is never compiled"
    );
}

/// The batch's plan is kept for the session (migration 19), with the estimates of the
/// moment it was made; whatever they were, a batch reads only the flagged rows it numbers:
/// one scan of each source table's partial index, and the rows it locked updated by their
/// versions, with no join. Planned while "DeletedRow" was known to be empty, a batch that
/// numbers 200 tombstones among 2,200 (and 100 renames) fetches 200 tombstones through
/// indexes. Under the load benchmark, a plan that joined the picked tombstones with the
/// table, kept from such a moment, walked the table's whole key for each of them (7,436 x
/// 1,079 rows, two seconds a batch).
#[tokio::test]
async fn a_batch_planned_while_a_table_was_empty_reads_only_its_flagged_rows() {
    let pool = migrated_pool().await;
    let (tenancy, _) = tenancy_with_database(&pool).await;
    fixtures::user(&pool, tenancy, "First").await;
    // Known to be empty, as autovacuum records it once a table emptied out.
    sqlx::query(r#"vacuum analyze "DeletedRow""#)
        .execute(&pool)
        .await
        .unwrap();
    let mut session = pool.acquire().await.unwrap();
    let first = sequence_batch(&mut *session, 1000, Wakefulness::OneOff)
        .await
        .unwrap()
        .expect("the sequencer is on");
    assert_eq!(
        (first.project_users, first.deleted_rows),
        (1, 0),
        "planned with no tombstone"
    );

    let delete_users = |count: i64| {
        sqlx::query(
            r#"delete from "ProjectUser" where ("tenancyId", "projectUserId") in (
                   select "tenancyId", "projectUserId" from "ProjectUser"
                   where "tenancyId" = $1 and "displayName" like 'Imported %' limit $2)"#,
        )
        .bind(tenancy)
        .bind(count)
    };
    fixtures::users(&pool, tenancy, 2_300, "Imported ").await;
    sequence_all(&pool, 5000).await;
    delete_users(2000).execute(&pool).await.unwrap();
    sequence_all(&pool, 5000).await;
    sqlx::query(r#"vacuum "DeletedRow""#)
        .execute(&pool)
        .await
        .unwrap();
    delete_users(200).execute(&pool).await.unwrap();
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = 'Renamed ' || "displayName"
           where ("tenancyId", "projectUserId") in (
               select "tenancyId", "projectUserId" from "ProjectUser"
               where "tenancyId" = $1 and "displayName" like 'Imported %' limit 100)"#,
    )
    .bind(tenancy)
    .execute(&pool)
    .await
    .unwrap();

    let (batch, reads) = batch_reading(&mut session).await;

    assert_eq!(
        (batch.project_users, batch.deleted_rows),
        (100, 200),
        "the renames and the new tombstones were numbered"
    );
    let scans: Vec<(&str, i64)> = (reads.iter())
        .map(|read| (read.table.as_str(), read.by_index))
        .collect();
    assert_eq!(
        scans,
        [("ContactChannel", 1), ("DeletedRow", 1), ("ProjectUser", 1)],
        "index scans of each source table"
    );
    assert!(
        reads.iter().all(|read| match read.table.as_str() {
            "DeletedRow" => read.fetched_by_index <= 200,
            "ProjectUser" => read.fetched_by_index <= 100,
            _ => read.fetched_by_index == 0,
        }),
        "rows fetched through indexes: {reads:?}"
    );
}

/// The look-up of a tenancy's latest change, which the poller's claim makes twice for
/// each request it takes (and the metrics' backlog for each database), keeps its plans
/// for the session (PL/pgSQL); whatever the estimates of the moment they were made, it
/// reads by index. Planned while "DeletedRow" was known to be empty, a look-up after
/// 3,000 tombstones of another tenancy arrived reads no source table whole. Under the
/// load benchmark, a plan kept from such a moment read every tombstone at each look-up
/// (5,000 rows, 30-50 ms with the machine saturated), which made the claims, and so
/// every sync, wait.
#[tokio::test]
async fn the_latest_change_planned_while_a_table_was_empty_reads_no_table_whole() {
    let pool = migrated_pool().await;
    sqlx::query(r#"alter table "DeletedRow" set (autovacuum_enabled = false)"#)
        .execute(&pool)
        .await
        .unwrap();
    let (tenancy, _) = tenancy_with_database(&pool).await;
    let user = fixtures::user(&pool, tenancy, "First").await;
    sequence_all(&pool, 1000).await;
    sqlx::query(r#"vacuum analyze "DeletedRow""#)
        .execute(&pool)
        .await
        .unwrap();
    let mut session = pool.acquire().await.unwrap();
    // More than the five calls after which PostgreSQL may keep a generic plan.
    for _ in 0..8 {
        for mapping in Mapping::ALL {
            latest_change_of(&mut session, mapping, tenancy).await;
        }
    }

    let (other, _) = tenancy_with_database(&pool).await;
    sqlx::query(
        r#"insert into "DeletedRow" ("tenancyId", "tableName", "primaryKey", "sequenceId",
                                     "shouldUpdateSequenceId")
           select $1, 'ProjectUser', jsonb_build_object('tenancyId', $1, 'n', n),
                  nextval('global_seq_id'), false
           from generate_series(1, 3000) n"#,
    )
    .bind(other)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(r#"delete from "ProjectUser" where "projectUserId" = $1"#)
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
    sequence_all(&pool, 1000).await;
    let tombstone = fixtures::tombstone(&pool, tenancy).await;

    sqlx::query("begin").execute(&mut *session).await.unwrap();
    let before = reads::counts(&mut session, &SOURCE_TABLES).await;
    let latest = latest_change_of(&mut session, Mapping::Users, tenancy).await;
    let reads = reads::since(&mut session, before).await;
    sqlx::query("commit").execute(&mut *session).await.unwrap();

    assert_eq!(
        latest,
        Some(tombstone),
        "the user's tombstone is the latest"
    );
    assert!(
        reads.iter().all(|read| read.whole == 0),
        "no source table read whole: {reads:?}"
    );
}

/// [`external_db_sync::db::changes::latest_change`] on `session`.
async fn latest_change_of(
    session: &mut PgConnection,
    mapping: Mapping,
    tenancy: Uuid,
) -> Option<i64> {
    external_db_sync::db::changes::latest_change(&mut *session, mapping, tenancy)
        .await
        .unwrap()
}

/// A tenancy of 2,000 users imported after the source tables were analyzed with another
/// tenancy of 500 (autovacuum off): the statistics do not know it, and estimate it at a
/// row or two, as right after a bulk import.
async fn a_tenancy_the_statistics_do_not_know(pool: &PgPool) -> Uuid {
    sqlx::raw_sql(
        r#"alter table "ProjectUser" set (autovacuum_enabled = false);
           alter table "ContactChannel" set (autovacuum_enabled = false);
           alter table "DeletedRow" set (autovacuum_enabled = false)"#,
    )
    .execute(pool)
    .await
    .unwrap();
    let (known, _) = tenancy_with_database(pool).await;
    fixtures::import(pool, known, 500, "Imported ").await;
    sqlx::query(r#"analyze "ProjectUser", "ContactChannel", "DeletedRow""#)
        .execute(pool)
        .await
        .unwrap();
    let (imported, _) = tenancy_with_database(pool).await;
    fixtures::import(pool, imported, 2_000, "Imported ").await;
    imported
}

/// Right after an import, the planner's statistics do not know the new tenancy (they
/// estimate it at a row). The batch query must still look a user's primary e-mail and a
/// deleted id's current row up by key: a look-up by the tenancy alone, filtered, reads
/// every channel of the tenancy for every user of the batch.
#[tokio::test]
async fn a_batch_of_a_tenancy_the_statistics_do_not_know_looks_rows_up_by_key() {
    let pool = migrated_pool().await;
    let imported = a_tenancy_the_statistics_do_not_know(&pool).await;

    for mapping in Mapping::ALL {
        let mut connection = pool.acquire().await.unwrap();
        sqlx::query(&format!(
            "prepare batch(uuid, int8, int8) as {}",
            external_db_sync::db::changes::batch_query(mapping)
        ))
        .execute(&mut *connection)
        .await
        .unwrap();
        let explain = format!("explain execute batch('{imported}', -1, 5000)");
        let plan: Vec<String> = sqlx::query_scalar(&explain)
            .fetch_all(&mut *connection)
            .await
            .unwrap();
        let plan = plan.join("\n");
        // A filter that compares a row's key with the row it is looked up for: the
        // look-up went by the tenancy alone.
        let filtered_lookups: Vec<&str> = plan
            .lines()
            .filter(|line| line.contains("Filter:"))
            .filter(|line| {
                ["batch_live.id", "tombstones.id", "gone.id", "touched.id"]
                    .iter()
                    .any(|outer| line.contains(outer))
            })
            .collect();
        assert_eq!(filtered_lookups, Vec::<&str>::new(), "{mapping:?}:\n{plan}");
    }
}

/// The initial copy reads a whole tenancy, the users with their primary e-mails: even
/// when the statistics put the tenancy at a row (right after an import), the read joins
/// them without a nested loop, which would read every channel of the tenancy once per
/// user it did not expect.
#[tokio::test]
async fn the_initial_copy_of_a_tenancy_the_statistics_do_not_know_joins_without_nested_loops() {
    let pool = migrated_pool().await;
    let imported = a_tenancy_the_statistics_do_not_know(&pool).await;

    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("begin isolation level repeatable read, read only")
        .execute(&mut *connection)
        .await
        .unwrap();
    external_db_sync::db::changes::plan_bulk_read(&mut *connection)
        .await
        .unwrap();
    for mapping in Mapping::ALL {
        let read = external_db_sync::db::changes::current_rows(mapping, imported);
        let plan: Vec<String> = sqlx::query_scalar(&format!("explain {read}"))
            .fetch_all(&mut *connection)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Nested Loop"), "{mapping:?}:\n{plan}");
    }
    sqlx::query("rollback")
        .execute(&mut *connection)
        .await
        .unwrap();
}
