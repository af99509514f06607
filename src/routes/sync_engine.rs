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
    let tenancy_id = tenancy_of(verified.bytes())?;
    let outcome = sync_tenancy(&state.engine, tenancy_id).await?;
    let summary = SyncSummary::new(tenancy_id, outcome);
    // 5xx only when a retry may help, so that QStash delivers the request again.
    let status = if summary.retry_may_help {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary)).into_response())
}

/// The tenancy a verified body names: `{"tenancyId": "<uuid>"}` (other fields are
/// ignored); anything else is a bad request with one documented message.
fn tenancy_of(body: &[u8]) -> Result<Uuid, AppError> {
    let request: SyncRequest = serde_json::from_slice(body).map_err(|error| {
        tracing::debug!(%error, "malformed sync-engine request body");
        AppError::BadRequest(EXPECTED_BODY.to_owned())
    })?;
    Ok(request.tenancy_id)
}

const EXPECTED_BODY: &str = "expected {\"tenancyId\": \"<uuid>\"}";

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any bytes: the tenancy they name, or the one documented bad request.
        #[test]
        fn any_body_is_a_tenancy_or_the_documented_bad_request(
            body in prop::collection::vec(any::<u8>(), 0..256)
        ) {
            match tenancy_of(&body) {
                Ok(tenancy) => {
                    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let named = parsed["tenancyId"].as_str().map(Uuid::parse_str);
                    prop_assert!(matches!(named, Some(Ok(id)) if id == tenancy));
                }
                Err(AppError::BadRequest(message)) => prop_assert_eq!(message, EXPECTED_BODY),
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
        }

        /// Bodies shaped like requests, with arbitrary ids and an extra field: the id
        /// as `Uuid` parses it, or the bad request.
        #[test]
        fn request_shaped_bodies_name_their_tenancy_or_are_refused(
            id in "[0-9a-fA-F-]{0,40}",
            extra in "[a-z]{1,8}",
            value in any::<i64>(),
        ) {
            let body = serde_json::json!({ "tenancyId": id, extra: value }).to_string();
            match (tenancy_of(body.as_bytes()), Uuid::parse_str(&id)) {
                (Ok(tenancy), Ok(expected)) => prop_assert_eq!(tenancy, expected),
                (Err(AppError::BadRequest(_)), Err(_)) => {}
                (result, expected) => prop_assert!(false, "{result:?} for {expected:?}"),
            }
        }
    }
}
