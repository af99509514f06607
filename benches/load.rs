//! Load: `serve` (the release binary, a process of its own) syncing 100 tenancies of
//! 2,000 users each, every one to a tenant database of its own on a second PostgreSQL
//! server, while writers insert, update and delete users and contact channels as fast
//! as the machine allows. Afterwards every tenant database is checked by the service's
//! own `verify`, and must be equal to its source.
//!
//! Printed: the sustained write rate, the sync throughput (rows written to tenant
//! databases per second, from `/metrics`), the lag (commit-to-visible of probe writes
//! made every half second, and the service's worst-database-lag gauge), the time to
//! drain once the writers stop, and `serve`'s resident memory: sampled every second,
//! with its peak, and how much it grew from the first tenth of the run to the end
//! (it must not grow with the number of rows written). Then where the lag goes: the
//! mean sequencer batch, claim, request (queued → synced) and tenant database sync
//! while writing, from `serve`'s histograms (left out with `LOAD_FAULTS`, which
//! restart `serve`).
//!
//! Run: `cargo bench --bench load`. Settings: `LOAD_TENANCIES` (default 100),
//! `LOAD_USERS` (per tenancy, default 2000), `LOAD_SECONDS` (default 60),
//! `LOAD_WRITERS` (concurrent writers, default 16: on the 2-core development machine,
//! 4 writers made 406 writes/s and 16 made 696). `LOAD_EXPLAIN=1`: the internal
//! database explains every statement that takes `LOAD_EXPLAIN_MS` (default 500) or
//! more, nested ones (inside functions) included, with actual times (`auto_explain`),
//! as warnings that `serve` logs, to see where a slow statement spent its time (the
//! timing costs the server some CPU).
//!
//! Soak: `LOAD_SECONDS=1800 LOAD_FAULTS=1 cargo bench --bench load`. Every
//! `LOAD_FAULT_EVERY` seconds (default 120) one fault, in turn: `serve` killed with
//! SIGKILL and started again; the tenant databases' server killed with SIGKILL and
//! restarted 5 s later; the internal database's server restarted. Each fault's
//! recovery is printed: how long until a probe write made after it was visible. With
//! faults, both servers checkpoint every 30 s, so that crash recovery after a kill
//! takes seconds.
//! Loopback only; nothing leaves the machine.

#[allow(dead_code)]
#[path = "../tests/integration/harness/mod.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::app::CRON_SECRET;
use harness::binary;
use harness::postgres::{pool, ClusterSetup, RestartableServer, Server};
use harness::sync::attach;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::Child;
use uuid::Uuid;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// What the writers may touch in one tenancy: its users (the first is the probe's,
/// never written by the writers) and their contact channels.
#[derive(Default)]
struct Rows {
    users: Vec<Uuid>,
    channels: Vec<(Uuid, Uuid)>,
}

struct Tenancy {
    id: Uuid,
    probe_user: Uuid,
    tenant: PgPool,
    rows: Mutex<Rows>,
}

/// The running `serve`: its process and address, replaced when a fault kills it.
struct Service {
    child: Child,
    address: String,
}

#[tokio::main]
async fn main() {
    let tenancy_count = setting("LOAD_TENANCIES", 100) as usize;
    let users = setting("LOAD_USERS", 2000) as i64;
    let seconds = setting("LOAD_SECONDS", 60);
    let writers = setting("LOAD_WRITERS", 16) as usize;
    let faults = setting("LOAD_FAULTS", 0) == 1;
    let fault_every = Duration::from_secs(setting("LOAD_FAULT_EVERY", 120));
    println!(
        "load: {tenancy_count} tenancies × {users} users, {writers} writers for {seconds} s{}",
        if faults { ", with faults" } else { "" }
    );

    let mut internal_setup = ClusterSetup::durable();
    internal_setup
        .settings
        .push(("max_connections", "300".to_owned()));
    // A server killed under load replays its WAL since the last checkpoint before it
    // accepts connections again: with faults, checkpoints come often enough that this
    // takes seconds, not minutes.
    let checkpoints = ("checkpoint_timeout", "30s".to_owned());
    if faults {
        internal_setup.settings.push(checkpoints.clone());
    }
    let internal_server = RestartableServer::start(&internal_setup);
    let internal_url = internal_server.databases().migrated_database().await;
    let internal = pool(&internal_url).await;
    if setting("LOAD_EXPLAIN", 0) == 1 {
        // For every session of the benchmark's role: the writers', the probe's, serve's.
        let statement = format!(
            "alter role current_user set session_preload_libraries = 'auto_explain';
             alter role current_user set auto_explain.log_min_duration = '{}ms';
             alter role current_user set auto_explain.log_nested_statements = on;
             alter role current_user set auto_explain.log_analyze = on;
             alter role current_user set auto_explain.log_level = 'warning';",
            setting("LOAD_EXPLAIN_MS", 500)
        );
        sqlx::raw_sql(&statement).execute(&internal).await.unwrap();
    }
    let mut tenant_setup = ClusterSetup::durable();
    tenant_setup
        .settings
        .push(("max_connections", (4 * tenancy_count + 50).to_string()));
    if faults {
        tenant_setup.settings.push(checkpoints);
    }
    let tenant_server = RestartableServer::start(&tenant_setup);

    let started = Instant::now();
    let tenancies =
        Arc::new(create_tenancies(&internal, &tenant_server, tenancy_count, users).await);
    println!(
        "imported {} users and as many contact channels in {:.1} s",
        tenancy_count as i64 * users,
        started.elapsed().as_secs_f64()
    );

    let log = std::env::temp_dir().join(format!("load-serve-{}.log", std::process::id()));
    let service = Arc::new(tokio::sync::Mutex::new(
        start_serve(&internal_url, &log).await,
    ));
    let started = Instant::now();
    wait_until_caught_up(&internal, Duration::from_secs(1800)).await;
    let initial = started.elapsed();
    let rows_initial = rows_written(&service).await;
    println!(
        "initial sync: {rows_initial:.0} rows in {:.1} s ({:.0} rows/s)",
        initial.as_secs_f64(),
        rows_initial / initial.as_secs_f64()
    );

    // The writers, the probes and the sampler run until `stop`.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let write_errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        tasks.push(tokio::spawn(write(
            internal.clone(),
            tenancies.clone(),
            stop.clone(),
            writes.clone(),
            write_errors.clone(),
        )));
    }
    let probes = Arc::new(Mutex::new(Vec::<Probe>::new()));
    let probing = tokio::spawn(probe(
        internal.clone(),
        tenancies.clone(),
        stop.clone(),
        probes.clone(),
    ));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampling = tokio::spawn(sample(service.clone(), stop.clone(), samples.clone()));
    let servers = Arc::new(FaultServers {
        internal: internal_server,
        tenants: tenant_server,
    });
    let faulting = faults.then(|| {
        tokio::spawn(inject_faults(
            fault_every,
            stop.clone(),
            service.clone(),
            internal_url.clone(),
            log.clone(),
            servers.clone(),
        ))
    });

    let window = Instant::now();
    let stages_before = stage_totals(&service).await;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let window = window.elapsed();
    // With faults, `serve` restarts and its totals begin again.
    let stages = (stage_totals(&service).await.since(&stages_before)).filter(|_| !faults);
    let drain_started = Instant::now();
    wait_until_caught_up(&internal, Duration::from_secs(600)).await;
    let drained = drain_started.elapsed();
    probing.await.unwrap();
    sampling.await.unwrap();
    let rows_during = samples
        .lock()
        .unwrap()
        .last()
        .map_or(0.0, |s| s.rows_written);
    let fault_times = match faulting {
        Some(task) => task.await.unwrap(),
        None => Vec::new(),
    };

    let unequal = verify_all(&service, &tenancies).await;
    report(Report {
        window,
        writes: writes.load(Ordering::Relaxed),
        write_errors: write_errors.load(Ordering::Relaxed),
        rows_during,
        drained,
        probes: &probes.lock().unwrap(),
        samples: &samples.lock().unwrap(),
        faults: &fault_times,
        unequal: &unequal,
        tenancies: tenancies.len(),
        stages,
    });
    let mut service = service.lock().await;
    service.child.start_kill().ok();
    assert!(
        unequal.is_empty(),
        "tenant databases not equal: {unequal:?}"
    );
}

/// Tenancies with `users` users each (every one with a primary email), each with a
/// tenant database of its own on `tenant_server`.
async fn create_tenancies(
    internal: &PgPool,
    tenant_server: &RestartableServer,
    count: usize,
    users: i64,
) -> Vec<Tenancy> {
    let databases = Server::without_template(tenant_server.base_url());
    let mut tenancies = Vec::with_capacity(count);
    for _ in 0..count {
        let id = harness::fixtures::tenancy(internal).await;
        let url = databases.empty_database("load").await;
        attach(internal, id, &[("main", &url)]).await;
        sqlx::query(
            r#"with made as (
                   insert into "ProjectUser"
                       ("tenancyId", "projectUserId", "displayName", "serverMetadata")
                   select $1, gen_random_uuid(), 'user ' || n, '{"plan": "free"}'
                   from generate_series(1, $2) n
                   returning "projectUserId"
               )
               insert into "ContactChannel"
                   ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth", "value")
               select $1, "projectUserId", gen_random_uuid(), 'EMAIL', true, true,
                      "projectUserId" || '@example.com'
               from made"#,
        )
        .bind(id)
        .bind(users)
        .execute(internal)
        .await
        .unwrap();
        let channels: Vec<(Uuid, Uuid)> = sqlx::query_as(
            r#"select "projectUserId", "id" from "ContactChannel" where "tenancyId" = $1
               order by "projectUserId""#,
        )
        .bind(id)
        .fetch_all(internal)
        .await
        .unwrap();
        let mut user_ids: Vec<Uuid> = channels.iter().map(|(user, _)| *user).collect();
        let probe_user = user_ids.remove(0);
        let tenant = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .unwrap();
        tenancies.push(Tenancy {
            id,
            probe_user,
            tenant,
            rows: Mutex::new(Rows {
                users: user_ids,
                channels: channels
                    .into_iter()
                    .filter(|(user, _)| *user != probe_user)
                    .collect(),
            }),
        });
    }
    tenancies
}

async fn start_serve(internal_url: &str, log: &std::path::Path) -> Service {
    let (child, address) =
        binary::serve_logging_to(internal_url, &[("RUST_LOG", "warn")], log).await;
    Service { child, address }
}

/// Waits until every change is numbered and every tenant database has every change of
/// its tenancy (status counts only numbered changes).
async fn wait_until_caught_up(internal: &PgPool, limit: Duration) {
    harness::wait::until("every tenant database to catch up", limit, || async {
        let unnumbered: bool = sqlx::query_scalar(
            r#"select exists (select from "ProjectUser" where "shouldUpdateSequenceId")
                   or exists (select from "ContactChannel" where "shouldUpdateSequenceId")
                   or exists (select from "DeletedRow" where "shouldUpdateSequenceId")
                   or exists (select from "ExternalDbSyncOwnerMark")"#,
        )
        .fetch_one(internal)
        .await
        .ok()?;
        if unnumbered {
            return None;
        }
        let statuses = external_db_sync::db::status::read(internal, None)
            .await
            .ok()?;
        statuses
            .iter()
            .all(|status| status.synced_through.is_some() && status.changes_behind == 0)
            .then_some(())
    })
    .await;
}

/// How many failed writes of the application are shown, each with its error.
const SHOWN_WRITE_ERRORS: u64 = 5;

/// One writer: random inserts, updates and deletes of users and contact channels in
/// random tenancies, one committed statement each, until `stop`.
async fn write(
    internal: PgPool,
    tenancies: Arc<Vec<Tenancy>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let tenancy = &tenancies[rand::rng().random_range(0..tenancies.len())];
        match write_once(&internal, tenancy).await {
            Ok(()) => {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                // The internal database is down (a fault) or a row went meanwhile. The
                // first few are shown: a failure the service caused (a deadlock with
                // its own statements) must not pass for the workload's own.
                if errors.fetch_add(1, Ordering::Relaxed) < SHOWN_WRITE_ERRORS {
                    let code = match &error {
                        sqlx::Error::Database(database) => database.code().map(|c| c.into_owned()),
                        _ => None,
                    };
                    println!(
                        "a write of the application failed (SQLSTATE {}): {error}",
                        code.as_deref().unwrap_or("none")
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One write, chosen at random: 20 % new users (with an email), 30 % renamed users,
/// 10 % deleted users, 15 % new channels, 15 % changed channels, 10 % deleted channels.
async fn write_once(internal: &PgPool, tenancy: &Tenancy) -> Result<(), sqlx::Error> {
    let roll = rand::rng().random_range(0..100);
    let (user, channel) = {
        let rows = tenancy.rows.lock().unwrap();
        let mut rng = rand::rng();
        (
            rows.users.choose(&mut rng).copied(),
            rows.channels.choose(&mut rng).copied(),
        )
    };
    match (roll, user, channel) {
        (0..20, _, _) | (_, None, _) => {
            let user = Uuid::new_v4();
            sqlx::query(
                r#"with made as (
                       insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
                       values ($1, $2, 'new user') returning "projectUserId"
                   )
                   insert into "ContactChannel"
                       ("tenancyId", "projectUserId", "id", "type", "isPrimary", "usedForAuth", "value")
                   select $1, "projectUserId", $3, 'EMAIL', true, true, $2::text || '@example.com'
                   from made"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .bind(Uuid::new_v4())
            .execute(internal)
            .await?;
            tenancy.rows.lock().unwrap().users.push(user);
        }
        (20..50, Some(user), _) => {
            sqlx::query(
                r#"update "ProjectUser" set "displayName" = 'renamed ' || gen_random_uuid(),
                          "clientMetadata" = jsonb_build_object('n', random())
                   where "tenancyId" = $1 and "projectUserId" = $2"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .execute(internal)
            .await?;
        }
        (50..60, Some(user), _) => {
            sqlx::query(
                r#"delete from "ProjectUser" where "tenancyId" = $1 and "projectUserId" = $2"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .execute(internal)
            .await?;
            let mut rows = tenancy.rows.lock().unwrap();
            rows.users.retain(|kept| *kept != user);
            rows.channels.retain(|(owner, _)| *owner != user);
        }
        (60..75, Some(user), _) => {
            let channel = Uuid::new_v4();
            sqlx::query(
                r#"insert into "ContactChannel"
                       ("tenancyId", "projectUserId", "id", "type", "value")
                   values ($1, $2, $3, 'EMAIL', $3::text || '@example.org')"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .bind(channel)
            .execute(internal)
            .await?;
            tenancy.rows.lock().unwrap().channels.push((user, channel));
        }
        (75..90, _, Some((user, channel))) => {
            sqlx::query(
                r#"update "ContactChannel" set "isVerified" = not "isVerified"
                   where "tenancyId" = $1 and "projectUserId" = $2 and "id" = $3"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .bind(channel)
            .execute(internal)
            .await?;
        }
        (_, _, Some((user, channel))) => {
            sqlx::query(
                r#"delete from "ContactChannel"
                   where "tenancyId" = $1 and "projectUserId" = $2 and "id" = $3"#,
            )
            .bind(tenancy.id)
            .bind(user)
            .bind(channel)
            .execute(internal)
            .await?;
            tenancy
                .rows
                .lock()
                .unwrap()
                .channels
                .retain(|(_, kept)| *kept != channel);
        }
        (_, Some(_), None) => {}
    }
    Ok(())
}

/// A probe write: when it committed, and how long until the tenant database had it
/// (`None`: not within 5 minutes).
type Probe = (Instant, Option<Duration>);

/// Every half second, renames the probe user of the next tenancy and measures how
/// long until the tenant database has the new name (`None`: not within 5 minutes).
async fn probe(
    internal: PgPool,
    tenancies: Arc<Vec<Tenancy>>,
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
) {
    let mut running = Vec::new();
    // From 1: a name that is not a probe's counts as probe 0.
    let mut n = 1usize;
    while !stop.load(Ordering::Relaxed) {
        let tenancy_index = n % tenancies.len();
        let name = format!("probe {n}");
        n += 1;
        let (internal, tenancies, probes) = (internal.clone(), tenancies.clone(), probes.clone());
        running.push(tokio::spawn(async move {
            let tenancy = &tenancies[tenancy_index];
            let written = sqlx::query(
                r#"update "ProjectUser" set "displayName" = $3
                   where "tenancyId" = $1 and "projectUserId" = $2"#,
            )
            .bind(tenancy.id)
            .bind(tenancy.probe_user)
            .bind(&name)
            .execute(&internal)
            .await;
            if written.is_err() {
                return; // the internal database is down: no probe
            }
            let committed = Instant::now();
            let deadline = committed + Duration::from_secs(300);
            let arrived = loop {
                let seen: Option<String> =
                    sqlx::query_scalar("select display_name from users where id = $1")
                        .bind(tenancy.probe_user)
                        .fetch_optional(&tenancy.tenant)
                        .await
                        .ok()
                        .flatten()
                        .flatten();
                // A later probe of the same user counts as this one arriving.
                if seen.is_some_and(|seen| probe_number(&seen) >= probe_number(&name)) {
                    break Some(committed.elapsed());
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            probes.lock().unwrap().push((committed, arrived));
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for task in running {
        task.await.unwrap();
    }
}

fn probe_number(name: &str) -> usize {
    name.strip_prefix("probe ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What the sampler saw at one moment.
struct Sample {
    at: Duration,
    rss_bytes: u64,
    worst_lag_seconds: f64,
    /// Rows written to tenant databases since sampling began, over every `serve`
    /// process (a counter that went down is a new process's).
    rows_written: f64,
}

/// Every second: `serve`'s resident memory and its worst-database-lag gauge.
async fn sample(
    service: Arc<tokio::sync::Mutex<Service>>,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) {
    let started = Instant::now();
    let (mut counted, mut last) = (0.0, None);
    while !stop.load(Ordering::Relaxed) {
        let (pid, address) = {
            let service = service.lock().await;
            (service.child.id(), service.address.clone())
        };
        if let (Some(pid), Ok(metrics)) = (pid, metrics(&address).await) {
            let now = rows_in(&metrics);
            counted += match last {
                Some(last) if now >= last => now - last,
                Some(_) => now,
                None => 0.0,
            };
            last = Some(now);
            samples.lock().unwrap().push(Sample {
                at: started.elapsed(),
                rss_bytes: rss_bytes(pid),
                worst_lag_seconds: metric(&metrics, "external_db_sync_worst_database_lag_seconds"),
                rows_written: counted,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn metrics(address: &str) -> Result<String, reqwest::Error> {
    reqwest::get(format!("http://{address}/metrics"))
        .await?
        .text()
        .await
}

/// The value of the metric `name` in Prometheus text, summed over its label sets (an
/// unlabelled metric has one); 0 when absent.
fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        .filter_map(|rest| rest.rsplit(' ').next())
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum()
}

/// What `serve`'s histograms and counters had recorded at one moment, over every label:
/// each stage's total seconds and count, and the rows the sequencer numbered.
#[derive(Debug, Clone, Copy, Default)]
struct StageTotals {
    sequencer_batches: (f64, f64),
    claims: (f64, f64),
    /// A request's lag: from its queuing (the start of the batch that queued it) to
    /// the end of its publish, which in direct mode is its tenancy's sync.
    requests: (f64, f64),
    database_syncs: (f64, f64),
    rows_sequenced: f64,
}

/// The running `serve`'s [`StageTotals`] (zero where its metrics cannot be read).
async fn stage_totals(service: &tokio::sync::Mutex<Service>) -> StageTotals {
    let address = service.lock().await.address.clone();
    let metrics = metrics(&address).await.unwrap_or_default();
    let histogram = |name: &str| {
        (
            metric(&metrics, &format!("{name}_sum")),
            metric(&metrics, &format!("{name}_count")),
        )
    };
    StageTotals {
        sequencer_batches: histogram("external_db_sync_sequencer_batch_duration_seconds"),
        claims: histogram("external_db_sync_poller_claim_duration_seconds"),
        requests: histogram("external_db_sync_request_lag_seconds"),
        database_syncs: histogram("external_db_sync_database_sync_duration_seconds"),
        rows_sequenced: metric(&metrics, "external_db_sync_rows_sequenced_total"),
    }
}

impl StageTotals {
    /// What was recorded since `before`; `None` if a total went down (a new process).
    fn since(&self, before: &StageTotals) -> Option<StageTotals> {
        let minus = |(sum, count): (f64, f64), (sum_before, count_before): (f64, f64)| {
            (sum - sum_before, count - count_before)
        };
        let since = StageTotals {
            sequencer_batches: minus(self.sequencer_batches, before.sequencer_batches),
            claims: minus(self.claims, before.claims),
            requests: minus(self.requests, before.requests),
            database_syncs: minus(self.database_syncs, before.database_syncs),
            rows_sequenced: self.rows_sequenced - before.rows_sequenced,
        };
        let counts = [
            since.sequencer_batches.1,
            since.claims.1,
            since.requests.1,
            since.database_syncs.1,
            since.rows_sequenced,
        ];
        counts.iter().all(|count| *count >= 0.0).then_some(since)
    }

    /// Where a change's lag goes, as means over the window of `seconds`.
    fn print(&self, seconds: f64) {
        let mean_ms = |(sum, count): (f64, f64)| match count > 0.0 {
            true => format!("{:.1} ms", sum / count * 1000.0),
            false => "—".to_owned(),
        };
        let (_, batches) = self.sequencer_batches;
        println!(
            "stages while writing (means, from serve's histograms): sequencer batch {} \
             ({:.1} a second, {:.0} rows each); claim {} ({:.1} a second); request \
             queued → synced {}; one tenant database's sync {}",
            mean_ms(self.sequencer_batches),
            batches / seconds,
            self.rows_sequenced / batches.max(1.0),
            mean_ms(self.claims),
            self.claims.1 / seconds,
            mean_ms(self.requests),
            mean_ms(self.database_syncs),
        );
    }
}

/// Rows written to tenant databases (upserted and deleted) by the running `serve`.
async fn rows_written(service: &tokio::sync::Mutex<Service>) -> f64 {
    let address = service.lock().await.address.clone();
    rows_in(&metrics(&address).await.unwrap_or_default())
}

/// Rows written to tenant databases (upserted and deleted), as `/metrics` counts them.
fn rows_in(metrics: &str) -> f64 {
    metric(metrics, "external_db_sync_rows_upserted_total")
        + metric(metrics, "external_db_sync_rows_deleted_total")
}

/// A process's resident memory now, from `/proc`; 0 if it is gone.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The servers a soak breaks.
struct FaultServers {
    internal: RestartableServer,
    tenants: RestartableServer,
}

/// A fault injected, from its start to when what it broke was back.
struct Fault {
    name: &'static str,
    started: Instant,
    ended: Instant,
}

/// Every `every`, one fault in turn, until `stop`; returns them.
async fn inject_faults(
    every: Duration,
    stop: Arc<AtomicBool>,
    service: Arc<tokio::sync::Mutex<Service>>,
    internal_url: String,
    log: std::path::PathBuf,
    servers: Arc<FaultServers>,
) -> Vec<Fault> {
    let mut done = Vec::new();
    let mut turn = 0;
    loop {
        let next = Instant::now() + every;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let started = Instant::now();
        let name = match turn % 3 {
            0 => {
                let mut service = service.lock().await;
                service.child.start_kill().unwrap();
                service.child.wait().await.unwrap();
                *service = start_serve(&internal_url, &log).await;
                "serve killed (SIGKILL) and started again"
            }
            1 => {
                let servers = servers.clone();
                tokio::task::spawn_blocking(move || {
                    servers.tenants.kill();
                    std::thread::sleep(Duration::from_secs(5));
                    servers.tenants.restart();
                })
                .await
                .unwrap();
                "tenant server killed (SIGKILL), restarted after 5 s"
            }
            _ => {
                let servers = servers.clone();
                tokio::task::spawn_blocking(move || {
                    servers.internal.stop();
                    servers.internal.restart();
                })
                .await
                .unwrap();
                "internal server restarted"
            }
        };
        println!("fault: {name}");
        done.push(Fault {
            name,
            started,
            ended: Instant::now(),
        });
        turn += 1;
    }
}

/// The service's own `verify` of every tenancy; returns those not equal.
async fn verify_all(
    service: &tokio::sync::Mutex<Service>,
    tenancies: &[Tenancy],
) -> Vec<(Uuid, Value)> {
    let address = service.lock().await.address.clone();
    let client = reqwest::Client::new();
    let mut unequal = Vec::new();
    for tenancy in tenancies {
        let answer: Value = client
            .post(format!(
                "http://{address}/api/latest/internal/external-db-sync/tenancies/{}/verify",
                tenancy.id
            ))
            .bearer_auth(CRON_SECRET)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if answer["equal"] != true {
            unequal.push((tenancy.id, answer));
        }
    }
    unequal
}

struct Report<'a> {
    window: Duration,
    writes: u64,
    write_errors: u64,
    rows_during: f64,
    drained: Duration,
    probes: &'a [Probe],
    samples: &'a [Sample],
    faults: &'a [Fault],
    unequal: &'a [(Uuid, Value)],
    tenancies: usize,
    /// `None` with faults, or when a total went down (`serve` restarted).
    stages: Option<StageTotals>,
}

fn report(report: Report<'_>) {
    let seconds = report.window.as_secs_f64();
    println!(
        "writes: {} in {seconds:.0} s = {:.0} writes/s ({} failed)",
        report.writes,
        report.writes as f64 / seconds,
        report.write_errors
    );
    println!(
        "sync throughput while writing: {:.0} rows/s written to tenant databases",
        report.rows_during / seconds
    );
    println!(
        "drained {:.2} s after the writers stopped",
        report.drained.as_secs_f64()
    );
    let mut lags: Vec<Duration> = report.probes.iter().filter_map(|(_, lag)| *lag).collect();
    lags.sort();
    let lost = report
        .probes
        .iter()
        .filter(|(_, lag)| lag.is_none())
        .count();
    if !lags.is_empty() {
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
        println!(
            "lag (probe commit to visible, {} probes): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms{}",
            lags.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            if lost > 0 {
                format!(", {lost} not visible within 5 min")
            } else {
                String::new()
            }
        );
    }
    let worst_lag = report
        .samples
        .iter()
        .map(|sample| sample.worst_lag_seconds)
        .fold(0.0, f64::max);
    println!("service's worst database lag gauge: max {worst_lag:.2} s");
    if let Some(stages) = &report.stages {
        stages.print(seconds);
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let peak = report
        .samples
        .iter()
        .map(|s| s.rss_bytes)
        .max()
        .unwrap_or(0);
    let tenth = report.window / 10;
    let early = report
        .samples
        .iter()
        .filter(|sample| sample.at <= tenth)
        .map(|sample| sample.rss_bytes)
        .max()
        .unwrap_or(0);
    let late = report.samples.last().map_or(0, |sample| sample.rss_bytes);
    println!(
        "serve RSS: {:.1} MiB after the first tenth, {:.1} MiB at the end ({:+.1} MiB), peak {:.1} MiB",
        mib(early),
        mib(late),
        mib(late) - mib(early),
        mib(peak)
    );
    let timeline: Vec<String> = report
        .samples
        .iter()
        .step_by(10.max(report.samples.len() / 12))
        .map(|sample| {
            format!(
                "{:.0} s {:.1} MiB",
                sample.at.as_secs_f64(),
                mib(sample.rss_bytes)
            )
        })
        .collect();
    println!("serve RSS over time: {}", timeline.join(", "));
    for fault in report.faults {
        // Recovered when a write made after the fault was over is visible: timed from
        // the fault's start.
        let recovered = report
            .probes
            .iter()
            .filter(|(committed, _)| *committed >= fault.ended)
            .find_map(|(committed, lag)| lag.map(|lag| *committed + lag));
        let outage = (fault.ended - fault.started).as_secs_f64();
        match recovered {
            Some(at) => println!(
                "  {}: broken for {outage:.1} s; recovered {:.2} s after it began",
                fault.name,
                (at - fault.started).as_secs_f64()
            ),
            None => println!(
                "  {}: broken for {outage:.1} s; no probe after it",
                fault.name
            ),
        }
    }
    println!(
        "verified equal by the service's verify: {} of {}",
        report.tenancies - report.unequal.len(),
        report.tenancies
    );
}
