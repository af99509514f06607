//! `external-db-sync demo`: the whole pipeline on this machine, in one command.
//!
//! It starts an embedded PostgreSQL in a fresh directory (removed at the end unless
//! `--keep`), creates tenancies each with its own tenant database on that server, and
//! runs the real service in-process (sequencer, poller, direct sync engine). Then, with
//! live progress: an initial load of users with contact channels; a burst of inserts,
//! updates and deletes for `--seconds` while a probe measures commit-to-visible
//! latency; a wait until every tenant database has caught up; and a verification of
//! every tenant database against its source. It ends with one summary and exits 0 only
//! when every database verified equal.

mod progress;
mod summary;
mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{ConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Env};
use crate::db;
use crate::embedded::Embedded;
use crate::startup::{self, Application};
use crate::sync::policy::{PrivateTargets, TargetPolicy};
use crate::sync::verify::{verify_tenancy, DatabaseComparison};
use crate::sync::SyncEngine;
use progress::Progress;
use summary::Summary;
use workload::{DemoTenancy, Written};

/// The demo's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Tenancies, each with its own tenant database (1 to 50).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub tenancies: u32,
    /// Users written to each tenancy before the burst, each with a primary email
    /// (1 to 1,000,000).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub users: u32,
    /// How long the burst of inserts, updates and deletes lasts (0 to 3,600).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub seconds: u32,
    /// Changes per second the burst writes, across the tenancies (1 to 10,000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,
    /// Keep the data directory, and the service running until Ctrl-C, with the psql
    /// commands to look inside.
    #[arg(long)]
    pub keep: bool,
    /// Test hook: before verifying, change one row of the first tenant database by
    /// hand, which the verification must catch (the demo then exits 1).
    #[arg(long)]
    pub corrupt_a_row: bool,
    /// Print the summary as one JSON document (progress as plain lines before it).
    #[arg(long)]
    pub json: bool,
}

/// How long the tenant databases may take to catch up after a phase.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// The demo's connections to the internal database: the burst's writers, the probe,
/// the progress display, and one to spare.
const DEMO_CONNECTIONS: u32 = BURST_WRITERS + 3;
/// Concurrent writers of the burst; each writes its share of `--rate`.
const BURST_WRITERS: u32 = 4;
/// How often progress is read.
const TICK: Duration = Duration::from_millis(250);

/// Runs the demo; `Ok(true)` when every tenant database verified equal.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let directory = fresh_directory()?;
    println!(
        "external-db-sync demo: {} tenancies x {} users, a {} s burst\n\
         starting PostgreSQL in {}",
        args.tenancies,
        args.users,
        args.seconds,
        directory.display()
    );
    let embedded = Embedded::start(&directory).await?;
    let outcome = run_on(&embedded, &args).await;
    embedded.stop().await;
    if args.keep {
        println!("the demo's data is kept in {}", directory.display());
    } else if let Err(error) = std::fs::remove_dir_all(&directory) {
        eprintln!("cannot remove {}: {error}", directory.display());
    }
    outcome
}

/// A new directory under the system's temporary directory.
fn fresh_directory() -> anyhow::Result<PathBuf> {
    let directory = std::env::temp_dir().join(format!(
        "external-db-sync-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir(&directory)
        .with_context(|| format!("cannot create {}", directory.display()))?;
    Ok(directory)
}

/// The service's configuration on the embedded database: direct mode, workers on, an
/// ephemeral port, private targets allowed (the tenant databases are on this machine).
/// The tuning variables (`SEQUENCER_*`, `POLLER_*`, `SYNC_*`) are read from the
/// environment, as `serve` reads them.
fn demo_config(url: &SecretString) -> anyhow::Result<Config> {
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let variables: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", url.expose_secret().to_owned()),
        ("CRON_SECRET", secret),
        ("BIND_ADDR", "127.0.0.1:0".to_owned()),
        ("ALLOW_PRIVATE_TARGETS", "true".to_owned()),
        ("SYNC_QUEUE", "direct".to_owned()),
        ("RUN_WORKERS", "true".to_owned()),
    ]);
    let tuning = ["SEQUENCER_", "POLLER_", "SYNC_"];
    let lookup = move |name: &str| match variables.get(name) {
        Some(value) => Some(value.clone()),
        None if tuning.iter().any(|prefix| name.starts_with(prefix)) => std::env::var(name).ok(),
        None => None,
    };
    Ok(Env::from_lookup(lookup).config()?)
}

async fn run_on(embedded: &Embedded, args: &DemoArgs) -> anyhow::Result<bool> {
    let config = demo_config(&embedded.url())?;
    let service_pool = db::connect(&config.database)
        .await
        .context("cannot connect to the embedded database")?;
    // The demo's own connections, apart from the service's. Its progress queries are
    // slow while the burst keeps both cores busy: not worth a warning with their text.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(DEMO_CONNECTIONS)
        .connect_with(
            config
                .database
                .connect_options
                .clone()
                .disable_statement_logging(),
        )
        .await
        .context("cannot connect to the embedded database")?;
    db::migrate(&pool)
        .await
        .context("cannot migrate the embedded database")?;
    let mut tenancies = workload::create_tenancies(&pool, &embedded.url(), args.tenancies).await?;
    let names = tenancies
        .iter()
        .map(|tenancy| tenancy.database.clone())
        .collect();
    let mut progress = Progress::new(names, !args.json);

    let shutdown = CancellationToken::new();
    let engine_settings = (config.sync.clone(), config.database.location());
    let application = Application::build(config, service_pool.clone(), shutdown.clone()).await?;
    let address = application.local_addr();
    let service = tokio::spawn(application.run());
    tokio::spawn(startup::cancel_on_signal(shutdown.clone()));

    // Whatever happens from here, the service is stopped before the database.
    let verified = async {
        let mut summary = phases(&pool, &mut tenancies, args, &mut progress, &shutdown).await?;
        let engine = SyncEngine::new(
            pool.clone(),
            engine_settings.0,
            TargetPolicy::new(PrivateTargets::Allowed, engine_settings.1),
        );
        progress.line("verifying every tenant database against its source");
        summary.verification = verify_all(&engine, &tenancies).await?;
        summary.print(args.json)?;
        if args.keep && !shutdown.is_cancelled() {
            print_psql(embedded, &tenancies, address);
            shutdown.cancelled().await;
        }
        anyhow::Ok(summary.all_equal())
    }
    .await;
    shutdown.cancel();
    let served = service.await.context("the service task")?;
    for tenancy in &tenancies {
        tenancy.tenant.close().await;
    }
    pool.close().await;
    service_pool.close().await;
    let verified = verified?;
    served?;
    Ok(verified)
}

/// The load, the burst and the catch-up, with progress; the summary without its
/// verification.
async fn phases(
    pool: &PgPool,
    tenancies: &mut [DemoTenancy],
    args: &DemoArgs,
    progress: &mut Progress,
    shutdown: &CancellationToken,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::new(args);
    progress.phase(&format!(
        "initial load: {} users with a primary email in each tenancy",
        args.users
    ));
    let started = Instant::now();
    summary.initial_rows = workload::load(pool, tenancies, args.users).await?;
    catch_up(pool, tenancies, progress, shutdown).await?;
    summary.initial_load = started.elapsed();

    progress.phase(&format!(
        "burst: inserts, updates and deletes at {} changes/s for {} s",
        args.rate, args.seconds
    ));
    let until = Instant::now() + Duration::from_secs(u64::from(args.seconds));
    let written = Mutex::new(Written::default());
    let tenancies = &*tenancies;
    // Several writers, as an application has: one commits a few hundred times a second.
    let writers = (0..BURST_WRITERS).map(|_| {
        workload::burst(
            pool,
            tenancies,
            args.rate.div_ceil(BURST_WRITERS),
            until,
            &written,
        )
    });
    let burst = futures::future::try_join_all(writers);
    let probe = workload::probe(pool, tenancies, until, CATCH_UP_TIMEOUT);
    let watch = watch_until(pool, tenancies, progress, until, shutdown);
    let (burst, latencies, watched) = tokio::join!(burst, probe, watch);
    burst?;
    watched?;
    summary.latencies = latencies?;
    summary.written = *written.lock().expect("not poisoned");
    summary.burst = Duration::from_secs(u64::from(args.seconds));
    progress.phase("waiting for every tenant database to catch up");
    let started = Instant::now();
    catch_up(pool, tenancies, progress, shutdown).await?;
    summary.catch_up = started.elapsed();
    progress.finish();
    if args.corrupt_a_row {
        workload::corrupt_a_row(tenancies).await?;
        progress.line("test hook: changed one row of the first tenant database by hand");
    }
    Ok(summary)
}

/// Shows progress until every tenant database has every row and change of its source.
async fn catch_up(
    pool: &PgPool,
    tenancies: &[DemoTenancy],
    progress: &mut Progress,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let now = progress::measure(pool, tenancies).await?;
        progress.show(&now);
        let caught_up = now.iter().all(|tenancy| {
            tenancy.changes_behind == 0 && tenancy.tenant_rows == tenancy.source_rows
        });
        if caught_up {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the tenant databases did not catch up within {} s",
                CATCH_UP_TIMEOUT.as_secs()
            );
        }
        if shutdown.is_cancelled() {
            anyhow::bail!("interrupted");
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Shows progress until `until`.
async fn watch_until(
    pool: &PgPool,
    tenancies: &[DemoTenancy],
    progress: &mut Progress,
    until: Instant,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    while Instant::now() < until {
        if shutdown.is_cancelled() {
            anyhow::bail!("interrupted");
        }
        progress.show(&progress::measure(pool, tenancies).await?);
        tokio::time::sleep(TICK).await;
    }
    Ok(())
}

async fn verify_all(
    engine: &SyncEngine,
    tenancies: &[DemoTenancy],
) -> anyhow::Result<Vec<DatabaseComparison>> {
    let mut comparisons = Vec::new();
    for tenancy in tenancies {
        let compared = verify_tenancy(engine, tenancy.id, None)
            .await
            .context("cannot read the source")?
            .unwrap_or_default();
        comparisons.extend(compared);
    }
    Ok(comparisons)
}

/// With `--keep`: how to look inside while the demo keeps running.
fn print_psql(embedded: &Embedded, tenancies: &[DemoTenancy], address: std::net::SocketAddr) {
    let password = embedded.password_file();
    let port = embedded.port();
    println!(
        "\nThe service keeps running on http://{address} until Ctrl-C. Look inside:\n  \
         internal: PGPASSWORD=\"$(cat {})\" psql -h 127.0.0.1 -p {port} -U postgres {}",
        password.display(),
        crate::embedded::DATABASE_NAME,
    );
    for tenancy in tenancies {
        println!(
            "  tenant:   PGPASSWORD=\"$(cat {})\" psql -h 127.0.0.1 -p {port} -U postgres {} \
             -c 'select count(*) from users'",
            password.display(),
            tenancy.database
        );
    }
    let directory = embedded.directory();
    println!(
        "Afterwards, the same data: EMBEDDED_DATA_DIR={} external-db-sync status",
        directory.display()
    );
}
