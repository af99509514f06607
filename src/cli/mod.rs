//! The command line. Each command's doc comment is its `--help`.
//!
//! Exit codes: 0 success; 1 a failure, or a report that found something wrong (`status`:
//! a database is failing; `verify`: a database differs; `sync`, `resync`: a database
//! failed), or an unknown tenancy or database; 2 an invalid configuration, command line
//! or argument (nothing was done).

mod resync_report;
mod status;
mod sync_report;
mod table;
mod tenancy;
mod verify_report;

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::config::{ConfigError, Env};
use crate::embedded::Embedded;
use crate::sync::policy::TargetPolicy;
use crate::sync::resync::TenancyResync;
use crate::sync::summary::SyncSummary;
use crate::sync::verify::TenancyComparison;
use crate::sync::{SyncEngine, TenancySync};
use crate::{db, startup, sync, telemetry};

/// Keeps each tenant's user data continuously copied from the internal PostgreSQL into
/// PostgreSQL databases that the tenants own.
///
/// Configuration comes from the environment (DATABASE_URL, CRON_SECRET, SYNC_QUEUE, …);
/// see the README for the full list.
#[derive(Debug, Parser)]
#[command(name = "external-db-sync", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service (the default): applies pending migrations, serves the cron,
    /// webhook and health routes, and with RUN_WORKERS=true (the default) also runs the
    /// sequencer and poller loops in-process, so that no cron is needed. Stops cleanly on
    /// SIGINT or SIGTERM, after the syncs it started have ended.
    ///
    /// Without DATABASE_URL it runs an embedded PostgreSQL in EMBEDDED_DATA_DIR (default
    /// .external-db-sync/ here), from the server binaries installed on the machine, with a
    /// generated CRON_SECRET kept beside it unless one is set.
    Serve,
    /// See the whole pipeline work on this machine in one command: starts an embedded
    /// PostgreSQL in a fresh directory, creates tenancies each with its own tenant
    /// database, runs the service in-process, loads users, writes a burst of inserts,
    /// updates and deletes while measuring commit-to-visible latency, waits until every
    /// tenant database has caught up, verifies each against its source and prints a
    /// summary. Never touches DATABASE_URL. Exits 0 only when every tenant database
    /// verified equal.
    Demo(crate::demo::DemoArgs),
    /// Apply pending migrations to the internal database (DATABASE_URL, or the embedded
    /// one) and exit.
    /// Safe to run repeatedly and over a database whose source tables already exist.
    Migrate,
    /// Show how far behind each tenant database is: the tenancy's latest change, how far
    /// the database is synced, the changes in between, the time since its last success,
    /// and its last error. Exits 1 when any database is failing.
    Status {
        /// Only this tenancy.
        tenancy: Option<Uuid>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Sync one tenancy now, in the foreground, whatever the queue holds, and print each
    /// database's result (what the /sync-engine webhook answers). Exits 1 when a
    /// database failed or the tenancy does not exist. Databases waiting for their next
    /// attempt after a failure are left alone, as the service leaves them.
    Sync {
        tenancy: Uuid,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare each tenant database of a tenancy with the source, mapping by mapping, in
    /// bounded memory: rows missing, extra and differing, with up to 10 example ids each.
    /// Nothing is written. Exits 0 only when every database is equal to its source.
    Verify {
        tenancy: Uuid,
        /// Only this database (its id in the tenancy's configuration).
        #[arg(long)]
        database: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create, list, show and delete tenancies.
    Tenancy {
        #[command(subcommand)]
        command: tenancy::TenancyCommand,
    },
    /// Add a tenant database to a tenancy, or remove one.
    Database {
        #[command(subcommand)]
        command: tenancy::DatabaseCommand,
    },
    /// Bring each tenant database of a tenancy (or one) back to the source exactly: rows
    /// the source does not have are deleted, missing and differing rows written, and the
    /// watermark set to the source's last change. Each table is rewritten in one
    /// transaction, so readers see it as it was until it is the source again, never
    /// partial or empty. Exits 0 only when every database was brought back.
    Resync {
        tenancy: Uuid,
        /// Only this database (its id in the tenancy's configuration).
        #[arg(long)]
        database: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// An argument the command refuses (a database entry the sync engine would not use, a
/// deletion not confirmed): nothing was done, and the exit code is 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(pub(super) String);

/// How a command that succeeded ends.
pub(super) enum Finished {
    Success,
    /// The command worked and found something wrong (exit code 1).
    Attention,
}

/// Runs the command and turns its result into the process exit code: 0 on success, 2
/// for invalid configuration, 1 for any other failure. Failures are printed as one line
/// on standard error.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(Finished::Success) => ExitCode::SUCCESS,
        Ok(Finished::Attention) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("external-db-sync: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some()
                || error.downcast_ref::<Refused>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<Finished> {
    let process = Env::process();
    let mut log_settings = process.log_settings()?;
    let command = cli.command.unwrap_or(Command::Serve);

    if !matches!(command, Command::Serve | Command::Migrate) && !process.is_set("RUST_LOG") {
        // A command that prints a report (or, for the demo, its progress) logs only
        // what goes wrong, unless asked.
        log_settings.filter = "warn".to_owned();
    }
    telemetry::init(&log_settings);
    let (env, embedded) = match command {
        // The demo starts a database of its own, whatever DATABASE_URL says.
        Command::Demo(_) => (process_env(), None),
        _ => with_database(process).await?,
    };
    let result = run_command(command, &env, embedded.as_ref()).await;
    if let Some(embedded) = embedded {
        embedded.database.stop().await;
    }
    result
}

/// The environment as the commands read it: as it is when `DATABASE_URL` is set;
/// otherwise with `DATABASE_URL` pointing at an embedded database started here (and, if
/// unset, `CRON_SECRET` read from the one kept beside it).
async fn with_database(
    process: Env<fn(&str) -> Option<String>>,
) -> anyhow::Result<(Env<Lookup>, Option<EmbeddedRun>)> {
    let Some(directory) = process.embedded_data_dir() else {
        return Ok((process_env(), None));
    };
    let embedded = Embedded::start(&directory).await?;
    migrate_embedded(&embedded).await?;
    let mut set = HashMap::new();
    set.insert("DATABASE_URL", embedded.url().expose_secret().to_owned());
    let secret = if process.is_set("CRON_SECRET") {
        "from CRON_SECRET".to_owned()
    } else {
        let (secret, path) = embedded.cron_secret()?;
        set.insert("CRON_SECRET", secret.expose_secret().to_owned());
        path.display().to_string()
    };
    let lookup: Lookup =
        Box::new(move |name| set.get(name).cloned().or_else(|| std::env::var(name).ok()));
    let run = EmbeddedRun {
        database: embedded,
        secret,
    };
    Ok((Env::from_lookup(lookup), Some(run)))
}

/// The environment as it is.
fn process_env() -> Env<Lookup> {
    Env::from_lookup(Box::new(|name| std::env::var(name).ok()))
}

/// The embedded database the command runs on, and where its `CRON_SECRET` comes from
/// (the variable, or the file it was generated into), for the start-up block.
struct EmbeddedRun {
    database: Embedded,
    secret: String,
}

/// Brings a new (or older) embedded database to the current schema, so that every
/// command finds its tables.
async fn migrate_embedded(embedded: &Embedded) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = embedded
        .url()
        .expose_secret()
        .parse()
        .context("the embedded database's URL")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context("cannot connect to the embedded database")?;
    db::migrate(&pool)
        .await
        .context("cannot migrate the embedded database")?;
    pool.close().await;
    Ok(())
}

/// How the commands read a variable.
pub(super) type Lookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

async fn run_command(
    command: Command,
    env: &Env<Lookup>,
    embedded: Option<&EmbeddedRun>,
) -> anyhow::Result<Finished> {
    match command {
        Command::Serve => {
            let config = env.config()?;
            if let Some(embedded) = embedded {
                print_embedded_block(embedded, &config.bind_addr.to_string());
            }
            startup::serve(config).await?;
            Ok(Finished::Success)
        }
        Command::Migrate => {
            let pool = connect(env).await?;
            db::migrate(&pool)
                .await
                .context("cannot migrate the internal database")?;
            tracing::info!("migrations applied");
            pool.close().await;
            Ok(Finished::Success)
        }
        Command::Status { tenancy, json } => {
            let pool = connect(env).await?;
            let statuses = db::status::read(&pool, tenancy)
                .await
                .context("cannot read the sync status")?;
            pool.close().await;
            let report = db::status::StatusReport::new(statuses);
            status::print(&report, json)?;
            Ok(if report.ok {
                Finished::Success
            } else {
                Finished::Attention
            })
        }
        Command::Sync { tenancy, json } => sync_now(env, tenancy, json).await,
        Command::Verify {
            tenancy,
            database,
            json,
        } => verify(env, tenancy, database.as_deref(), json).await,
        Command::Demo(args) => Ok(if crate::demo::run(args).await? {
            Finished::Success
        } else {
            Finished::Attention
        }),
        Command::Tenancy { command } => tenancy::tenancy(command, env).await,
        Command::Database { command } => tenancy::database(command, env).await,
        Command::Resync {
            tenancy,
            database,
            json,
        } => resync(env, tenancy, database.as_deref(), json).await,
    }
}

/// The sync engine as `serve` builds it (settings, target policy), and its pool.
async fn engine(env: &Env<Lookup>) -> anyhow::Result<(SyncEngine, sqlx::PgPool)> {
    let database = env.database_settings()?;
    let settings = env.sync_settings()?;
    let policy = TargetPolicy::new(env.private_targets()?, database.location());
    let pool = connect(env).await?;
    Ok((SyncEngine::new(pool.clone(), settings, policy), pool))
}

/// `verify`: every database of the tenancy (or one) against the source.
async fn verify(
    env: &Env<Lookup>,
    tenancy: Uuid,
    database: Option<&str>,
    json: bool,
) -> anyhow::Result<Finished> {
    let (engine, pool) = engine(env).await?;
    let comparisons = sync::verify::verify_tenancy(&engine, tenancy, database)
        .await
        .context("cannot read the source from the internal database")?;
    pool.close().await;
    let comparison =
        TenancyComparison::new(tenancy, known_databases(tenancy, database, comparisons)?);
    verify_report::print(&comparison, json)?;
    Ok(if comparison.equal {
        Finished::Success
    } else {
        Finished::Attention
    })
}

/// `resync`: every database of the tenancy (or one) back to the source.
async fn resync(
    env: &Env<Lookup>,
    tenancy: Uuid,
    database: Option<&str>,
    json: bool,
) -> anyhow::Result<Finished> {
    let (engine, pool) = engine(env).await?;
    let results = sync::resync::resync_tenancy(&engine, tenancy, database)
        .await
        .context("cannot read the source from the internal database")?;
    pool.close().await;
    let resync = TenancyResync::new(tenancy, known_databases(tenancy, database, results)?);
    resync_report::print(&resync, json)?;
    Ok(if resync.ok {
        Finished::Success
    } else {
        Finished::Attention
    })
}

/// A tenancy's per-database results, or the error that there is no such tenancy, or
/// no such database in it.
fn known_databases<T>(
    tenancy: Uuid,
    database: Option<&str>,
    results: Option<Vec<T>>,
) -> anyhow::Result<Vec<T>> {
    let Some(results) = results else {
        anyhow::bail!("no tenancy {tenancy}");
    };
    if let Some(database) = database {
        if results.is_empty() {
            anyhow::bail!("tenancy {tenancy} has no database {database}");
        }
    }
    Ok(results)
}

/// `sync`: the engine as `serve` builds it, on this one tenancy.
async fn sync_now(env: &Env<Lookup>, tenancy: Uuid, json: bool) -> anyhow::Result<Finished> {
    let (engine, pool) = engine(env).await?;
    let outcome = sync::sync_tenancy_now(&engine, tenancy)
        .await
        .context("cannot read the tenancy from the internal database")?;
    pool.close().await;
    if matches!(outcome, TenancySync::UnknownTenancy) {
        anyhow::bail!("no tenancy {tenancy}");
    }
    let summary = SyncSummary::new(tenancy, outcome);
    sync_report::print(&summary, json)?;
    Ok(if summary.ok {
        Finished::Success
    } else {
        Finished::Attention
    })
}

/// The internal database's pool, for a command.
pub(super) async fn connect(env: &Env<Lookup>) -> anyhow::Result<sqlx::PgPool> {
    let database = env.database_settings()?;
    db::connect(&database)
        .await
        .context("cannot connect to the internal database (DATABASE_URL)")
}

/// The one block `serve` prints on an embedded database: where everything is.
fn print_embedded_block(run: &EmbeddedRun, address: &str) {
    let embedded = &run.database;
    println!(
        "external-db-sync on an embedded PostgreSQL {} in {}\n  \
         internal database  {} (password in {})\n  \
         listening on       http://{address}\n  \
         cron secret        {}",
        embedded.version(),
        embedded.directory().display(),
        embedded.display_url(),
        embedded.password_file().display(),
        run.secret,
    );
}
