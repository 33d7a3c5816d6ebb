//! Who is calling: API keys (hashed, cached in process) and JWTs, plus the cache invalidation
//! channel that makes a revocation reach every instance within about a second.

pub mod cache;
pub mod invalidation;
pub mod jwt;
pub mod keys;

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

    /// Resolves an API key: cache first, Postgres on a miss.
    pub async fn resolve_key(&self, pool: &PgPool, key: &str) -> Result<Identity, AuthError> {
        if !keys::looks_like_key(key) {
            return Err(AuthError::Invalid("not a tollgate key".into()));
        }
        let hash = keys::hash(key);
        let cached = match self.keys.get(&hash) {
            Some(hit) => hit,
            None => {
                let found = crate::store::keys::find_by_hash(pool, &hash).await?;
                let identity = found.map(|k| Identity {
                    account_id: k.account_id,
                    key_id: Some(k.key_id),
                    tier: k.tier,
                    status: k.status,
                });
                if identity.is_some() {
                    self.keys.insert(hash, identity.clone());
                } else {
                    self.keys.insert_short(hash, None);
                }
                identity
            }
        };
        cached.ok_or_else(|| AuthError::Invalid("unknown or revoked key".into()))
    }

    /// Resolves the account a verified JWT names.
    pub async fn resolve_account(
        &self,
        pool: &PgPool,
        account_id: &str,
    ) -> Result<Identity, AuthError> {
        let cached = match self.accounts.get(&account_id.to_string()) {
            Some(hit) => hit,
            None => {
                let found = crate::store::accounts::get(pool, account_id)
                    .await?
                    .map(|a| (a.tier, a.status));
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
