//! What a sync of one tenancy did, as the `/sync-engine` webhook answers it and the
//! `sync` command prints it: per database, its outcome (with a stable error code, and
//! never the internal error chain), and per mapping what was written.

use serde::Serialize;
use uuid::Uuid;

use super::error::SyncError;
use super::report::{DatabaseReport, MappingReport, TenancySync};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncSummary {
    /// Every database synced.
    pub ok: bool,
    pub tenancy_id: Uuid,
    /// `synced`, `unknownTenancy` or `invalidConfig`.
    pub outcome: &'static str,
    /// A stable name for `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub databases: Vec<DatabaseResult>,
    /// Databases not attempted: their last attempt failed and their next one is not
    /// due yet. A retry request for then is queued.
    pub not_due_databases: Vec<String>,
    /// Work was left over and a new sync request was queued.
    pub requeued: bool,
    /// Some database failed in a way that a later attempt may fix.
    #[serde(skip)]
    pub retry_may_help: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseResult {
    pub database_id: String,
    pub ok: bool,
    /// A stable name for `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_through: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<MappingResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MappingResult {
    pub mapping: &'static str,
    pub batches: u32,
    pub changes: u64,
    pub upserted: u64,
    pub deleted: u64,
    pub last_synced_sequence_id: i64,
    pub more_remaining: bool,
}

impl SyncSummary {
    /// The summary of `outcome`, a sync of `tenancy_id`.
    pub fn new(tenancy_id: Uuid, outcome: TenancySync) -> Self {
        let nothing_synced = |ok, outcome, error: Option<SyncError>| SyncSummary {
            ok,
            tenancy_id,
            outcome,
            code: error.as_ref().map(SyncError::code),
            error: error.as_ref().map(SyncError::to_string),
            databases: Vec::new(),
            not_due_databases: Vec::new(),
            requeued: false,
            retry_may_help: false,
        };
        match outcome {
            TenancySync::UnknownTenancy => nothing_synced(true, "unknownTenancy", None),
            TenancySync::InvalidConfig(error) => {
                nothing_synced(false, "invalidConfig", Some(error))
            }
            TenancySync::Synced(report) => {
                let databases: Vec<DatabaseResult> =
                    report.databases.iter().map(DatabaseResult::from).collect();
                let retry_may_help = report.has_retryable_failure();
                SyncSummary {
                    ok: databases.iter().all(|database| database.ok) && report.not_due.is_empty(),
                    tenancy_id,
                    outcome: "synced",
                    code: None,
                    error: None,
                    databases,
                    not_due_databases: report.not_due,
                    requeued: report.requeued,
                    retry_may_help,
                }
            }
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
