//! Tenant databases as connection targets: a tenant's connection string, parsed.
//!
//! Tenants write their connection strings themselves, so a connection string is
//! untrusted input. It is parsed here, strictly, into one [`Target`] type: anything this
//! service would silently ignore is refused instead, and the password never appears in
//! a message. Whether the service may connect to a target is [`super::policy`]'s
//! business; connecting is [`super::connect`]'s.

use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::error::SyncError;
use super::tls::{RootCertificates, SslMode};

/// Longest `connect_timeout` a connection string may ask for.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// A tenant database, parsed from a `postgres://` connection string.
#[derive(Clone)]
pub struct Target {
    /// Host name or IP address as written (IPv6 without brackets), or a Unix socket
    /// directory.
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) password: Option<SecretString>,
    pub(super) dbname: String,
    pub(super) ssl_mode: SslMode,
    pub(super) roots: RootCertificates,
    /// Asked for by the connection string, at most [`MAX_CONNECT_TIMEOUT`].
    pub(super) connect_timeout: Option<Duration>,
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
        target.apply_parameters(&url)?;
        Ok(target)
    }

    /// The query parameters of the connection string; see [`Target::parse`].
    fn apply_parameters(&mut self, url: &Url) -> Result<(), SyncError> {
        let target = self;
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
        Ok(())
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

    /// The connection string without its password (`postgres://user@host:port/dbname
    /// ?sslmode=…`), to show an operator what is configured.
    pub fn display_url(&self) -> String {
        /// What cannot stand as itself in a URL's user or path.
        const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
            .add(b' ')
            .add(b'/')
            .add(b'?')
            .add(b'#')
            .add(b'@')
            .add(b':')
            .add(b'%');
        let encode = |text: &str| percent_encoding::utf8_percent_encode(text, RESERVED).to_string();
        let host = if self.is_unix_socket() {
            encode(&self.host)
        } else if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "postgres://{}@{host}:{}/{}?sslmode={}",
            encode(&self.user),
            self.port,
            encode(&self.dbname),
            self.ssl_mode.name()
        )
    }

    pub(super) fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

/// A connection string that cannot be used; `reason` never contains the password.
fn invalid(reason: &str) -> SyncError {
    SyncError::InvalidConfig(format!("connectionString: {reason}"))
}

fn decode(text: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
}

/// A parameter name for an error message: short and free of control characters.
pub(super) fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(40).collect()
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn parse(raw: &str) -> Target {
        Target::parse(raw).unwrap()
    }

    fn reason(raw: &str) -> String {
        Target::parse(raw).unwrap_err().to_string()
    }

    #[test]
    fn display_url_has_everything_but_the_password() {
        let target = parse("postgres://ana:s%40cret@db.example.com:6543/app%20db?sslmode=require");
        assert_eq!(
            target.display_url(),
            "postgres://ana@db.example.com:6543/app%20db?sslmode=require"
        );
        assert_eq!(
            parse("postgres://ana:x@[::1]/db").display_url(),
            "postgres://ana@[::1]:5432/db?sslmode=prefer"
        );
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
    fn never_shows_the_password() {
        let raw = "postgres://ana:hunter2@db.example.com:5432/app?sslmode=nope";
        assert!(!reason(raw).contains("hunter2"));
        let target = parse("postgres://ana:hunter2@db.example.com/app");
        assert_eq!(target.describe(), "ana@db.example.com:5432/app");
        assert!(!format!("{target:?}").contains("hunter2"));
    }
}

/// Properties over arbitrary input (`proptest`, a bounded number of cases per run).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any text is a target or a configuration error naming the field; never a
        /// panic, never another kind of error.
        #[test]
        fn any_text_is_a_target_or_a_connection_string_error(raw in "\\PC{0,200}") {
            if let Err(error) = Target::parse(&raw) {
                prop_assert!(
                    matches!(&error, SyncError::InvalidConfig(message)
                        if message.starts_with("connectionString: ")),
                    "{error:?}"
                );
            }
        }

        /// URL-shaped text, often almost right, with a password in it: whatever is wrong
        /// with it, the error does not show the password.
        #[test]
        fn a_refused_connection_string_never_shows_its_password(
            scheme in prop::sample::select(vec!["postgres", "postgresql", "mysql", "postgres:"]),
            user in "[a-z%]{0,8}",
            password in "[A-Za-z0-9]{12,20}",
            rest in "[ -~]{0,60}",
        ) {
            let raw = format!("{scheme}://{user}:{password}@{rest}");
            if let Err(error) = Target::parse(&raw) {
                prop_assert!(!error.to_string().contains(&password), "{error}");
            }
        }
    }
}
