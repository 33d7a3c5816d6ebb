//! Accounts: create, read.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::extract::JsonBody;
use crate::state::AppState;
use crate::store::accounts::{self, AccountRow};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub id: String,
    pub tier: String,
}

fn account_json(row: &AccountRow) -> Value {
    json!({
        "id": row.id,
        "tier": row.tier,
        "status": row.status,
        "period_start": row.period_start,
        "period_end": row.period_end,
        "created_at": row.created_at,
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<NewAccount>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    if !accounts::valid_id(&body.id) {
        return Err(AdminError::BadRequest(
            "id must be 1-128 characters of letters, digits, '_', '-', '.', '@'".into(),
        ));
    }
    if state.config().tier(&body.tier).is_none() {
        return Err(AdminError::UnknownTier(body.tier));
    }
    let Some(row) = accounts::create(&state.pg, &body.id, &body.tier).await? else {
        return Err(AdminError::Conflict(format!(
            "account {:?} already exists",
            body.id
        )));
    };
    tracing::info!(account = %row.id, tier = %row.tier, "account created");
    Ok((StatusCode::CREATED, Json(account_json(&row))))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let row = accounts::get(&state.pg, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {id:?}")))?;
    Ok(Json(account_json(&row)))
}
