//! Each component's settings, read from its variables. The components own their
//! settings types; this is the one place that knows the variables' names.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::env::{parse_database_url, parse_http_url, Env};
use super::{ConfigError, QstashSettings};
use crate::db::sync_status::{Backoff, RetrySchedule};
use crate::db::DatabaseSettings;
use crate::embedded::DEFAULT_DIRECTORY;
use crate::poller::PollerSettings;
use crate::sequencer::SequencerSettings;
use crate::sync::connect::SessionSettings;
use crate::sync::policy::PrivateTargets;
use crate::sync::sessions::SessionPoolSettings;
use crate::sync::SyncSettings;
use crate::telemetry::{LogFormat, LogSettings};

/// The longest wait between two attempts of a failing database that may be configured.
const DAY_MS: u64 = 86_400_000;
/// The longest idle interval of a loop, and the longest statement or lock timeout.
const HOUR_MS: u64 = 3_600_000;

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// Where the embedded database lives (`EMBEDDED_DATA_DIR`, by default
    /// [`DEFAULT_DIRECTORY`] under the current directory), or `None` when `DATABASE_URL`
    /// names the database to use.
    pub fn embedded_data_dir(&self) -> Option<PathBuf> {
        if self.get("DATABASE_URL").is_some() {
            return None;
        }
        Some(
            self.get("EMBEDDED_DATA_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_DIRECTORY), PathBuf::from),
        )
    }

    /// `ALLOW_PRIVATE_TARGETS`.
    pub fn private_targets(&self) -> Result<PrivateTargets, ConfigError> {
        Ok(if self.bool_or("ALLOW_PRIVATE_TARGETS", false)? {
            PrivateTargets::Allowed
        } else {
            PrivateTargets::Refused
        })
    }

    /// Whether `name` is set (to something other than blanks).
    pub fn is_set(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// `RUST_LOG`, `LOG_FORMAT` and `LOG_UNSAFE_QUERY_PARAMETERS`.
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

    /// `DATABASE_URL` and `DATABASE_MAX_CONNECTIONS`. The command line starts an embedded
    /// database when `DATABASE_URL` is unset, and sets it before this is read.
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
        Ok(DatabaseSettings {
            connect_options,
            max_connections: self.number("DATABASE_MAX_CONNECTIONS", 10, 2, 1000)?,
        })
    }

    /// `QSTASH_*`.
    pub(super) fn qstash_settings(&self) -> Result<QstashSettings, ConfigError> {
        let default_url =
            Url::parse("https://qstash.upstash.io").expect("the default QStash URL is valid");
        Ok(QstashSettings {
            url: self.parse_or("QSTASH_URL", default_url, parse_http_url)?,
            token: self.secret("QSTASH_TOKEN"),
            current_signing_key: self.secret("QSTASH_CURRENT_SIGNING_KEY"),
            next_signing_key: self.secret("QSTASH_NEXT_SIGNING_KEY"),
            clock_tolerance: self.secs(
                "QSTASH_CLOCK_TOLERANCE_SECS",
                Duration::from_secs(5),
                0,
                300,
            )?,
            retries: self.number("QSTASH_RETRIES", 5, 0, 100)?,
        })
    }

    /// `SEQUENCER_*`.
    pub(super) fn sequencer_settings(&self) -> Result<SequencerSettings, ConfigError> {
        let defaults = SequencerSettings::default();
        Ok(SequencerSettings {
            batch_size: self.number("SEQUENCER_BATCH_SIZE", defaults.batch_size, 1, 100_000)?,
            idle_interval: self.millis(
                "SEQUENCER_IDLE_INTERVAL_MS",
                defaults.idle_interval,
                HOUR_MS,
            )?,
            gather_pause: Duration::from_millis(self.number(
                "SEQUENCER_GATHER_MS",
                defaults.gather_pause.as_millis() as u64,
                0,
                1000,
            )?),
        })
    }

    /// `POLLER_*`.
    pub(super) fn poller_settings(&self) -> Result<PollerSettings, ConfigError> {
        let defaults = PollerSettings::default();
        Ok(PollerSettings {
            batch_size: self.number("POLLER_BATCH_SIZE", defaults.batch_size, 1, 10_000)?,
            lease: self.secs("POLLER_LEASE_SECS", defaults.lease, 1, 86_400)?,
            idle_interval: self.millis(
                "POLLER_IDLE_INTERVAL_MS",
                defaults.idle_interval,
                HOUR_MS,
            )?,
            sync_concurrency: self.number(
                "POLLER_SYNC_CONCURRENCY",
                defaults.sync_concurrency,
                1,
                1000,
            )?,
            status_interval: Duration::from_millis(self.number(
                "POLLER_STATUS_INTERVAL_MS",
                defaults.status_interval.as_millis() as u64,
                0,
                60_000,
            )?),
            completion_wait: Duration::from_millis(self.number(
                "POLLER_COMPLETION_WAIT_MS",
                defaults.completion_wait.as_millis() as u64,
                0,
                1000,
            )?),
            ..defaults
        })
    }

    /// `SYNC_*`: batch size, per-run budget, concurrency, tenant sessions and retries.
    pub fn sync_settings(&self) -> Result<SyncSettings, ConfigError> {
        let defaults = SyncSettings::default();
        Ok(SyncSettings {
            batch_size: self.number("SYNC_BATCH_SIZE", defaults.batch_size, 1, 100_000)?,
            staged_batch_size: self.number(
                "SYNC_STAGED_BATCH_SIZE",
                defaults.staged_batch_size,
                0,
                1_000_000,
            )?,
            max_batches_per_run: self.number(
                "SYNC_MAX_BATCHES_PER_RUN",
                defaults.max_batches_per_run,
                1,
                100_000,
            )?,
            database_concurrency: self.number(
                "SYNC_DATABASE_CONCURRENCY",
                defaults.database_concurrency,
                1,
                256,
            )?,
            max_databases_per_tenancy: self.number(
                "SYNC_MAX_DATABASES_PER_TENANCY",
                defaults.max_databases_per_tenancy,
                1,
                1000,
            )?,
            session: self.session_settings(&defaults.session)?,
            pool: self.session_pool_settings(&defaults.pool)?,
            retry: self.retry_schedule(&defaults.retry)?,
        })
    }

    /// `SYNC_CONNECT_TIMEOUT_MS`, `SYNC_STATEMENT_TIMEOUT_MS`, `SYNC_LOCK_TIMEOUT_MS`,
    /// `SYNC_MAX_TENANT_MESSAGE_BYTES`.
    fn session_settings(&self, defaults: &SessionSettings) -> Result<SessionSettings, ConfigError> {
        Ok(SessionSettings {
            connect_timeout: self.millis(
                "SYNC_CONNECT_TIMEOUT_MS",
                defaults.connect_timeout,
                300_000,
            )?,
            statement_timeout: self.millis(
                "SYNC_STATEMENT_TIMEOUT_MS",
                defaults.statement_timeout,
                HOUR_MS,
            )?,
            lock_timeout: self.millis("SYNC_LOCK_TIMEOUT_MS", defaults.lock_timeout, HOUR_MS)?,
            idle_in_transaction_timeout: defaults.idle_in_transaction_timeout,
            // At least 64 KiB (a handshake or an error message takes a few hundred bytes),
            // at most 1 GiB (PostgreSQL's own largest value).
            max_message_bytes: self.number(
                "SYNC_MAX_TENANT_MESSAGE_BYTES",
                defaults.max_message_bytes,
                64 * 1024,
                1024 * 1024 * 1024,
            )?,
        })
    }

    /// `SYNC_IDLE_SESSIONS_PER_DATABASE`, `SYNC_MAX_IDLE_SESSIONS`, `SYNC_SESSION_IDLE_SECS`.
    fn session_pool_settings(
        &self,
        defaults: &SessionPoolSettings,
    ) -> Result<SessionPoolSettings, ConfigError> {
        Ok(SessionPoolSettings {
            per_database: self.number(
                "SYNC_IDLE_SESSIONS_PER_DATABASE",
                defaults.per_database,
                0,
                64,
            )?,
            total: self.number("SYNC_MAX_IDLE_SESSIONS", defaults.total, 0, 100_000)?,
            idle_timeout: self.secs("SYNC_SESSION_IDLE_SECS", defaults.idle_timeout, 1, 3600)?,
        })
    }

    /// `SYNC_RETRY_*` and `SYNC_PERMANENT_RETRY_*`.
    fn retry_schedule(&self, defaults: &RetrySchedule) -> Result<RetrySchedule, ConfigError> {
        Ok(RetrySchedule {
            retryable: Backoff {
                first: self.millis("SYNC_RETRY_FIRST_MS", defaults.retryable.first, DAY_MS)?,
                max: self.millis("SYNC_RETRY_MAX_MS", defaults.retryable.max, DAY_MS)?,
            },
            permanent: Backoff {
                first: self.millis(
                    "SYNC_PERMANENT_RETRY_FIRST_MS",
                    defaults.permanent.first,
                    DAY_MS,
                )?,
                max: self.millis(
                    "SYNC_PERMANENT_RETRY_MAX_MS",
                    defaults.permanent.max,
                    DAY_MS,
                )?,
            },
        })
    }
}
