//! Who is calling: API keys (hashed; cached in process, recorded in Redis) and JWTs, plus the
//! cache invalidation channel that makes a revocation reach every instance within about a
//! second, and the outbox that carries revocations and suspensions to Postgres.

pub mod cache;
pub mod invalidation;
pub mod jwt;
pub mod keys;
pub mod last_used;
pub mod outbox;
pub mod redis_keys;

/// The caller, as the rest of the request path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub account_id: String,
    /// `None` for JWT callers.
    pub key_id: Option<String>,
    pub tier: String,
    pub status: String,
}

use std::time::Duration;

use sqlx::PgPool;

use cache::TtlCache;
use keys::KeyHash;

/// Why a credential did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("invalid credentials: {0}")]
    Invalid(String),
    #[error("credential store unavailable: {0}")]
    Store(#[from] sqlx::Error),
}

/// A Redis key lookup that takes longer than this falls back to Postgres.
const REDIS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Entries cached per instance. `None` values cache a miss, so junk keys do not reach Postgres
/// on every request.
pub struct AuthCaches {
    pub keys: TtlCache<KeyHash, Option<Identity>>,
    pub accounts: TtlCache<String, Option<(String, String)>>,
}

/// Negative entries and everything while the push channel is down live this long.
const DEGRADED_TTL: Duration = Duration::from_secs(1);
const CACHE_CAPACITY: usize = 100_000;

impl AuthCaches {
    pub fn new(ttl: Duration) -> Self {
        AuthCaches {
            keys: TtlCache::new(ttl, DEGRADED_TTL, CACHE_CAPACITY),
            accounts: TtlCache::new(ttl, DEGRADED_TTL, CACHE_CAPACITY),
        }
    }

    /// Applies one invalidation message (`key:<hex>`, `account:<id>`, `all`).
    pub fn apply(&self, message: &str) {
        if let Some(hex_hash) = message.strip_prefix("key:") {
            if let Ok(bytes) = hex::decode(hex_hash) {
                if let Ok(hash) = <KeyHash>::try_from(bytes.as_slice()) {
                    self.keys.remove(&hash);
                }
            }
        } else if let Some(account) = message.strip_prefix("account:") {
            self.accounts.remove(&account.to_string());
            self.keys
                .retain(|_, v| v.as_ref().is_none_or(|id| id.account_id != account));
        } else {
            self.clear();
        }
    }

    pub fn clear(&self) {
        self.keys.clear();
        self.accounts.clear();
    }

    pub fn set_push_healthy(&self, healthy: bool) {
        self.keys.set_push_healthy(healthy);
        self.accounts.set_push_healthy(healthy);
    }

    /// Resolves an API key: in-process cache, then its Redis record (one round trip), then
    /// Postgres, whose answer re-fills Redis without overwriting a newer Redis state.
    pub async fn resolve_key(
        &self,
        pool: &PgPool,
        redis: &mut crate::redis_conn::RedisConn,
        index: &redis_keys::KeyIndex,
        key: &str,
    ) -> Result<Identity, AuthError> {
        if !keys::looks_like_key(key) {
            return Err(AuthError::Invalid("not a tollgate key".into()));
        }
        let hash = keys::hash(key);
        if let Some(hit) = self.keys.get(&hash) {
            return hit.ok_or_else(|| AuthError::Invalid("unknown or revoked key".into()));
        }
        let (from_redis, redis_ok) =
            match tokio::time::timeout(REDIS_LOOKUP_TIMEOUT, index.get(redis, &hash)).await {
                Ok(Ok(found)) => (found, true),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "key lookup in redis failed; asking postgres");
                    (None, false)
                }
                Err(_) => {
                    tracing::warn!("key lookup in redis timed out; asking postgres");
                    (None, false)
                }
            };
        let identity = match from_redis {
            Some(record) => {
                let identity = record.identity();
                self.keys.insert(hash, identity.clone());
                identity
            }
            None => {
                let found = crate::store::keys::find_by_hash(pool, &hash).await?;
                match found {
                    Some(k) => {
                        let record = redis_keys::KeyRecord {
                            key_id: k.key_id,
                            account_id: k.account_id,
                            tier: k.tier,
                            status: k.status,
                            revoked: false,
                        };
                        // A fill never replaces a record Redis already has: if one appeared
                        // meanwhile (a revocation), it wins over this Postgres row.
                        // Skipped while Redis fails: the next lookup fills it.
                        let filled = if redis_ok {
                            let fill = index.put(redis, &hash, &record, 0, redis_keys::Mode::Fill);
                            match tokio::time::timeout(REDIS_LOOKUP_TIMEOUT, fill).await {
                                Ok(r) => r.map_err(|e| e.to_string()),
                                Err(_) => Err("timed out".to_string()),
                            }
                        } else {
                            Err("redis unavailable".to_string())
                        };
                        match filled {
                            Ok(true) | Err(_) => {
                                if let Err(e) = filled {
                                    tracing::debug!(error = %e, "key record not re-filled");
                                }
                                let identity = record.identity();
                                self.keys.insert(hash, identity.clone());
                                identity
                            }
                            // Redis got a record meanwhile: it is the newer state.
                            Ok(false) => {
                                tokio::time::timeout(REDIS_LOOKUP_TIMEOUT, index.get(redis, &hash))
                                    .await
                                    .ok()
                                    .and_then(Result::ok)
                                    .flatten()
                                    .and_then(|r| r.identity())
                            }
                        }
                    }
                    None => {
                        self.keys.insert_short(hash, None);
                        None
                    }
                }
            }
        };
        identity.ok_or_else(|| AuthError::Invalid("unknown or revoked key".into()))
    }

    /// Resolves the account a verified JWT names: in-process cache, then the account's ledger
    /// hash in Redis (tier and status, one round trip), then Postgres.
    pub async fn resolve_account(
        &self,
        pool: &PgPool,
        redis: &mut crate::redis_conn::RedisConn,
        index: &redis_keys::KeyIndex,
        account_id: &str,
    ) -> Result<Identity, AuthError> {
        let cached = match self.accounts.get(&account_id.to_string()) {
            Some(hit) => hit,
            None => {
                let lookup = index.account_plan(redis, account_id);
                let in_redis = match tokio::time::timeout(REDIS_LOOKUP_TIMEOUT, lookup).await {
                    Ok(Ok(found)) => found,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "account lookup in redis failed; asking postgres");
                        None
                    }
                    Err(_) => None,
                };
                let found = match in_redis {
                    Some(plan) => Some(plan),
                    None => crate::store::accounts::get(pool, account_id)
                        .await?
                        .map(|a| (a.tier, a.status)),
                };
                if found.is_some() {
                    self.accounts.insert(account_id.to_string(), found.clone());
                } else {
                    self.accounts.insert_short(account_id.to_string(), None);
                }
                found
            }
        };
        match cached {
            Some((tier, status)) => Ok(Identity {
                account_id: account_id.to_string(),
                key_id: None,
                tier,
                status,
            }),
            None => Err(AuthError::Invalid(format!(
                "JWT names unknown account {account_id:?}"
            ))),
        }
    }
}
