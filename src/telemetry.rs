//! Logging set-up: `RUST_LOG` picks what is logged, `LOG_FORMAT` how.
//!
//! Some dependencies log the parameters bound to each statement at `debug` or `trace`
//! (`tokio_postgres` does: users' e-mails, names and metadata). Whatever `RUST_LOG`
//! says, their targets are held at `info` unless `LOG_UNSAFE_QUERY_PARAMETERS=true`
//! asks for them.

use std::io::IsTerminal;

use tracing_subscriber::filter::Directive;
use tracing_subscriber::EnvFilter;

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
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

/// Targets that log statements or their parameters below `info`.
const PARAMETER_TARGETS: [&str; 3] = ["tokio_postgres", "sqlx::query", "tower_http"];

/// The filter of `settings`, with [`PARAMETER_TARGETS`] held at `info` unless unsafe
/// logging was asked for.
pub fn filter(settings: &LogSettings) -> EnvFilter {
    let requested = if settings.unsafe_query_parameters {
        settings.filter.clone()
    } else {
        // A directive for a target inside one of these (`tokio_postgres::query=debug`)
        // would be more specific than the cap below, and win: such directives go.
        settings
            .filter
            .split(',')
            .filter(|directive| !names_parameter_target(directive))
            .collect::<Vec<_>>()
            .join(",")
    };
    // The filter was validated when the settings were read.
    let mut filter = EnvFilter::try_new(&requested).unwrap_or_else(|_| EnvFilter::new("info"));
    if !settings.unsafe_query_parameters {
        for target in PARAMETER_TARGETS {
            let directive: Directive = format!("{target}=info")
                .parse()
                .expect("a constant directive parses");
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Whether a `RUST_LOG` directive is about a target in [`PARAMETER_TARGETS`].
fn names_parameter_target(directive: &str) -> bool {
    let target = directive
        .split(['[', '='])
        .next()
        .unwrap_or_default()
        .trim();
    PARAMETER_TARGETS.iter().any(|held| {
        target == *held
            || target
                .strip_prefix(held)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(settings: &LogSettings) {
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(settings))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    fn settings(filter: &str, unsafe_query_parameters: bool) -> LogSettings {
        LogSettings {
            filter: filter.to_owned(),
            format: LogFormat::Pretty,
            unsafe_query_parameters,
        }
    }

    /// Whether an event of `target` at `level` passes the filter of `settings`.
    fn passes(settings: &LogSettings, target: &'static str, level: tracing::Level) -> bool {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subscriber = tracing_subscriber::registry()
            .with(filter(settings))
            .with(Probe(seen.clone()));
        tracing::subscriber::with_default(subscriber, || match (target, level) {
            ("tokio_postgres::query", tracing::Level::DEBUG) => {
                tracing::debug!(target: "tokio_postgres::query", "parameters")
            }
            ("tokio_postgres::query", _) => tracing::info!(target: "tokio_postgres::query", "x"),
            (_, tracing::Level::TRACE) => tracing::trace!(target: "external_db_sync", "x"),
            _ => tracing::info!(target: "external_db_sync", "x"),
        });
        seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    struct Probe(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Probe {
        fn on_event(
            &self,
            _event: &tracing::Event<'_>,
            _context: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn parameter_targets_stay_at_info_whatever_rust_log_says() {
        for rust_log in [
            "trace",
            "trace,tokio_postgres=trace",
            "trace,tokio_postgres::query=debug",
        ] {
            let held = settings(rust_log, false);
            assert!(
                !passes(&held, "tokio_postgres::query", tracing::Level::DEBUG),
                "{rust_log}"
            );
            assert!(
                passes(&held, "tokio_postgres::query", tracing::Level::INFO),
                "{rust_log}"
            );
            assert!(
                passes(&held, "external_db_sync", tracing::Level::TRACE),
                "{rust_log}"
            );
        }
        let unsafe_logging = settings("trace", true);
        assert!(passes(
            &unsafe_logging,
            "tokio_postgres::query",
            tracing::Level::DEBUG
        ));
        assert_eq!(
            filter(&settings("info", false)).max_level_hint(),
            Some(LevelFilter::INFO)
        );
    }
}
