//! The one error type that HTTP handlers return, and the only place that decides status
//! codes. Every error answer is `{"ok": false, "code": "<stable code>", "error": "<short
//! message>"}`; details (a signature's fault, a database error's source chain, which
//! can carry row values, hosts or user names) go to the log only.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::qstash::SignatureError;
use crate::error::error_chain;
use crate::poller::PollerError;
use crate::sequencer::SequencerError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Missing, malformed or wrong `Authorization: Bearer …`.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The `/sync-engine` request is not signed by QStash with a configured key. Which
    /// check failed is logged, not answered.
    #[error("invalid Upstash-Signature")]
    InvalidSignature(SignatureError),
    /// `/sync-engine` cannot check signatures because no signing key is configured.
    #[error("QSTASH_CURRENT_SIGNING_KEY and QSTASH_NEXT_SIGNING_KEY are not set; /sync-engine is disabled")]
    SigningKeysMissing,
    /// The request itself is wrong; the message is safe to show the caller.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than the route accepts.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// No such route.
    #[error("no such route")]
    NotFound,
    /// The tenancy a route names does not exist.
    #[error("no tenancy {0}")]
    UnknownTenancy(uuid::Uuid),
    /// The tenancy has no database with the id asked for.
    #[error("the tenancy has no database with that id")]
    UnknownDatabase(String),
    /// The route exists, but not for this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
    #[error(transparent)]
    Poller(#[from] PollerError),
    #[error("internal database error")]
    Database(#[from] sqlx::Error),
}

impl AppError {
    /// The stable, machine-readable name of the error, answered as `"code"`.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::Unauthorized => "unauthorized",
            AppError::InvalidSignature(_) => "invalid_signature",
            AppError::SigningKeysMissing => "signing_keys_missing",
            AppError::BadRequest(_) => "bad_request",
            AppError::PayloadTooLarge => "payload_too_large",
            AppError::NotFound => "not_found",
            AppError::UnknownTenancy(_) => "unknown_tenancy",
            AppError::UnknownDatabase(_) => "unknown_database",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Sequencer(_) | AppError::Poller(_) | AppError::Database(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthorized | AppError::InvalidSignature(_) => StatusCode::UNAUTHORIZED,
            AppError::SigningKeysMissing => StatusCode::SERVICE_UNAVAILABLE,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::NotFound | AppError::UnknownTenancy(_) | AppError::UnknownDatabase(_) => {
                StatusCode::NOT_FOUND
            }
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Sequencer(_) | AppError::Poller(_) | AppError::Database(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let message = match &self {
            AppError::InvalidSignature(error) => {
                tracing::warn!(%error, "rejected a sync-engine request");
                self.to_string()
            }
            AppError::Sequencer(_) | AppError::Poller(_) | AppError::Database(_) => {
                tracing::error!(error = %error_chain(&self), "request failed");
                "internal error".to_owned()
            }
            _ => self.to_string(),
        };
        let body = json!({ "ok": false, "code": self.code(), "error": message });
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, AppError::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"external-db-sync\""),
            );
        }
        response
    }
}
