//! `POST /api/latest/internal/external-db-sync/tenancies/{id}/sync`, `…/verify` and
//! `…/resync`: what the `sync`, `verify` and `resync` commands do, answered as their
//! `--json` prints it. `verify` and `resync` take `?databaseId=` for one database.
//!
//! An unknown tenancy (or database) is a 404 with code `unknown_tenancy` (or
//! `unknown_database`). Otherwise the answer is 200, and its `ok` (`equal` for
//! `verify`) says whether every database succeeded (was equal).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::error::AppError;
use crate::auth::CronAuth;
use crate::routes::AppState;
use crate::sync::resync::{self, TenancyResync};
use crate::sync::summary::SyncSummary;
use crate::sync::verify::{self, TenancyComparison};
use crate::sync::{sync_tenancy_now, TenancySync};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseQuery {
    database_id: Option<String>,
}

pub async fn sync(
    _auth: CronAuth,
    State(state): State<AppState>,
    tenancy: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<SyncSummary>, AppError> {
    let tenancy = tenancy_id(tenancy)?;
    let outcome = sync_tenancy_now(&state.engine, tenancy).await?;
    if matches!(outcome, TenancySync::UnknownTenancy) {
        return Err(AppError::UnknownTenancy(tenancy));
    }
    Ok(Json(SyncSummary::new(tenancy, outcome)))
}

pub async fn verify(
    _auth: CronAuth,
    State(state): State<AppState>,
    tenancy: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<DatabaseQuery>, QueryRejection>,
) -> Result<Json<TenancyComparison>, AppError> {
    let (tenancy, only) = (tenancy_id(tenancy)?, database_id(query)?);
    let databases = verify::verify_tenancy(&state.engine, tenancy, only.as_deref()).await?;
    let databases = known(tenancy, only, databases)?;
    Ok(Json(TenancyComparison::new(tenancy, databases)))
}

pub async fn resync(
    _auth: CronAuth,
    State(state): State<AppState>,
    tenancy: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<DatabaseQuery>, QueryRejection>,
) -> Result<Json<TenancyResync>, AppError> {
    let (tenancy, only) = (tenancy_id(tenancy)?, database_id(query)?);
    let databases = resync::resync_tenancy(&state.engine, tenancy, only.as_deref()).await?;
    let databases = known(tenancy, only, databases)?;
    Ok(Json(TenancyResync::new(tenancy, databases)))
}

fn tenancy_id(path: Result<Path<Uuid>, PathRejection>) -> Result<Uuid, AppError> {
    let Path(tenancy) =
        path.map_err(|_| AppError::BadRequest("the tenancy id must be a uuid".to_owned()))?;
    Ok(tenancy)
}

fn database_id(
    query: Result<Query<DatabaseQuery>, QueryRejection>,
) -> Result<Option<String>, AppError> {
    let Query(query) = query.map_err(|_| {
        AppError::BadRequest("query parameters: only databaseId is accepted".to_owned())
    })?;
    Ok(query.database_id)
}

/// The per-database results, or 404 when the tenancy (or the one database asked for)
/// does not exist.
fn known<T>(
    tenancy: Uuid,
    only: Option<String>,
    results: Option<Vec<T>>,
) -> Result<Vec<T>, AppError> {
    let results = results.ok_or(AppError::UnknownTenancy(tenancy))?;
    match only {
        Some(database) if results.is_empty() => Err(AppError::UnknownDatabase(database)),
        _ => Ok(results),
    }
}
