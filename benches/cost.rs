//! What one synced change costs, beside what the change itself costs and beside native
//! logical replication: the comparison of issue 27. The internal database is the
//! platform's primary, so every CPU-millisecond the sync spends there is taken from the
//! application; this benchmark puts a number on it.
//!
//! Two durable PostgreSQL servers (fsync on): a source, standing in for the internal
//! database, and a target for the tenants' databases. The same writer runs in five modes,
//! each on fresh databases:
//! 1. **writer alone**: the same tables and indexes, change capture off (the writer's
//!    sessions set `session_replication_role = replica`), nothing replicating;
//! 2. **native logical replication, one subscription** for every tenancy;
//! 3. **native logical replication, one subscription per tenancy**, each from a
//!    publication with a row filter on `"tenancyId"`, into a database of its own;
//! 4. **this service**: `serve` as a process of its own, one tenant database per tenancy,
//!    the writer with the change-capture triggers on;
//! 5. **the contract's floor**: the same, with the poller switched off (the fusebox) once
//!    the tenant databases are filled: the change-capture triggers and the sequencer's
//!    numbering and queuing, which DESIGN.md's data model requires whatever the sync
//!    does, and nothing else (the switched-off poller still answers each queue
//!    notification with a claim that takes nothing and a read of the fusebox: a little
//!    above the floor).
//!
//! The writer: 4 connections renaming random users at `BENCH_RATE` changes/s together,
//! plus a probe that renames a dedicated user every 50 ms (round-robin over tenancies) and
//! times commit → visible: a trigger on the target table sends `pg_notify` when a probe's
//! name arrives, and the benchmark listens, so arrival is seen without polling.
//!
//! CPU is counted per process from `/proc/<pid>/stat` over the measured window: each
//! server's postmaster with its children (children that exit are counted through the
//! postmaster's `cutime`/`cstime` once reaped), `serve`, and this process (the writer,
//! the probe and its listeners). Per-change figures are per change the writer made, so a
//! mode whose writer fell behind its rate is not flattered. For `serve` it also counts
//! task switches (its threads switched off their core, waiting or preempted, from
//! `/proc/<pid>/task/*/status`): a process that moves small messages spends its CPU
//! mostly on those waits and wake-ups. Each server's CPU is also split by the kind of
//! process that spent it, told by the title PostgreSQL gives each one: the writer's
//! sessions (the application's write and the capture triggers it fires), the service's
//! sessions, autovacuum (with any other process that ended in the window), and the
//! server's background processes (the WAL writer, the checkpointer, WAL senders…). The
//! writer's connections stay open until after the last reading, so their sessions are
//! counted as theirs.
//!
//! Run: `cargo bench --bench cost`. Settings: `BENCH_TENANCIES` (default 50, 20 users
//! each), `BENCH_RATE` (default 400), `BENCH_SECONDS` (default 20). `BENCH_BASELINE`, the
//! path of another build's binary (an earlier commit's `target/release/external-db-sync`),
//! runs the service's mode `BENCH_PAIRS` (default 2) times with each build, alternately
//! (baseline first), so that a change is measured before and after in one run on the
//! same servers; the baseline's databases are migrated by the baseline itself, so a
//! change to the migrations compares too. The service's own
//! variables (`POLLER_*`, `SEQUENCER_*`, `SYNC_*`, `DATABASE_MAX_CONNECTIONS`) and
//! `TOKIO_WORKER_THREADS` pass through to `serve`. `BENCH_STATEMENTS=1` also prints,
//! for each of the service's modes, its costliest statements on each server in the
//! window (calls, and execution plus planning time per change, by that time; planning is
//! counted, `pg_stat_statements.track_planning`, only in such runs), to see where a
//! lever should aim; `BENCH_STATEMENTS=nested` adds the statements run inside functions
//! (`pg_stat_statements.track = all`), marked as such, their time also counted in the
//! statement that called them (statements per change still count top-level statements
//! only). `BENCH_EXPLAIN=<ms>`: the source explains each of the service's statements
//! that runs at least that many whole milliseconds (0: every one), nested ones included,
//! with actual times and buffers (`auto_explain`), as warnings in `serve`'s log; the
//! timing costs the source CPU, so such a run's figures compare with no other.
//! `BENCH_NATIVE=0` leaves out the two native modes (quicker, when only builds of the
//! service are compared). The benchmark starts its own clusters, so
//! `EXTERNAL_DB_SYNC_TEST_DATABASE_URL` must not be set.

#[allow(dead_code)]
#[path = "../tests/integration/harness/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use external_db_sync::db::fusebox;
use harness::app::CRON_SECRET;
use harness::{binary, postgres, wait};
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::Child;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Users per tenancy; the first is the probe's and the writer never touches it.
const USERS_PER_TENANCY: i32 = 20;
const WRITER_CONNECTIONS: u64 = 4;
const PROBE_EVERY: Duration = Duration::from_millis(50);
const SETTLE: Duration = Duration::from_secs(2);
/// The longest a set-up step (a subscription's copy, the initial sync) may take.
const SET_UP_LIMIT: Duration = Duration::from_secs(600);
/// The role of every connection the benchmark opens. The service (and the subscriptions)
/// connect as `postgres`, so the `pg_stat_statements` rows of `postgres` in the measured
/// window are the service's statements alone: the writer's are not subtracted, they are
/// never counted.
const BENCH_ROLE: &str = "bench";
const SERVICE_ROLE: &str = "postgres";
const PROBE_CHANNEL: &str = "bench_probe";
const RENAME: &str = r#"update "ProjectUser" set "displayName" = $1
                        where "tenancyId" = $2 and "projectUserId" = $3"#;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    WriterAlone,
    NativeOne,
    NativePerTenancy,
    /// `serve` with its poller switched off: capture and sequencing only.
    ContractFloor,
    /// `serve` of this build, or of the `BENCH_BASELINE` build.
    Service {
        baseline: bool,
    },
}

impl Mode {
    /// Whether `serve` runs, and with it the change-capture triggers in the writer.
    fn runs_serve(self) -> bool {
        matches!(self, Mode::Service { .. } | Mode::ContractFloor)
    }

    fn label(self) -> &'static str {
        match self {
            Mode::WriterAlone => "writer alone",
            Mode::NativeOne => "native LR, one subscription",
            Mode::NativePerTenancy => "native LR, subscription per tenancy",
            Mode::ContractFloor => "capture + sequencer only (the contract's floor)",
            Mode::Service { baseline: false } => "this service (serve)",
            Mode::Service { baseline: true } => "baseline build (serve)",
        }
    }
}

#[tokio::main]
async fn main() {
    let tenancy_count = setting("BENCH_TENANCIES", 50) as usize;
    let rate = setting("BENCH_RATE", 400);
    let seconds = setting("BENCH_SECONDS", 20);
    assert!(
        std::env::var("EXTERNAL_DB_SYNC_TEST_DATABASE_URL").is_err(),
        "the cost benchmark starts its own two servers: unset EXTERNAL_DB_SYNC_TEST_DATABASE_URL"
    );
    println!(
        "cost benchmark: {tenancy_count} tenancies × {USERS_PER_TENANCY} users (one primary \
         e-mail each; one user per tenancy is the probe's), {WRITER_CONNECTIONS} writer \
         connections at {rate} changes/s together for {seconds} s, a probe every {} ms; two \
         durable servers (fsync on); {} cores",
        PROBE_EVERY.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    let source = Cluster::start(tenancy_count).await;
    let target = Cluster::start(tenancy_count).await;
    if let Ok(milliseconds) = std::env::var("BENCH_EXPLAIN") {
        let milliseconds: u64 = (milliseconds.parse()).expect("BENCH_EXPLAIN: whole milliseconds");
        // For every later session of the service's role on the source: serve's.
        source
            .server
            .admin_execute(&format!(
                "alter role {SERVICE_ROLE} set session_preload_libraries = 'auto_explain';
                 alter role {SERVICE_ROLE} set auto_explain.log_min_duration = '{milliseconds}ms';
                 alter role {SERVICE_ROLE} set auto_explain.log_nested_statements = on;
                 alter role {SERVICE_ROLE} set auto_explain.log_analyze = on;
                 alter role {SERVICE_ROLE} set auto_explain.log_buffers = on;
                 alter role {SERVICE_ROLE} set auto_explain.log_level = 'warning';"
            ))
            .await;
    }
    let mut modes = match setting("BENCH_NATIVE", 1) {
        0 => vec![Mode::WriterAlone, Mode::ContractFloor],
        _ => vec![
            Mode::WriterAlone,
            Mode::NativeOne,
            Mode::NativePerTenancy,
            Mode::ContractFloor,
        ],
    };
    match baseline_binary() {
        Some(baseline) => {
            println!("baseline build: {}", baseline.display());
            for _ in 0..setting("BENCH_PAIRS", 2) {
                modes.push(Mode::Service { baseline: true });
                modes.push(Mode::Service { baseline: false });
            }
        }
        None => modes.push(Mode::Service { baseline: false }),
    }
    let mut outcomes = Vec::new();
    for mode in modes {
        let setting_up = Instant::now();
        let setup = arrange(mode, tenancy_count, &source, &target).await;
        let took = setting_up.elapsed().as_secs_f64();
        println!("{}: set up in {took:.1} s; measuring", mode.label());
        outcomes.push(measure(mode, &setup, rate, seconds, &source, &target).await);
        tear_down(setup.teardown).await;
    }
    let took = started.elapsed().as_secs_f64();
    println!("all modes done in {took:.0} s\n");
    print_report(&outcomes);
}

// ---------------------------------------------------------------------------------------
// The two servers

/// One of the two servers: the harness's handle, its data directory (for the
/// postmaster's pid), and a connection for reading `pg_stat_statements`.
struct Cluster {
    server: postgres::Server,
    data: PathBuf,
    stats: PgPool,
}

impl Cluster {
    /// A durable cluster of its own. Both get the same settings: logical decoding, and
    /// slots, senders and workers for a subscription per tenancy with up to two
    /// table-sync workers each (on a subscriber `max_replication_slots` bounds the
    /// replication origins).
    async fn start(tenancies: usize) -> Cluster {
        let mut setup = postgres::ClusterSetup::durable();
        let workers = 3 * tenancies + 20;
        setup.settings.extend([
            ("max_connections", (400 + 6 * tenancies).to_string()),
            ("shared_preload_libraries", "pg_stat_statements".to_owned()),
            // Room for every (role, database, statement) of many tenant databases, so
            // that no entry counted is evicted during the window.
            ("pg_stat_statements.max", "20000".to_owned()),
            ("pg_stat_statements.track", statement_tracking().to_owned()),
            // Planning is CPU too, and not in the execution time: counted when the
            // statements are shown (a prepared statement may be planned at each call).
            (
                "pg_stat_statements.track_planning",
                std::env::var_os("BENCH_STATEMENTS").is_some().to_string(),
            ),
            ("wal_level", "logical".to_owned()),
            ("max_wal_senders", workers.to_string()),
            ("max_replication_slots", workers.to_string()),
            ("max_logical_replication_workers", workers.to_string()),
            ("max_worker_processes", (workers + 20).to_string()),
        ]);
        let server = postgres::start_server(setup);
        let data = (server.socket_directory.clone())
            .expect("a cluster of the harness's own has a directory")
            .join("data");
        server
            .admin_execute(&format!(
                "create role {BENCH_ROLE} login superuser; create extension pg_stat_statements;"
            ))
            .await;
        let stats = bench_pool(&server.url("postgres")).await;
        Cluster {
            server,
            data,
            stats,
        }
    }

    /// CPU seconds of the server so far, by the kind of process that spent them: the
    /// postmaster's own and its reaped children's, and those of its children still alive.
    fn cpu_by_process(&self) -> ServerCpu {
        let lock = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("the server is running: postmaster.pid");
        let postmaster: u32 = (lock.lines().next())
            .and_then(|line| line.trim().parse().ok())
            .expect("postmaster.pid starts with the postmaster's pid");
        let (_, own, reaped) = proc_stat(postmaster).expect("the postmaster is alive");
        let mut cpu = ServerCpu {
            ended: ticks_to_seconds(reaped),
            background: ticks_to_seconds(own),
            ..ServerCpu::default()
        };
        let processes = std::fs::read_dir("/proc").expect("a /proc file system");
        for entry in processes.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((ppid, ticks, _)) = proc_stat(pid) else {
                continue;
            };
            if ppid != postmaster {
                continue;
            }
            let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let seconds = ticks_to_seconds(ticks);
            *cpu.kind(&String::from_utf8_lossy(&title)) += seconds;
        }
        cpu
    }

    /// Statements the service's role has run on this server so far, over all its
    /// databases: all of them (utility statements included), and of those the
    /// transaction control (`begin`, `commit`, `rollback`).
    async fn service_calls(&self) -> (f64, f64) {
        let (all, control): (i64, i64) = sqlx::query_as(
            r#"select coalesce(sum(s.calls), 0)::bigint,
                      coalesce(sum(s.calls) filter (
                          where s.query ~* '^\s*(begin|commit|rollback|start transaction)'), 0)::bigint
               from pg_stat_statements s join pg_roles r on r.oid = s.userid
               where r.rolname = $1 and s.toplevel"#,
        )
        .bind(SERVICE_ROLE)
        .fetch_one(&self.stats)
        .await
        .expect("reading pg_stat_statements");
        (all as f64, control as f64)
    }

    /// Each statement of the service's role so far, by its first words (one statement
    /// has a query id per database). Read only with `BENCH_STATEMENTS`.
    async fn service_statements(&self) -> HashMap<String, StatementUse> {
        if std::env::var_os("BENCH_STATEMENTS").is_none() {
            return HashMap::new();
        }
        let rows: Vec<(i64, f64, f64, String)> = sqlx::query_as(
            r#"select s.calls, s.total_exec_time, s.total_plan_time,
                      case when s.toplevel then '' else '(nested) ' end
                      || left(regexp_replace(s.query, '\s+', ' ', 'g'), 90)
               from pg_stat_statements s join pg_roles r on r.oid = s.userid
               where r.rolname = $1"#,
        )
        .bind(SERVICE_ROLE)
        .fetch_all(&self.stats)
        .await
        .expect("reading pg_stat_statements");
        let mut statements: HashMap<String, StatementUse> = HashMap::new();
        for (calls, executing, planning, query) in rows {
            let entry = statements.entry(query).or_default();
            entry.calls += calls as f64;
            entry.executing += executing;
            entry.planning += planning;
        }
        statements
    }
}

/// What one statement cost a server: its calls, and the milliseconds spent executing
/// and planning it.
#[derive(Debug, Default, Clone, Copy)]
struct StatementUse {
    calls: f64,
    executing: f64,
    planning: f64,
}

impl StatementUse {
    fn minus(self, before: StatementUse) -> StatementUse {
        StatementUse {
            calls: self.calls - before.calls,
            executing: self.executing - before.executing,
            planning: self.planning - before.planning,
        }
    }

    fn milliseconds(&self) -> f64 {
        self.executing + self.planning
    }
}

/// From `/proc/<pid>/stat`: the parent's pid, the process's own CPU ticks (user and
/// system) and those of its children it has reaped; `None` when the process is gone.
/// After the command (in parentheses, free to hold spaces) come the fields from 3
/// (state) on: ppid is field 4, utime, stime, cutime and cstime are fields 14 to 17.
fn proc_stat(pid: impl std::fmt::Display) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
    let ppid = field(4)? as u32;
    Some((ppid, field(14)? + field(15)?, field(16)? + field(17)?))
}

/// A server's CPU seconds by the kind of process that spent them, told by the title
/// PostgreSQL gives each process (`postgres: <role> <database> <client> <state>` for a
/// session).
#[derive(Debug, Clone, Copy, Default)]
struct ServerCpu {
    /// Sessions of the service's role (`serve`'s, and the benchmark's few reads of
    /// `pg_stat_statements`).
    service: f64,
    /// Sessions of the benchmark's role: the writers and the probe.
    writer: f64,
    /// Autovacuum workers still running.
    autovacuum: f64,
    /// Processes that ended (their CPU is the postmaster's reaped children's): mostly
    /// autovacuum workers, which end after each table they visit.
    ended: f64,
    /// Every other process: the postmaster, the WAL writer, the checkpointer, the
    /// background writer, the launchers, WAL senders and apply workers.
    background: f64,
}

impl ServerCpu {
    fn total(&self) -> f64 {
        self.service + self.writer + self.autovacuum + self.ended + self.background
    }

    /// Where the CPU of a process titled `title` is counted.
    fn kind(&mut self, title: &str) -> &mut f64 {
        let mut words = title
            .strip_prefix("postgres: ")
            .unwrap_or(title)
            .split_whitespace();
        match words.next() {
            Some(SERVICE_ROLE) => &mut self.service,
            Some(BENCH_ROLE) => &mut self.writer,
            Some("autovacuum") if words.next() == Some("worker") => &mut self.autovacuum,
            _ => &mut self.background,
        }
    }

    fn minus(self, before: ServerCpu) -> ServerCpu {
        ServerCpu {
            service: self.service - before.service,
            writer: self.writer - before.writer,
            autovacuum: self.autovacuum - before.autovacuum,
            ended: self.ended - before.ended,
            background: self.background - before.background,
        }
    }
}

/// How many times a process's threads have been switched off their core so far,
/// waiting (voluntary) or preempted, summed over its threads alive now: each wait for a
/// socket, a lock or a task costs a switch and a wake-up, the kernel's share of a
/// process that moves small messages. `None` when the process is gone.
fn task_switches(pid: u32) -> Option<u64> {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let switches = (threads.flatten())
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("status")).ok())
        .flat_map(|status| {
            (status.lines())
                .filter_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.ends_with("ctxt_switches")
                        .then(|| value.trim().parse::<u64>().ok())?
                })
                .collect::<Vec<_>>()
        })
        .sum();
    Some(switches)
}

/// A process's own CPU seconds so far (not its children's).
fn own_cpu_seconds(pid: impl std::fmt::Display) -> Option<f64> {
    proc_stat(pid).map(|(_, own, _)| ticks_to_seconds(own))
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(per_second > 0, "sysconf(_SC_CLK_TCK) answered {per_second}");
    ticks as f64 / per_second as f64
}

/// `url` with the benchmark's role instead of the superuser the harness names.
fn as_bench(url: &str) -> String {
    let mut url = url::Url::parse(url).expect("the harness gives URLs");
    url.set_username(BENCH_ROLE).expect("a URL with a host");
    url.to_string()
}

fn database_name(url: &str) -> String {
    let url = url::Url::parse(url).expect("the harness gives URLs");
    url.path().trim_start_matches('/').to_owned()
}

/// A `libpq` connection string for a subscription to the database of `url`.
fn conninfo(url: &str) -> String {
    let port = url::Url::parse(url).ok().and_then(|url| url.port());
    let (port, database) = (port.expect("a port in the URL"), database_name(url));
    format!("host=127.0.0.1 port={port} dbname={database} user={SERVICE_ROLE}")
}

/// A small pool on the database of `url`, as the benchmark's role.
async fn bench_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&as_bench(url))
        .await
        .unwrap_or_else(|error| panic!("connecting to {}: {error}", database_name(url)))
}

/// Runs `statements` on a connection of its own (`create subscription` may not run in a
/// transaction, nor through a pool that might have one open).
async fn execute_on(url: &str, statements: &str) {
    let mut connection = PgConnection::connect(&as_bench(url))
        .await
        .unwrap_or_else(|error| panic!("connecting to {}: {error}", database_name(url)));
    sqlx::raw_sql(statements)
        .execute(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("{statements}: {error}"));
    connection.close().await.ok();
}

// ---------------------------------------------------------------------------------------
// Setting up each mode

/// A tenancy of the workload: its probe user and the users the writer renames.
struct Tenancy {
    id: Uuid,
    probe_user: Uuid,
    users: Vec<Uuid>,
}

/// What a mode set up: where the writer writes, where probes arrive, what to take down.
struct Setup {
    source_url: String,
    tenancies: Vec<Tenancy>,
    /// Databases whose probe trigger announces arrivals (none for the writer alone).
    probe_targets: Vec<String>,
    teardown: Teardown,
}

enum Teardown {
    /// Subscriptions as (subscriber database URL, subscription name).
    Subscriptions(Vec<(String, String)>),
    Serve(Child),
}

/// Fresh databases for `mode` on both servers, filled, replicating and caught up.
async fn arrange(mode: Mode, tenancy_count: usize, source: &Cluster, target: &Cluster) -> Setup {
    let source_url = match mode {
        // The baseline's own migrations: a build refuses a schema that has migrations
        // it does not know, and a lever may be one (a trigger's function).
        Mode::Service { baseline: true } => {
            let url = source.server.empty_database("bench_source").await;
            migrate_with_baseline(&url).await;
            url
        }
        _ => source.server.migrated_database().await,
    };
    let pool = bench_pool(&source_url).await;
    let mut tenancies = Vec::with_capacity(tenancy_count);
    let mut tenant_urls = Vec::new();
    for _ in 0..tenancy_count {
        let mut config = serde_json::json!({});
        if mode.runs_serve() {
            let url = target.server.empty_database("bench_tenant").await;
            config = serde_json::json!({ "dbSync": { "externalDatabases": {
                "main": { "type": "postgres", "connectionString": url } } } });
            tenant_urls.push(url);
        }
        tenancies.push(seed_tenancy(&pool, config).await);
    }
    pool.close().await;
    let (probe_targets, teardown) = match mode {
        Mode::WriterAlone => (Vec::new(), Teardown::Subscriptions(Vec::new())),
        Mode::NativeOne => {
            let publication = r#"create publication bench_all
                                 for table "ProjectUser", "ContactChannel""#;
            execute_on(&source_url, publication).await;
            let subscriptions = vec![subscribe(&source_url, target, "bench_all").await];
            let urls = subscriptions.iter().map(|(url, _)| url);
            wait_in_each(urls, "the subscriptions", REPLICATING).await;
            let targets = subscriptions.iter().map(|(url, _)| url.clone()).collect();
            (targets, Teardown::Subscriptions(subscriptions))
        }
        Mode::NativePerTenancy => {
            let mut subscriptions = Vec::new();
            for (n, tenancy) in tenancies.iter().enumerate() {
                // DDL takes no parameters; the filter's value is a formatted `Uuid`.
                let filter = format!(r#"where ("tenancyId" = '{}')"#, tenancy.id);
                let publication = format!("bench_tenancy_{n}");
                let create = format!(
                    r#"create publication {publication}
                       for table "ProjectUser" {filter}, "ContactChannel" {filter}"#
                );
                execute_on(&source_url, &create).await;
                subscriptions.push(subscribe(&source_url, target, &publication).await);
            }
            let urls = subscriptions.iter().map(|(url, _)| url);
            wait_in_each(urls, "the subscriptions", REPLICATING).await;
            let targets = subscriptions.iter().map(|(url, _)| url.clone()).collect();
            (targets, Teardown::Subscriptions(subscriptions))
        }
        Mode::Service { .. } | Mode::ContractFloor => {
            let baseline = matches!(mode, Mode::Service { baseline: true });
            let child = start_serve(&source_url, baseline).await;
            // Every user of the tenancy in its database, with its primary e-mail.
            let synced = format!(
                "select count(*) = {USERS_PER_TENANCY} from users where primary_email is not null"
            );
            wait_in_each(&tenant_urls, "the initial sync", &synced).await;
            if mode == Mode::ContractFloor {
                let pool = bench_pool(&source_url).await;
                let switched = fusebox::write(&pool, None, Some(false)).await;
                assert!(!switched.expect("switching the poller off").poller_enabled);
                pool.close().await;
                (Vec::new(), Teardown::Serve(child))
            } else {
                for url in &tenant_urls {
                    add_probe_trigger(url, "users", "display_name", false).await;
                }
                (tenant_urls, Teardown::Serve(child))
            }
        }
    };
    // The statistics of a database in service. Without them the planner scans the
    // freshly filled tables whole (each sequencer batch read every user twice) until
    // autovacuum's first analyze, which came a minute or so into a run, so in the
    // middle of one mode or another.
    execute_on(&source_url, "analyze").await;
    for url in &probe_targets {
        execute_on(url, "analyze").await;
    }
    Setup {
        source_url,
        tenancies,
        probe_targets,
        teardown,
    }
}

/// A tenancy with its users, each with one primary e-mail.
async fn seed_tenancy(pool: &PgPool, config: serde_json::Value) -> Tenancy {
    let id = Uuid::new_v4();
    sqlx::query(r#"insert into "Tenancy" ("id", "projectId", "config") values ($1, 'bench', $2)"#)
        .bind(id)
        .bind(config)
        .execute(pool)
        .await
        .expect("inserting a tenancy");
    let mut users: Vec<Uuid> = sqlx::query_scalar(
        r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
           select $1, gen_random_uuid(), 'user ' || n from generate_series(1, $2) n
           returning "projectUserId""#,
    )
    .bind(id)
    .bind(USERS_PER_TENANCY)
    .fetch_all(pool)
    .await
    .expect("inserting users");
    sqlx::query(
        r#"insert into "ContactChannel"
               ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth", "value")
           select $1, u, gen_random_uuid(), 'EMAIL', true, true, u::text || '@example.com'
           from unnest($2::uuid[]) u"#,
    )
    .bind(id)
    .bind(&users)
    .execute(pool)
    .await
    .expect("inserting contact channels");
    let probe_user = users.remove(0);
    Tenancy {
        id,
        probe_user,
        users,
    }
}

/// A migrated database on the target (the source's tables, whose triggers and foreign
/// keys do not fire under the apply worker's `session_replication_role = replica`),
/// subscribed to `publication` with `copy_data`: returns its URL and the subscription.
/// The slot is made by `create subscription` on the source: the two are separate servers.
async fn subscribe(source_url: &str, target: &Cluster, publication: &str) -> (String, String) {
    let url = target.server.migrated_database().await;
    add_probe_trigger(&url, r#""ProjectUser""#, r#""displayName""#, true).await;
    let connection = conninfo(source_url);
    let create = format!(
        "create subscription {publication} connection '{connection}' \
         publication {publication} with (copy_data = true)"
    );
    execute_on(&url, &create).await;
    (url, publication.to_owned())
}

/// Waits until `done` (a query answering a boolean) holds in the database of each URL.
async fn wait_in_each(urls: impl IntoIterator<Item = &String>, what: &str, done: &str) {
    for url in urls {
        let pool = bench_pool(url).await;
        wait::until(what, SET_UP_LIMIT, || async {
            let answer = sqlx::query_scalar::<_, bool>(done).fetch_one(&pool).await;
            answer.unwrap_or(false).then_some(())
        })
        .await;
        pool.close().await;
    }
}

/// Both tables of a subscription copied and streaming.
const REPLICATING: &str =
    "select count(*) = 2 and bool_and(srsubstate = 'r') from pg_subscription_rel";

/// Announces on [`PROBE_CHANNEL`] each row of `table` whose `column` arrives holding a
/// probe's name. The apply worker of native replication runs as a replica, so there the
/// trigger must be enabled `always`.
async fn add_probe_trigger(url: &str, table: &str, column: &str, always: bool) {
    let enable = match always {
        true => format!("alter table {table} enable always trigger bench_probe;"),
        false => String::new(),
    };
    let statements = format!(
        r#"create function bench_probe_arrived() returns trigger language plpgsql as $$
           begin
               perform pg_notify('{PROBE_CHANNEL}', new.{column});
               return null;
           end $$;
           create trigger bench_probe after insert or update on {table} for each row
               when (new.{column} like 'probe %') execute function bench_probe_arrived();
           {enable}"#
    );
    execute_on(url, &statements).await;
}

/// `serve` on a free loopback port, as the tests start it, with the service's tuning
/// variables passed through; returns once it answers `/healthz`.
/// The binary named by `BENCH_BASELINE`, if set; it must exist.
fn baseline_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("BENCH_BASELINE")?);
    assert!(
        path.is_file(),
        "BENCH_BASELINE: no file at {}",
        path.display()
    );
    Some(path)
}

/// Applies the `BENCH_BASELINE` build's migrations to the database at `url`.
async fn migrate_with_baseline(url: &str) {
    let binary = baseline_binary().expect("the baseline's mode runs only with BENCH_BASELINE");
    let output = tokio::process::Command::new(&binary)
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running the baseline's migrate");
    assert!(
        output.status.success(),
        "{} migrate: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn start_serve(source_url: &str, baseline: bool) -> Child {
    let address = binary::free_address();
    let log = std::env::temp_dir().join(format!("cost-serve-{}.log", std::process::id()));
    let tuning = std::env::vars().filter(|(name, _)| {
        ["POLLER_", "SEQUENCER_", "SYNC_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || name == "DATABASE_MAX_CONNECTIONS"
            || name == "TOKIO_WORKER_THREADS"
    });
    let binary = match baseline {
        true => baseline_binary().expect("the baseline's mode runs only with BENCH_BASELINE"),
        false => PathBuf::from(env!("CARGO_BIN_EXE_external-db-sync")),
    };
    let mut child = tokio::process::Command::new(binary)
        .arg("serve")
        .env_clear()
        .envs(tuning)
        .env("DATABASE_URL", source_url)
        .env("CRON_SECRET", CRON_SECRET)
        .env("BIND_ADDR", &address)
        .env("ALLOW_PRIVATE_TARGETS", "true")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("creating serve's log"))
        .kill_on_drop(true)
        .spawn()
        .expect("starting serve");
    println!("serve's log: {}", log.display());
    binary::wait_until_healthy(&address, &mut child).await;
    child
}

/// Stops `serve` (SIGTERM, SIGKILL after 10 s) or drops the subscriptions and with them
/// their slots on the source, so that nothing of this mode costs CPU in the next.
async fn tear_down(teardown: Teardown) {
    match teardown {
        Teardown::Subscriptions(subscriptions) => {
            for (url, name) in subscriptions {
                execute_on(&url, &format!("drop subscription {name}")).await;
            }
        }
        Teardown::Serve(mut child) => {
            if let Some(pid) = child.id() {
                // SAFETY: a signal to the child this benchmark started and still holds.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            let stopped = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            if stopped.is_err() {
                child.kill().await.ok();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measuring

/// CPU seconds of each process and the service's statement counts at one instant, or
/// (from [`Reading::since`]) over a window, whose length is then `wall`.
#[derive(Clone)]
struct Reading {
    wall: f64,
    source: f64,
    /// The source's CPU seconds by kind of process.
    source_by_process: ServerCpu,
    target: f64,
    /// The target's CPU seconds by kind of process (the service's sessions are its
    /// connections to the tenant databases).
    target_by_process: ServerCpu,
    serve: Option<f64>,
    /// `serve`'s task switches (see [`task_switches`]).
    serve_switches: Option<u64>,
    writer: f64,
    /// The service's statements on the source and the target, each as (all, of which
    /// transaction control).
    statements: [(f64, f64); 2],
    /// With `BENCH_STATEMENTS`: each statement of the service on the source and the
    /// target (see [`Cluster::service_statements`]).
    detail: [HashMap<String, StatementUse>; 2],
}

impl Reading {
    async fn take(source: &Cluster, target: &Cluster, serve: Option<u32>) -> Reading {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let statements = [source.service_calls().await, target.service_calls().await];
        let detail = [
            source.service_statements().await,
            target.service_statements().await,
        ];
        let source_cpu = source.cpu_by_process();
        let target_cpu = target.cpu_by_process();
        Reading {
            wall: EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64(),
            source: source_cpu.total(),
            source_by_process: source_cpu,
            target: target_cpu.total(),
            target_by_process: target_cpu,
            serve: serve.and_then(own_cpu_seconds),
            serve_switches: serve.and_then(task_switches),
            writer: own_cpu_seconds("self").expect("reading /proc/self/stat"),
            statements,
            detail,
        }
    }

    fn since(&self, before: &Reading) -> Reading {
        let minus = |(all, control): (f64, f64), (all_before, control_before): (f64, f64)| {
            (all - all_before, control - control_before)
        };
        Reading {
            wall: self.wall - before.wall,
            source: self.source - before.source,
            source_by_process: self.source_by_process.minus(before.source_by_process),
            target: self.target - before.target,
            target_by_process: self.target_by_process.minus(before.target_by_process),
            serve: self.serve.zip(before.serve).map(|(after, b)| after - b),
            serve_switches: (self.serve_switches.zip(before.serve_switches))
                .map(|(after, b)| after.saturating_sub(b)),
            writer: self.writer - before.writer,
            statements: [0, 1].map(|n| minus(self.statements[n], before.statements[n])),
            detail: [0, 1].map(|n| {
                (self.detail[n].iter())
                    .map(|(query, used)| {
                        let before = before.detail[n].get(query).copied().unwrap_or_default();
                        (query.clone(), used.minus(before))
                    })
                    .filter(|(_, used)| used.calls > 0.0)
                    .collect()
            }),
        }
    }
}

/// What one mode measured.
struct Outcome {
    mode: Mode,
    used: Reading,
    changes: u64,
    /// Commit → visible of each probe that arrived, in milliseconds, sorted.
    latencies: Vec<f64>,
    probes_lost: usize,
}

/// Runs the writer and the probe for `seconds` between two readings.
async fn measure(
    mode: Mode,
    setup: &Setup,
    rate: u64,
    seconds: u64,
    source: &Cluster,
    target: &Cluster,
) -> Outcome {
    // Every connection is open before the first reading and stays open past the last;
    // only the service's mode keeps the change-capture triggers on.
    let mut connections = Vec::new();
    for _ in 0..=WRITER_CONNECTIONS {
        connections.push(writer_connection(&setup.source_url, mode.runs_serve()).await);
    }
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for url in &setup.probe_targets {
        listeners.push(listen(url, arrivals.clone()).await);
    }
    let serve = match &setup.teardown {
        Teardown::Serve(child) => child.id(),
        _ => None,
    };
    tokio::time::sleep(SETTLE).await;

    let before = Reading::take(source, target, serve).await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let changes = Arc::new(AtomicU64::new(0));
    let probe_users: Vec<(Uuid, Uuid)> = (setup.tenancies.iter())
        .map(|tenancy| (tenancy.id, tenancy.probe_user))
        .collect();
    let probe_connection = connections.pop().expect("one connection more than writers");
    let probe = tokio::spawn(rename_loop(
        probe_connection,
        PROBE_EVERY,
        deadline,
        changes.clone(),
        move |n, _| {
            let (tenancy, user) = probe_users[n as usize % probe_users.len()];
            (tenancy, user, format!("probe {n}"))
        },
    ));
    let users: Arc<Vec<(Uuid, Uuid)>> = Arc::new(
        (setup.tenancies.iter())
            .flat_map(|tenancy| tenancy.users.iter().map(|user| (tenancy.id, *user)))
            .collect(),
    );
    let period = Duration::from_secs_f64(WRITER_CONNECTIONS as f64 / rate.max(1) as f64);
    let writers: Vec<_> = (connections.into_iter())
        .map(|connection| {
            let users = users.clone();
            let rename = move |_, random: &mut rand::rngs::StdRng| {
                let (tenancy, user) = users[random.random_range(0..users.len())];
                (tenancy, user, format!("name {}", random.random::<u32>()))
            };
            tokio::spawn(rename_loop(
                connection,
                period,
                deadline,
                changes.clone(),
                rename,
            ))
        })
        .collect();
    let (committed, probe_connection) = probe.await.expect("the probe task");
    let mut open = vec![probe_connection];
    for writer in writers {
        open.push(writer.await.expect("a writer task").1);
    }
    let used = Reading::take(source, target, serve).await.since(&before);
    for connection in open {
        connection.close().await.ok();
    }
    let (latencies, probes_lost) = match listeners.is_empty() {
        true => (Vec::new(), 0),
        false => probe_latencies(&committed, &mut arrived).await,
    };
    listeners.iter().for_each(|listener| listener.abort());
    let changes = changes.load(Ordering::Relaxed);
    Outcome {
        mode,
        used,
        changes,
        latencies,
        probes_lost,
    }
}

/// Each committed probe's commit → visible in milliseconds, sorted, and how many probes
/// were not seen; those still on their way get ten seconds more.
async fn probe_latencies(
    committed: &[(u64, Instant)],
    arrived: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
) -> (Vec<f64>, usize) {
    let mut seen: HashMap<u64, Instant> = HashMap::new();
    let grace = Instant::now() + Duration::from_secs(10);
    while committed.iter().any(|(n, _)| !seen.contains_key(n)) && Instant::now() < grace {
        let next = tokio::time::timeout(Duration::from_millis(100), arrived.recv()).await;
        if let Ok(Some((n, at))) = next {
            seen.entry(n).or_insert(at);
        }
    }
    // A notification heard before the probe's commit was acknowledged counts as 0 ms.
    let mut latencies: Vec<f64> = (committed.iter())
        .filter_map(|(n, at)| Some(seen.get(n)?.saturating_duration_since(*at)))
        .map(|latency| latency.as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let lost = committed.len() - latencies.len();
    (latencies, lost)
}

/// A writer's session; without change capture, the triggers do not fire in it.
async fn writer_connection(url: &str, captures_changes: bool) -> PgConnection {
    let mut connection = PgConnection::connect(&as_bench(url))
        .await
        .expect("connecting a writer");
    if !captures_changes {
        sqlx::query("set session_replication_role = replica")
            .execute(&mut connection)
            .await
            .expect("turning the triggers off for the writer");
    }
    connection
}

/// Renames a user every `period` until `deadline` (a tick missed while a rename was slow
/// is skipped, not made up in a burst), `next` choosing the n-th rename's tenancy, user
/// and name. Returns each rename's number with the instant its commit was acknowledged,
/// and the connection, still open: a session that ended would count its server
/// process's CPU with the ended ones.
async fn rename_loop(
    mut connection: PgConnection,
    period: Duration,
    deadline: Instant,
    changes: Arc<AtomicU64>,
    mut next: impl FnMut(u64, &mut rand::rngs::StdRng) -> (Uuid, Uuid, String),
) -> (Vec<(u64, Instant)>, PgConnection) {
    let mut random = rand::rngs::StdRng::from_os_rng();
    let mut committed = Vec::new();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for n in 0u64.. {
        ticker.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        let (tenancy, user, name) = next(n, &mut random);
        let query = sqlx::query(RENAME).bind(name).bind(tenancy).bind(user);
        if query.execute(&mut connection).await.is_ok() {
            committed.push((n, Instant::now()));
            changes.fetch_add(1, Ordering::Relaxed);
        }
    }
    (committed, connection)
}

/// Listens on [`PROBE_CHANNEL`] in the database of `url` and passes on each probe's
/// number with the instant it was heard.
async fn listen(
    url: &str,
    arrivals: mpsc::UnboundedSender<(u64, Instant)>,
) -> tokio::task::JoinHandle<()> {
    let mut listener = PgListener::connect(&as_bench(url))
        .await
        .expect("connecting a probe listener");
    let listening = listener.listen(PROBE_CHANNEL).await;
    listening.expect("listening for probes");
    tokio::spawn(async move {
        while let Ok(notification) = listener.recv().await {
            let heard = Instant::now();
            let payload = notification.payload().strip_prefix("probe ");
            if let Some(number) = payload.and_then(|n| n.parse().ok()) {
                if arrivals.send((number, heard)).is_err() {
                    break;
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// The report

fn print_report(outcomes: &[Outcome]) {
    let alone = (outcomes.iter())
        .find(|outcome| outcome.mode == Mode::WriterAlone)
        .expect("the writer-alone mode ran");
    // The application's own write: the source's CPU per change with nothing replicating.
    // Figures per change (not per second) keep a mode whose writer fell behind from
    // looking cheaper.
    let write_cost = alone.used.source / alone.changes.max(1) as f64;
    let header = "mode|changes/s|source|target|serve|writer|core-ms/change above write|\
                  source extra ÷ write|probe p50 / p99 ms";
    let mut rows = vec![header.split('|').map(str::to_owned).collect::<Vec<_>>()];
    for outcome in outcomes {
        let (used, latencies) = (&outcome.used, &outcome.latencies);
        let changes = outcome.changes.max(1) as f64;
        let cores = |seconds: f64| format!("{:.2}", seconds / used.wall);
        // Source, target and serve per change, less the write itself (the source's CPU
        // per change in the writer-alone mode).
        let all = used.source + used.target + used.serve.unwrap_or(0.0);
        let above = (all / changes - write_cost) * 1000.0;
        let extra = (used.source / changes - write_cost) / write_cost;
        let mut latency = match latencies.is_empty() {
            true => "—".to_owned(),
            false => format!(
                "{:.1} / {:.1}",
                percentile(latencies, 0.50),
                percentile(latencies, 0.99)
            ),
        };
        if outcome.probes_lost > 0 {
            latency.push_str(&format!(" ({} lost)", outcome.probes_lost));
        }
        rows.push(vec![
            outcome.mode.label().to_owned(),
            format!("{:.0}", changes / used.wall),
            cores(used.source),
            cores(used.target),
            used.serve.map_or_else(|| "—".to_owned(), cores),
            cores(used.writer),
            format!("{above:.3}"),
            format!("{extra:.2}×"),
            latency,
        ]);
    }
    println!("CPU in cores: CPU seconds over the wall seconds of the measured window.");
    println!("Source extra: the source's CPU per change beyond the writer-alone mode's,");
    println!("as a multiple of it.\n");
    print_table(&rows);
    // The same per change, in CPU-milliseconds, finer than the cores above: how the
    // README's table states each goal.
    let header = "mode|source above write|target|serve|serve task switches";
    let mut rows = vec![header.split('|').map(str::to_owned).collect::<Vec<_>>()];
    for outcome in outcomes.iter().filter(|outcome| outcome.mode.runs_serve()) {
        let (used, changes) = (&outcome.used, outcome.changes.max(1) as f64);
        let per_change = |seconds: f64| format!("{:.3}", seconds / changes * 1000.0);
        rows.push(vec![
            outcome.mode.label().to_owned(),
            per_change(used.source - write_cost * changes),
            per_change(used.target),
            used.serve.map_or_else(|| "—".to_owned(), per_change),
            (used.serve_switches).map_or_else(
                || "—".to_owned(),
                |switches| format!("{:.1}", switches as f64 / changes),
            ),
        ]);
    }
    println!("\nPer change, CPU-milliseconds (task switches: `serve`'s threads, waiting or preempted):\n");
    print_table(&rows);
    // Which processes of each server spend it: the write's own sessions (the probe's
    // listener, on the target), the service's, and the server's own work that the writes
    // cause (vacuuming the versions they leave, writing the WAL out).
    let header =
        "mode|all|the writer's sessions|the service's sessions|autovacuum and ended processes|\
                  WAL writer, checkpointer and the rest";
    for (server, by_process) in [
        (
            "source",
            (|used: &Reading| used.source_by_process) as fn(&Reading) -> ServerCpu,
        ),
        ("target", |used: &Reading| used.target_by_process),
    ] {
        let mut rows = vec![header.split('|').map(str::to_owned).collect::<Vec<_>>()];
        for outcome in outcomes {
            let (cpu, changes) = (by_process(&outcome.used), outcome.changes.max(1) as f64);
            let per_change = |seconds: f64| format!("{:.3}", seconds / changes * 1000.0);
            rows.push(vec![
                outcome.mode.label().to_owned(),
                per_change(cpu.total()),
                per_change(cpu.writer),
                per_change(cpu.service),
                per_change(cpu.autovacuum + cpu.ended),
                per_change(cpu.background),
            ]);
        }
        println!("\nThe {server}'s CPU per change by process, CPU-milliseconds (a process that ended in the window is counted with the ended ones):\n");
        print_table(&rows);
    }
    for Outcome {
        mode,
        used,
        changes,
        ..
    } in outcomes
    {
        let changes = (*changes).max(1) as f64;
        if mode.runs_serve() {
            let [(source, source_control), (target, target_control)] = used
                .statements
                .map(|(all, control)| (all / changes, control / changes));
            println!(
                "\n{}: {source:.2} statements per change on the source ({source_control:.2} of \
                 them begin/commit/rollback), {target:.2} on the target ({target_control:.2}); \
                 pg_stat_statements, the service's role only; {:.0} changes/s written",
                mode.label(),
                changes / used.wall
            );
            for (server, detail) in ["source", "target"].iter().zip(&used.detail) {
                let mut top: Vec<_> = detail.iter().collect();
                top.sort_by(|a, b| b.1.milliseconds().total_cmp(&a.1.milliseconds()));
                for (query, used) in top.into_iter().take(STATEMENTS_SHOWN) {
                    println!(
                        "  {server}: {:.3} calls, {:.4} ms per change ({:.4} of it planning): \
                         {query}",
                        used.calls / changes,
                        used.milliseconds() / changes,
                        used.planning / changes,
                    );
                }
            }
        }
    }
}

/// `pg_stat_statements.track`: `all` with `BENCH_STATEMENTS=nested`, so that the
/// statements run inside functions are counted too.
fn statement_tracking() -> &'static str {
    match std::env::var("BENCH_STATEMENTS").as_deref() {
        Ok("nested") => "all",
        _ => "top",
    }
}

/// With `BENCH_STATEMENTS`, the statements shown per server and mode.
const STATEMENTS_SHOWN: usize = 12;

/// A markdown table with its columns aligned: the first to the left, the rest right.
fn print_table(rows: &[Vec<String>]) {
    let width = |n: usize| rows.iter().map(|row| row[n].chars().count()).max();
    let widths: Vec<usize> = (0..rows[0].len()).filter_map(width).collect();
    let line = |cells: Vec<String>| println!("| {} |", cells.join(" | "));
    for (index, row) in rows.iter().enumerate() {
        line(
            (row.iter().zip(&widths).enumerate())
                .map(|(n, (cell, &width))| match n {
                    0 => format!("{cell:<width$}"),
                    _ => format!("{cell:>width$}"),
                })
                .collect(),
        );
        if index == 0 {
            line(
                (widths.iter().enumerate())
                    .map(|(n, &width)| match n {
                        0 => "-".repeat(width),
                        _ => format!("{}:", "-".repeat(width - 1)),
                    })
                    .collect(),
            );
        }
    }
}

/// The value below which a share `p` of the `sorted` values lie.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
