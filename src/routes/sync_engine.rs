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
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::AppError;
use crate::auth::qstash::SIGNATURE_HEADER;
use crate::routes::AppState;
use crate::sync::report::{DatabaseReport, MappingReport, TenancySync};
use crate::sync::{sync_tenancy, SyncError};

/// Largest accepted body; a sync request is a few dozen bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncRequest {
    tenancy_id: Uuid,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SyncResponse {
    /// Every database synced.
    ok: bool,
    tenancy_id: Uuid,
    /// `synced`, `unknownTenancy` or `invalidConfig`.
    outcome: &'static str,
    /// A stable name for `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    databases: Vec<DatabaseResult>,
    /// Databases not attempted: their last attempt failed and their next one is not
    /// due yet. A retry request for then is queued.
    not_due_databases: Vec<String>,
    /// Work was left over and a new sync request was queued.
    requeued: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DatabaseResult {
    database_id: String,
    ok: bool,
    /// A stable name for `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    synced_through: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mappings: Option<Vec<MappingResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retryable: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MappingResult {
    mapping: &'static str,
    batches: u32,
    changes: u64,
    upserted: u64,
    deleted: u64,
    last_synced_sequence_id: i64,
    more_remaining: bool,
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
    let (status, response) = answer(request.tenancy_id, outcome);
    Ok((status, Json(response)).into_response())
}

/// The status and body for a sync's outcome: 5xx only when a retry may help, so that
/// QStash delivers the request again.
fn answer(tenancy_id: Uuid, outcome: TenancySync) -> (StatusCode, SyncResponse) {
    let nothing_synced = |ok, outcome, error: Option<SyncError>| SyncResponse {
        ok,
        tenancy_id,
        outcome,
        code: error.as_ref().map(SyncError::code),
        error: error.as_ref().map(SyncError::to_string),
        databases: Vec::new(),
        not_due_databases: Vec::new(),
        requeued: false,
    };
    match outcome {
        TenancySync::UnknownTenancy => {
            (StatusCode::OK, nothing_synced(true, "unknownTenancy", None))
        }
        TenancySync::InvalidConfig(error) => (
            StatusCode::OK,
            nothing_synced(false, "invalidConfig", Some(error)),
        ),
        TenancySync::Synced(report) => {
            let status = if report.has_retryable_failure() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            let databases: Vec<DatabaseResult> =
                report.databases.iter().map(DatabaseResult::from).collect();
            let response = SyncResponse {
                ok: databases.iter().all(|database| database.ok) && report.not_due.is_empty(),
                tenancy_id,
                outcome: "synced",
                code: None,
                error: None,
                databases,
                not_due_databases: report.not_due,
                requeued: report.requeued,
            };
            (status, response)
        }
    }
}

impl From<&DatabaseReport> for DatabaseResult {
    fn from(report: &DatabaseReport) -> Self {
        let database_id = report.database_id.clone();
        match &report.result {
            Ok(synced) => DatabaseResult {
                database_id,
                ok: true,
                synced_through: Some(synced.synced_through()),
                mappings: Some(synced.mappings.iter().map(MappingResult::from).collect()),
                code: None,
                error: None,
                retryable: None,
            },
            Err(error) => DatabaseResult {
                database_id,
                ok: false,
                synced_through: None,
                mappings: None,
                code: Some(error.code()),
                error: Some(error.to_string()),
                retryable: Some(error.is_retryable()),
            },
        }
    }
}

impl From<&MappingReport> for MappingResult {
    fn from(report: &MappingReport) -> Self {
        MappingResult {
            mapping: report.mapping.name(),
            batches: report.batches,
            changes: report.changes,
            upserted: report.upserted,
            deleted: report.deleted,
            last_synced_sequence_id: report.watermark,
            more_remaining: report.more_remaining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_result_names_its_error_without_internals() {
        let report = DatabaseReport {
            database_id: "main".to_owned(),
            result: Err(SyncError::Internal(sqlx::Error::Protocol(
                "detail of the internal database".to_owned(),
            ))),
        };
        let answer = serde_json::to_value(DatabaseResult::from(&report)).unwrap();
        assert_eq!(answer["code"], "internal");
        assert_eq!(answer["error"], "internal database");
        assert!(!answer
            .to_string()
            .contains("detail of the internal database"));
    }
}
