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
use crate::auth::keys::KeyHash;
use crate::auth::outbox;
use crate::auth::redis_keys::{now_version, KeyIndex, KeyRecord, Mode};
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
    // The Redis record lets every instance resolve the key without Postgres. If this write
    // fails, the first lookup re-fills it from Postgres.
    let config = state.config();
    let index = KeyIndex::new(&config.redis.key_prefix, config.redis.shards);
    let record = KeyRecord {
        key_id: id.clone(),
        account_id: account_id.clone(),
        tier: account.tier.clone(),
        status: account.status.clone(),
        revoked: false,
    };
    let mut redis = state.redis.clone();
    if let Err(e) = index
        .put(&mut redis, &hash, &record, now_version(), Mode::Set)
        .await
    {
        tracing::warn!(error = %e, key_id = %id, "could not write the key's redis record");
    }
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

/// Revokes in Redis first (so it works while Postgres is down), records the change in the
/// auth outbox, and lets the drainer write it to Postgres.
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let config = state.config();
    let prefix = config.redis.key_prefix.clone();
    let index = KeyIndex::new(&prefix, config.redis.shards);
    let mut redis = state.redis.clone();
    let known = match index.hash_of(&mut redis, &key_id).await? {
        Some(hash) => index
            .get(&mut redis, &hash)
            .await?
            .map(|record| (hash, record.account_id, record.revoked)),
        None => None,
    };
    let (hash, account_id) = match known {
        Some((_, _, true)) => {
            return Err(AdminError::NotFound(format!("no live key {key_id:?}")));
        }
        Some((hash, account_id, false)) => (hash, account_id),
        // A key Redis does not know yet (created before key records existed).
        None => {
            let found = crate::store::keys::find_by_id(&state.pg, &key_id)
                .await
                .map_err(|e| {
                    AdminError::Unavailable(format!(
                        "postgres (key {key_id:?} is not in redis): {e}"
                    ))
                })?;
            let Some((account_id, hash, false)) = found else {
                return Err(AdminError::NotFound(format!("no live key {key_id:?}")));
            };
            let hash = KeyHash::try_from(hash.as_slice())
                .map_err(|_| AdminError::Internal(format!("key {key_id:?} has a bad hash")))?;
            (hash, account_id)
        }
    };
    let change = outbox::Change::Revoke {
        key_id: key_id.clone(),
        hash,
        account_id,
        at: now_version(),
    };
    outbox::submit(&mut redis, &prefix, &index, &state.ledger, &change).await?;
    if let Err(e) =
        invalidation::publish(&mut redis, &prefix, &state.caches, Invalidation::Key(&hash)).await
    {
        // Other instances drop the key when their cache entry ages out (1 s while their own
        // subscription is down, else the key TTL); their next lookup finds the tombstone.
        tracing::error!(error = %e, key_id = %key_id, "could not announce key revocation");
    }
    outbox::nudge(Arc::clone(&state)).await;
    tracing::info!(key_id = %key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
