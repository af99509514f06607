//! The embedded internal database: with no `DATABASE_URL`, the service runs a PostgreSQL
//! cluster of its own, from the server binaries installed on the machine.
//!
//! Everything lives in one directory (`EMBEDDED_DATA_DIR`, by default
//! `.external-db-sync/` under the current directory), kept across restarts:
//!
//! - `data/`: the cluster (`initdb` on first start);
//! - `password`: the `postgres` role's password (mode 0600), so that no other local
//!   account can connect;
//! - `cron-secret`: the generated `CRON_SECRET` when none is set (mode 0600);
//! - `service.lock`: held (`flock`) while a service uses the directory, so that a second
//!   one fails at once with a clear message; the kernel drops it when the holder dies,
//!   so a killed run leaves no stale lock;
//! - `postgres.log`, the server's log.
//!
//! The server listens on 127.0.0.1 only (no Unix socket), on a free port chosen at each
//! start. It runs in
//! a process group of its own (a Ctrl-C reaches the service, which then stops the
//! server in order) and gets SIGINT (a fast, clean shutdown) if the service dies. When
//! the service runs as root, the cluster runs as the `postgres` account (or `nobody`),
//! because PostgreSQL refuses to run as root.

mod setup;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

pub use setup::find_server_binaries;
use setup::{
    free_port, initdb, lock, log_tail, password, prepare_directory, read_or_create_secret, signal,
    spawn_server, unprivileged_account,
};

/// The database the service uses inside the embedded cluster.
pub const DATABASE_NAME: &str = "external_db_sync";
/// `EMBEDDED_DATA_DIR` when unset, under the current directory.
pub const DEFAULT_DIRECTORY: &str = ".external-db-sync";

/// How long the server may take to accept connections (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the embedded database cannot be used. One line each, naming what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no DATABASE_URL, and no PostgreSQL server binaries (initdb, postgres) to run an \
         embedded database: looked on PATH, through pg_config --bindir and under \
         /usr/lib/postgresql/*/bin. Install PostgreSQL's server package (Debian/Ubuntu: \
         apt-get install postgresql; macOS: brew install postgresql) or set DATABASE_URL"
    )]
    NoBinaries,
    #[error(
        "the embedded database in {0} is in use by another external-db-sync process; stop \
         it, or set EMBEDDED_DATA_DIR to another directory"
    )]
    InUse(PathBuf),
    #[error(
        "running as root, and neither a postgres nor a nobody account exists to run the \
         embedded PostgreSQL as (it refuses to run as root); create one, or set DATABASE_URL"
    )]
    NoAccount,
    #[error(
        "EMBEDDED_DATA_DIR {path}: the {account} account that runs the embedded PostgreSQL \
         cannot reach it (a parent directory is closed to it); choose a directory it can \
         reach, such as one under /var/lib or /tmp, or run as a non-root user"
    )]
    Unreachable {
        path: PathBuf,
        account: &'static str,
    },
    #[error(
        "EMBEDDED_DATA_DIR {0}: the directory exists and holds other files; choose a new or \
         empty directory for the embedded database"
    )]
    Foreign(PathBuf),
    #[error("the embedded PostgreSQL {step} failed: {detail}")]
    Failed { step: &'static str, detail: String },
    #[error("EMBEDDED_DATA_DIR {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A running embedded cluster. Stop it with [`Embedded::stop`]; dropped without, it is
/// stopped too (without waiting).
pub struct Embedded {
    directory: PathBuf,
    port: u16,
    password: SecretString,
    version: String,
    pid: u32,
    exited: std::sync::mpsc::Receiver<std::io::Result<ExitStatus>>,
    /// Held while the service uses the directory.
    _lock: File,
}

impl Embedded {
    /// Starts the cluster in `directory`, creating it on first use, and creates the
    /// service's database in it if missing.
    pub async fn start(directory: &Path) -> Result<Embedded, EmbeddedError> {
        let bin = find_server_binaries().ok_or(EmbeddedError::NoBinaries)?;
        let account = unprivileged_account()?;
        let directory = std::path::absolute(directory).map_err(io(directory))?;
        prepare_directory(&directory, account)?;
        let lock = lock(&directory)?;
        let password = password(&directory, account)?;
        let data = directory.join("data");
        if !data.join("PG_VERSION").is_file() {
            initdb(&bin, &directory, &data, account)?;
        }
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .map_err(io(&data))?
            .trim()
            .to_owned();
        let mut last_failure = None;
        for _attempt in 0..5 {
            let port = free_port().map_err(io(&directory))?;
            let (pid, exited) = spawn_server(&bin, &directory, &data, port, account)?;
            let mut embedded = Embedded {
                directory: directory.clone(),
                port,
                password: password.clone(),
                version: version.clone(),
                pid,
                exited,
                _lock: lock.try_clone().map_err(io(&directory))?,
            };
            match embedded.wait_until_ready().await {
                Ok(()) => {
                    embedded.create_database().await?;
                    return Ok(embedded);
                }
                // Another process took the port between the check and the bind.
                Err(failure) if log_tail(&directory).contains("could not bind") => {
                    last_failure = Some(failure);
                }
                Err(failure) => return Err(failure),
            }
        }
        Err(last_failure.expect("five attempts failed"))
    }

    /// The service's connection URL, with the password.
    pub fn url(&self) -> SecretString {
        SecretString::from(format!(
            "postgres://postgres:{}@127.0.0.1:{}/{DATABASE_NAME}",
            percent_encoding::utf8_percent_encode(
                self.password.expose_secret(),
                percent_encoding::NON_ALPHANUMERIC
            ),
            self.port
        ))
    }

    /// The URL without the password, to show.
    pub fn display_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{DATABASE_NAME}",
            self.port
        )
    }

    /// The port the server listens on (127.0.0.1), chosen at this start.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The server's major version (`PG_VERSION`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where the password is kept.
    pub fn password_file(&self) -> PathBuf {
        self.directory.join("password")
    }

    /// The `CRON_SECRET` kept in the directory, generated (mode 0600) on first use.
    pub fn cron_secret(&self) -> Result<(SecretString, PathBuf), EmbeddedError> {
        let path = self.directory.join("cron-secret");
        let secret = read_or_create_secret(&path, None)?;
        Ok((secret, path))
    }

    /// Stops the server with a fast shutdown (clients disconnected, a checkpoint
    /// written), and waits for it to exit; after [`STOP_TIMEOUT`] it is killed.
    pub async fn stop(self) {
        signal(self.pid, libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.exited.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return,
            }
        }
        tracing::warn!(
            pid = self.pid,
            "the embedded PostgreSQL did not stop in time; killing it"
        );
        signal(self.pid, libc::SIGKILL);
    }

    async fn wait_until_ready(&mut self) -> Result<(), EmbeddedError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let options = self.options("postgres");
        loop {
            if let Ok(connection) = options.connect().await {
                connection.close().await.ok();
                return Ok(());
            }
            if let Ok(status) = self.exited.try_recv() {
                let status = status.map_or_else(|error| error.to_string(), |s| s.to_string());
                return Err(EmbeddedError::Failed {
                    step: "server",
                    detail: format!(
                        "it exited ({status}); the end of {}: {}",
                        self.directory.join("postgres.log").display(),
                        log_tail(&self.directory)
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(EmbeddedError::Failed {
                    step: "server",
                    detail: format!(
                        "it did not accept connections within {} s; see {}",
                        START_TIMEOUT.as_secs(),
                        self.directory.join("postgres.log").display()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .password(self.password.expose_secret())
            .database(database)
            .application_name("external-db-sync")
    }

    async fn create_database(&self) -> Result<(), EmbeddedError> {
        let failed = |error: sqlx::Error| EmbeddedError::Failed {
            step: "database creation",
            detail: error.to_string(),
        };
        let mut connection = self.options("postgres").connect().await.map_err(failed)?;
        let exists: bool =
            sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
                .bind(DATABASE_NAME)
                .fetch_one(&mut connection)
                .await
                .map_err(failed)?;
        if !exists {
            sqlx::raw_sql(&format!("create database {DATABASE_NAME}"))
                .execute(&mut connection)
                .await
                .map_err(failed)?;
        }
        connection.close().await.ok();
        Ok(())
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Stopped already, or a service that ends without stopping it: a fast shutdown
        // either way (a signal to a process that has exited does nothing).
        if matches!(
            self.exited.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        ) {
            signal(self.pid, libc::SIGINT);
        }
    }
}
