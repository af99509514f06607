//! `GET|POST /api/latest/internal/external-db-sync/fusebox`: reads or sets the switches
//! that turn the sequencer and the poller on or off for every replica at once.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::AppError;
use crate::auth::CronAuth;
use crate::db::fusebox::{self, Fusebox};
use crate::routes::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseboxChange {
    sequencer_enabled: Option<bool>,
    poller_enabled: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct FuseboxResponse {
    ok: bool,
    sequencer_enabled: bool,
    poller_enabled: bool,
}

impl From<Fusebox> for FuseboxResponse {
    fn from(state: Fusebox) -> Self {
        FuseboxResponse {
            ok: true,
            sequencer_enabled: state.sequencer_enabled,
            poller_enabled: state.poller_enabled,
        }
    }
}

pub async fn read(
    _auth: CronAuth,
    State(state): State<AppState>,
) -> Result<Json<FuseboxResponse>, AppError> {
    Ok(Json(fusebox::read(&state.pool).await?.into()))
}

/// Sets the switches present in the body, e.g. `{"poller_enabled": false}`.
pub async fn write(
    _auth: CronAuth,
    State(state): State<AppState>,
    change: Result<Json<FuseboxChange>, JsonRejection>,
) -> Result<Json<FuseboxResponse>, AppError> {
    let Json(change) = change.map_err(|_| {
        AppError::BadRequest(
            "expected {\"sequencer_enabled\": true|false, \"poller_enabled\": true|false}"
                .to_owned(),
        )
    })?;
    let state_now =
        fusebox::write(&state.pool, change.sequencer_enabled, change.poller_enabled).await?;
    tracing::info!(
        sequencer_enabled = state_now.sequencer_enabled,
        poller_enabled = state_now.poller_enabled,
        "fusebox changed"
    );
    Ok(Json(state_now.into()))
}
