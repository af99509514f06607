//! End-to-end latency: `serve` running in `direct` mode (its own sequencer and poller
//! loops, woken by `LISTEN`), a writer committing user changes at a fixed rate spread
//! over many tenancies, and the time from each commit in the internal database to the
//! moment the change is in the tenant's database. Then the idle service's query rate.
//!
//! Visibility is measured inside the tenant databases: a trigger on `users` records
//! when each version arrives, next to the write time the version carries in its
//! metadata. Both clocks are the same server's. A write that is overtaken by a newer one
//! of the same user before a sync counts as visible when the newer one arrives.
//!
//! Scale: `BENCH_QUIET_TENANCIES` more tenancies (default 0), each with
//! `BENCH_QUIET_USERS` users (default 200) and no tenant database, are imported before
//! the service starts. The benchmark prints how long the service took to number that
//! backlog (and how many sync requests it queued for it: none is right), then measures
//! latency and the idle query rate with them in the internal database (after
//! `BENCH_SETTLE_SECONDS` of rest, default 0). While the writer runs it counts the
//! service's statements (from `pg_stat_statements`) and times the sequencer's batches
//! and the poller's claims (from the service's histograms). The scale case of 10,000 tenancies:
//! `BENCH_TENANCIES=100 BENCH_QUIET_TENANCIES=9900`.
//!
//! Run: `cargo bench --bench latency`. Settings: `BENCH_RATE` (changes per second,
//! default 1000), `BENCH_SECONDS` (default 10), `BENCH_TENANCIES` (default 50),
//! `BENCH_DURABLE=0` (no `fsync`, to see what disk flushes cost), `BENCH_STATEMENTS=1`
//! (print the statements that took the servers' time while writing, from
//! `pg_stat_statements`), `BENCH_TAIL=<ms>` (the writes slower than that, by the tenth of
//! a second they were written in and by tenancy). Before measuring, one change per
//! tenancy goes through unmeasured (a warm-up). The service's own variables
//! (`POLLER_*`, `SEQUENCER_*`, `SYNC_*`, `DATABASE_MAX_CONNECTIONS`) pass through from
//! the environment.

#[path = "support/cpu_times.rs"]
mod cpu_times;
#[allow(dead_code)]
#[path = "../tests/integration/harness/postgres.rs"]
mod postgres;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use external_db_sync::config::Env;
use external_db_sync::startup::Application;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cpu_times::CpuTimes;

const USERS_PER_TENANCY: i32 = 20;

/// One change: the write time goes into the user's metadata, to be read back where it
/// arrives.
const WRITE: &str = r#"update "ProjectUser"
    set "serverMetadata" = jsonb_build_object('writtenAt', clock_timestamp())
    where "tenancyId" = $1 and "projectUserId" = $2
    returning ("serverMetadata" ->> 'writtenAt')::timestamptz"#;

/// A version of a user that reached a tenant database: `(written_at, arrived_at)`.
type Arrival = (DateTime<Utc>, DateTime<Utc>);

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let rate = setting("BENCH_RATE", 1000);
    let seconds = setting("BENCH_SECONDS", 10);
    let tenancy_count = setting("BENCH_TENANCIES", 50) as usize;
    println!("latency benchmark: {rate} changes/s for {seconds} s over {tenancy_count} tenancies");

    // BENCH_DURABLE=0 runs without fsync, to see how much of the latency is disk flushes.
    let mut setup = if setting("BENCH_DURABLE", 1) == 0 {
        postgres::ClusterSetup::default()
    } else {
        postgres::ClusterSetup::durable()
    };
    // The service keeps sessions to every tenant database, and the benchmark has a pool
    // for each: a hundred tenancies need more than the harness's 400 connections.
    setup
        .settings
        .push(("max_connections", (400 + 6 * tenancy_count).to_string()));
    // pg_stat_statements counts the service's statements while the writer runs;
    // BENCH_STATEMENTS=1 also prints where the servers' time went, per statement.
    setup
        .settings
        .push(("shared_preload_libraries", "pg_stat_statements".to_owned()));
    let statements = setting("BENCH_STATEMENTS", 0) == 1;
    if statements {
        setup
            .settings
            .push(("pg_stat_statements.track_planning", "on".to_owned()));
    }
    let server = postgres::start_server(setup);
    let internal_url = server.migrated_database().await;
    let pool = postgres::pool(&internal_url).await;

    // Tenancies, their databases, and their users.
    let mut tenants: Vec<(Uuid, PgPool)> = Vec::new();
    let mut users: Vec<(Uuid, Uuid)> = Vec::new();
    for _ in 0..tenancy_count {
        let tenancy = Uuid::new_v4();
        let tenant_url = server.empty_database("bench_tenant").await;
        sqlx::query(
            r#"insert into "Tenancy" ("id", "projectId", "config") values ($1, 'bench', $2)"#,
        )
        .bind(tenancy)
        .bind(serde_json::json!({ "dbSync": { "externalDatabases": {
                "main": { "type": "postgres", "connectionString": tenant_url } } } }))
        .execute(&pool)
        .await
        .unwrap();
        let ids: Vec<Uuid> = sqlx::query_scalar(
            r#"insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
               select $1, gen_random_uuid(), 'user ' || n from generate_series(1, $2) n
               returning "projectUserId""#,
        )
        .bind(tenancy)
        .bind(USERS_PER_TENANCY)
        .fetch_all(&pool)
        .await
        .unwrap();
        users.extend(ids.into_iter().map(|id| (tenancy, id)));
        tenants.push((tenancy, postgres::pool(&tenant_url).await));
    }

    // Quiet tenancies: many users, no tenant database.
    let quiet_tenancies = setting("BENCH_QUIET_TENANCIES", 0);
    let quiet_users = setting("BENCH_QUIET_USERS", 200);
    if quiet_tenancies > 0 {
        let started = Instant::now();
        sqlx::query(
            r#"with tenancies as (
                   insert into "Tenancy" ("id", "projectId")
                   select gen_random_uuid(), 'quiet' from generate_series(1, $1)
                   returning "id")
               insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
               select tenancies."id", gen_random_uuid(), 'quiet user ' || n
               from tenancies, generate_series(1, $2) n"#,
        )
        .bind(quiet_tenancies as i64)
        .bind(quiet_users as i32)
        .execute(&pool)
        .await
        .unwrap();
        // No VACUUM or ANALYZE of their own: the backlog is numbered as autovacuum
        // (with the migrations' settings) lets it be; the tables are analyzed once
        // everything is synced, before the writers start.
        println!(
            "imported {quiet_tenancies} quiet tenancies with {quiet_users} users each in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    // Every sync request queued from now on, logged by a trigger of the benchmark's.
    sqlx::raw_sql(
        r#"create table bench_queued (key text not null);
           create function bench_log_queued() returns trigger language plpgsql as $$
           begin
               insert into bench_queued values (new."deduplicationKey");
               return null;
           end $$;
           create trigger bench_log_queued after insert on "OutgoingRequest"
               for each row execute function bench_log_queued();"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let backlog: i64 =
        sqlx::query_scalar(r#"select count(*) from "ProjectUser" where "shouldUpdateSequenceId""#)
            .fetch_one(&pool)
            .await
            .unwrap();

    // The service, as `serve` runs it.
    // The service's tuning variables (`POLLER_*`, `SEQUENCER_*`, `SYNC_*`,
    // `DATABASE_MAX_CONNECTIONS`) pass through from the environment.
    let mut variables: HashMap<String, String> = std::env::vars()
        .filter(|(name, _)| {
            ["POLLER_", "SEQUENCER_", "SYNC_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                || name == "DATABASE_MAX_CONNECTIONS"
        })
        .collect();
    for (name, value) in [
        ("DATABASE_URL", internal_url.clone()),
        ("CRON_SECRET", "benchmark-cron-secret-0123".to_owned()),
        ("BIND_ADDR", "127.0.0.1:0".to_owned()),
        ("ALLOW_PRIVATE_TARGETS", "true".to_owned()),
    ] {
        variables.insert(name.to_owned(), value);
    }
    let config = Env::from_lookup(move |name| variables.get(name).cloned())
        .config()
        .unwrap();
    let service_pool = external_db_sync::db::connect(&config.database)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let application = Application::build(config, service_pool, shutdown.clone())
        .await
        .unwrap();
    let service = tokio::spawn(application.run());

    // The backlog numbered by the service's sequencer, and the queue it left.
    let started = Instant::now();
    wait_for(Duration::from_secs(1800), || async {
        sqlx::query_scalar::<_, bool>(
            r#"select not exists (select from "ProjectUser" where "shouldUpdateSequenceId")"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(false)
    })
    .await;
    let numbering = started.elapsed();
    let quiet_requests: i64 = sqlx::query_scalar(
        r#"select count(*) from bench_queued as queued
           join "Tenancy" as tenancy on queued.key like '%' || tenancy."id"::text
           where tenancy."projectId" = 'quiet'"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "backlog: {backlog} users numbered in {:.1} s ({:.0} rows/s); sync requests queued \
         for tenancies without databases: {quiet_requests}",
        numbering.as_secs_f64(),
        backlog as f64 / numbering.as_secs_f64().max(0.001)
    );
    // BENCH_SETTLE_SECONDS: a pause after the backlog, for autovacuum to catch up.
    let settle = setting("BENCH_SETTLE_SECONDS", 0);
    if settle > 0 {
        println!("settling for {settle} s");
        tokio::time::sleep(Duration::from_secs(settle)).await;
    }

    // The initial sync, then the arrival log in every tenant database.
    for (_, tenant) in &tenants {
        wait_for(Duration::from_secs(120), || async {
            sqlx::query_scalar::<_, i64>("select count(*) from users")
                .fetch_one(tenant)
                .await
                .is_ok_and(|count| count == i64::from(USERS_PER_TENANCY))
        })
        .await;
        sqlx::raw_sql(ARRIVAL_LOG).execute(tenant).await.unwrap();
    }
    // The statistics of a database in service. Without them the planner scans the
    // freshly filled tables whole (each sequencer batch read every user twice) until
    // autovacuum's first analyze, a minute or so into a run.
    sqlx::raw_sql("analyze").execute(&pool).await.unwrap();
    // One change per tenancy, not measured. Without it the first change of each
    // tenancy after the arrival log's trigger was created (and the analyze) came late:
    // with `BENCH_TAIL`, every write over 60 ms at 400 changes/s was in a run's first
    // half second, over 40 of 50 tenancies, up to 300 ms, and at 1,000 changes/s that
    // half second is 5 % of the writes, p99's whole margin.
    let warming = Instant::now();
    for (tenancy, user) in users.iter().step_by(USERS_PER_TENANCY as usize) {
        sqlx::query(WRITE)
            .bind(tenancy)
            .bind(user)
            .fetch_one(&pool)
            .await
            .unwrap();
    }
    for (_, tenant) in &tenants {
        wait_for(Duration::from_secs(120), || async {
            sqlx::query_scalar::<_, bool>("select exists (select from arrivals)")
                .fetch_one(tenant)
                .await
                .unwrap_or(false)
        })
        .await;
    }
    sqlx::raw_sql(
        "create extension if not exists pg_stat_statements; select pg_stat_statements_reset()",
    )
    .execute(&pool)
    .await
    .unwrap();
    let metrics_before = Ticks::read();
    println!(
        "initial sync done; one change per tenancy arrived in {:.0} ms (warming up: not \
         measured); writing",
        warming.elapsed().as_secs_f64() * 1000.0
    );

    // The writer: one change per tick, each its own transaction.
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(32));
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let cpu_before = CpuTimes::read();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        ticker.tick().await;
        let (tenancy, user) = users[(n as usize * 7919) % users.len()];
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let (pool, writes, errors) = (pool.clone(), writes.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let written: Result<DateTime<Utc>, _> = sqlx::query_scalar(WRITE)
                .bind(tenancy)
                .bind(user)
                .fetch_one(&pool)
                .await;
            match written {
                Ok(at) => writes.lock().unwrap().push((user, at)),
                Err(_) => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let writing = started.elapsed();
    let cpu_busy = CpuTimes::read()
        .zip(cpu_before)
        .map(|(after, before)| (after.busy_since(&before), after.process_since(&before)));
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    println!(
        "wrote {} changes in {:.2} s ({:.0}/s), {} failed writes",
        writes.len(),
        writing.as_secs_f64(),
        writes.len() as f64 / writing.as_secs_f64(),
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );

    if let Some((busy, process)) = cpu_busy {
        println!(
            "machine CPU while writing: {:.0} % busy ({} cores), {:.0} % in this process \
             (the service and the writer), the rest mostly the PostgreSQL servers",
            busy * 100.0,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            process * 100.0
        );
    }
    print_busy_statements(&pool, writing, writes.len()).await;
    Ticks::read().print_since(&metrics_before, writing);
    if statements {
        print_statements(&pool).await;
    }

    // Wait until every user's last write has arrived, then collect the arrival logs.
    let mut last_write: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
    for (user, at) in &writes {
        let entry = last_write.entry(*user).or_insert(*at);
        *entry = (*entry).max(*at);
    }
    let mut arrivals: HashMap<Uuid, Vec<Arrival>> = HashMap::new();
    let mut batches = 0i64;
    for (tenancy, tenant) in &tenants {
        let arrived = reached(Duration::from_secs(120), || async {
            let latest: Vec<(Uuid, DateTime<Utc>)> =
                sqlx::query_as("select user_id, max(written_at) from arrivals group by user_id")
                    .fetch_all(tenant)
                    .await
                    .unwrap();
            let latest: HashMap<Uuid, DateTime<Utc>> = latest.into_iter().collect();
            users_of(&users, tenant, &tenants).iter().all(|user| {
                last_write.get(user).map_or(true, |last| {
                    latest.get(user).is_some_and(|seen| seen >= last)
                })
            })
        })
        .await;
        if !arrived {
            print_stall(&pool, *tenancy, tenant).await;
            panic!("the last writes of tenancy {tenancy} did not arrive within 120 s");
        }
        let rows: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> =
            sqlx::query_as("select user_id, written_at, arrived_at from arrivals")
                .fetch_all(tenant)
                .await
                .unwrap();
        for (user, written, arrived) in rows {
            arrivals.entry(user).or_default().push((written, arrived));
        }
        batches +=
            sqlx::query_scalar::<_, i64>("select count(distinct transaction_id) from arrivals")
                .fetch_one(tenant)
                .await
                .unwrap();
    }

    // Latency of each write: until the first version that includes it arrived.
    let mut latencies: Vec<f64> = writes
        .iter()
        .map(|(user, written)| {
            let arrived = arrivals[user]
                .iter()
                .filter(|(version, _)| version >= written)
                .map(|(_, arrived)| *arrived)
                .min()
                .expect("every write arrived");
            (arrived - *written).num_microseconds().unwrap_or(0) as f64 / 1000.0
        })
        .collect();
    if let Some(over) = std::env::var("BENCH_TAIL")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        print_tail(&writes, &latencies, &users, over);
    }
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let failures: i64 = sqlx::query_scalar(
        r#"select coalesce(sum("consecutiveFailures"), 0) from "ExternalDbSyncStatus""#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!();
    println!("| commit → visible | ms |");
    println!("|---|---:|");
    println!("| p50 | {:.1} |", percentile(0.50));
    println!("| p95 | {:.1} |", percentile(0.95));
    println!("| p99 | {:.1} |", percentile(0.99));
    println!("| max | {:.1} |", percentile(1.0));
    println!("sync failures recorded: {failures}");
    println!(
        "user batches applied: {batches} ({:.1} changes each)",
        writes.len() as f64 / batches.max(1) as f64
    );

    // The idle service: statements it sends to the internal database over 10 s, counted
    // from the server's statement log (transaction counters also count background work).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = server_log(&pool).await;
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    for setting in [
        "alter system set log_statement = 'all'",
        "alter system set log_line_prefix = '%a|'",
        "select pg_reload_conf()",
    ] {
        sqlx::query(setting).execute(&pool).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    for setting in [
        "alter system reset log_statement",
        "select pg_reload_conf()",
    ] {
        sqlx::query(setting).execute(&pool).await.unwrap();
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let statements = logged[logged_before.min(logged.len())..]
        .lines()
        .filter(|line| line.starts_with("external-db-sync|") && line.contains("LOG:  "))
        .filter(|line| line.contains("execute") || line.contains("statement:"))
        .count();
    println!(
        "idle: {:.1} statements/s from the service",
        statements as f64 / 10.0
    );

    shutdown.cancel();
    service.await.unwrap().unwrap();
}

/// The statements the service sent while the writer ran (every statement but the
/// writer's, which is the only one the benchmark sends meanwhile), from
/// `pg_stat_statements`: to the internal database, and to the tenant databases added up.
/// The writer's are told apart by their text without its constants: `pg_stat_statements`
/// keeps a statement first parsed after its reset normalized (`jsonb_build_object($1,
/// …)`), one prepared before it as written (before this, a filter on the constant
/// counted the writer's statements of the connections opened after the reset as the
/// service's, up to one per change).
async fn print_busy_statements(pool: &PgPool, writing: Duration, changes: usize) {
    let (internal, tenant): (i64, i64) = sqlx::query_as(
        r#"select coalesce(sum(s.calls) filter (
                      where d.datname not like '%bench_tenant%'
                        and s.query not like '%set "serverMetadata" = jsonb_build_object(%'
                        and s.query not like '%pg_stat_statements%'), 0)::bigint,
                  coalesce(sum(s.calls) filter (where d.datname like '%bench_tenant%'), 0)::bigint
           from pg_stat_statements s join pg_database d on d.oid = s.dbid"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let seconds = writing.as_secs_f64().max(0.001);
    let changes = changes.max(1) as f64;
    println!(
        "busy: {:.0} statements/s from the service to the internal database ({:.2} per \
         change), {:.0}/s to the tenant databases ({:.2} per change)",
        internal as f64 / seconds,
        internal as f64 / changes,
        tenant as f64 / seconds,
        tenant as f64 / changes
    );
}

/// The sequencer's batches and the poller's claims, from the service's own histograms
/// (the benchmark runs the service in its process, with the process's recorder).
struct Ticks {
    text: String,
}

impl Ticks {
    const HISTOGRAMS: [(&'static str, &'static str); 2] = [
        (
            "sequencer batch",
            "external_db_sync_sequencer_batch_duration_seconds",
        ),
        (
            "poller claim",
            "external_db_sync_poller_claim_duration_seconds",
        ),
    ];

    fn read() -> Self {
        Self {
            text: external_db_sync::instruments::handle().render(),
        }
    }

    /// The value of the sample `name` (with its labels, as rendered).
    fn sample(&self, name: &str) -> f64 {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn print_since(&self, before: &Self, took: Duration) {
        for (what, name) in Self::HISTOGRAMS {
            let moved = |suffix: &str| {
                let sample = format!("{name}{suffix}");
                self.sample(&sample) - before.sample(&sample)
            };
            let count = moved("_count");
            let mean_ms = 1000.0 * moved("_sum") / count.max(1.0);
            // The smallest bucket bound that holds 99 % of the ticks.
            let p99 = [
                "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
            ]
            .into_iter()
            .find(|bound| moved(&format!("_bucket{{le=\"{bound}\"}}")) >= 0.99 * count)
            .map_or_else(|| "> 10 s".to_owned(), |bound| format!("≤ {bound} s"));
            println!(
                "{what}: {:.0} per second, {mean_ms:.1} ms each on average, p99 {p99}",
                count / took.as_secs_f64().max(0.001)
            );
        }
    }
}

/// The statements that took the servers' time while the writer ran, over all databases
/// (the tenant databases' statements added up).
async fn print_statements(pool: &PgPool) {
    let rows: Vec<(String, i64, f64, f64, String)> = sqlx::query_as(
        r#"select case when d.datname like '%bench_tenant%' then 'tenant' else 'internal' end,
                  sum(s.calls)::bigint, sum(s.total_exec_time), sum(s.total_plan_time),
                  left(regexp_replace(s.query, '\s+', ' ', 'g'), 110) as query
           from pg_stat_statements s join pg_database d on d.oid = s.dbid
           group by 1, 5 order by sum(s.total_exec_time) + sum(s.total_plan_time) desc limit 25"#,
    )
    .fetch_all(pool)
    .await
    .unwrap();
    println!(
        "\n| database | calls | executing ms | planning ms | statement |\n|---|---:|---:|---:|---|"
    );
    for (database, calls, executing, planning, query) in rows {
        println!("| {database} | {calls} | {executing:.0} | {planning:.0} | `{query}` |");
    }
}

/// `BENCH_TAIL=<ms>`: the writes slower than that, by the tenth of a second they were
/// written in (counted from the first write) and by tenancy, to tell a stall of the
/// whole pipeline (slow writes of many tenancies in one moment) from one tenancy's path.
fn print_tail(
    writes: &[(Uuid, DateTime<Utc>)],
    latencies: &[f64],
    users: &[(Uuid, Uuid)],
    over: f64,
) {
    let Some(first) = writes.iter().map(|(_, at)| *at).min() else {
        return;
    };
    let tenancy_of: HashMap<Uuid, Uuid> = users.iter().map(|(t, u)| (*u, *t)).collect();
    let mut by_tenth: std::collections::BTreeMap<
        i64,
        (usize, f64, std::collections::HashSet<Uuid>),
    > = Default::default();
    for ((user, at), latency) in writes.iter().zip(latencies).filter(|(_, l)| **l > over) {
        let tenth = (*at - first).num_milliseconds() / 100;
        let entry = by_tenth.entry(tenth).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(*latency);
        entry.2.insert(tenancy_of[user]);
    }
    let slow: usize = by_tenth.values().map(|(count, _, _)| count).sum();
    println!("writes slower than {over} ms: {slow} of {}", writes.len());
    for (tenth, (count, worst, tenancies)) in by_tenth {
        println!(
            "  written at {:.1} s: {count} (worst {worst:.0} ms) over {} tenancies",
            tenth as f64 / 10.0,
            tenancies.len()
        );
    }
}

/// The users of the tenancy whose database is `tenant`.
fn users_of(users: &[(Uuid, Uuid)], tenant: &PgPool, tenants: &[(Uuid, PgPool)]) -> Vec<Uuid> {
    let tenancy = tenants
        .iter()
        .find(|(_, pool)| std::ptr::eq(pool, tenant))
        .map(|(tenancy, _)| *tenancy)
        .expect("a tenant of this run");
    users
        .iter()
        .filter(|(owner, _)| *owner == tenancy)
        .map(|(_, user)| *user)
        .collect()
}

/// The server's log file: the test harness starts the server with its output in
/// `postgres.log` beside the data directory.
async fn server_log(pool: &PgPool) -> std::path::PathBuf {
    let data: String =
        sqlx::query_scalar("select setting from pg_settings where name = 'data_directory'")
            .fetch_one(pool)
            .await
            .unwrap();
    std::path::Path::new(&data)
        .parent()
        .expect("the data directory has a parent")
        .join("postgres.log")
}

async fn wait_for<F, Fut>(limit: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(reached(limit, check).await, "timed out after {limit:?}");
}

/// Whether `check` held within `limit`.
async fn reached<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// What a tenancy whose writes did not arrive looks like, on both sides.
async fn print_stall(pool: &PgPool, tenancy: Uuid, tenant: &PgPool) {
    let source: (Option<i64>, i64) = sqlx::query_as(
        r#"select max("sequenceId"), count(*) filter (where "shouldUpdateSequenceId")
           from "ProjectUser" where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .fetch_one(pool)
    .await
    .unwrap();
    println!(
        "source: highest sequence id {:?}, rows not yet sequenced {}",
        source.0, source.1
    );
    let requests: Vec<(Option<String>, i32, String, Option<String>)> = sqlx::query_as(
        r#"select "startedFulfillingAt"::text, "attempts", "nextAttemptAt"::text, "lastError"
           from "OutgoingRequest" where "deduplicationKey" like '%' || $1::text"#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap();
    println!("requests (claimed at, attempts, next attempt, last error): {requests:?}");
    let status: Vec<(Option<i64>, Option<String>)> = sqlx::query_as(
        r#"select "lastSyncedSequenceId", "lastError" from "ExternalDbSyncStatus"
           where "tenancyId" = $1"#,
    )
    .bind(tenancy)
    .fetch_all(pool)
    .await
    .unwrap();
    println!("sync status (synced through, last error): {status:?}");
    let watermarks: Vec<(String, i64)> =
        sqlx::query_as("select mapping_name, last_synced_sequence_id from _stack_sync_metadata")
            .fetch_all(tenant)
            .await
            .unwrap();
    println!("tenant watermarks: {watermarks:?}");
    println!("now: {:?}", Utc::now());
}

/// Records when each version of a user arrives, with the write time it carries.
const ARRIVAL_LOG: &str = r#"
create table arrivals (
    user_id uuid not null,
    written_at timestamptz not null,
    arrived_at timestamptz not null default clock_timestamp(),
    transaction_id bigint not null default txid_current()
);
create function log_arrival() returns trigger language plpgsql as $$
begin
    if new.server_metadata ? 'writtenAt' then
        insert into arrivals (user_id, written_at)
        values (new.id, (new.server_metadata ->> 'writtenAt')::timestamptz);
    end if;
    return null;
end;
$$;
create trigger log_arrival after insert or update on users
    for each row execute function log_arrival();
"#;
