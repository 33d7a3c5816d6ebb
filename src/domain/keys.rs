//! API keys: created with their plaintext shown once (seats capped by the tier's
//! `max_keys`); revoked everywhere within 2 s, also while Postgres is down.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::DomainError;
use crate::auth::invalidation::{self, Invalidation};
use crate::auth::keys::KeyHash;
use crate::auth::outbox;
use crate::auth::redis_keys::{now_version, KeyIndex, KeyRecord, Mode};
use crate::state::AppState;

/// A key just made: the only time its plaintext `key` is known.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    /// `key_` + 16 base62 characters; revoke with `DELETE /v1/keys/{key_id}`.
    pub id: String,
    /// The plaintext key (`tg_` + 32 base62 characters). Shown only here; only its SHA-256 is
    /// stored.
    pub key: String,
    /// The key's first 11 characters, shown in listings.
    pub prefix: String,
    pub name: String,
    pub account_id: String,
    pub created_at: DateTime<Utc>,
}

/// Makes a key for `account_id` (named `default` unless `name` says otherwise).
pub async fn create(
    state: &AppState,
    account_id: &str,
    name: Option<String>,
) -> Result<CreatedKey, DomainError> {
    let name = name.unwrap_or_else(|| "default".into());
    if name.len() > 200 {
        return Err(DomainError::Invalid(
            "name must be at most 200 characters".into(),
        ));
    }
    let Some(account) = crate::store::accounts::get(&state.pg, account_id).await? else {
        return Err(DomainError::NotFound(format!("no account {account_id:?}")));
    };
    let (key, prefix, hash) = crate::auth::keys::generate();
    let id = crate::auth::keys::new_key_id();
    // Seats: a tier with `max_keys` caps the account's live keys (team members).
    let seats = state
        .config()
        .tier(&account.tier)
        .and_then(|t| t.max_keys());
    let created_at = match seats {
        Some(cap) => crate::store::keys::insert_capped(
            &state.pg, &id, account_id, &name, &prefix, &hash, cap,
        )
        .await?
        .ok_or(DomainError::SeatLimit {
            tier: account.tier.clone(),
            limit: cap,
        })?,
        None => {
            crate::store::keys::insert(&state.pg, &id, account_id, &name, &prefix, &hash).await?
        }
    };
    // The Redis record lets every instance resolve the key without Postgres. If this write
    // fails, the first lookup re-fills it from Postgres.
    let config = state.config();
    let index = KeyIndex::new(&config.redis.key_prefix, config.redis.shards);
    let record = KeyRecord {
        key_id: id.clone(),
        account_id: account_id.to_string(),
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
    Ok(CreatedKey {
        id,
        key,
        prefix,
        name,
        account_id: account_id.to_string(),
        created_at,
    })
}

/// Revokes in Redis first (so it works while Postgres is down), records the change in the
/// auth outbox, and lets the drainer write it to Postgres.
pub async fn revoke(state: &Arc<AppState>, key_id: &str) -> Result<(), DomainError> {
    let config = state.config();
    let prefix = config.redis.key_prefix.clone();
    let index = KeyIndex::new(&prefix, config.redis.shards);
    let mut redis = state.redis.clone();
    let known = match index.hash_of(&mut redis, key_id).await? {
        Some(hash) => index
            .get(&mut redis, &hash)
            .await?
            .map(|record| (hash, record.account_id, record.revoked)),
        None => None,
    };
    let (hash, account_id) = match known {
        Some((_, _, true)) => {
            return Err(DomainError::NotFound(format!("no live key {key_id:?}")));
        }
        Some((hash, account_id, false)) => (hash, account_id),
        // A key Redis does not know yet (created before key records existed).
        None => {
            let found = crate::store::keys::find_by_id(&state.pg, key_id)
                .await
                .map_err(|e| {
                    DomainError::Unavailable(format!(
                        "postgres (key {key_id:?} is not in redis): {e}"
                    ))
                })?;
            let Some((account_id, hash, false)) = found else {
                return Err(DomainError::NotFound(format!("no live key {key_id:?}")));
            };
            let hash = KeyHash::try_from(hash.as_slice())
                .map_err(|_| DomainError::Internal(format!("key {key_id:?} has a bad hash")))?;
            (hash, account_id)
        }
    };
    let change = outbox::Change::Revoke {
        key_id: key_id.to_string(),
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
    outbox::nudge(Arc::clone(state)).await;
    tracing::info!(key_id = %key_id, "API key revoked");
    Ok(())
}
