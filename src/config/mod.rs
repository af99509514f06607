//! Typed configuration read from the environment (DESIGN.md §8).
//!
//! Everything is parsed and validated once, at start-up, so that a typo in a deployment
//! stops the process with one line naming the variable instead of failing an hour later
//! inside a worker. Secrets are held as [`SecretString`] and never printed: the `Debug`
//! output of every type here redacts them.

mod components;
mod env;

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

pub use env::Env;

use crate::db::DatabaseSettings;
use crate::poller::PollerSettings;
use crate::sequencer::SequencerSettings;
use crate::sync::SyncSettings;
use env::parse_http_url;

/// A configuration value that cannot be used. Displayed as one line that names the
/// variable and never contains the value (it may be a secret).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub(super) fn new(variable: &'static str, reason: impl Into<String>) -> Self {
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

impl<F: Fn(&str) -> Option<String>> Env<F> {
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
        let sync_queue = self.parse_or("SYNC_QUEUE", SyncQueue::Direct, |raw| match raw {
            "direct" => Ok(SyncQueue::Direct),
            "qstash" => Ok(SyncQueue::Qstash),
            _ => Err("expected direct or qstash".to_owned()),
        })?;
        let config = Config {
            database,
            bind_addr,
            public_url: self.parse_or("PUBLIC_URL", default_public_url, parse_http_url)?,
            cron_secret: self.cron_secret()?,
            sync_queue,
            qstash: self.qstash_settings()?,
            run_workers: self.bool_or("RUN_WORKERS", true)?,
            allow_private_targets: self.bool_or("ALLOW_PRIVATE_TARGETS", false)?,
            sequencer: self.sequencer_settings()?,
            sync: self.sync_settings()?,
            poller: self.poller_settings()?,
        };
        if config.sync_queue == SyncQueue::Qstash && config.qstash.token.is_none() {
            return Err(ConfigError::new(
                "QSTASH_TOKEN",
                "is required when SYNC_QUEUE=qstash",
            ));
        }
        Ok(config)
    }

    /// `CRON_SECRET`: required, and long enough not to be guessed.
    fn cron_secret(&self) -> Result<SecretString, ConfigError> {
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
        Ok(cron_secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::LogFormat;
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
        assert_eq!(config.sync.staged_batch_size, 20_000);
        assert_eq!(config.qstash.clock_tolerance, Duration::from_secs(5));
        assert_eq!(config.database.location().dbname, "app");
    }

    #[test]
    fn staging_can_be_turned_off() {
        let mut pairs = BASE.to_vec();
        pairs.push(("SYNC_STAGED_BATCH_SIZE", "0"));
        assert_eq!(env(&pairs).config().unwrap().sync.staged_batch_size, 0);
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
            ("SEQUENCER_GATHER_MS", "1001"),
            ("DATABASE_MAX_CONNECTIONS", "lots"),
            ("QSTASH_CLOCK_TOLERANCE_SECS", "-1"),
            ("SYNC_BATCH_SIZE", "0"),
            ("SYNC_STAGED_BATCH_SIZE", "2000000"),
            ("SYNC_MAX_BATCHES_PER_RUN", "x"),
            ("SYNC_DATABASE_CONCURRENCY", "1000"),
            ("SYNC_CONNECT_TIMEOUT_MS", "0"),
            ("SYNC_STATEMENT_TIMEOUT_MS", "soon"),
            ("SYNC_LOCK_TIMEOUT_MS", "1.5"),
            ("SYNC_MAX_TENANT_MESSAGE_BYTES", "1024"),
            ("QSTASH_RETRIES", "many"),
            ("POLLER_BATCH_SIZE", "0"),
            ("POLLER_LEASE_SECS", "0"),
            ("POLLER_IDLE_INTERVAL_MS", "-5"),
            ("POLLER_SYNC_CONCURRENCY", "0"),
            ("POLLER_STATUS_INTERVAL_MS", "60001"),
            ("POLLER_COMPLETION_WAIT_MS", "1001"),
        ];
        for (variable, value) in cases {
            let error = error_for(&[(variable, value)]);
            assert_eq!(error.variable, variable, "{value:?}");
            assert!(error.to_string().contains(variable));
            assert!(!error.to_string().contains('\n'));
        }
    }

    #[test]
    fn the_sequencer_gathers_for_five_milliseconds_unless_told_otherwise() {
        let gather = |pairs: &[(&str, &str)]| {
            let mut all = BASE.to_vec();
            all.extend_from_slice(pairs);
            env(&all).config().unwrap().sequencer.gather_pause
        };
        assert_eq!(gather(&[]), Duration::from_millis(5));
        assert_eq!(
            gather(&[("SEQUENCER_GATHER_MS", "20")]),
            Duration::from_millis(20)
        );
        assert_eq!(
            gather(&[("SEQUENCER_GATHER_MS", "0")]),
            Duration::ZERO,
            "no pause"
        );
    }

    #[test]
    fn a_plain_success_is_written_at_most_every_two_seconds_unless_told_otherwise() {
        let interval = |pairs: &[(&str, &str)]| {
            let mut all = BASE.to_vec();
            all.extend_from_slice(pairs);
            env(&all).config().unwrap().poller.status_interval
        };
        assert_eq!(interval(&[]), Duration::from_secs(2));
        assert_eq!(
            interval(&[("POLLER_STATUS_INTERVAL_MS", "500")]),
            Duration::from_millis(500)
        );
        assert_eq!(
            interval(&[("POLLER_STATUS_INTERVAL_MS", "0")]),
            Duration::ZERO,
            "every success written with its completion"
        );
    }

    #[test]
    fn a_completion_waits_twenty_milliseconds_for_a_claim_unless_told_otherwise() {
        let wait = |pairs: &[(&str, &str)]| {
            let mut all = BASE.to_vec();
            all.extend_from_slice(pairs);
            env(&all).config().unwrap().poller.completion_wait
        };
        assert_eq!(wait(&[]), Duration::from_millis(20));
        assert_eq!(
            wait(&[("POLLER_COMPLETION_WAIT_MS", "100")]),
            Duration::from_millis(100)
        );
        assert_eq!(
            wait(&[("POLLER_COMPLETION_WAIT_MS", "0")]),
            Duration::ZERO,
            "each completion at once"
        );
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
