//! `POST /api/latest/internal/external-db-sync/sync-engine`: the webhook QStash calls
//! with `{"tenancyId": "<uuid>"}`. The signature is checked on the raw body before
//! anything is parsed; then the tenancy is synced and every database's result returned.
//!
//! The status code tells QStash whether to deliver again: 5xx only when some database
//! failed in a way a retry can fix. Permanent failures (a bad connection string, a
//! refused target) are recorded and answered 200, so they do not burn retries. A
//! database whose next attempt is not due yet is not attempted (answered 200): its
//! retry request comes when it is due.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::error::AppError;
use crate::auth::qstash::SIGNATURE_HEADER;
use crate::routes::AppState;
use crate::sync::summary::SyncSummary;
use crate::sync::sync_tenancy;

/// Largest accepted body; a sync request is a few dozen bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncRequest {
    tenancy_id: Uuid,
}

pub async fn run(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge
        } else {
            tracing::debug!(error = %rejection, "cannot read a sync-engine request body");
            AppError::BadRequest("the request body could not be read".to_owned())
        }
    })?;
    let verifier = state
        .verifier
        .as_ref()
        .ok_or(AppError::SigningKeysMissing)?;
    let token = headers
        .get(SIGNATURE_HEADER)
        .map(|value| value.to_str().unwrap_or_default());
    let verified = verifier
        .verify(token, body)
        .map_err(AppError::InvalidSignature)?;
    let request: SyncRequest = serde_json::from_slice(verified.bytes()).map_err(|error| {
        tracing::debug!(%error, "malformed sync-engine request body");
        AppError::BadRequest("expected {\"tenancyId\": \"<uuid>\"}".to_owned())
    })?;
    let outcome = sync_tenancy(&state.engine, request.tenancy_id).await?;
    let summary = SyncSummary::new(request.tenancy_id, outcome);
    // 5xx only when a retry may help, so that QStash delivers the request again.
    let status = if summary.retry_may_help {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary)).into_response())
}
