//! Setting the embedded cluster up: finding the server binaries, the account it runs
//! as, its directory, lock and secrets, `initdb`, and starting `postgres`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use rand::Rng;
use secrecy::SecretString;

use super::{io, EmbeddedError};

/// The account the server runs as when the service runs as root.
#[derive(Debug, Clone, Copy)]
pub(super) struct Account {
    name: &'static str,
    uid: u32,
    gid: u32,
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
pub(super) fn unprivileged_account() -> Result<Option<Account>, EmbeddedError> {
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
pub(super) fn prepare_directory(
    directory: &Path,
    account: Option<Account>,
) -> Result<(), EmbeddedError> {
    refuse_foreign_directory(directory)?;
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

/// An existing directory is taken over (made private, handed to the server's account)
/// only if it is empty or already an embedded database's: `EMBEDDED_DATA_DIR` pointed at
/// a home or project directory by mistake is refused, untouched.
fn refuse_foreign_directory(directory: &Path) -> Result<(), EmbeddedError> {
    let mut entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io(directory)(error)),
    };
    let ours = directory.join("service.lock").exists() || directory.join("data").is_dir();
    if ours || entries.next().is_none() {
        return Ok(());
    }
    Err(EmbeddedError::Foreign(directory.to_owned()))
}

/// Takes `service.lock`; fails at once if another process holds it.
pub(super) fn lock(directory: &Path) -> Result<File, EmbeddedError> {
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
pub(super) fn password(
    directory: &Path,
    account: Option<Account>,
) -> Result<SecretString, EmbeddedError> {
    read_or_create_secret(&directory.join("password"), account)
}

pub(super) fn read_or_create_secret(
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
pub(super) fn initdb(
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
pub(super) fn spawn_server(
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
        // TCP only: a socket file in a deep EMBEDDED_DATA_DIR would pass the 107-byte
        // limit on its path and stop the server, and nothing here uses it.
        .args(["-c", "unix_socket_directories="])
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

pub(super) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The last lines of `postgres.log`, on one line.
pub(super) fn log_tail(directory: &Path) -> String {
    let log = std::fs::read_to_string(directory.join("postgres.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    one_line(&lines.into_iter().rev().collect::<Vec<_>>().join(" | "))
}

pub(super) fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(500)
        .collect()
}
