//! Initial sync of N users into an empty tenant database, beside two baselines on the
//! same server in the same run:
//!
//! - `COPY`: the same rows, already in memory, written with binary `COPY` into identical
//!   empty tables: the fastest way PostgreSQL can ingest them;
//! - per row: one prepared `insert … on conflict do update` per row, the naive way a
//!   sync could be written; once with all rows in one transaction (its best case) and
//!   once with each statement committing on its own.
//!
//! The sync is timed end to end (`sync_tenancy`: reading the internal database,
//! connecting, creating the tables, writing both mappings), so it writes every user and
//! every contact channel; the baselines write the same two sets of rows. Rates are rows
//! per second over both tables.
//!
//! Run: `cargo bench --bench initial_sync` (N = 100,000; set `BENCH_USERS` and
//! `BENCH_BATCH_SIZE` to vary). It starts its own PostgreSQL cluster, with durability
//! on as in production (`fsync`, `synchronous_commit`), or uses the server of
//! `EXTERNAL_DB_SYNC_TEST_DATABASE_URL`. Internal and tenant databases share that
//! server, and its machine, with the benchmark itself.

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
/// 100,000 rows one by one would only make the benchmark slow.
const PER_ROW_SAMPLE: usize = 10_000;

#[tokio::main]
async fn main() {
    let users: i32 = std::env::var("BENCH_USERS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100_000);
    let batch_size: u32 = std::env::var("BENCH_BATCH_SIZE")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(SyncSettings::default().batch_size);
    println!("initial sync benchmark: {users} users (and as many contact channels), batch size {batch_size}");

    let server = postgres::start_server(postgres::ClusterSetup::durable());
    let internal_url = server.migrated_database().await;
    let pool = postgres::pool(&internal_url).await;
    let tenancy = Uuid::new_v4();
    prepare_source(&pool, tenancy, users).await;

    // The sync.
    let tenant_url = server.empty_database("bench_sync").await;
    sqlx::query(r#"update "Tenancy" set "config" = $2 where "id" = $1"#)
        .bind(tenancy)
        .bind(serde_json::json!({ "dbSync": { "externalDatabases": {
            "bench": { "type": "postgres", "connectionString": tenant_url } } } }))
        .execute(&pool)
        .await
        .unwrap();
    let engine = engine(&pool, batch_size);
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let outcome = sync_tenancy(&engine, tenancy).await.unwrap();
    let sync_time = started.elapsed();
    let sync_cpu = process_cpu_time() - cpu_before;
    let TenancySync::Synced(report) = outcome else {
        panic!("the tenancy was not synced: {outcome:?}");
    };
    let synced = report.databases[0]
        .result
        .as_ref()
        .expect("the sync succeeded");
    assert!(!synced.more_remaining());
    let tenant = connect(&tenant_url).await;
    let copied: i64 = tenant
        .query_one(
            "select (select count(*) from users) + (select count(*) from contact_channels)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let rows = 2 * i64::from(users);
    assert_eq!(copied, rows, "every user and channel arrived");

    // The baselines, on the same rows.
    let (user_rows, channel_rows) = read_rows(&pool, tenancy).await;
    let copy_url = server.empty_database("bench_copy").await;
    let copy_time = copy_baseline(&copy_url, &user_rows, &channel_rows).await;
    let sample = PER_ROW_SAMPLE.min(user_rows.len());
    let (users_sample, channels_sample) = (&user_rows[..sample], &channel_rows[..sample]);
    let per_row_url = server.empty_database("bench_per_row").await;
    let per_row_time =
        per_row_baseline(&per_row_url, users_sample, channels_sample, Commit::Once).await;
    let autocommit_url = server.empty_database("bench_autocommit").await;
    let autocommit_time = per_row_baseline(
        &autocommit_url,
        users_sample,
        channels_sample,
        Commit::EachRow,
    )
    .await;

    let rate = |rows: f64, time: Duration| rows / time.as_secs_f64();
    let sync_rate = rate(rows as f64, sync_time);
    let copy_rate = rate(rows as f64, copy_time);
    let per_row_rate = rate((2 * sample) as f64, per_row_time);
    let autocommit_rate = rate((2 * sample) as f64, autocommit_time);
    println!();
    println!("| method | rows | time | rows/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| sync_tenancy | {rows} | {:.3} s | {sync_rate:.0} |",
        sync_time.as_secs_f64()
    );
    println!(
        "| binary COPY | {rows} | {:.3} s | {copy_rate:.0} |",
        copy_time.as_secs_f64()
    );
    println!(
        "| upsert per row, one transaction | {} | {:.3} s | {per_row_rate:.0} |",
        2 * sample,
        per_row_time.as_secs_f64()
    );
    println!(
        "| upsert per row, autocommit | {} | {:.3} s | {autocommit_rate:.0} |",
        2 * sample,
        autocommit_time.as_secs_f64()
    );
    println!();
    println!(
        "sync used {:.2} s of this process's CPU in {:.2} s",
        sync_cpu.as_secs_f64(),
        sync_time.as_secs_f64()
    );
    println!(
        "sync / COPY:    {:.0} % (target ≥ 40 %)",
        100.0 * sync_rate / copy_rate
    );
    println!(
        "sync / per row: {:.1}× against one transaction, {:.1}× against autocommit \
         (target ≥ 20×)",
        sync_rate / per_row_rate,
        sync_rate / autocommit_rate
    );
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

/// `users` users with one primary e-mail each, sequenced.
async fn prepare_source(pool: &sqlx::PgPool, tenancy: Uuid, users: i32) {
    sqlx::query(r#"insert into "Tenancy" ("id", "projectId") values ($1, 'bench')"#)
        .bind(tenancy)
        .execute(pool)
        .await
        .unwrap();
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
    let settings = SequencerSettings {
        batch_size: 50_000,
        idle_interval: Duration::from_millis(50),
    };
    loop {
        let run = sequencer::run_once(pool, &settings).await.unwrap();
        if run.outcome(settings.batch_size) == Outcome::Idle {
            break;
        }
    }
    sqlx::query("vacuum analyze").execute(pool).await.unwrap();
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

async fn copy_baseline(url: &str, users: &[UserRow], channels: &[ChannelRow]) -> Duration {
    let mut client = connect(url).await;
    client.batch_execute(TABLES).await.unwrap();
    let started = Instant::now();
    let transaction = client.transaction().await.unwrap();
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
    started.elapsed()
}

/// How the per-row baseline commits.
#[derive(Clone, Copy)]
enum Commit {
    /// All rows in one transaction: the kindest case for per-row writes.
    Once,
    /// Every statement on its own, as code that simply runs one upsert per row does.
    EachRow,
}

async fn per_row_baseline(
    url: &str,
    users: &[UserRow],
    channels: &[ChannelRow],
    commit: Commit,
) -> Duration {
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
    if matches!(commit, Commit::Once) {
        client.batch_execute("begin").await.unwrap();
    }
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
    if matches!(commit, Commit::Once) {
        client.batch_execute("commit").await.unwrap();
    }
    started.elapsed()
}
