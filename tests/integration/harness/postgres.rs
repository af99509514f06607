//! A throwaway PostgreSQL server for the whole test run, and fresh databases on it.
//!
//! By default the harness starts its own cluster: `initdb` and `postgres` are looked up
//! on `PATH`, through `pg_config --bindir`, then under `/usr/lib/postgresql/*/bin`. When
//! the tests run as root (CI, containers) the server runs as the `postgres` system user,
//! or `nobody`, because PostgreSQL refuses to run as root. The server dies with the test
//! process (parent-death signal) and its directory is swept by the next run.
//!
//! Set `EXTERNAL_DB_SYNC_TEST_DATABASE_URL` to a superuser URL of a running server to use
//! that server instead; the tests then create databases named `eds_*` on it.

use std::ffi::CString;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const EXTERNAL_SERVER_VARIABLE: &str = "EXTERNAL_DB_SYNC_TEST_DATABASE_URL";
const DIRECTORY_PREFIX: &str = "external-db-sync-tests-";

/// The server every test of this process uses.
pub struct Server {
    /// Superuser URL without a database name; append `/name`.
    base_url: String,
    /// The directory of the server's Unix socket, for a cluster of the harness's own.
    pub socket_directory: Option<PathBuf>,
    /// Migrated database that per-test databases are cloned from.
    template: String,
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The shared server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| start_server(ClusterSetup::default()))
}

/// The server of `EXTERNAL_DB_SYNC_TEST_DATABASE_URL`, or a new cluster set up with
/// `setup`, with a migrated template database.
pub fn start_server(setup: ClusterSetup) -> Server {
    // Start-up needs async database calls but may run inside a test's runtime: give it a
    // runtime of its own on a thread of its own, so no pool outlives it.
    std::thread::spawn(move || {
        let (base_url, socket_directory) = match std::env::var(EXTERNAL_SERVER_VARIABLE) {
            Ok(url) if !url.trim().is_empty() => (strip_database(&url), None),
            _ => {
                let (base_url, directory) = start_cluster(&setup);
                (base_url, Some(directory))
            }
        };
        let template = format!("eds_template_{}", short_id());
        tokio::runtime::Runtime::new()
            .expect("a tokio runtime for the test server set-up")
            .block_on(create_template(&base_url, &template));
        Server {
            base_url,
            socket_directory,
            template,
        }
    })
    .join()
    .expect("the test PostgreSQL server started")
}

impl Server {
    /// A server without a migrated template: only for tenant databases.
    pub fn without_template(base_url: String) -> Server {
        Server {
            base_url,
            socket_directory: None,
            template: String::new(),
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}", self.base_url)
    }

    /// A new database with the service's schema migrated, cloned from the template.
    pub async fn migrated_database(&self) -> String {
        let name = format!("eds_test_{}", short_id());
        let statement = format!(r#"create database "{name}" template "{}""#, self.template);
        self.create_database(&statement).await;
        self.url(&name)
    }

    /// A new, empty database: a tenant's own database, or one to migrate by hand.
    pub async fn empty_database(&self, prefix: &str) -> String {
        let name = format!("eds_{prefix}_{}", short_id());
        self.create_database(&format!(r#"create database "{name}""#))
            .await;
        self.url(&name)
    }

    /// Runs a statement on the server's `postgres` database.
    pub async fn admin_execute(&self, statement: &str) {
        let mut connection = PgConnection::connect(&self.url("postgres")).await.unwrap();
        sqlx::raw_sql(statement)
            .execute(&mut connection)
            .await
            .unwrap();
        connection.close().await.unwrap();
    }

    async fn create_database(&self, statement: &str) {
        // Two clones of one template at the same instant can collide ("source database
        // is being accessed by other users"); that answer is retried.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut connection = PgConnection::connect(&self.url("postgres")).await.unwrap();
            let result = sqlx::raw_sql(statement).execute(&mut connection).await;
            connection.close().await.ok();
            match result {
                Ok(_) => return,
                Err(sqlx::Error::Database(error))
                    if error.code().as_deref() == Some("55006") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("{statement}: {error}"),
            }
        }
    }
}

/// A pool on a fresh migrated database.
pub async fn migrated_pool() -> PgPool {
    pool(&server().migrated_database().await).await
}

/// A pool on `url`, sized for a test.
pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .unwrap_or_else(|error| panic!("connecting to a test database: {error}"))
}

pub fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..16].to_owned()
}

fn strip_database(url: &str) -> String {
    let mut url = url::Url::parse(url).expect("EXTERNAL_DB_SYNC_TEST_DATABASE_URL is a URL");
    url.set_path("");
    url.to_string().trim_end_matches('/').to_owned()
}

async fn create_template(base_url: &str, template: &str) {
    let mut admin = PgConnection::connect(&format!("{base_url}/postgres"))
        .await
        .expect("connecting to the test server");
    sqlx::raw_sql(&format!(r#"create database "{template}""#))
        .execute(&mut admin)
        .await
        .expect("creating the template database");
    admin.close().await.ok();
    let options = PgConnectOptions::from_str(&format!("{base_url}/{template}")).unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    external_db_sync::db::migrate(&pool)
        .await
        .expect("migrating the template database");
    // No connection may stay open on a template while it is cloned.
    pool.close().await;
}

// ---------------------------------------------------------------------------------------
// Starting a cluster

/// What a cluster needs beyond the defaults: files placed in its directory (readable
/// only by the server's account, as PostgreSQL demands of key files) and settings,
/// where `{dir}` stands for that directory.
#[derive(Default)]
pub struct ClusterSetup {
    pub files: Vec<(&'static str, String)>,
    pub settings: Vec<(&'static str, String)>,
}

impl ClusterSetup {
    /// Durability as in production (`fsync`, `synchronous_commit`, full page writes),
    /// for benchmarks: the tests' default turns it off for speed, which would flatter
    /// every method that commits often.
    #[allow(dead_code)] // used by the benchmarks, which include this file
    pub fn durable() -> ClusterSetup {
        ClusterSetup {
            files: Vec::new(),
            settings: vec![
                ("fsync", "on".to_owned()),
                ("synchronous_commit", "on".to_owned()),
                ("full_page_writes", "on".to_owned()),
            ],
        }
    }
}

/// Starts a cluster of its own (never the external server of
/// `EXTERNAL_DB_SYNC_TEST_DATABASE_URL`) and returns its superuser URL without a
/// database name, and the directory of its Unix socket. It lives as long as the test
/// process.
pub fn start_cluster(setup: &ClusterSetup) -> (String, PathBuf) {
    let cluster = Cluster::init(setup);
    for _attempt in 0..5 {
        let port = free_port();
        if cluster.spawn(port) {
            return (cluster.base_url(port), cluster.directory);
        }
    }
    let log = std::fs::read_to_string(cluster.directory.join("postgres.log")).unwrap_or_default();
    panic!("the test PostgreSQL server did not start; its log:\n{log}");
}

/// An initialized data directory, and how to start a server on it.
struct Cluster {
    bin: PathBuf,
    directory: PathBuf,
    data: PathBuf,
    account: Option<(u32, u32)>,
    /// `-c name=value` arguments from the set-up, after the defaults.
    settings: Vec<String>,
}

impl Cluster {
    fn init(setup: &ClusterSetup) -> Cluster {
        sweep_stale_directories();
        let bin = find_server_binaries();
        let directory = std::env::temp_dir().join(format!(
            "{DIRECTORY_PREFIX}{}-{}",
            std::process::id(),
            short_id()
        ));
        let data = directory.join("data");
        std::fs::create_dir_all(&directory).unwrap();
        let account = unprivileged_account();
        if let Some((uid, gid)) = account {
            chown(&directory, uid, gid);
        }
        for (name, contents) in &setup.files {
            let path = directory.join(name);
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some((uid, gid)) = account {
                chown(&path, uid, gid);
            }
        }
        let directory_text = directory.to_string_lossy().into_owned();
        let settings: Vec<String> = setup
            .settings
            .iter()
            .flat_map(|(name, value)| {
                [
                    "-c".to_owned(),
                    format!("{name}={}", value.replace("{dir}", &directory_text)),
                ]
            })
            .collect();

        let initdb = run_as(Command::new(bin.join("initdb")), account)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        Cluster {
            bin,
            directory,
            data,
            account,
            settings,
        }
    }

    fn base_url(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}")
    }

    /// Starts the server on `port` (its log appended to `postgres.log`), and waits up to
    /// a minute for it to answer; false if it did not.
    fn spawn(&self, port: u16) -> bool {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.directory.join("postgres.log"))
            .unwrap();
        let directory_text = self.directory.to_string_lossy().into_owned();
        let mut command = run_as(Command::new(self.bin.join("postgres")), self.account);
        command
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("unix_socket_directories={directory_text}"),
            ])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=128MB"])
            // A throwaway cluster: durability buys nothing and costs seconds.
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            // Last, so that a setup can override the defaults above.
            .args(&self.settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_this_process(&mut command);
        // The parent-death signal fires when the spawning *thread* ends, so spawn from a
        // thread that lives exactly as long as the server.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                sender.send(Ok(child.id())).ok();
                child.wait().ok();
                // Tells a start-up that is still waiting that the server gave up.
                sender.send(Ok(0)).ok();
            }
            Err(error) => {
                sender.send(Err(error)).ok();
            }
        });
        receiver.recv().unwrap().expect("starting postgres");
        let exited = move || receiver.try_recv().is_ok();
        // Long enough for crash recovery after a kill under load (minutes of WAL).
        wait_for_server(&self.base_url(port), Duration::from_secs(300), exited)
    }

    /// The postmaster's process id, from its lock file; `None` when it is not running.
    fn postmaster_pid(&self) -> Option<libc::pid_t> {
        let lock = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: libc::pid_t = lock.lines().next()?.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
    }
}

/// A cluster of its own that a test may kill, stop and start again, on the same port and
/// data: for the fault tests. Dropped, it is shut down at once.
#[allow(dead_code)] // used by the fault tests, which include this file
pub struct RestartableServer {
    cluster: Cluster,
    port: u16,
}

#[allow(dead_code)] // used by the fault tests, which include this file
impl RestartableServer {
    /// A new cluster, running.
    pub fn start(setup: &ClusterSetup) -> RestartableServer {
        let cluster = Cluster::init(setup);
        for _attempt in 0..5 {
            let port = free_port();
            if cluster.spawn(port) {
                return RestartableServer { cluster, port };
            }
        }
        panic!("the restartable PostgreSQL server did not start");
    }

    /// Superuser URL without a database name.
    pub fn base_url(&self) -> String {
        self.cluster.base_url(self.port)
    }

    /// The harness's view of this server, with a migrated template: for
    /// [`Server::migrated_database`] and [`Server::empty_database`].
    pub fn databases(&self) -> Server {
        let base_url = self.base_url();
        std::thread::spawn(move || {
            let template = format!("eds_template_{}", short_id());
            tokio::runtime::Runtime::new()
                .expect("a tokio runtime for the template")
                .block_on(create_template(&base_url, &template));
            Server {
                base_url,
                socket_directory: None,
                template,
            }
        })
        .join()
        .expect("the template database was created")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the postmaster with SIGKILL (its backends end when they notice), and waits
    /// until it is gone.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Fast shutdown (SIGINT): sessions are ended, the server exits cleanly.
    pub fn stop(&self) {
        self.signal(libc::SIGINT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self
            .cluster
            .postmaster_pid()
            .expect("the server is running");
        // SAFETY: kill with a pid read from the server's own lock file.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "signalling the postmaster"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.cluster.postmaster_pid() == Some(pid) {
            assert!(Instant::now() < deadline, "the postmaster did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port and data; retried while the old
    /// server's shared memory is still held by backends that are ending.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !self.cluster.spawn(self.port) {
            assert!(
                Instant::now() < deadline,
                "the server did not start again; its log:\n{}",
                std::fs::read_to_string(self.cluster.directory.join("postgres.log"))
                    .unwrap_or_default()
            );
        }
    }
}

impl Drop for RestartableServer {
    fn drop(&mut self) {
        if let Some(pid) = self.cluster.postmaster_pid() {
            // SAFETY: as in `signal`; immediate shutdown.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
    }
}

/// Waits until the server answers; false after `limit`, or as soon as `exited` says it
/// is gone.
/// On a thread of its own, so that a test's runtime may call it.
fn wait_for_server(base_url: &str, limit: Duration, exited: impl Fn() -> bool + Send) -> bool {
    std::thread::scope(|scope| {
        scope
            .spawn(|| wait_for_server_here(base_url, limit, exited))
            .join()
            .expect("waiting for the server")
    })
}

fn wait_for_server_here(base_url: &str, limit: Duration, exited: impl Fn() -> bool) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + limit;
    runtime.block_on(async {
        while Instant::now() < deadline && !exited() {
            if let Ok(connection) = PgConnection::connect(&format!("{base_url}/postgres")).await {
                connection.close().await.ok();
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    })
}

/// Makes the server get SIGQUIT (immediate shutdown) when this test process exits,
/// however it exits. Linux only; elsewhere a server outlives a killed test run.
#[cfg(target_os = "linux")]
fn die_with_this_process(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe. It runs in the child after the uid change
    // (which would clear it).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_this_process(_command: &mut Command) {}

/// Where the service itself looks for an embedded database's binaries.
fn find_server_binaries() -> PathBuf {
    external_db_sync::embedded::find_server_binaries().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries (initdb, postgres) found on PATH, through \
             pg_config --bindir, or under /usr/lib/postgresql/*/bin; install them \
             (Debian: apt-get install postgresql) or set {EXTERNAL_SERVER_VARIABLE}"
        )
    })
}

/// The account to run the server as when this process is root: `postgres`, else `nobody`.
fn unprivileged_account() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let c_name = CString::new(name).unwrap();
        // SAFETY: getpwnam returns a pointer into static storage or null; it is read at
        // once, before any other call could overwrite it (set-up runs on one thread).
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        if !entry.is_null() {
            return Some(unsafe { ((*entry).pw_uid, (*entry).pw_gid) });
        }
    }
    panic!(
        "running as root, and neither a postgres nor a nobody account exists to run PostgreSQL as"
    )
}

fn run_as(mut command: Command, account: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = account {
        command.uid(uid).gid(gid);
        // The binaries and the data directory must not depend on root's environment.
        command.current_dir("/");
    }
    command
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("handing the data directory over");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the directories of earlier runs whose process is gone.
fn sweep_stale_directories() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIRECTORY_PREFIX) else {
            continue;
        };
        let pid = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                std::fs::remove_dir_all(entry.path()).ok();
            }
        }
    }
}
