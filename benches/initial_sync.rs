//! Bulk throughput: N users (and one primary e-mail each) imported, numbered and synced
//! into a tenant database, beside the limits on the same server in the same run.
//!
//! Timed, in order, for each N (each in a process of its own, so that its peak RSS is
//! its own):
//! - import without triggers: the application's own `insert` into a second internal
//!   database, with the change-capture triggers off (`session_replication_role =
//!   replica`): what the import costs without this service;
//! - import with the application's constraints only: the same `insert` into a third
//!   database, with this service's triggers disabled (`alter table … disable trigger
//!   user`) and the foreign keys checked: what the service's triggers add, apart from
//!   what the application's own schema costs;
//! - import: the same `insert`, with the change-capture triggers;
//! - sequencer: numbering every imported row (batches of `BENCH_SEQUENCER_BATCH`);
//! - initial sync: `sync_tenancy` into an empty tenant database (reading the internal
//!   database, creating the tables, writing both tables side by side);
//! - renames: every user renamed, numbered, then synced into the populated database, four
//!   times: by batches of upserts only (`staged_batch_size` 0), by the staging path (the
//!   default; see `sync::staged`) twice, by upserts only again, so that each path meets
//!   the table as it grows with dead rows, on average, alike;
//! - renames, the staged path's halves apart: a fifth round, its staged batches all read
//!   from the internal database first (as a staged batch reads them, into memory), then
//!   all written into the tenant database (as a staged batch writes them): what each
//!   half costs alone, and so the most the staged path could reach were the other free;
//! - pipelined end to end: a second tenancy of N users imported, then numbered by the
//!   sequencer while a sync loop syncs it into a database of its own, until every row is
//!   there; against the sequencer alone on another import just before it (the tables in
//!   the same state), what syncing while numbering adds; and how busy the machine was in
//!   both (every process on it, and this one, which syncs), since the pipelined run's
//!   CPU time spread over every core bounds how fast it can end here;
//! - parallel binary `COPY` of the same rows (already in memory) into identical empty
//!   tables, both tables at once on two connections: the fastest way PostgreSQL can
//!   ingest them, and the limit the sync is compared with; run just before the initial
//!   sync and just after it, each by a process of its own (the rows it holds stay out
//!   of this one's peak RSS), the limit being their mean;
//! - one upsert per row, each committing on its own (a sample of `PER_ROW_SAMPLE`), the
//!   way a naive apply writes.
//!
//! Peak RSS is the process's, read after the syncs and before the baselines load the
//! rows into memory: the sync engine runs in this process.
//!
//! Run: `cargo bench --bench initial_sync` (N = 100,000 then 1,000,000;
//! `BENCH_USERS=100000` for one N, or a comma-separated list; `BENCH_BATCH_SIZE` and
//! `BENCH_STAGED_BATCH_SIZE` set the sync's). Each N starts its own PostgreSQL cluster,
//! with durability on as in production (`fsync`, `synchronous_commit`), or uses the
//! server of `EXTERNAL_DB_SYNC_TEST_DATABASE_URL`. Internal and tenant databases share
//! that server, and its machine, with the benchmark itself.

#[path = "support/cpu_times.rs"]
mod cpu_times;
#[allow(dead_code)]
#[path = "../tests/integration/harness/postgres.rs"]
mod postgres;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use external_db_sync::db::{self, InternalDatabase};
use external_db_sync::mapping::Mapping;
use external_db_sync::sequencer;
use external_db_sync::sequencer::SequencerSettings;
use external_db_sync::sync::policy::{PrivateTargets, TargetPolicy};
use external_db_sync::sync::statements;
use external_db_sync::sync::TenancySync;
use external_db_sync::sync::{sync_tenancy, SyncEngine, SyncSettings};
use external_db_sync::workers::Outcome;
use futures::{pin_mut, SinkExt, TryStreamExt};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use cpu_times::CpuTimes;

/// Rows the per-row baseline writes; its rate does not depend on N, and writing all
/// rows one by one would only make the benchmark slow.
const PER_ROW_SAMPLE: usize = 10_000;

/// Set in the process that runs one N.
const CHILD: &str = "BENCH_INITIAL_SYNC_CHILD";

/// Set in a process that times the `COPY` limit once (see [`copy_limit`]): the internal
/// database's URL, the tenancy whose rows it copies, and the empty database it copies
/// them into, separated by spaces.
const COPY_CHILD: &str = "BENCH_INITIAL_SYNC_COPY";

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Ok(arguments) = std::env::var(COPY_CHILD) {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(copy_limit_alone(&arguments));
        return;
    }
    if std::env::var_os(CHILD).is_some() {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(run(setting("BENCH_USERS", 100_000)));
        return;
    }
    let sizes = std::env::var("BENCH_USERS").unwrap_or_else(|_| "100000,1000000".to_owned());
    for users in sizes.split(',') {
        let users: i32 = users
            .trim()
            .parse()
            .expect("BENCH_USERS: numbers, comma-separated");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env(CHILD, "1")
            .env("BENCH_USERS", users.to_string())
            .status()
            .expect("running the benchmark for one N");
        assert!(status.success(), "the benchmark for {users} users failed");
    }
}

/// Pairs of a row count and how long it took, printed as a table against the limit.
struct Lines {
    copy_rate: f64,
}

impl Lines {
    fn line(&self, what: &str, rows: i64, time: Duration) {
        let rows_per_second = rows as f64 / time.as_secs_f64();
        println!(
            "| {what} | {rows} | {:.3} s | {rows_per_second:.0} | {:.2}× |",
            time.as_secs_f64(),
            rows_per_second / self.copy_rate
        );
    }
}

async fn run(users: i32) {
    let defaults = SyncSettings::default();
    let batch_size: u32 = setting("BENCH_BATCH_SIZE", defaults.batch_size);
    let staged_batch_size: u32 = setting("BENCH_STAGED_BATCH_SIZE", defaults.staged_batch_size);
    let sequencer_batch: u32 = setting("BENCH_SEQUENCER_BATCH", 10_000);
    println!(
        "bulk benchmark: {users} users (and as many contact channels), sync batch size \
         {batch_size}, staged batch size {staged_batch_size}, sequencer batch size \
         {sequencer_batch}"
    );
    let rows = 2 * i64::from(users);

    let server = postgres::start_server(postgres::ClusterSetup::durable());

    // The import without this service's triggers, each into a database of its own:
    // once before the import with them and once after, so that neither meets only a
    // colder or a warmer server.
    let bare_before = import_without_capture(&server, users, Capture::Off).await;
    let constrained_before = import_without_capture(&server, users, Capture::ConstraintsOnly).await;

    let internal_url = server.migrated_database().await;
    let pool = postgres::pool(&internal_url).await;
    let tenancy = Uuid::new_v4();
    let tenant_url = server.empty_database("bench_sync").await;
    create_tenancy(&pool, tenancy, &tenant_url).await;

    checkpoint(&pool).await;
    let import_time = import(&pool, tenancy, users, Capture::On).await;
    let constrained_after = import_without_capture(&server, users, Capture::ConstraintsOnly).await;
    let bare_after = import_without_capture(&server, users, Capture::Off).await;
    let bare_import_time = (bare_before + bare_after) / 2;
    let constrained_import_time = (constrained_before + constrained_after) / 2;
    checkpoint(&pool).await;
    let sequencer_time = sequence_everything(&pool, sequencer_batch).await;
    checkpoint(&pool).await;

    // The initial sync, into the empty database, between two runs of the `COPY` limit
    // (the limit is their mean: the machine's speed moves, and the sync meets it
    // between them).
    let copy_before = copy_limit(&server, &internal_url, tenancy).await;
    checkpoint(&pool).await;
    let staged = engine(&pool, batch_size, staged_batch_size);
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    sync_once(&staged, tenancy).await;
    let sync_time = started.elapsed();
    let sync_cpu = process_cpu_time() - cpu_before;
    checkpoint(&pool).await;
    let copy_after = copy_limit(&server, &internal_url, tenancy).await;
    let copy_time = (copy_before + copy_after) / 2;
    let tenant = connect(&tenant_url).await;
    assert_eq!(
        tenant_rows(&tenant).await,
        rows,
        "every user and channel arrived"
    );

    // Every user renamed, four times: synced by upserts only, staged, staged, upserts
    // only, so that both paths meet, on average, the same table (it grows with each
    // round's dead rows).
    let upserts_only = engine(&pool, batch_size, 0);
    let mut renames_sequencer_time = Duration::ZERO;
    let (mut upsert_times, mut staged_times) = (Vec::new(), Vec::new());
    for (round, staging) in [false, true, true, false].into_iter().enumerate() {
        let path = if staging { &staged } else { &upserts_only };
        let (sequencer, sync) =
            rename_and_sync(&pool, path, tenancy, &tenant, sequencer_batch, round).await;
        renames_sequencer_time += sequencer / 4;
        if staging {
            staged_times.push(sync);
        } else {
            upsert_times.push(sync);
        }
    }
    let mean = |times: &[Duration]| times.iter().sum::<Duration>() / times.len() as u32;
    let (upsert_time, staged_time) = (mean(&upsert_times), mean(&staged_times));

    // The sequencer alone once more, on another import, just before the pipelined run:
    // the tables are then in the state that run meets (more tenancies, the renames' dead
    // rows), and the first numbering, on fresher tables, is no measure of it (it took
    // 15–23 % less time at 100k).
    let numbered_alone = Uuid::new_v4();
    let numbered_alone_url = server.empty_database("bench_numbered_alone").await;
    create_tenancy(&pool, numbered_alone, &numbered_alone_url).await;
    import(&pool, numbered_alone, users, Capture::On).await;
    checkpoint(&pool).await;
    let (cpu_before, wal_before) = (CpuTimes::read(), wal_position(&pool).await);
    let sequencer_alone_time = sequence_everything(&pool, sequencer_batch).await;
    let sequencer_cpu = Busy::since(cpu_before);
    let sequencer_wal = wal_position(&pool).await - wal_before;

    // A second import, numbered while it is synced.
    let second = Uuid::new_v4();
    let second_url = server.empty_database("bench_pipelined").await;
    create_tenancy(&pool, second, &second_url).await;
    import(&pool, second, users, Capture::On).await;
    checkpoint(&pool).await;
    let second_tenant = connect(&second_url).await;
    let (cpu_before, wal_before) = (CpuTimes::read(), wal_position(&pool).await);
    let pipelined_time = sequence_while_syncing(
        &pool,
        &staged,
        second,
        &second_tenant,
        rows,
        sequencer_batch,
    )
    .await;
    let pipelined_cpu = Busy::since(cpu_before);
    let pipelined_wal = wal_position(&pool).await - wal_before;
    let peak_rss_mb = peak_rss_bytes() as f64 / 1_048_576.0;

    // The staged path's halves apart (holding a round's rows in memory: after the peak
    // RSS was read).
    let (apart_read_time, apart_write_time) = renames_apart(
        &pool,
        tenancy,
        &tenant,
        sequencer_batch,
        staged_batch_size,
        4,
    )
    .await;

    // The baselines, on the same rows.
    let (user_rows, channel_rows) = read_rows(&pool, tenancy).await;
    let sample = PER_ROW_SAMPLE.min(user_rows.len());
    let (users_sample, channels_sample) = (&user_rows[..sample], &channel_rows[..sample]);
    let autocommit_url = server.empty_database("bench_autocommit").await;
    let autocommit_time = per_row_baseline(&autocommit_url, users_sample, channels_sample).await;

    let lines = Lines {
        copy_rate: rows as f64 / copy_time.as_secs_f64(),
    };
    let renamed = i64::from(users);
    println!();
    println!("| what | rows | time | rows/s | vs. parallel COPY |");
    println!("|---|---:|---:|---:|---:|");
    lines.line("parallel binary COPY (the limit)", rows, copy_time);
    lines.line(
        "import, change-capture triggers off",
        rows,
        bare_import_time,
    );
    lines.line(
        "import, the application's foreign keys only",
        rows,
        constrained_import_time,
    );
    lines.line("import, change-capture triggers on", rows, import_time);
    lines.line("sequencer", rows, sequencer_time);
    lines.line("initial sync (empty tenant database)", rows, sync_time);
    lines.line(
        "sequencer, then initial sync",
        rows,
        sequencer_time + sync_time,
    );
    lines.line(
        "sequencer alone, just before the pipelined run",
        rows,
        sequencer_alone_time,
    );
    lines.line(
        "sequencer while syncing (pipelined end to end)",
        rows,
        pipelined_time,
    );
    lines.line(
        "sequencer of the renames (mean of 4)",
        renamed,
        renames_sequencer_time,
    );
    lines.line(
        "renames into the populated database, upserts only (mean of 2)",
        renamed,
        upsert_time,
    );
    lines.line(
        "renames into the populated database, staged (mean of 2)",
        renamed,
        staged_time,
    );
    lines.line(
        "renames, the staged path's read alone (every batch into memory)",
        renamed,
        apart_read_time,
    );
    lines.line(
        "renames, the staged path's write alone (every batch from memory)",
        renamed,
        apart_write_time,
    );
    lines.line(
        "renames, staged, were the halves wholly overlapped (the slower half)",
        renamed,
        apart_read_time.max(apart_write_time),
    );
    lines.line(
        "upsert per row, autocommit",
        (2 * sample) as i64,
        autocommit_time,
    );
    println!();
    let seconds = |times: &[Duration]| {
        times
            .iter()
            .map(|time| format!("{:.3} s", time.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "renames, in the order run: upserts only {}; staged {} (the means above)",
        seconds(&upsert_times),
        seconds(&staged_times)
    );
    println!(
        "parallel binary COPY (the limit, their mean): {:.3} s before the initial sync, \
         {:.3} s after",
        copy_before.as_secs_f64(),
        copy_after.as_secs_f64()
    );
    println!(
        "import without triggers: {:.3} s before the import with them, {:.3} s after",
        bare_before.as_secs_f64(),
        bare_after.as_secs_f64()
    );
    println!(
        "import with the foreign keys only: {:.3} s before the import with the triggers, \
         {:.3} s after",
        constrained_before.as_secs_f64(),
        constrained_after.as_secs_f64()
    );
    println!(
        "import with triggers / without: {:.2}× (of which the application's foreign keys: \
         {:.2}×; this service's triggers over the foreign keys: {:.2}×); pipelined end to \
         end / the sequencer just before it: {:.2}× the sequencer's rate",
        import_time.as_secs_f64() / bare_import_time.as_secs_f64(),
        constrained_import_time.as_secs_f64() / bare_import_time.as_secs_f64(),
        import_time.as_secs_f64() / constrained_import_time.as_secs_f64(),
        sequencer_alone_time.as_secs_f64() / pipelined_time.as_secs_f64(),
    );
    println!(
        "initial sync used {:.2} s of this process's CPU in {:.2} s; peak RSS of this \
         process through the syncs: {peak_rss_mb:.0} MB",
        sync_cpu.as_secs_f64(),
        sync_time.as_secs_f64()
    );
    if let (Some(alone), Some(pipelined)) = (sequencer_cpu, pipelined_cpu) {
        // The sequencer numbers one batch at a time, so nothing ends before it would
        // alone; nor before the pipelined run's CPU time, spread over every core.
        let spread = pipelined.cores * pipelined_time.as_secs_f64() / Busy::machine_cores();
        println!(
            "cores busy: the sequencer alone just before {:.2} (this process {:.2}), pipelined {:.2} \
             (this process, syncing: {:.2}) of {:.0}; the pipelined run's CPU time spread \
             over every core: {spread:.2} s, so at most {:.2}× the sequencer's rate here",
            alone.cores,
            alone.process,
            pipelined.cores,
            pipelined.process,
            Busy::machine_cores(),
            sequencer_alone_time.as_secs_f64() / spread.max(sequencer_alone_time.as_secs_f64()),
        );
    }
    println!(
        "write-ahead log written by the one server: the sequencer alone just before {:.0} MB, \
         pipelined {:.0} MB (the tenant database shares the server, and so its log)",
        sequencer_wal as f64 / 1_048_576.0,
        pipelined_wal as f64 / 1_048_576.0,
    );
}

/// Where the server's write-ahead log is now, in bytes from its start.
async fn wal_position(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How busy the machine was over a window, in cores: everything on it, and this process.
struct Busy {
    cores: f64,
    process: f64,
}

impl Busy {
    /// Since `before` (`None` where there is no `/proc/stat` to read).
    fn since(before: Option<CpuTimes>) -> Option<Busy> {
        let (after, before) = (CpuTimes::read()?, before?);
        Some(Busy {
            cores: after.busy_since(&before) * Self::machine_cores(),
            process: after.process_since(&before) * Self::machine_cores(),
        })
    }

    fn machine_cores() -> f64 {
        std::thread::available_parallelism().map_or(1, |cores| cores.get()) as f64
    }
}

/// Renames every user of `tenancy` (the `round`th time), numbers the renames, then syncs
/// them with `engine`; returns how long the numbering and the sync took.
async fn rename_and_sync(
    pool: &sqlx::PgPool,
    engine: &SyncEngine,
    tenancy: Uuid,
    tenant: &Client,
    sequencer_batch: u32,
    round: usize,
) -> (Duration, Duration) {
    let (suffix, sequencer_time) = rename_and_number(pool, tenancy, sequencer_batch, round).await;
    let started = Instant::now();
    sync_once(engine, tenancy).await;
    let sync_time = started.elapsed();
    assert_every_rename_arrived(tenant, &suffix).await;
    (sequencer_time, sync_time)
}

/// Renames every user of `tenancy` (the `round`th time) and numbers the renames; returns
/// the suffix the names got and how long the numbering took.
async fn rename_and_number(
    pool: &sqlx::PgPool,
    tenancy: Uuid,
    sequencer_batch: u32,
    round: usize,
) -> (String, Duration) {
    let suffix = format!(" (renamed {round})");
    sqlx::query(
        r#"update "ProjectUser" set "displayName" = "displayName" || $2 where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .bind(&suffix)
    .execute(pool)
    .await
    .unwrap();
    checkpoint(pool).await;
    let sequencer_time = sequence_everything(pool, sequencer_batch).await;
    checkpoint(pool).await;
    (suffix, sequencer_time)
}

async fn assert_every_rename_arrived(tenant: &Client, suffix: &str) {
    let row = tenant
        .query_one(
            "select count(*) filter (where display_name like '%' || $1), count(*) from users",
            &[&suffix],
        )
        .await
        .unwrap();
    let (renamed, users): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(renamed, users, "every rename arrived");
}

/// A round of renames synced by the staged path's two halves one after the other: every
/// staged batch read from the internal database (each in a `REPEATABLE READ` snapshot:
/// its cutoff, then its rows as binary `COPY`) into memory, then every batch written
/// into the tenant database (each in a transaction under the mapping's lock: a staging
/// table, `COPY` into it, the merge that also moves the watermark, the commit), with
/// the statements the staged path sends. Returns how long each half took.
async fn renames_apart(
    pool: &sqlx::PgPool,
    tenancy: Uuid,
    tenant: &Client,
    sequencer_batch: u32,
    staged_batch_size: u32,
    round: usize,
) -> (Duration, Duration) {
    let (suffix, _) = rename_and_number(pool, tenancy, sequencer_batch, round).await;
    let mapping = Mapping::Users;
    let watermark: i64 = tenant
        .query_one(
            "select last_synced_sequence_id from _stack_sync_metadata where mapping_name = $1",
            &[&mapping.name()],
        )
        .await
        .unwrap()
        .get(0);

    let started = Instant::now();
    let mut internal = pool.acquire().await.unwrap();
    let mut batches = Vec::new();
    let mut after = watermark;
    loop {
        sqlx::query("begin isolation level repeatable read, read only")
            .execute(&mut *internal)
            .await
            .unwrap();
        let cutoff =
            db::changes::batch_cutoff(&mut *internal, mapping, tenancy, after, staged_batch_size)
                .await
                .unwrap();
        let Some(cutoff) = cutoff else {
            sqlx::query("rollback")
                .execute(&mut *internal)
                .await
                .unwrap();
            break;
        };
        let copy = db::changes::copy_batch(mapping, tenancy, after, cutoff);
        // Gathered as the staged path gathers what it passes on: about 256 KiB a time.
        let mut chunks = Vec::new();
        let mut chunk = bytes::BytesMut::new();
        let mut rows = internal.copy_out_raw(&copy).await.unwrap();
        while let Some(message) = rows.try_next().await.unwrap() {
            chunk.extend_from_slice(&message);
            if chunk.len() >= 256 * 1024 {
                chunks.push(chunk.split().freeze());
            }
        }
        drop(rows);
        chunks.push(chunk.freeze());
        sqlx::query("commit").execute(&mut *internal).await.unwrap();
        after = cutoff.last_sequence_id;
        batches.push((after, chunks));
    }
    let read_time = started.elapsed();

    let started = Instant::now();
    // The service's own sessions say so to the tables' guard.
    tenant
        .batch_execute("set external_db_sync.writer = on")
        .await
        .unwrap();
    for (through, chunks) in batches {
        tenant
            .batch_execute(&format!(
                "{}; {}",
                statements::begin_and_lock(mapping),
                statements::create_stage(mapping)
            ))
            .await
            .unwrap();
        let sink = tenant
            .copy_in::<_, bytes::Bytes>(statements::copy_into_stage(mapping))
            .await
            .unwrap();
        pin_mut!(sink);
        for chunk in chunks {
            sink.send(chunk).await.unwrap();
        }
        sink.finish().await.unwrap();
        tenant
            .batch_execute(&statements::merge_stage(mapping, through))
            .await
            .unwrap();
        tenant.batch_execute("commit").await.unwrap();
    }
    let write_time = started.elapsed();
    assert_every_rename_arrived(tenant, &suffix).await;
    (read_time, write_time)
}

/// Numbers everything while a loop syncs `tenancy` with `engine`, until the sequencer is
/// done and the tenant database holds all `rows`; returns how long that took.
///
/// The loop syncs again at once after a sync that brought changes, and otherwise waits
/// for the sequencer's next batch, as `serve` syncs a tenancy when a batch of the
/// sequencer queued a request for it: a loop that looked again every few milliseconds
/// would run syncs that the service never runs (about 60 a second, each reading and
/// recording on the internal server beside the sequencer).
async fn sequence_while_syncing(
    pool: &sqlx::PgPool,
    engine: &SyncEngine,
    tenancy: Uuid,
    tenant: &Client,
    rows: i64,
    sequencer_batch: u32,
) -> Duration {
    let numbered = AtomicBool::new(false);
    let batch_committed = Notify::new();
    let started = Instant::now();
    let numbering = async {
        sequence_batches(pool, sequencer_batch, || batch_committed.notify_one()).await;
        numbered.store(true, Ordering::SeqCst);
        batch_committed.notify_one();
    };
    let syncing = async {
        loop {
            let last = numbered.load(Ordering::SeqCst);
            let outcome = sync_tenancy(engine, tenancy).await.unwrap();
            let changed = match &outcome {
                TenancySync::Synced(report) => {
                    report.databases[0]
                        .result
                        .as_ref()
                        .expect("the sync succeeded")
                        .changes()
                        > 0
                }
                _ => false,
            };
            if last {
                break;
            }
            if !changed {
                // A permit stored by a batch committed since is taken at once.
                batch_committed.notified().await;
            }
        }
    };
    tokio::join!(numbering, syncing);
    let elapsed = started.elapsed();
    assert_eq!(
        tenant_rows(tenant).await,
        rows,
        "every user and channel arrived"
    );
    elapsed
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

/// [`import`] without this service's triggers (`capture` is not [`Capture::On`]), into
/// a migrated database of its own.
async fn import_without_capture(
    server: &postgres::Server,
    users: i32,
    capture: Capture,
) -> Duration {
    let url = server.migrated_database().await;
    let pool = postgres::pool(&url).await;
    if capture == Capture::ConstraintsOnly {
        // Every trigger but the foreign keys' (`user` leaves out the internal ones).
        sqlx::raw_sql(
            r#"alter table "ProjectUser" disable trigger user;
               alter table "ContactChannel" disable trigger user"#,
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    // The users' tenancy, which the foreign keys look for (without databases: nothing is
    // queued).
    let tenancy = Uuid::new_v4();
    sqlx::query(
        r#"insert into "Tenancy" ("id", "projectId", "config") values ($1, 'bench', '{}')"#,
    )
    .bind(tenancy)
    .execute(&pool)
    .await
    .unwrap();
    checkpoint(&pool).await;
    let time = import(&pool, tenancy, users, capture).await;
    pool.close().await;
    time
}

/// Whether the import runs through this service's change-capture triggers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    On,
    /// Every trigger off for the import's session (`session_replication_role = replica`),
    /// as an application without this service would write.
    Off,
    /// This service's triggers disabled on the tables; the foreign keys still checked.
    ConstraintsOnly,
}

/// `users` users with one primary e-mail each, inserted as the application would: one
/// statement per table, through the change-capture triggers unless `capture` is off.
async fn import(pool: &sqlx::PgPool, tenancy: Uuid, users: i32, capture: Capture) -> Duration {
    let mut connection = pool.acquire().await.unwrap();
    if capture == Capture::Off {
        sqlx::query("set session_replication_role = replica")
            .execute(&mut *connection)
            .await
            .unwrap();
    }
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
    .execute(&mut *connection)
    .await
    .unwrap();
    let elapsed = started.elapsed();
    if capture == Capture::Off {
        // Not handed back to the pool with the triggers off.
        connection.close().await.unwrap();
    }
    elapsed
}

/// Runs sequencer batches until nothing is left to number; returns how long it took.
async fn sequence_everything(pool: &sqlx::PgPool, batch_size: u32) -> Duration {
    sequence_batches(pool, batch_size, || {}).await
}

/// Numbers everything in batches of `batch_size`, calling `after_batch` after each one
/// committed; returns how long that took.
async fn sequence_batches(
    pool: &sqlx::PgPool,
    batch_size: u32,
    after_batch: impl Fn(),
) -> Duration {
    let settings = SequencerSettings {
        batch_size,
        idle_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let started = Instant::now();
    loop {
        let run = sequencer::run_once(pool, &settings).await.unwrap();
        after_batch();
        if run.outcome(settings.batch_size) == Outcome::Idle {
            break;
        }
    }
    started.elapsed()
}

fn engine(pool: &sqlx::PgPool, batch_size: u32, staged_batch_size: u32) -> SyncEngine {
    let options = pool.connect_options();
    let internal = InternalDatabase {
        host: options.get_host().to_owned(),
        port: options.get_port(),
        dbname: options.get_database().unwrap_or_default().to_owned(),
    };
    let settings = SyncSettings {
        batch_size,
        staged_batch_size,
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

/// The `COPY` limit once: `tenancy`'s rows, read from the internal database at
/// `internal_url` into memory, then copied into a new empty database of `server` in the
/// external tables' shape, by a process of its own, so that the rows it holds stay out
/// of this process's peak RSS. Returns how long the `COPY` took.
async fn copy_limit(server: &postgres::Server, internal_url: &str, tenancy: Uuid) -> Duration {
    let target_url = server.empty_database("bench_copy").await;
    let output = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env_remove(CHILD)
        .env(COPY_CHILD, format!("{internal_url} {tenancy} {target_url}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("running the COPY limit");
    assert!(output.status.success(), "the COPY limit failed");
    let seconds: f64 = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("the COPY limit prints its time in seconds");
    Duration::from_secs_f64(seconds)
}

/// The process [`copy_limit`] starts: prints the time of the `COPY`, in seconds.
async fn copy_limit_alone(arguments: &str) {
    let [internal_url, tenancy, target_url] = arguments.split(' ').collect::<Vec<_>>()[..] else {
        panic!("{COPY_CHILD}: the internal URL, the tenancy and the target URL");
    };
    let pool = postgres::pool(internal_url).await;
    let (users, channels) = read_rows(&pool, tenancy.parse().unwrap()).await;
    pool.close().await;
    let time = copy_baseline(target_url, &users, &channels).await;
    println!("{}", time.as_secs_f64());
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
