//! `GET /api/latest/internal/external-db-sync/status[?tenancyId=]`: how far behind each
//! tenant database is, as `external-db-sync status --json` prints it.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::error::AppError;
use crate::auth::CronAuth;
use crate::db::status::{self, StatusReport};
use crate::routes::AppState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusQuery {
    tenancy_id: Option<Uuid>,
}

pub async fn read(
    _auth: CronAuth,
    State(state): State<AppState>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<StatusReport>, AppError> {
    let Query(query) = query.map_err(|_| {
        AppError::BadRequest("query parameters: tenancyId must be a uuid".to_owned())
    })?;
    let databases = status::read(&state.pool, query.tenancy_id).await?;
    Ok(Json(StatusReport::new(databases)))
}
