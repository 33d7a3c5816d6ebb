//! The `api_keys` table. Keys are looked up by the SHA-256 of the presented key.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// What a valid key resolves to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyIdentity {
    pub key_id: String,
    pub account_id: String,
    pub tier: String,
    pub status: String,
}

pub async fn insert(
    pool: &PgPool,
    id: &str,
    account_id: &str,
    name: &str,
    prefix: &str,
    hash: &[u8],
) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO api_keys (id, account_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)
         RETURNING created_at",
    )
    .bind(id)
    .bind(account_id)
    .bind(name)
    .bind(prefix)
    .bind(hash)
    .fetch_one(pool)
    .await
}

/// Resolves a live (not revoked) key by hash.
pub async fn find_by_hash(pool: &PgPool, hash: &[u8]) -> Result<Option<KeyIdentity>, sqlx::Error> {
    sqlx::query_as::<_, KeyIdentity>(
        "SELECT k.id AS key_id, k.account_id, a.tier, a.status
           FROM api_keys k JOIN accounts a ON a.id = k.account_id
          WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await
}

/// Revokes a key; returns its hash (for cache invalidation) or `None` if there is no such
/// live key.
pub async fn revoke(pool: &PgPool, id: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING key_hash",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
