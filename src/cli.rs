//! The command line. Each command's doc comment is its `--help`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Env};
use crate::{db, startup, telemetry};

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
    Serve,
    /// Apply pending migrations to the internal database (DATABASE_URL) and exit.
    /// Safe to run repeatedly and over a database whose source tables already exist.
    Migrate,
}

/// Runs the command and turns its result into the process exit code: 0 on success, 2
/// for invalid configuration, 1 for any other failure. Failures are printed as one line
/// on standard error.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("external-db-sync: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let env = Env::process();
    let log_settings = env.log_settings()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = env.config()?;
            telemetry::init(&log_settings);
            startup::serve(config).await
        }
        Command::Migrate => {
            let database = env.database_settings()?;
            telemetry::init(&log_settings);
            let pool = db::connect(&database)
                .await
                .context("cannot connect to the internal database (DATABASE_URL)")?;
            db::migrate(&pool)
                .await
                .context("cannot migrate the internal database")?;
            tracing::info!("migrations applied");
            pool.close().await;
            Ok(())
        }
    }
}
