//! Reading variables: [`Env`] and the parsers every setting shares. A reason never
//! contains the value, which may be a secret.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use url::Url;

use super::ConfigError;

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

    pub(super) fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    /// `name` parsed by `parse`, or `default` when unset.
    pub(super) fn parse_or<T>(
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

    /// A whole number from `min` to `max`, or `default` when unset.
    pub(super) fn number<T>(
        &self,
        name: &'static str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        self.parse_or(name, default, |raw| parse_in_range(raw, min, max))
    }

    /// A duration given in whole milliseconds, from 1 to `max_ms`.
    pub(super) fn millis(
        &self,
        name: &'static str,
        default: Duration,
        max_ms: u64,
    ) -> Result<Duration, ConfigError> {
        let default = u64::try_from(default.as_millis()).unwrap_or(max_ms);
        self.number(name, default, 1, max_ms)
            .map(Duration::from_millis)
    }

    /// A duration given in whole seconds, from `min_secs` to `max_secs`.
    pub(super) fn secs(
        &self,
        name: &'static str,
        default: Duration,
        min_secs: u64,
        max_secs: u64,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default.as_secs(), min_secs, max_secs)
            .map(Duration::from_secs)
    }

    pub(super) fn bool_or(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse_or(name, default, |raw| {
            match raw.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err("expected true or false".to_owned()),
            }
        })
    }

    pub(super) fn secret(&self, name: &str) -> Option<SecretString> {
        self.get(name).map(SecretString::from)
    }
}

/// Parses a PostgreSQL URL without ever echoing it: the reason names what is wrong, not
/// the value, because the value carries a password.
pub(super) fn parse_database_url(raw: &str) -> Result<PgConnectOptions, String> {
    let url = Url::parse(raw).map_err(|error| format!("not a valid URL ({error})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("expected a postgres:// or postgresql:// URL".to_owned());
    }
    PgConnectOptions::from_str(raw).map_err(|_| "not a valid PostgreSQL connection URL".to_owned())
}

pub(super) fn parse_http_url(raw: &str) -> Result<Url, String> {
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
