//! The `accounts` table.

use chrono::{DateTime, Datelike, Months, Utc};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AccountRow {
    pub id: String,
    pub tier: String,
    pub status: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Day of month billing periods end on (clamped to short months).
    pub anchor_day: i16,
    pub created_at: DateTime<Utc>,
}

/// The end of the billing period that starts at `start`: one calendar month later.
pub fn period_end_after(start: DateTime<Utc>) -> DateTime<Utc> {
    start
        .checked_add_months(Months::new(1))
        .unwrap_or(start + chrono::Duration::days(30))
}

/// Inserts a new account; `Ok(None)` when the id is taken.
pub async fn create(
    pool: &PgPool,
    id: &str,
    tier: &str,
) -> Result<Option<AccountRow>, sqlx::Error> {
    let now = Utc::now();
    sqlx::query_as::<_, AccountRow>(
        "INSERT INTO accounts (id, tier, status, period_start, period_end, anchor_day)
         VALUES ($1, $2, 'active', $3, $4, $5)
         ON CONFLICT (id) DO NOTHING
         RETURNING id, tier, status, period_start, period_end, anchor_day, created_at",
    )
    .bind(id)
    .bind(tier)
    .bind(now)
    .bind(period_end_after(now))
    .bind(now.day() as i16)
    .fetch_optional(pool)
    .await
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<AccountRow>, sqlx::Error> {
    sqlx::query_as::<_, AccountRow>(
        "SELECT id, tier, status, period_start, period_end, anchor_day, created_at FROM accounts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn set_tier(
    pool: &PgPool,
    id: &str,
    tier: &str,
) -> Result<Option<AccountRow>, sqlx::Error> {
    sqlx::query_as::<_, AccountRow>(
        "UPDATE accounts SET tier = $2, updated_at = now() WHERE id = $1
         RETURNING id, tier, status, period_start, period_end, anchor_day, created_at",
    )
    .bind(id)
    .bind(tier)
    .fetch_optional(pool)
    .await
}

/// Account ids are chosen by operators; they go into Redis keys and URLs, so they are kept to
/// a safe alphabet.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// Accounts for the console's list: id containing `search` (case-insensitive), optionally of
/// one tier and status, newest first, at most `limit`.
pub async fn search(
    pool: &PgPool,
    search: &str,
    tier: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let pattern = format!(
        "%{}%",
        search
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    sqlx::query_as(
        "SELECT id, tier, status, period_start, period_end, anchor_day, created_at
           FROM accounts
          WHERE id ILIKE $1
            AND ($2::TEXT IS NULL OR tier = $2)
            AND ($3::TEXT IS NULL OR status = $3)
          ORDER BY created_at DESC, id
          LIMIT $4",
    )
    .bind(pattern)
    .bind(tier)
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await
}
