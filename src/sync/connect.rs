//! Connecting to a checked tenant database: TLS per `sslmode`, the session's timeouts
//! and `search_path`, the identity check against the internal database, and the
//! connection task that logs what the server says on its own.
//!
//! Every session gets `application_name` and the statement, lock and
//! idle-in-transaction timeouts, so a slow tenant database cannot hold a worker.

use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::SyncError;
use super::framing::{Bounded, BoundedTls, MessageBound};
use super::policy::CheckedAddresses;
use super::schema::WRITER_SETTING;
use super::sessions::TenantSession;
use super::stall::{self, StallWatch, Watched};
use super::target::{printable, Target};
use super::tls;
use crate::db::identity::{DatabaseIdentity, IDENTITY_COLUMNS};

/// The `application_name` tenant databases see in `pg_stat_activity`.
const APPLICATION_NAME: &str = "external-db-sync";

/// Timeouts and bounds applied to every tenant-database session.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
    /// Longest message, and most bytes of rows in one answer, that a tenant server may
    /// send (`SYNC_MAX_TENANT_MESSAGE_BYTES`, see [`super::framing`]).
    pub max_message_bytes: u64,
}

/// Opens a session on a checked target, with TLS per `sslmode`, the session timeouts
/// applied, its connection watched for stalls ([`super::stall`]) and what the server
/// sends bounded ([`super::framing`]), and refuses it if
/// it turns out to be connected to the database whose identity is `internal`, however
/// the target spelled its address.
pub async fn connect(
    target: &Target,
    addresses: &CheckedAddresses,
    session: &SessionSettings,
    internal: DatabaseIdentity,
) -> Result<TenantSession, SyncError> {
    let connect_timeout = target.connect_timeout.unwrap_or(session.connect_timeout);
    let config = client_config(target, connect_timeout);
    let watch = StallWatch::new(stall::limit(session.statement_timeout));
    let bound = MessageBound::new(session.max_message_bytes);
    let client = tokio::time::timeout(
        connect_timeout,
        open(&config, target, addresses, watch.clone(), bound.clone()),
    )
    .await
    .map_err(|_| SyncError::ConnectTimeout(target.describe()))??;
    let identity = set_up_session(&client, target, session)
        .await
        .map_err(|error| error.explained_by(&bound))?;
    if identity == internal {
        return Err(SyncError::TargetRefused(format!(
            "{}: this is the service's own internal database",
            target.describe()
        )));
    }
    Ok(TenantSession::new(client, watch, bound))
}

/// The connection parameters of `target`, for the handshake on a socket [`open`]
/// connected: the host name stays for TLS (server name, SNI).
fn client_config(target: &Target, connect_timeout: Duration) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .user(&target.user)
        .dbname(&target.dbname)
        .host(&target.host)
        .port(target.port)
        .application_name(APPLICATION_NAME)
        .ssl_mode(target.ssl_mode.negotiation())
        .connect_timeout(connect_timeout);
    if let Some(password) = &target.password {
        config.password(password.expose_secret());
    }
    config
}

/// Connects a socket to the first of the checked addresses that accepts (a Unix socket
/// when there are none: its directory is the host), watched for stalls, then runs the
/// handshake on it under `bound` and spawns the connection's task.
async fn open(
    config: &tokio_postgres::Config,
    target: &Target,
    addresses: &CheckedAddresses,
    watch: StallWatch,
    bound: MessageBound,
) -> Result<Client, SyncError> {
    let failed = |source: std::io::Error| SyncError::Connect {
        target: target.describe(),
        source,
    };
    if addresses.0.is_empty() {
        let path = format!("{}/.s.PGSQL.{}", target.host, target.port);
        let socket = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(failed)?;
        return handshake(config, Watched::new(socket, watch), target, bound).await;
    }
    let mut last_error = None;
    for address in &addresses.0 {
        match tokio::net::TcpStream::connect((*address, target.port)).await {
            Ok(socket) => {
                socket.set_nodelay(true).ok();
                return handshake(config, Watched::new(socket, watch), target, bound).await;
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(failed(last_error.unwrap_or_else(|| {
        std::io::Error::other("the host resolved to no address")
    })))
}

/// The PostgreSQL handshake on a connected socket, with or without TLS as `sslmode`
/// says, and what the server sends under `bound` from its first byte: on the socket
/// without TLS, above TLS with it.
async fn handshake<S>(
    config: &tokio_postgres::Config,
    socket: Watched<S>,
    target: &Target,
    bound: MessageBound,
) -> Result<Client, SyncError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match tls::client_config(target.ssl_mode, &target.roots)? {
        None => {
            let (client, connection) = config
                .connect_raw(Bounded::messages(socket, bound), tokio_postgres::NoTls)
                .await
                .map_err(SyncError::target)?;
            tokio::spawn(drive(connection, target.describe()));
            Ok(client)
        }
        Some(tls_config) => {
            let Ok(tls) = MakeTlsConnect::<Bounded<Watched<S>>>::make_tls_connect(
                &mut MakeRustlsConnect::new(tls_config),
                &target.host,
            );
            let socket = Bounded::asking_for_tls(socket, bound.clone());
            let (client, connection) = config
                .connect_raw(socket, BoundedTls::new(tls, bound))
                .await
                .map_err(SyncError::target)?;
            tokio::spawn(drive(connection, target.describe()));
            Ok(client)
        }
    }
}

/// Sets the session's timeouts, `search_path` and [`WRITER_SETTING`] (its writes are
/// the service's own: the tables' guard lets them through), and reads the server's identity, in
/// one statement.
///
/// The `search_path` becomes the schema the tables live in, alone: then `pg_catalog`
/// is searched first, so that no function or operator of the tenant's stands in for a
/// built-in one, and temporary objects are searched last.
async fn set_up_session(
    client: &Client,
    target: &Target,
    session: &SessionSettings,
) -> Result<DatabaseIdentity, SyncError> {
    let millis = |duration: Duration| duration.as_millis().to_string();
    let settings = client
        .query_one(
            &format!(
                "select pg_catalog.set_config('statement_timeout', $1, false), \
                        pg_catalog.set_config('lock_timeout', $2, false), \
                        pg_catalog.set_config('idle_in_transaction_session_timeout', $3, false), \
                        pg_catalog.set_config('{WRITER_SETTING}', 'on', false), \
                        pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ', \
                            pg_catalog.quote_ident(pg_catalog.current_schema()), 'pg_temp'), \
                            false), \
                        pg_catalog.current_schema()::pg_catalog.text as schema, \
                        {IDENTITY_COLUMNS}"
            ),
            &[
                &millis(session.statement_timeout),
                &millis(session.lock_timeout),
                &millis(session.idle_in_transaction_timeout),
            ],
        )
        .await
        .map_err(SyncError::target)?;
    let schema: Option<String> = settings.try_get("schema").map_err(SyncError::target)?;
    if schema.is_none() {
        return Err(SyncError::InvalidConfig(format!(
            "{}: the role's search_path names no schema that exists, so there is nowhere \
             to create the synced tables",
            target.describe()
        )));
    }
    Ok(DatabaseIdentity {
        system_identifier: settings
            .try_get("system_identifier")
            .map_err(SyncError::target)?,
        database_oid: settings
            .try_get("database_oid")
            .map_err(SyncError::target)?,
    })
}

/// Runs a connection until its client is dropped, and logs what the server says on its
/// own (notices) through [`log_notice`], not verbatim.
async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                log_notice(&target, notice.severity(), notice.message());
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::debug!(%target, %error, "tenant database connection closed with an error");
                return;
            }
            None => return,
        }
    }
}

/// Longest part of a tenant's notice that is logged.
const NOTICE_CHARS: usize = 200;
/// Notices logged per tenant database and [`NOTICE_WINDOW`]; the rest are counted.
const NOTICES_PER_WINDOW: u32 = 10;
const NOTICE_WINDOW: Duration = Duration::from_secs(60);

/// Per tenant database: when its window began, notices in it, and how many of those
/// were not logged.
type NoticeBudgets = std::collections::HashMap<String, (std::time::Instant, u32, u32)>;

static NOTICE_BUDGETS: std::sync::LazyLock<std::sync::Mutex<NoticeBudgets>> =
    std::sync::LazyLock::new(Default::default);

/// Logs a tenant database's notice as one line: escaped (a newline cannot forge another
/// line), truncated, and at most [`NOTICES_PER_WINDOW`] per database and window; the
/// count of the others is logged when the next window opens.
fn log_notice(target: &str, severity: &str, message: &str) {
    let suppressed_before = {
        let mut budgets = NOTICE_BUDGETS
            .lock()
            .expect("the lock is never held across a panic");
        if budgets.len() > 10_000 {
            budgets.retain(|_, (start, ..)| start.elapsed() < NOTICE_WINDOW);
        }
        let budget = budgets
            .entry(target.to_owned())
            .or_insert((std::time::Instant::now(), 0, 0));
        let mut suppressed_before = 0;
        if budget.0.elapsed() >= NOTICE_WINDOW {
            suppressed_before = budget.2;
            *budget = (std::time::Instant::now(), 0, 0);
        }
        budget.1 += 1;
        if budget.1 > NOTICES_PER_WINDOW {
            budget.2 += 1;
            return;
        }
        suppressed_before
    };
    if suppressed_before > 0 {
        tracing::info!(%target, suppressed = suppressed_before, "tenant database notices not logged (rate limit)");
    }
    tracing::info!(
        %target,
        severity = %printable(severity),
        notice = %escaped(message, NOTICE_CHARS),
        "tenant database notice"
    );
}

/// `text` on one line, control characters escaped, at most `limit` characters of it.
fn escaped(text: &str, limit: usize) -> String {
    let mut line: String = text
        .chars()
        .take(limit)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(limit).is_some() {
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_truncates_notices() {
        assert_eq!(escaped("a\nINFO forged line", 200), "a\\nINFO forged line");
        assert_eq!(escaped("\u{1b}[31mred", 200), "\\u{1b}[31mred");
        assert_eq!(
            escaped(&"x".repeat(300), 200),
            format!("{}…", "x".repeat(200))
        );
    }
}
