//! API keys: created with their plaintext shown once; revoked everywhere within 2 s.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::extract::JsonBody;
use crate::auth::invalidation::{self, Invalidation};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: Option<String>,
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    let name = body.name.unwrap_or_else(|| "default".into());
    if name.len() > 200 {
        return Err(AdminError::BadRequest(
            "name must be at most 200 characters".into(),
        ));
    }
    let Some(account) = crate::store::accounts::get(&state.pg, &account_id).await? else {
        return Err(AdminError::NotFound(format!("no account {account_id:?}")));
    };
    let (key, prefix, hash) = crate::auth::keys::generate();
    let id = crate::auth::keys::new_key_id();
    // Seats: a tier with `max_keys` caps the account's live keys (team members).
    let seats = state
        .config()
        .tier(&account.tier)
        .and_then(|t| t.raw.max_keys);
    let created_at = match seats {
        Some(cap) => crate::store::keys::insert_capped(
            &state.pg,
            &id,
            &account_id,
            &name,
            &prefix,
            &hash,
            cap,
        )
        .await?
        .ok_or(AdminError::SeatLimit {
            tier: account.tier.clone(),
            limit: cap,
        })?,
        None => {
            crate::store::keys::insert(&state.pg, &id, &account_id, &name, &prefix, &hash).await?
        }
    };
    tracing::info!(key_id = %id, account = %account_id, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "key": key,
            "prefix": prefix,
            "name": name,
            "account_id": account_id,
            "created_at": created_at,
        })),
    ))
}

pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let Some(hash) = crate::store::keys::revoke(&state.pg, &key_id).await? else {
        return Err(AdminError::NotFound(format!("no live key {key_id:?}")));
    };
    let prefix = state.config().redis.key_prefix.clone();
    let mut redis = state.redis.clone();
    if let Err(e) =
        invalidation::publish(&mut redis, &prefix, &state.caches, Invalidation::Key(&hash)).await
    {
        // The key is revoked in Postgres; other instances drop it when their cache entry ages
        // out (1 s while their own subscription is down, else the key TTL).
        tracing::error!(error = %e, key_id = %key_id, "could not announce key revocation");
    }
    tracing::info!(key_id = %key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
