//! Tenant databases as connection targets: parsing a tenant's connection string, deciding
//! whether the service may connect to it at all, and connecting.
//!
//! Tenants write their connection strings themselves, so a connection string is
//! untrusted input. Three rules follow:
//! - it is parsed here, strictly, into one [`Target`] type; anything this service would
//!   silently ignore is refused instead, and the password never appears in a message;
//! - the host is resolved once, every address is checked by [`TargetPolicy`], and the
//!   connection is pinned to the checked addresses, so a second DNS answer cannot point
//!   it elsewhere;
//! - every session gets `application_name` and the statement, lock and
//!   idle-in-transaction timeouts, so a slow tenant database cannot hold a worker.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;
use url::Url;

use super::error::SyncError;
use super::tls::{self, RootCertificates, SslMode};
use crate::db::identity::{DatabaseIdentity, IDENTITY_COLUMNS};

/// The `application_name` tenant databases see in `pg_stat_activity`.
const APPLICATION_NAME: &str = "external-db-sync";

/// Longest `connect_timeout` a connection string may ask for.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeouts applied to every tenant-database session.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
}

/// A tenant database, parsed from a `postgres://` connection string.
#[derive(Clone)]
pub struct Target {
    /// Host name or IP address as written (IPv6 without brackets), or a Unix socket
    /// directory.
    host: String,
    port: u16,
    user: String,
    password: Option<SecretString>,
    dbname: String,
    ssl_mode: SslMode,
    roots: RootCertificates,
    connect_timeout: Option<Duration>,
}

/// Redacted: the password is never shown, even in debug output.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Target {
    /// Parses a `postgres://user:password@host:port/dbname?sslmode=…` URL. Supported
    /// parameters: `sslmode` (default `prefer`, as in libpq), `sslrootcert=system` (the
    /// web PKI roots, also the default), `connect_timeout` (seconds) and
    /// `application_name` (ignored: the service always names itself). Anything else is
    /// refused rather than silently dropped: above all an `sslrootcert` path, which
    /// would make the service open a file a tenant chose (the CA goes in the entry's
    /// `caCertificate`, see [`Target::with_ca_certificate`]).
    pub fn parse(raw: &str) -> Result<Target, SyncError> {
        let invalid =
            |reason: &str| SyncError::InvalidConfig(format!("connectionString: {reason}"));
        let url = Url::parse(raw.trim()).map_err(|_| {
            invalid("not a URL; expected postgres://user:password@host:5432/database")
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid("expected a postgres:// or postgresql:// URL"));
        }
        let host = match url.host() {
            Some(url::Host::Domain(domain)) => decode(domain).map_err(|_| invalid("bad host"))?,
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(invalid("the host is missing")),
        };
        if host.contains(',') {
            return Err(invalid("several hosts are not supported"));
        }
        let user = decode(url.username()).map_err(|_| invalid("the user name is not UTF-8"))?;
        if user.is_empty() {
            return Err(invalid("the user name is missing"));
        }
        let password = match url.password() {
            Some(password) => Some(SecretString::from(
                decode(password).map_err(|_| invalid("the password is not UTF-8"))?,
            )),
            None => None,
        };
        let dbname = decode(url.path().trim_start_matches('/'))
            .map_err(|_| invalid("the database name is not UTF-8"))?;
        if dbname.contains('/') {
            return Err(invalid("the path must be just the database name"));
        }
        let mut target = Target {
            dbname: if dbname.is_empty() {
                user.clone()
            } else {
                dbname
            },
            host,
            port: url.port().unwrap_or(5432),
            user,
            password,
            ssl_mode: SslMode::Prefer,
            roots: RootCertificates::WebPki,
            connect_timeout: None,
        };
        let mut system_roots = false;
        for (name, value) in url.query_pairs() {
            match &*name {
                "sslmode" => {
                    target.ssl_mode = SslMode::parse(&value).ok_or_else(|| {
                        invalid(
                            "sslmode must be disable, prefer, require, verify-ca or verify-full",
                        )
                    })?;
                }
                "sslrootcert" if value == "system" => system_roots = true,
                // The same answer for every path, so that it tells nothing about the
                // service's files.
                "sslrootcert" => {
                    return Err(invalid(
                        "sslrootcert may only be `system`: the service opens no file named \
                         by a tenant; put the CA's PEM text in the database entry's \
                         caCertificate instead",
                    ))
                }
                "connect_timeout" => {
                    let seconds: u64 = value.parse().map_err(|_| {
                        invalid("connect_timeout must be a whole number of seconds")
                    })?;
                    // libpq treats 0 as "wait forever"; a worker must not.
                    target.connect_timeout = (seconds > 0)
                        .then(|| Duration::from_secs(seconds).min(MAX_CONNECT_TIMEOUT));
                }
                "application_name" => {}
                other => {
                    return Err(invalid(&format!(
                        "the parameter `{}` is not supported (supported: sslmode, \
                         sslrootcert, connect_timeout, application_name)",
                        printable(other)
                    )))
                }
            }
        }
        if system_roots && !target.ssl_mode.verifies() {
            return Err(invalid(
                "sslrootcert is only used with sslmode=verify-ca or verify-full",
            ));
        }
        Ok(target)
    }

    /// Trusts the CA certificates of `pem` (an entry's `caCertificate`) instead of the
    /// web PKI roots. Only meaningful, and so only accepted, with a verifying `sslmode`.
    pub fn with_ca_certificate(mut self, pem: &str) -> Result<Target, SyncError> {
        let invalid = |reason: &str| SyncError::InvalidConfig(format!("caCertificate: {reason}"));
        if !self.ssl_mode.verifies() {
            return Err(invalid(
                "only used with sslmode=verify-ca or verify-full in the connectionString",
            ));
        }
        self.roots = RootCertificates::from_pem(pem).map_err(|reason| invalid(&reason))?;
        Ok(self)
    }

    /// `user@host:port/dbname`, for logs and error messages: never the password.
    pub fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{}@{}:{}/{}", self.user, host, self.port, self.dbname)
    }

    fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

fn decode(text: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
}

/// A parameter name for an error message: short and free of control characters.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(40).collect()
}

/// Where the service may connect. By default only global unicast addresses: a tenant
/// must not be able to make the service talk to its own infrastructure. The internal
/// database is refused even when private targets are allowed, so that no tenant
/// configuration can write into it: by its address here (compared in canonical form),
/// and, whatever spelling got past that, by its identity once connected (see
/// [`connect`]).
pub struct TargetPolicy {
    allow_private: bool,
    internal: InternalDatabase,
    /// The internal database's addresses, once they resolved; a failed resolution is
    /// not kept, so it is tried again next time instead of switching the check off.
    internal_addresses: OnceCell<Vec<IpAddr>>,
}

/// Where the internal database lives, as `DATABASE_URL` says.
#[derive(Debug, Clone)]
pub struct InternalDatabase {
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

/// Addresses a target may be reached at, checked by [`TargetPolicy::check`].
#[derive(Debug)]
pub struct CheckedAddresses(Vec<IpAddr>);

impl TargetPolicy {
    pub fn new(allow_private: bool, internal: InternalDatabase) -> Self {
        Self {
            allow_private,
            internal,
            internal_addresses: OnceCell::new(),
        }
    }

    /// Resolves `target` and checks every address it resolves to.
    pub async fn check(
        &self,
        target: &Target,
        resolve_timeout: Duration,
    ) -> Result<CheckedAddresses, SyncError> {
        let refused =
            |reason: String| SyncError::TargetRefused(format!("{}: {reason}", target.describe()));
        if target.is_unix_socket() {
            return if self.allow_private && !self.is_internal_database(target, &[]).await {
                Ok(CheckedAddresses(Vec::new()))
            } else {
                Err(refused(
                    "Unix sockets are local; set ALLOW_PRIVATE_TARGETS=true to allow them".into(),
                ))
            };
        }
        let addresses: Vec<IpAddr> = resolve(&target.host, target.port, resolve_timeout)
            .await?
            .into_iter()
            .map(|address| address.to_canonical())
            .collect();
        if self.is_internal_database(target, &addresses).await {
            return Err(refused(
                "this is the service's own internal database".into(),
            ));
        }
        if !self.allow_private {
            if let Some((address, kind)) = addresses
                .iter()
                .find_map(|address| non_public_kind(*address).map(|kind| (address, kind)))
            {
                return Err(refused(format!(
                    "{address} is a {kind} address; set ALLOW_PRIVATE_TARGETS=true to allow it"
                )));
            }
            if self
                .internal_addresses()
                .await
                .iter()
                .any(|internal| addresses.contains(internal))
            {
                return Err(refused(
                    "it is on the internal database's server; set ALLOW_PRIVATE_TARGETS=true \
                     to allow it"
                        .into(),
                ));
            }
        }
        Ok(CheckedAddresses(addresses))
    }

    /// A first, cheap check by address; the identity check after connecting is the
    /// one no spelling can pass. An unspecified address (`0.0.0.0`, `::`) reaches this
    /// machine, so it counts as every local address.
    async fn is_internal_database(&self, target: &Target, addresses: &[IpAddr]) -> bool {
        if target.port != self.internal.port || target.dbname != self.internal.dbname {
            return false;
        }
        if target.host == self.internal.host {
            return true;
        }
        let internal = self.internal_addresses().await;
        let local = |address: &IpAddr| address.is_loopback() || address.is_unspecified();
        addresses.iter().any(|address| {
            internal.contains(address) || (local(address) && internal.iter().any(local))
        })
    }

    /// The internal database's addresses in canonical form, resolved once they can be.
    /// While the name does not resolve the list is empty (and resolution is tried again
    /// next time); the host-name comparison and the identity check still apply.
    async fn internal_addresses(&self) -> &[IpAddr] {
        if self.internal.host.starts_with('/') {
            return &[];
        }
        let resolved = self
            .internal_addresses
            .get_or_try_init(|| async {
                resolve(
                    &self.internal.host,
                    self.internal.port,
                    Duration::from_secs(5),
                )
                .await
                .map(|addresses| addresses.into_iter().map(|a| a.to_canonical()).collect())
            })
            .await;
        resolved.map_or(&[], Vec::as_slice)
    }
}

async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<IpAddr>, SyncError> {
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(vec![address]);
    }
    let failed = |reason: std::io::Error| SyncError::Resolve {
        host: host.to_owned(),
        source: reason,
    };
    let lookup = tokio::net::lookup_host((host, port));
    let addresses = match tokio::time::timeout(timeout, lookup).await {
        Ok(found) => found.map_err(failed)?,
        Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
    };
    let mut unique: Vec<IpAddr> = Vec::new();
    for address in addresses.map(|socket| socket.ip()) {
        if !unique.contains(&address) {
            unique.push(address);
        }
    }
    if unique.is_empty() {
        return Err(failed(std::io::ErrorKind::NotFound.into()));
    }
    Ok(unique)
}

/// Why `address` is not a global unicast address, if it is not. Only global unicast
/// passes: the special-purpose ranges (IANA's registries) that are not routed on the
/// internet, or that tunnel to an address judged elsewhere, are all refused.
pub fn non_public_kind(address: IpAddr) -> Option<&'static str> {
    match address.to_canonical() {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 embeds an IPv4 address; judge that one.
                let [.., a, b] = segments;
                non_public_v4(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b)))
            } else if segments[0] & 0xe000 != 0x2000 {
                // Outside 2000::/3: unique local, link-local, site-local, multicast,
                // IPv4-compatible (::/96), discard and the rest of the reserved space.
                Some(match segments[0] {
                    first if first & 0xfe00 == 0xfc00 => "private (unique local)",
                    first if first & 0xffc0 == 0xfe80 => "link-local",
                    first if first & 0xffc0 == 0xfec0 => "site-local",
                    first if first & 0xff00 == 0xff00 => "multicast",
                    _ => "reserved",
                })
            } else if segments[0] == 0x2002 {
                Some("6to4 tunnel")
            } else if segments[0] == 0x2001 && segments[1] < 0x0200 {
                // 2001::/23: Teredo (2001::/32), benchmarking, ORCHID and other IETF
                // protocol assignments.
                Some("special-purpose (IETF protocol assignment)")
            } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if a == 0 {
        Some("unspecified")
    } else if a == 192 && b == 0 && c == 0 {
        Some("special-purpose (IETF protocol assignment)")
    } else if (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        Some("documentation")
    } else if a == 198 && (b & 0xfe) == 18 {
        Some("benchmarking")
    } else if a == 192 && b == 88 && c == 99 {
        Some("6to4 relay")
    } else if v4.is_multicast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// Opens a session on a checked target, with TLS per `sslmode` and the session
/// timeouts applied, and refuses it if it turns out to be connected to the database
/// whose identity is `internal`, however the target spelled its address.
pub async fn connect(
    target: &Target,
    addresses: &CheckedAddresses,
    session: &SessionSettings,
    internal: DatabaseIdentity,
) -> Result<Client, SyncError> {
    let connect_timeout = target.connect_timeout.unwrap_or(session.connect_timeout);
    let mut config = tokio_postgres::Config::new();
    config
        .user(&target.user)
        .dbname(&target.dbname)
        .port(target.port)
        .application_name(APPLICATION_NAME)
        .ssl_mode(target.ssl_mode.negotiation())
        .connect_timeout(connect_timeout);
    if let Some(password) = &target.password {
        config.password(password.expose_secret());
    }
    if addresses.0.is_empty() {
        config.host(&target.host);
    }
    // The host name stays for TLS (server name, SNI); the TCP connection goes to the
    // addresses that were checked, tried in order.
    for address in &addresses.0 {
        config.host(&target.host).hostaddr(*address);
    }

    let attempt = async {
        match tls::client_config(target.ssl_mode, &target.roots)? {
            None => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(SyncError::target)?;
                tokio::spawn(drive(connection, target.describe()));
                Ok(client)
            }
            Some(tls_config) => {
                let (client, connection) = config
                    .connect(MakeRustlsConnect::new(tls_config))
                    .await
                    .map_err(SyncError::target)?;
                tokio::spawn(drive(connection, target.describe()));
                Ok::<_, SyncError>(client)
            }
        }
    };
    let client = tokio::time::timeout(connect_timeout, attempt)
        .await
        .map_err(|_| SyncError::ConnectTimeout(target.describe()))??;

    let millis = |duration: Duration| duration.as_millis().to_string();
    let settings = client
        .query_one(
            &format!(
                "select pg_catalog.set_config('statement_timeout', $1, false), \
                        pg_catalog.set_config('lock_timeout', $2, false), \
                        pg_catalog.set_config('idle_in_transaction_session_timeout', $3, false), \
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
    // The session's search_path becomes the schema the tables live in, alone: then
    // pg_catalog is searched first, so that no function or operator of the tenant's
    // stands in for a built-in one, and temporary objects are searched last.
    let schema: Option<String> = settings.try_get("schema").map_err(SyncError::target)?;
    if schema.is_none() {
        return Err(SyncError::InvalidConfig(format!(
            "{}: the role's search_path names no schema that exists, so there is nowhere \
             to create the synced tables",
            target.describe()
        )));
    }
    let identity = DatabaseIdentity {
        system_identifier: settings
            .try_get("system_identifier")
            .map_err(SyncError::target)?,
        database_oid: settings
            .try_get("database_oid")
            .map_err(SyncError::target)?,
    };
    if identity == internal {
        return Err(SyncError::TargetRefused(format!(
            "{}: this is the service's own internal database",
            target.describe()
        )));
    }
    Ok(client)
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

    fn parse(raw: &str) -> Target {
        Target::parse(raw).unwrap()
    }

    fn reason(raw: &str) -> String {
        Target::parse(raw).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_parts_of_a_url() {
        let target = parse("postgresql://ana%40corp:p%40ss%2Fw0rd@db.example.com:6543/sales%20db?sslmode=verify-full&sslrootcert=system&connect_timeout=7");
        assert_eq!(target.user, "ana@corp");
        assert_eq!(
            target.password.as_ref().unwrap().expose_secret(),
            "p@ss/w0rd"
        );
        assert_eq!(target.host, "db.example.com");
        assert_eq!(target.port, 6543);
        assert_eq!(target.dbname, "sales db");
        assert_eq!(target.ssl_mode, SslMode::VerifyFull);
        assert!(matches!(target.roots, RootCertificates::WebPki));
        assert_eq!(target.connect_timeout, Some(Duration::from_secs(7)));
    }

    #[test]
    fn follows_libpq_defaults() {
        let target = parse("postgres://ana@db.example.com");
        assert_eq!(target.port, 5432);
        assert_eq!(target.dbname, "ana");
        assert_eq!(target.ssl_mode, SslMode::Prefer);
        assert!(target.password.is_none());
        assert_eq!(
            parse("postgres://a@[2001:db8::1]:5433/x").host,
            "2001:db8::1"
        );
    }

    #[test]
    fn refuses_what_it_would_otherwise_ignore() {
        assert!(reason("mysql://a:b@h/d").contains("postgres://"));
        assert!(reason("host=h user=a").contains("not a URL"));
        assert!(reason("postgres://h/d").contains("user name is missing"));
        assert!(reason("postgres://a@h/d?sslmode=allow").contains("sslmode must be"));
        assert!(
            reason("postgres://a@h/d?options=-c%20x%3Dy").contains("`options` is not supported")
        );
        assert!(reason("postgres://a@h/d?sslrootcert=system").contains("verify-ca or verify-full"));
        assert!(reason("postgres://a@h/d?connect_timeout=soon").contains("connect_timeout"));
    }

    #[test]
    fn refuses_every_sslrootcert_path_with_one_answer() {
        let answers: Vec<String> = ["/dev/zero", "/etc", "/no/such/file", "ca.pem", ""]
            .iter()
            .map(|path| {
                reason(&format!(
                    "postgres://a@h/d?sslmode=verify-full&sslrootcert={path}"
                ))
            })
            .collect();
        assert!(answers[0].contains("caCertificate"), "{}", answers[0]);
        assert!(
            answers.iter().all(|answer| *answer == answers[0]),
            "{answers:?}"
        );
    }

    #[test]
    fn takes_a_ca_certificate_only_with_a_verifying_sslmode() {
        let pem = rcgen::generate_simple_self_signed(vec!["ca".to_owned()])
            .unwrap()
            .cert
            .pem();
        let verifying = parse("postgres://a@h/d?sslmode=verify-ca");
        let target = verifying.clone().with_ca_certificate(&pem).unwrap();
        assert!(matches!(&target.roots, RootCertificates::Pem(certs) if certs.len() == 1));
        let error = |target: &Target, pem: &str| {
            target
                .clone()
                .with_ca_certificate(pem)
                .unwrap_err()
                .to_string()
        };
        assert!(error(&parse("postgres://a@h/d?sslmode=require"), &pem).contains("verify-ca"));
        assert!(error(&verifying, "hello").contains("holds no PEM certificate"));
        let bad_body = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(error(&verifying, bad_body).contains("not PEM certificate text"));
        let huge = pem.repeat(64 * 1024 / pem.len() + 1);
        assert!(error(&verifying, &huge).contains("larger than 64 KiB"));
    }

    #[test]
    fn escapes_and_truncates_notices() {
        assert_eq!(escaped("a\nINFO forged line", 200), "a\\nINFO forged line");
        assert_eq!(escaped("\u{1b}[31mred", 200), "\\u{1b}[31mred");
        assert_eq!(
            escaped(&"x".repeat(300), 200),
            format!("{}…", "x".repeat(200))
        );
    }

    #[test]
    fn never_shows_the_password() {
        let raw = "postgres://ana:hunter2@db.example.com:5432/app?sslmode=nope";
        assert!(!reason(raw).contains("hunter2"));
        let target = parse("postgres://ana:hunter2@db.example.com/app");
        assert_eq!(target.describe(), "ana@db.example.com:5432/app");
        assert!(!format!("{target:?}").contains("hunter2"));
    }

    #[test]
    fn classifies_addresses() {
        let kind = |text: &str| non_public_kind(text.parse().unwrap());
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "::7f00:1",
            "2002:7f00:1::1",
            "2001::1",
            "2001:db8::1",
            "fec0::1",
            "100::1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "192.88.99.1",
            "255.255.255.255",
        ] {
            assert!(kind(private).is_some(), "{private}");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "64:ff9b::808:808",
            "2606:4700::1111",
            "2001:200::1",
            "198.20.0.1",
            "192.0.3.1",
        ] {
            assert_eq!(kind(public), None, "{public}");
        }
    }

    fn policy(allow_private: bool) -> TargetPolicy {
        TargetPolicy::new(
            allow_private,
            InternalDatabase {
                host: "10.0.0.5".into(),
                port: 5432,
                dbname: "app".into(),
            },
        )
    }

    #[tokio::test]
    async fn refuses_private_targets_unless_allowed() {
        let target = parse("postgres://a@127.0.0.1:5432/tenant");
        let error = policy(false)
            .check(&target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(error, SyncError::TargetRefused(_)));
        assert!(
            error
                .to_string()
                .contains("127.0.0.1 is a loopback address"),
            "{error}"
        );
        assert!(policy(true)
            .check(&target, Duration::from_secs(1))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn always_refuses_the_internal_database() {
        let target = parse("postgres://a@10.0.0.5:5432/app");
        let error = policy(true)
            .check(&target, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("internal database"), "{error}");
        let other_database = parse("postgres://a@10.0.0.5:5432/tenant");
        assert!(policy(true)
            .check(&other_database, Duration::from_secs(1))
            .await
            .is_ok());
    }
}
