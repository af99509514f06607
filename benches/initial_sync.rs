//! Bulk throughput: N users (and one primary e-mail each) imported, numbered and synced
//! into a tenant database, beside the limits on the same server in the same run.
//!
//! Timed, in order:
//! - import: the application's own `insert`, with the change-capture triggers;
//! - sequencer: numbering every imported row (batches of `BENCH_SEQUENCER_BATCH`);
//! - initial sync: `sync_tenancy` into an empty tenant database (reading the internal
//!   database, creating the tables, writing both tables side by side);
//! - updated users: every user renamed, numbered, then synced into the populated
//!   database (the batches' upsert path);
//! - parallel binary `COPY` of the same rows (already in memory) into identical empty
//!   tables, both tables at once on two connections: the fastest way PostgreSQL can
//!   ingest them, and the limit the sync is compared with;
//! - one upsert per row, each committing on its own (a sample of `PER_ROW_SAMPLE`), the
//!   way a naive apply writes.
//!
//! End to end is the sequencer and the initial sync one after the other. Peak RSS is this
//! process's, read after the syncs and before the baselines load the rows into memory:
//! the sync engine runs in this process.
//!
//! Run: `cargo bench --bench initial_sync` (N = 100,000; `BENCH_USERS=1000000` for a
//! million; `BENCH_BATCH_SIZE` sets the sync's batch size). It starts its own PostgreSQL
//! cluster, with durability on as in production (`fsync`, `synchronous_commit`), or uses
//! the server of `EXTERNAL_DB_SYNC_TEST_DATABASE_URL`. Internal and tenant databases
//! share that server, and its machine, with the benchmark itself.

#[allow(dead_code)]
#[path = "../tests/integration/harness/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use external_db_sync::db::InternalDatabase;
use external_db_sync::sequencer;
use external_db_sync::sequencer::SequencerSettings;
use external_db_sync::sync::policy::{PrivateTargets, TargetPolicy};
use external_db_sync::sync::TenancySync;
use external_db_sync::sync::{sync_tenancy, SyncEngine, SyncSettings};
use external_db_sync::workers::Outcome;
use futures::pin_mut;
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

/// Rows the per-row baseline writes; its rate does not depend on N, and writing all
/// rows one by one would only make the benchmark slow.
const PER_ROW_SAMPLE: usize = 10_000;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let users: i32 = setting("BENCH_USERS", 100_000);
    let batch_size: u32 = setting("BENCH_BATCH_SIZE", SyncSettings::default().batch_size);
    let sequencer_batch: u32 = setting("BENCH_SEQUENCER_BATCH", 10_000);
    println!(
        "bulk benchmark: {users} users (and as many contact channels), sync batch size \
         {batch_size}, sequencer batch size {sequencer_batch}"
    );
    let rows = 2 * i64::from(users);

    let server = postgres::start_server(postgres::ClusterSetup::durable());
    let internal_url = server.migrated_database().await;
    let pool = postgres::pool(&internal_url).await;
    let tenancy = Uuid::new_v4();
    let tenant_url = server.empty_database("bench_sync").await;
    create_tenancy(&pool, tenancy, &tenant_url).await;

    let import_time = import(&pool, tenancy, users).await;
    checkpoint(&pool).await;
    let sequencer_time = sequence_everything(&pool, sequencer_batch).await;
    checkpoint(&pool).await;

    // The initial sync, into the empty database.
    let engine = engine(&pool, batch_size);
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    sync_once(&engine, tenancy).await;
    let sync_time = started.elapsed();
    let sync_cpu = process_cpu_time() - cpu_before;
    let tenant = connect(&tenant_url).await;
    assert_eq!(
        tenant_rows(&tenant).await,
        rows,
        "every user and channel arrived"
    );

    // Every user renamed: a batch of N updates into the populated database.
    sqlx::query(r#"update "ProjectUser" set "displayName" = "displayName" || ' (renamed)'"#)
        .execute(&pool)
        .await
        .unwrap();
    sequence_everything(&pool, sequencer_batch).await;
    checkpoint(&pool).await;
    let started = Instant::now();
    sync_once(&engine, tenancy).await;
    let update_time = started.elapsed();
    let renamed: i64 = tenant
        .query_one(
            "select count(*) from users where display_name like '% (renamed)'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(renamed, i64::from(users), "every rename arrived");
    let peak_rss_mb = peak_rss_bytes() as f64 / 1_048_576.0;

    // The baselines, on the same rows.
    let (user_rows, channel_rows) = read_rows(&pool, tenancy).await;
    let copy_url = server.empty_database("bench_copy").await;
    let copy_time = copy_baseline(&copy_url, &user_rows, &channel_rows).await;
    let sample = PER_ROW_SAMPLE.min(user_rows.len());
    let (users_sample, channels_sample) = (&user_rows[..sample], &channel_rows[..sample]);
    let autocommit_url = server.empty_database("bench_autocommit").await;
    let autocommit_time = per_row_baseline(&autocommit_url, users_sample, channels_sample).await;

    let rate = |rows: f64, time: Duration| rows / time.as_secs_f64();
    let copy_rate = rate(rows as f64, copy_time);
    let line = |what: &str, rows: i64, time: Duration| {
        let rows_per_second = rate(rows as f64, time);
        println!(
            "| {what} | {rows} | {:.3} s | {rows_per_second:.0} | {:.2}× |",
            time.as_secs_f64(),
            rows_per_second / copy_rate
        );
    };
    println!();
    println!("| what | rows | time | rows/s | vs. parallel COPY |");
    println!("|---|---:|---:|---:|---:|");
    line("parallel binary COPY (the limit)", rows, copy_time);
    line(
        "import (application insert, change capture)",
        rows,
        import_time,
    );
    line("sequencer", rows, sequencer_time);
    line("initial sync (empty tenant database)", rows, sync_time);
    line(
        "sequencer + initial sync, end to end",
        rows,
        sequencer_time + sync_time,
    );
    line(
        "sync of updated users (populated database)",
        i64::from(users),
        update_time,
    );
    line(
        "upsert per row, autocommit",
        (2 * sample) as i64,
        autocommit_time,
    );
    println!();
    println!(
        "initial sync used {:.2} s of this process's CPU in {:.2} s; peak RSS of this \
         process through the syncs: {peak_rss_mb:.0} MB",
        sync_cpu.as_secs_f64(),
        sync_time.as_secs_f64()
    );
}

async fn sync_once(engine: &SyncEngine, tenancy: Uuid) {
    let outcome = sync_tenancy(engine, tenancy).await.unwrap();
    let TenancySync::Synced(report) = outcome else {
        panic!("the tenancy was not synced: {outcome:?}");
    };
    let synced = report.databases[0]
        .result
        .as_ref()
        .expect("the sync succeeded");
    assert!(!synced.more_remaining());
}

async fn tenant_rows(tenant: &Client) -> i64 {
    tenant
        .query_one(
            "select (select count(*) from users) + (select count(*) from contact_channels)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A checkpoint between phases, so that one phase's dirty pages are not written during
/// the next one's timing.
async fn checkpoint(pool: &sqlx::PgPool) {
    sqlx::query("checkpoint").execute(pool).await.unwrap();
}

/// The highest resident set size this process reached so far.
fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    // Kilobytes on Linux.
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

/// CPU time (user and system) this process has used so far.
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

async fn create_tenancy(pool: &sqlx::PgPool, tenancy: Uuid, tenant_url: &str) {
    sqlx::query(r#"insert into "Tenancy" ("id", "projectId", "config") values ($1, 'bench', $2)"#)
        .bind(tenancy)
        .bind(serde_json::json!({ "dbSync": { "externalDatabases": {
            "bench": { "type": "postgres", "connectionString": tenant_url } } } }))
        .execute(pool)
        .await
        .unwrap();
    // The request adding the database queued; the benchmark syncs by itself.
    sqlx::query(r#"delete from "OutgoingRequest""#)
        .execute(pool)
        .await
        .unwrap();
}

/// `users` users with one primary e-mail each, inserted as the application would: one
/// statement per table, through the change-capture triggers.
async fn import(pool: &sqlx::PgPool, tenancy: Uuid, users: i32) -> Duration {
    let started = Instant::now();
    sqlx::query(
        r#"with users as (
               insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName",
                   "profileImageUrl", "clientMetadata", "serverMetadata", "signedUpAt")
               select $1, gen_random_uuid(), 'Bench User ' || n,
                      'https://img.example.com/' || n || '.png',
                      jsonb_build_object('theme', 'dark', 'n', n),
                      jsonb_build_object('plan', 'pro', 'seats', n % 50),
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
    .bind(users)
    .execute(pool)
    .await
    .unwrap();
    started.elapsed()
}

/// Runs sequencer batches until nothing is left to number; returns how long it took.
async fn sequence_everything(pool: &sqlx::PgPool, batch_size: u32) -> Duration {
    let settings = SequencerSettings {
        batch_size,
        idle_interval: Duration::from_millis(50),
    };
    let started = Instant::now();
    loop {
        let run = sequencer::run_once(pool, &settings).await.unwrap();
        if run.outcome(settings.batch_size) == Outcome::Idle {
            break;
        }
    }
    started.elapsed()
}

fn engine(pool: &sqlx::PgPool, batch_size: u32) -> SyncEngine {
    let options = pool.connect_options();
    let internal = InternalDatabase {
        host: options.get_host().to_owned(),
        port: options.get_port(),
        dbname: options.get_database().unwrap_or_default().to_owned(),
    };
    let settings = SyncSettings {
        batch_size,
        max_batches_per_run: u32::MAX,
        ..SyncSettings::default()
    };
    SyncEngine::new(
        pool.clone(),
        settings,
        TargetPolicy::new(PrivateTargets::Allowed, internal),
    )
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

type UserRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    NaiveDateTime,
    Value,
    Value,
    Value,
    bool,
);
type ChannelRow = (Uuid, Uuid, String, String, bool, bool, bool, NaiveDateTime);

/// The rows as the tenant gets them, read into memory before the baselines are timed.
async fn read_rows(pool: &sqlx::PgPool, tenancy: Uuid) -> (Vec<UserRow>, Vec<ChannelRow>) {
    let users = sqlx::query_as(
        r#"select u."projectUserId", u."displayName", u."profileImageUrl", c."value",
                  coalesce(c."isVerified", false), coalesce(u."signedUpAt", u."createdAt"),
                  coalesce(u."clientMetadata", '{}'), coalesce(u."clientReadOnlyMetadata", '{}'),
                  coalesce(u."serverMetadata", '{}'), u."isAnonymous"
           from "ProjectUser" u
           left join "ContactChannel" c on c."tenancyId" = u."tenancyId"
               and c."projectUserId" = u."projectUserId" and c."type" = 'EMAIL' and c."isPrimary"
           where u."tenancyId" = $1"#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap();
    let channels = sqlx::query_as(
        r#"select "id", "projectUserId", "type", "value", coalesce("isPrimary", false),
                  "isVerified", coalesce("usedForAuth", false), "createdAt"
           from "ContactChannel" where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap();
    (users, channels)
}

/// The external tables, as the sync engine creates them.
const TABLES: &str = r#"
create table users (
    id uuid primary key, display_name text, profile_image_url text, primary_email text,
    primary_email_verified boolean not null default false,
    signed_up_at timestamp without time zone not null,
    client_metadata jsonb not null default '{}', client_read_only_metadata jsonb not null default '{}',
    server_metadata jsonb not null default '{}', is_anonymous boolean not null default false);
create table contact_channels (
    id uuid primary key, user_id uuid not null, type text not null, value text not null,
    is_primary boolean not null, is_verified boolean not null, used_for_auth boolean not null,
    created_at timestamp without time zone not null);
"#;

/// Binary `COPY` of both tables at once, each on a connection of its own and committing
/// on its own, as the sync writes its two tables side by side.
async fn copy_baseline(url: &str, users: &[UserRow], channels: &[ChannelRow]) -> Duration {
    let setup = connect(url).await;
    setup.batch_execute(TABLES).await.unwrap();
    let (mut users_client, mut channels_client) = (connect(url).await, connect(url).await);
    let started = Instant::now();
    let copy_users = async {
        let transaction = users_client.transaction().await.unwrap();
        let sink = transaction
            .copy_in("copy users from stdin (format binary)")
            .await
            .unwrap();
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::BOOL,
                Type::TIMESTAMP,
                Type::JSONB,
                Type::JSONB,
                Type::JSONB,
                Type::BOOL,
            ],
        );
        pin_mut!(writer);
        for row in users {
            let values: [&(dyn ToSql + Sync); 10] = [
                &row.0, &row.1, &row.2, &row.3, &row.4, &row.5, &row.6, &row.7, &row.8, &row.9,
            ];
            writer.as_mut().write(&values).await.unwrap();
        }
        writer.finish().await.unwrap();
        transaction.commit().await.unwrap();
    };
    let copy_channels = async {
        let transaction = channels_client.transaction().await.unwrap();
        let sink = transaction
            .copy_in("copy contact_channels from stdin (format binary)")
            .await
            .unwrap();
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::UUID,
                Type::TEXT,
                Type::TEXT,
                Type::BOOL,
                Type::BOOL,
                Type::BOOL,
                Type::TIMESTAMP,
            ],
        );
        pin_mut!(writer);
        for row in channels {
            let values: [&(dyn ToSql + Sync); 8] = [
                &row.0, &row.1, &row.2, &row.3, &row.4, &row.5, &row.6, &row.7,
            ];
            writer.as_mut().write(&values).await.unwrap();
        }
        writer.finish().await.unwrap();
        transaction.commit().await.unwrap();
    };
    tokio::join!(copy_users, copy_channels);
    started.elapsed()
}

/// One upsert per row, each statement committing on its own, as code that simply runs
/// one upsert per row does.
async fn per_row_baseline(url: &str, users: &[UserRow], channels: &[ChannelRow]) -> Duration {
    let client = connect(url).await;
    client.batch_execute(TABLES).await.unwrap();
    let upsert_user = client
        .prepare(
            "insert into users values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             on conflict (id) do update set display_name = excluded.display_name, \
             profile_image_url = excluded.profile_image_url, primary_email = excluded.primary_email, \
             primary_email_verified = excluded.primary_email_verified, signed_up_at = excluded.signed_up_at, \
             client_metadata = excluded.client_metadata, client_read_only_metadata = excluded.client_read_only_metadata, \
             server_metadata = excluded.server_metadata, is_anonymous = excluded.is_anonymous",
        )
        .await
        .unwrap();
    let upsert_channel = client
        .prepare(
            "insert into contact_channels values ($1, $2, $3, $4, $5, $6, $7, $8) \
             on conflict (id) do update set user_id = excluded.user_id, type = excluded.type, \
             value = excluded.value, is_primary = excluded.is_primary, is_verified = excluded.is_verified, \
             used_for_auth = excluded.used_for_auth, created_at = excluded.created_at",
        )
        .await
        .unwrap();
    let started = Instant::now();
    for row in users {
        client
            .execute(
                &upsert_user,
                &[
                    &row.0, &row.1, &row.2, &row.3, &row.4, &row.5, &row.6, &row.7, &row.8, &row.9,
                ],
            )
            .await
            .unwrap();
    }
    for row in channels {
        client
            .execute(
                &upsert_channel,
                &[
                    &row.0, &row.1, &row.2, &row.3, &row.4, &row.5, &row.6, &row.7,
                ],
            )
            .await
            .unwrap();
    }
    started.elapsed()
}
