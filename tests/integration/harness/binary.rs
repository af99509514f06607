//! Running the built binary: a clean environment, a free address, waiting for health.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::wait;

pub const BINARY: &str = env!("CARGO_BIN_EXE_external-db-sync");

/// Every variable the service reads, cleared so that the caller's environment cannot leak
/// into a test.
const VARIABLES: [&str; 18] = [
    "DATABASE_URL",
    "EMBEDDED_DATA_DIR",
    "DATABASE_MAX_CONNECTIONS",
    "BIND_ADDR",
    "PUBLIC_URL",
    "CRON_SECRET",
    "SYNC_QUEUE",
    "QSTASH_URL",
    "QSTASH_TOKEN",
    "QSTASH_CURRENT_SIGNING_KEY",
    "QSTASH_NEXT_SIGNING_KEY",
    "RUN_WORKERS",
    "ALLOW_PRIVATE_TARGETS",
    "RUST_LOG",
    "LOG_FORMAT",
    "SEQUENCER_BATCH_SIZE",
    "SEQUENCER_IDLE_INTERVAL_MS",
    "SEQUENCER_GATHER_MS",
];

/// The binary with `args`, only the variables in `env`, no input, killed when dropped.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BINARY);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for variable in VARIABLES {
        command.env_remove(variable);
    }
    command.envs(env.iter().copied());
    command
}

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Waits (30 s at most) until the process answers `/healthz`; panics if it exits first.
pub async fn wait_until_healthy(address: &str, child: &mut Child) {
    let client = reqwest::Client::new();
    wait::until("serve to answer /healthz", Duration::from_secs(30), || {
        let exited = child.try_wait().unwrap();
        let client = &client;
        async move {
            assert!(exited.is_none(), "serve exited early: {exited:?}");
            let response = client
                .get(format!("http://{address}/healthz"))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        }
    })
    .await;
}

/// `serve` on a free loopback address against `database_url`, with the test's cron
/// secret, private targets allowed and `env` on top, logging to `log`; returns once it
/// answers `/healthz`, with its address.
pub async fn serve_logging_to(
    database_url: &str,
    env: &[(&str, &str)],
    log: &Path,
) -> (Child, String) {
    let address = free_address();
    let mut variables = vec![
        ("DATABASE_URL", database_url),
        ("CRON_SECRET", super::app::CRON_SECRET),
        ("BIND_ADDR", address.as_str()),
        ("ALLOW_PRIVATE_TARGETS", "true"),
    ];
    variables.extend_from_slice(env);
    let mut child = command(&["serve"], &variables)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_until_healthy(&address, &mut child).await;
    (child, address)
}

/// The bound stated for a `serve` process's peak memory while tenants misbehave (the
/// hostile-tenant and `sslrootcert` tests). What they try (ten million rows, 50 MB
/// values, reading `/dev/zero`) would pass it many times over if the service took it.
pub const PEAK_RSS_BOUND: u64 = 64 * 1024 * 1024;

/// A process's peak resident memory, from the kernel's high-water mark.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}
