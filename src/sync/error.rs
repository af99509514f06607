//! Why a tenant database could not be synced, and whether trying again can help.
//!
//! The classification decides what QStash is told: a retryable failure answers 5xx so
//! the message is delivered again; a permanent one is recorded and answered 200, because
//! retrying the same configuration cannot succeed and would only burn retries. Messages
//! never contain passwords or row values; they may name hosts, users and roles.

use std::io;

use super::framing::{MessageBound, TooLarge};

/// A failure while syncing one tenant database.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The database's entry in the tenancy config is unusable (type, connection string,
    /// role names). Permanent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The target address is not allowed (loopback, private, link-local, or the internal
    /// database itself). Permanent.
    #[error("target refused: {0}")]
    TargetRefused(String),
    /// The database already holds another tenancy's data. Permanent.
    #[error("database belongs to another tenancy: {0}")]
    ForeignOwner(String),
    /// The host name did not resolve. Retryable: DNS outages pass.
    #[error("cannot resolve host {host}")]
    Resolve { host: String, source: io::Error },
    /// The certificate was rejected, or TLS was required and not offered. Permanent.
    #[error("TLS: {0}")]
    Tls(String),
    /// No address of the target accepted a connection (refused, unreachable).
    /// Retryable: servers come back.
    #[error("cannot connect to {target}")]
    Connect { target: String, source: io::Error },
    /// Connecting took longer than the connect timeout. Retryable.
    #[error("timed out connecting to {0}")]
    ConnectTimeout(String),
    /// An error from the tenant database or the connection to it. Shown without the
    /// server's DETAIL, which can quote row values.
    #[error("tenant database: {}", describe_postgres_error(.0))]
    Target(tokio_postgres::Error),
    /// The mapping's row in `_stack_sync_metadata` is gone. Retryable: the next attempt
    /// prepares the schema again, which puts it back.
    #[error("tenant database: the watermark of {0} is missing from _stack_sync_metadata")]
    MissingWatermark(&'static str),
    /// The tenant database answered something this service cannot use (its bookkeeping
    /// table altered, more grants than any configuration needs). Permanent: someone
    /// has to repair the database.
    #[error("tenant database: {0}")]
    Malformed(String),
    /// The tenant server sent a message, or the rows of one answer, longer than
    /// `SYNC_MAX_TENANT_MESSAGE_BYTES`: the connection was failed before it was read.
    /// Permanent: the same statement draws the same answer until the tenant changes
    /// its database.
    #[error("message_too_large: {0}")]
    MessageTooLarge(TooLarge),
    /// An error reading the internal database. Retryable.
    #[error("internal database")]
    Internal(#[from] sqlx::Error),
}

impl SyncError {
    /// A stable, machine-readable name of the failure, answered with it.
    pub fn code(&self) -> &'static str {
        match self {
            SyncError::InvalidConfig(_) => "invalid_config",
            SyncError::TargetRefused(_) => "target_refused",
            SyncError::ForeignOwner(_) => "foreign_owner",
            SyncError::Resolve { .. } => "resolve_failed",
            SyncError::Connect { .. } => "connect_failed",
            SyncError::Tls(_) => "tls",
            SyncError::ConnectTimeout(_) => "connect_timeout",
            SyncError::Target(_) => "tenant_database",
            SyncError::MissingWatermark(_) => "missing_watermark",
            SyncError::Malformed(_) => "malformed_tenant_database",
            SyncError::MessageTooLarge(_) => "message_too_large",
            SyncError::Internal(_) => "internal",
        }
    }

    /// Whether the same attempt may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::InvalidConfig(_)
            | SyncError::TargetRefused(_)
            | SyncError::ForeignOwner(_)
            | SyncError::Malformed(_)
            | SyncError::MessageTooLarge(_)
            | SyncError::Tls(_) => false,
            SyncError::Resolve { .. }
            | SyncError::Connect { .. }
            | SyncError::ConnectTimeout(_)
            | SyncError::MissingWatermark(_)
            | SyncError::Internal(_) => true,
            SyncError::Target(error) => target_error_is_retryable(error),
        }
    }

    /// Whether the session to the tenant database was gone: closed, reset, or ended by
    /// the server (a restart, `pg_terminate_backend`, an idle timeout).
    pub fn is_lost_session(&self) -> bool {
        let SyncError::Target(error) = self else {
            return false;
        };
        match error.code() {
            Some(code) => {
                let code = code.code();
                code.starts_with("08") || code.starts_with("57P")
            }
            None => error.is_closed() || find_source::<io::Error>(error).is_some(),
        }
    }

    /// Whether a table this service owns in the tenant database, or the watermark's row,
    /// was not there (dropped by someone since the schema was prepared).
    pub fn is_missing_table(&self) -> bool {
        match self {
            SyncError::MissingWatermark(_) => true,
            SyncError::Target(error) => error
                .code()
                .is_some_and(|code| *code == tokio_postgres::error::SqlState::UNDEFINED_TABLE),
            _ => false,
        }
    }

    /// This error, or [`SyncError::MessageTooLarge`] if `bound` tripped: a connection
    /// failed by its bound only tells the requests it served that it closed.
    pub(crate) fn explained_by(self, bound: &MessageBound) -> Self {
        match bound.tripped() {
            Some(too_large) => SyncError::MessageTooLarge(too_large.clone()),
            None => self,
        }
    }

    pub(crate) fn target(error: tokio_postgres::Error) -> Self {
        // The handshake reads the stream itself, so a bound it tripped is in the chain.
        if let Some(too_large) = find_source::<TooLarge>(&error) {
            return SyncError::MessageTooLarge(too_large.clone());
        }
        // A certificate that fails verification surfaces as an I/O error wrapping a rustls
        // error; it is permanent and deserves a plain explanation.
        if let Some(tls) = find_source::<rustls::Error>(&error) {
            return SyncError::Tls(format!("certificate rejected ({tls})"));
        }
        SyncError::Target(error)
    }
}

/// SQLSTATE classes and codes that a retry can fix: connection loss, resource shortage,
/// shutdowns, timeouts, serialization failures and deadlocks. Everything else the server
/// reports (authentication, permissions, undefined objects, bad data) needs a person.
fn target_error_is_retryable(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources
                // Admin shutdown, crash shutdown, cannot connect now, idle session timeout;
                // not 57P04, database dropped: that needs a person.
                || (code.starts_with("57P") && code != "57P04")
                || matches!(
                    code,
                    "40001" // serialization failure
                    | "40P01" // deadlock detected
                    | "55P03" // lock not available (lock_timeout)
                    | "57014" // query canceled (statement_timeout)
                    | "25P03" // idle in transaction timeout
                )
        }
        // No SQLSTATE: the connection itself failed (refused, reset, closed).
        None => true,
    }
}

/// Longest part of a tenant server's error message that is kept (recorded, logged,
/// answered): the message is the tenant's to choose, and can be megabytes long.
const MAX_MESSAGE_CHARS: usize = 500;

fn describe_postgres_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let message = db.message();
            let mut shown: String = message
                .chars()
                .take(MAX_MESSAGE_CHARS)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if message.chars().nth(MAX_MESSAGE_CHARS).is_some() {
                shown.push('…');
            }
            format!("{shown} (SQLSTATE {})", db.code().code())
        }
        None => crate::error::error_chain(error),
    }
}

/// Finds an error of type `T` in `error`'s source chain. `io::Error` needs help: its
/// `source()` skips the error it wraps, which is where rustls puts its own.
fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        let wrapped = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref);
        if let Some(found) = wrapped.and_then(|inner| inner.downcast_ref::<T>()) {
            return Some(found);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_problems_are_permanent() {
        assert!(!SyncError::InvalidConfig("x".into()).is_retryable());
        assert!(!SyncError::TargetRefused("x".into()).is_retryable());
        assert!(!SyncError::ForeignOwner("x".into()).is_retryable());
        assert!(!SyncError::Tls("x".into()).is_retryable());
        assert!(!SyncError::Malformed("x".into()).is_retryable());
    }

    #[test]
    fn transient_problems_are_retryable() {
        let resolve = SyncError::Resolve {
            host: "db.example".into(),
            source: io::Error::other("no answer"),
        };
        assert!(resolve.is_retryable());
        assert!(SyncError::ConnectTimeout("db.example:5432".into()).is_retryable());
        assert!(SyncError::Internal(sqlx::Error::PoolTimedOut).is_retryable());
    }
}
