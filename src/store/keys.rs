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

/// Inserts a key unless the account already has `cap` live keys (`Ok(None)`). The account row
/// is locked for the check, so concurrent creations cannot both take the last seat.
pub async fn insert_capped(
    pool: &PgPool,
    id: &str,
    account_id: &str,
    name: &str,
    prefix: &str,
    hash: &[u8],
    cap: u32,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL",
    )
    .bind(account_id)
    .fetch_one(&mut *tx)
    .await?;
    if live >= i64::from(cap) {
        return Ok(None);
    }
    let created_at = sqlx::query_scalar(
        "INSERT INTO api_keys (id, account_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)
         RETURNING created_at",
    )
    .bind(id)
    .bind(account_id)
    .bind(name)
    .bind(prefix)
    .bind(hash)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(created_at))
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

/// A key by id, revoked or not: (account, hash, revoked).
pub async fn find_by_id(
    pool: &PgPool,
    id: &str,
) -> Result<Option<(String, Vec<u8>, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT account_id, key_hash, revoked_at IS NOT NULL FROM api_keys WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// One API key as its account's key list shows it (never the hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyListing {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// An account's keys, newest first (the portal's and console's key lists).
pub async fn list_for_account(
    pool: &PgPool,
    account_id: &str,
) -> Result<Vec<KeyListing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, prefix, created_at, revoked_at FROM api_keys
          WHERE account_id = $1 ORDER BY created_at DESC, id LIMIT 500",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}
