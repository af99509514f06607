//! The one error type that HTTP handlers return, and the only place that decides status
//! codes. Internal failures are logged with their whole source chain and answered with a
//! generic message: database errors can carry row values, hosts or user names.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::qstash::SignatureError;
use crate::poller::PollerError;
use crate::sequencer::SequencerError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Missing, malformed or wrong `Authorization: Bearer …`.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The `/sync-engine` request is not signed by QStash with a configured key.
    #[error("invalid Upstash-Signature: {0}")]
    InvalidSignature(SignatureError),
    /// `/sync-engine` cannot check signatures because no signing key is configured.
    #[error("QSTASH_CURRENT_SIGNING_KEY and QSTASH_NEXT_SIGNING_KEY are not set; /sync-engine is disabled")]
    SigningKeysMissing,
    /// The request itself is wrong; the message is safe to show the caller.
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
    #[error(transparent)]
    Poller(#[from] PollerError),
    #[error("internal database error")]
    Database(#[from] sqlx::Error),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, self.to_string()),
            AppError::InvalidSignature(error) => {
                tracing::warn!(%error, "rejected a sync-engine request");
                (StatusCode::UNAUTHORIZED, self.to_string())
            }
            AppError::SigningKeysMissing => (StatusCode::SERVICE_UNAVAILABLE, self.to_string()),
            AppError::BadRequest(message) => (StatusCode::BAD_REQUEST, message.clone()),
            AppError::Sequencer(_) | AppError::Poller(_) | AppError::Database(_) => {
                tracing::error!(error = %error_chain(&self), "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        let mut response = (status, Json(json!({ "ok": false, "error": message }))).into_response();
        if matches!(self, AppError::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"external-db-sync\""),
            );
        }
        response
    }
}

/// Formats an error and all its sources on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
