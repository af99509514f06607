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
//! - `postgres.log`, and the server's Unix socket.
//!
//! The server listens on 127.0.0.1 only, on a free port chosen at each start. It runs in
//! a process group of its own (a Ctrl-C reaches the service, which then stops the
//! server in order) and gets SIGINT (a fast, clean shutdown) if the service dies. When
//! the service runs as root, the cluster runs as the `postgres` account (or `nobody`),
//! because PostgreSQL refuses to run as root.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

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
    #[error("the embedded PostgreSQL {step} failed: {detail}")]
    Failed { step: &'static str, detail: String },
    #[error("EMBEDDED_DATA_DIR {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The account the server runs as when the service runs as root.
#[derive(Debug, Clone, Copy)]
struct Account {
    name: &'static str,
    uid: u32,
    gid: u32,
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

/// `initdb`, `postgres` and `pg_ctl` directory: on `PATH`, through `pg_config --bindir`,
/// or the newest under `/usr/lib/postgresql/*/bin`.
pub fn find_server_binaries() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_server(dir)) {
            return Some(dir);
        }
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir)
}

/// `postgres`, else `nobody`, when this process is root; `None` otherwise.
fn unprivileged_account() -> Result<Option<Account>, EmbeddedError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let c_name = CString::new(name).expect("no NUL in a literal");
        // SAFETY: getpwnam returns a pointer into static storage or null; it is read at
        // once. Start-up runs this before any other thread could call getpw*.
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        if !entry.is_null() {
            // SAFETY: checked non-null above.
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Ok(Some(Account { name, uid, gid }));
        }
    }
    Err(EmbeddedError::NoAccount)
}

/// Creates the directory (mode 0700), hands it to `account`, and checks that the account
/// can reach it.
fn prepare_directory(directory: &Path, account: Option<Account>) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(directory).map_err(io(directory))?;
    std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))
        .map_err(io(directory))?;
    let Some(account) = account else {
        return Ok(());
    };
    std::os::unix::fs::chown(directory, Some(account.uid), Some(account.gid))
        .map_err(io(directory))?;
    // Every parent must let the account through (the execute bit for "other", as the
    // account owns none of them).
    for parent in directory.ancestors().skip(1) {
        let mode = std::fs::metadata(parent)
            .map_err(io(parent))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(EmbeddedError::Unreachable {
                path: directory.to_owned(),
                account: account.name,
            });
        }
    }
    Ok(())
}

/// Takes `service.lock`; fails at once if another process holds it.
fn lock(directory: &Path) -> Result<File, EmbeddedError> {
    let path = directory.join("service.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(if error.kind() == std::io::ErrorKind::WouldBlock {
            EmbeddedError::InUse(directory.to_owned())
        } else {
            EmbeddedError::Io {
                path,
                source: error,
            }
        });
    }
    Ok(file)
}

/// The `postgres` role's password, generated on first use into `password` (mode 0600,
/// readable by the server's account, which `initdb` needs).
fn password(directory: &Path, account: Option<Account>) -> Result<SecretString, EmbeddedError> {
    read_or_create_secret(&directory.join("password"), account)
}

fn read_or_create_secret(
    path: &Path,
    account: Option<Account>,
) -> Result<SecretString, EmbeddedError> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(SecretString::from(text.trim())),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(path)(error)),
    }
    let secret: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(secret.as_bytes()).map_err(io(path))?;
    if let Some(account) = account {
        std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid)).map_err(io(path))?;
    }
    Ok(SecretString::from(secret))
}

/// Creates the cluster. A `data/` left without `PG_VERSION` by an interrupted `initdb`
/// holds no data yet, and is replaced.
fn initdb(
    bin: &Path,
    directory: &Path,
    data: &Path,
    account: Option<Account>,
) -> Result<(), EmbeddedError> {
    if data.exists() {
        std::fs::remove_dir_all(data).map_err(io(data))?;
    }
    let output = as_account(Command::new(bin.join("initdb")), account)
        .arg("-D")
        .arg(data)
        .args([
            "--username=postgres",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .arg(format!("--pwfile={}", directory.join("password").display()))
        .stdin(Stdio::null())
        .output()
        .map_err(|error| EmbeddedError::Failed {
            step: "initdb",
            detail: error.to_string(),
        })?;
    if !output.status.success() {
        return Err(EmbeddedError::Failed {
            step: "initdb",
            detail: one_line(&String::from_utf8_lossy(&output.stderr)),
        });
    }
    Ok(())
}

/// Starts `postgres` from a thread that lives as long as it (the parent-death signal is
/// tied to the spawning thread) and reports its exit.
fn spawn_server(
    bin: &Path,
    directory: &Path,
    data: &Path,
    port: u16,
    account: Option<Account>,
) -> Result<(u32, std::sync::mpsc::Receiver<std::io::Result<ExitStatus>>), EmbeddedError> {
    let log_path = directory.join("postgres.log");
    let log = File::create(&log_path).map_err(io(&log_path))?;
    if let Some(account) = account {
        std::os::unix::fs::chown(&log_path, Some(account.uid), Some(account.gid))
            .map_err(io(&log_path))?;
    }
    let mut command = as_account(Command::new(bin.join("postgres")), account);
    command
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", directory.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io(&log_path))?)
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it runs in the child after the uid change
    // (which would clear it).
    #[cfg(target_os = "linux")]
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (started, pid) = std::sync::mpsc::channel();
    let (ended, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || match command.spawn() {
        Ok(mut child) => {
            started.send(Ok(child.id())).ok();
            ended.send(child.wait()).ok();
        }
        Err(error) => {
            started.send(Err(error)).ok();
        }
    });
    let pid = pid
        .recv()
        .map_err(|_| EmbeddedError::Failed {
            step: "server",
            detail: "the thread that starts it ended".to_owned(),
        })?
        .map_err(|error| EmbeddedError::Failed {
            step: "server",
            detail: error.to_string(),
        })?;
    Ok((pid, exited))
}

fn as_account(mut command: Command, account: Option<Account>) -> Command {
    if let Some(account) = account {
        command.uid(account.uid).gid(account.gid);
        // Not root's working directory, which the account may not enter.
        command.current_dir("/");
    }
    command
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The last lines of `postgres.log`, on one line.
fn log_tail(directory: &Path) -> String {
    let log = std::fs::read_to_string(directory.join("postgres.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    one_line(&lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(500)
        .collect()
}
