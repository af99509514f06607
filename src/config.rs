//! Typed configuration read from the environment (DESIGN.md §8).
//!
//! Everything is parsed and validated once, at start-up, so that a typo in a deployment
//! stops the process with one line naming the variable instead of failing an hour later
//! inside a worker. Secrets are held as [`SecretString`] and never printed: the `Debug`
//! output of every type here redacts them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use url::Url;

use crate::db::sync_status::{Backoff, RetrySchedule};
use crate::poller::PollerSettings;
use crate::sync::sessions::SessionPoolSettings;
use crate::sync::target::{InternalDatabase, SessionSettings};
use crate::sync::SyncSettings;

/// A configuration value that cannot be used. Displayed as one line that names the
/// variable and never contains the value (it may be a secret).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl ConfigError {
    fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            reason: reason.into(),
        }
    }
}

/// Where the service publishes sync requests (`SYNC_QUEUE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncQueue {
    /// Runs the sync engine in-process: no HTTP hop, no external service.
    Direct,
    /// Publishes through Upstash QStash, which calls back `/sync-engine`.
    Qstash,
}

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The internal database (`DATABASE_URL`).
#[derive(Clone)]
pub struct DatabaseSettings {
    /// Parsed connection options; they contain the password, hence no `Debug` derive.
    pub connect_options: PgConnectOptions,
    pub max_connections: u32,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.connect_options.get_host())
            .field("port", &self.connect_options.get_port())
            .field("database", &self.connect_options.get_database())
            .field("username", &self.connect_options.get_username())
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// QStash endpoint and credentials. Unused in `direct` mode, except the signing keys,
/// which also protect `/sync-engine` when QStash is used by another deployment.
#[derive(Debug, Clone)]
pub struct QstashSettings {
    pub url: Url,
    pub token: Option<SecretString>,
    pub current_signing_key: Option<SecretString>,
    pub next_signing_key: Option<SecretString>,
    /// How far `exp` and `nbf` of a signature may be off (`QSTASH_CLOCK_TOLERANCE_SECS`).
    pub clock_tolerance: Duration,
    /// Delivery retries QStash makes per message (`QSTASH_RETRIES`).
    pub retries: u32,
}

/// Tuning of the sequencer.
#[derive(Debug, Clone)]
pub struct SequencerSettings {
    /// Rows sequenced per table in one transaction (`SEQUENCER_BATCH_SIZE`).
    pub batch_size: u32,
    /// How long the in-process loop waits when it found nothing to do and no change
    /// notification arrives (`SEQUENCER_IDLE_INTERVAL_MS`): the safety net behind
    /// `LISTEN`.
    pub idle_interval: Duration,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseSettings,
    pub bind_addr: SocketAddr,
    pub public_url: Url,
    pub cron_secret: SecretString,
    pub sync_queue: SyncQueue,
    pub qstash: QstashSettings,
    pub run_workers: bool,
    pub allow_private_targets: bool,
    pub sequencer: SequencerSettings,
    pub sync: SyncSettings,
    pub poller: PollerSettings,
}

impl DatabaseSettings {
    /// Where the internal database is, for the sync engine's target policy.
    pub fn location(&self) -> InternalDatabase {
        let options = &self.connect_options;
        InternalDatabase {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            dbname: options
                .get_database()
                .unwrap_or_else(|| options.get_username())
                .to_owned(),
        }
    }
}

/// How logs are written; read before anything else so that start-up is logged.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
    /// `LOG_UNSAFE_QUERY_PARAMETERS`: let dependencies log below `info`, bound query
    /// parameters (users' e-mails and metadata) included. Unsafe; for debugging only.
    pub unsafe_query_parameters: bool,
}

/// Reads variables through a lookup function, so that tests can parse a configuration
/// without touching the process environment. Empty values count as unset, as they do
/// in most deployment tools' env files.
pub struct Env<F> {
    lookup: F,
}

impl Env<fn(&str) -> Option<String>> {
    /// The process environment.
    pub fn process() -> Self {
        Env {
            lookup: |name| std::env::var(name).ok(),
        }
    }
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    pub fn from_lookup(lookup: F) -> Self {
        Env { lookup }
    }

    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    fn parse_or<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => parse(raw.trim()).map_err(|reason| ConfigError::new(name, reason)),
        }
    }

    fn bool_or(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse_or(name, default, |raw| {
            match raw.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err("expected true or false".to_owned()),
            }
        })
    }

    fn secret(&self, name: &str) -> Option<SecretString> {
        self.get(name).map(SecretString::from)
    }

    /// `RUST_LOG` and `LOG_FORMAT`.
    pub fn log_settings(&self) -> Result<LogSettings, ConfigError> {
        let filter = self.get("RUST_LOG").unwrap_or_else(|| "info".to_owned());
        tracing_subscriber::EnvFilter::try_new(&filter).map_err(|error| {
            ConfigError::new("RUST_LOG", format!("not a valid filter ({error})"))
        })?;
        let format = self.parse_or("LOG_FORMAT", LogFormat::Pretty, |raw| {
            match raw.to_ascii_lowercase().as_str() {
                "pretty" => Ok(LogFormat::Pretty),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected pretty or json".to_owned()),
            }
        })?;
        let unsafe_query_parameters = self.bool_or("LOG_UNSAFE_QUERY_PARAMETERS", false)?;
        Ok(LogSettings {
            filter,
            format,
            unsafe_query_parameters,
        })
    }

    /// `DATABASE_URL` and `DATABASE_MAX_CONNECTIONS`. The embedded database of a later
    /// release will make `DATABASE_URL` optional; until then it is required.
    pub fn database_settings(&self) -> Result<DatabaseSettings, ConfigError> {
        let raw = self.get("DATABASE_URL").ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "is required (postgres://user:password@host:5432/database)",
            )
        })?;
        let connect_options = parse_database_url(raw.trim())
            .map_err(|reason| ConfigError::new("DATABASE_URL", reason))?
            .application_name("external-db-sync");
        let max_connections = self.parse_or("DATABASE_MAX_CONNECTIONS", 10, |raw| {
            parse_in_range(raw, 2, 1000)
        })?;
        Ok(DatabaseSettings {
            connect_options,
            max_connections,
        })
    }

    /// The whole configuration of `serve`.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let database = self.database_settings()?;
        let bind_addr = self.parse_or(
            "BIND_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 8102)),
            |raw| {
                SocketAddr::from_str(raw)
                    .map_err(|_| "expected an address and port such as 0.0.0.0:8102".to_owned())
            },
        )?;
        let default_public_url = Url::parse(&format!("http://{bind_addr}"))
            .map_err(|error| ConfigError::new("BIND_ADDR", error.to_string()))?;
        let public_url = self.parse_or("PUBLIC_URL", default_public_url, parse_http_url)?;
        let cron_secret = self.secret("CRON_SECRET").ok_or_else(|| {
            ConfigError::new(
                "CRON_SECRET",
                "is required: the bearer token that /sequencer and /poller expect",
            )
        })?;
        if cron_secret.expose_secret().trim().len() < 16 {
            return Err(ConfigError::new(
                "CRON_SECRET",
                "must be at least 16 characters long",
            ));
        }
        let sync_queue = self.parse_or("SYNC_QUEUE", SyncQueue::Direct, |raw| match raw {
            "direct" => Ok(SyncQueue::Direct),
            "qstash" => Ok(SyncQueue::Qstash),
            _ => Err("expected direct or qstash".to_owned()),
        })?;
        let qstash = QstashSettings {
            url: self.parse_or(
                "QSTASH_URL",
                Url::parse("https://qstash.upstash.io").expect("the default QStash URL is valid"),
                parse_http_url,
            )?,
            token: self.secret("QSTASH_TOKEN"),
            current_signing_key: self.secret("QSTASH_CURRENT_SIGNING_KEY"),
            next_signing_key: self.secret("QSTASH_NEXT_SIGNING_KEY"),
            clock_tolerance: Duration::from_secs(self.parse_or(
                "QSTASH_CLOCK_TOLERANCE_SECS",
                5,
                |raw| parse_in_range(raw, 0, 300),
            )?),
            retries: self.parse_or("QSTASH_RETRIES", 5, |raw| parse_in_range(raw, 0, 100))?,
        };
        if sync_queue == SyncQueue::Qstash && qstash.token.is_none() {
            return Err(ConfigError::new(
                "QSTASH_TOKEN",
                "is required when SYNC_QUEUE=qstash",
            ));
        }
        let sequencer = SequencerSettings {
            batch_size: self.parse_or("SEQUENCER_BATCH_SIZE", 1000, |raw| {
                parse_in_range(raw, 1, 100_000)
            })?,
            idle_interval: Duration::from_millis(self.parse_or(
                "SEQUENCER_IDLE_INTERVAL_MS",
                5000,
                |raw| parse_in_range(raw, 1, 3_600_000),
            )?),
        };
        let sync = self.sync_settings()?;
        let poller_defaults = PollerSettings::default();
        let poller = PollerSettings {
            batch_size: self.parse_or("POLLER_BATCH_SIZE", poller_defaults.batch_size, |raw| {
                parse_in_range(raw, 1, 10_000)
            })?,
            lease: Duration::from_secs(self.parse_or(
                "POLLER_LEASE_SECS",
                poller_defaults.lease.as_secs(),
                |raw| parse_in_range(raw, 1, 86_400),
            )?),
            idle_interval: Duration::from_millis(self.parse_or(
                "POLLER_IDLE_INTERVAL_MS",
                poller_defaults.idle_interval.as_millis() as u64,
                |raw| parse_in_range(raw, 1, 3_600_000),
            )?),
            sync_concurrency: self.parse_or(
                "POLLER_SYNC_CONCURRENCY",
                poller_defaults.sync_concurrency,
                |raw| parse_in_range(raw, 1, 1000),
            )?,
            ..poller_defaults
        };
        Ok(Config {
            database,
            bind_addr,
            public_url,
            cron_secret,
            sync_queue,
            qstash,
            run_workers: self.bool_or("RUN_WORKERS", true)?,
            allow_private_targets: self.bool_or("ALLOW_PRIVATE_TARGETS", false)?,
            sequencer,
            sync,
            poller,
        })
    }

    /// `SYNC_*`: batch size, per-run budget, concurrency and tenant-session timeouts.
    fn sync_settings(&self) -> Result<SyncSettings, ConfigError> {
        let defaults = SyncSettings::default();
        let millis = |name: &'static str, default: Duration, max: u64| {
            let default = u64::try_from(default.as_millis()).unwrap_or(max);
            self.parse_or(name, default, |raw| parse_in_range(raw, 1, max))
                .map(Duration::from_millis)
        };
        Ok(SyncSettings {
            batch_size: self.parse_or("SYNC_BATCH_SIZE", defaults.batch_size, |raw| {
                parse_in_range(raw, 1, 100_000)
            })?,
            max_batches_per_run: self.parse_or(
                "SYNC_MAX_BATCHES_PER_RUN",
                defaults.max_batches_per_run,
                |raw| parse_in_range(raw, 1, 100_000),
            )?,
            database_concurrency: self.parse_or(
                "SYNC_DATABASE_CONCURRENCY",
                defaults.database_concurrency,
                |raw| parse_in_range(raw, 1, 256),
            )?,
            max_databases_per_tenancy: self.parse_or(
                "SYNC_MAX_DATABASES_PER_TENANCY",
                defaults.max_databases_per_tenancy,
                |raw| parse_in_range(raw, 1, 1000),
            )?,
            session: SessionSettings {
                connect_timeout: millis(
                    "SYNC_CONNECT_TIMEOUT_MS",
                    defaults.session.connect_timeout,
                    300_000,
                )?,
                statement_timeout: millis(
                    "SYNC_STATEMENT_TIMEOUT_MS",
                    defaults.session.statement_timeout,
                    3_600_000,
                )?,
                lock_timeout: millis(
                    "SYNC_LOCK_TIMEOUT_MS",
                    defaults.session.lock_timeout,
                    3_600_000,
                )?,
                idle_in_transaction_timeout: defaults.session.idle_in_transaction_timeout,
            },
            pool: SessionPoolSettings {
                per_database: self.parse_or(
                    "SYNC_IDLE_SESSIONS_PER_DATABASE",
                    defaults.pool.per_database,
                    |raw| parse_in_range(raw, 0, 64),
                )?,
                total: self.parse_or("SYNC_MAX_IDLE_SESSIONS", defaults.pool.total, |raw| {
                    parse_in_range(raw, 0, 100_000)
                })?,
                idle_timeout: self
                    .parse_or(
                        "SYNC_SESSION_IDLE_SECS",
                        defaults.pool.idle_timeout.as_secs(),
                        |raw| parse_in_range(raw, 1, 3600),
                    )
                    .map(Duration::from_secs)?,
            },
            retry: RetrySchedule {
                retryable: Backoff {
                    first: millis(
                        "SYNC_RETRY_FIRST_MS",
                        defaults.retry.retryable.first,
                        DAY_MS,
                    )?,
                    max: millis("SYNC_RETRY_MAX_MS", defaults.retry.retryable.max, DAY_MS)?,
                },
                permanent: Backoff {
                    first: millis(
                        "SYNC_PERMANENT_RETRY_FIRST_MS",
                        defaults.retry.permanent.first,
                        DAY_MS,
                    )?,
                    max: millis(
                        "SYNC_PERMANENT_RETRY_MAX_MS",
                        defaults.retry.permanent.max,
                        DAY_MS,
                    )?,
                },
            },
        })
    }
}

/// The longest wait between two attempts of a failing database that may be configured.
const DAY_MS: u64 = 86_400_000;

/// Parses a PostgreSQL URL without ever echoing it: the reason names what is wrong, not
/// the value, because the value carries a password.
fn parse_database_url(raw: &str) -> Result<PgConnectOptions, String> {
    let url = Url::parse(raw).map_err(|error| format!("not a valid URL ({error})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("expected a postgres:// or postgresql:// URL".to_owned());
    }
    PgConnectOptions::from_str(raw).map_err(|_| "not a valid PostgreSQL connection URL".to_owned())
}

fn parse_http_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|error| format!("not a valid URL ({error})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http:// or https:// URL with a host".to_owned());
    }
    Ok(url)
}

fn parse_in_range<T>(raw: &str, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    match raw.parse::<T>() {
        Ok(value) if value >= min && value <= max => Ok(value),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::from_lookup(move |name| map.get(name).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        (
            "DATABASE_URL",
            "postgres://app:hunter2-secret@db.internal:5432/app",
        ),
        ("CRON_SECRET", "a-cron-secret-of-some-length"),
    ];

    #[test]
    fn defaults_follow_the_design() {
        let config = env(&BASE).config().unwrap();
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1:8102");
        assert_eq!(config.public_url.as_str(), "http://127.0.0.1:8102/");
        assert_eq!(config.sync_queue, SyncQueue::Direct);
        assert_eq!(config.qstash.url.as_str(), "https://qstash.upstash.io/");
        assert!(config.run_workers);
        assert!(!config.allow_private_targets);
        assert_eq!(config.sequencer.batch_size, 1000);
        assert_eq!(config.sync.batch_size, 5000);
        assert_eq!(config.qstash.clock_tolerance, Duration::from_secs(5));
        assert_eq!(config.database.location().dbname, "app");
    }

    #[test]
    fn public_url_defaults_to_the_bind_address() {
        let mut pairs = BASE.to_vec();
        pairs.push(("BIND_ADDR", "0.0.0.0:9000"));
        let config = env(&pairs).config().unwrap();
        assert_eq!(config.public_url.as_str(), "http://0.0.0.0:9000/");
    }

    fn error_for(pairs: &[(&str, &str)]) -> ConfigError {
        let mut all = BASE.to_vec();
        all.extend_from_slice(pairs);
        env(&all).config().unwrap_err()
    }

    #[test]
    fn each_invalid_value_names_its_variable() {
        let cases = [
            ("DATABASE_URL", "not a url"),
            ("DATABASE_URL", "mysql://x@y/z"),
            ("BIND_ADDR", "localhost"),
            ("PUBLIC_URL", "ftp://example.com"),
            ("CRON_SECRET", "short"),
            ("SYNC_QUEUE", "nonsense"),
            ("QSTASH_URL", "nope"),
            ("RUN_WORKERS", "maybe"),
            ("ALLOW_PRIVATE_TARGETS", "2"),
            ("SEQUENCER_BATCH_SIZE", "0"),
            ("DATABASE_MAX_CONNECTIONS", "lots"),
            ("QSTASH_CLOCK_TOLERANCE_SECS", "-1"),
            ("SYNC_BATCH_SIZE", "0"),
            ("SYNC_MAX_BATCHES_PER_RUN", "x"),
            ("SYNC_DATABASE_CONCURRENCY", "1000"),
            ("SYNC_CONNECT_TIMEOUT_MS", "0"),
            ("SYNC_STATEMENT_TIMEOUT_MS", "soon"),
            ("SYNC_LOCK_TIMEOUT_MS", "1.5"),
            ("QSTASH_RETRIES", "many"),
            ("POLLER_BATCH_SIZE", "0"),
            ("POLLER_LEASE_SECS", "0"),
            ("POLLER_IDLE_INTERVAL_MS", "-5"),
            ("POLLER_SYNC_CONCURRENCY", "0"),
        ];
        for (variable, value) in cases {
            let error = error_for(&[(variable, value)]);
            assert_eq!(error.variable, variable, "{value:?}");
            assert!(error.to_string().contains(variable));
            assert!(!error.to_string().contains('\n'));
        }
    }

    #[test]
    fn qstash_mode_requires_a_token() {
        let error = error_for(&[("SYNC_QUEUE", "qstash")]);
        assert_eq!(error.variable, "QSTASH_TOKEN");
    }

    #[test]
    fn missing_required_variables_are_named() {
        assert_eq!(env(&[]).config().unwrap_err().variable, "DATABASE_URL");
        let only_db = [BASE[0]];
        assert_eq!(env(&only_db).config().unwrap_err().variable, "CRON_SECRET");
    }

    #[test]
    fn errors_and_debug_output_never_contain_secrets() {
        let error = error_for(&[(
            "DATABASE_URL",
            "postgres://app:hunter2-secret@db:notaport/x",
        )]);
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let config = env(&BASE).config().unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("a-cron-secret"), "{debug}");
    }

    #[test]
    fn log_settings_are_validated() {
        let error = env(&[("LOG_FORMAT", "xml")]).log_settings().unwrap_err();
        assert_eq!(error.variable, "LOG_FORMAT");
        let error = env(&[("RUST_LOG", "info,[[[")]).log_settings().unwrap_err();
        assert_eq!(error.variable, "RUST_LOG");
        let settings = env(&[("LOG_FORMAT", "json")]).log_settings().unwrap();
        assert_eq!(settings.format, LogFormat::Json);
        assert_eq!(settings.filter, "info");
    }
}
