use std::process::ExitCode;

use clap::Parser;
use external_db_sync::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
