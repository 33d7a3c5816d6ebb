//! Usage statistics and journal history of an account, for the admin API, the portal, the
//! console and the self-service `/_tollgate/v1/usage`. Neither shows entries older than the
//! account's tier `history_days`.

use std::collections::HashMap;

use chrono::{Duration, Utc};
use serde_json::{json, Value};

use super::DomainError;
use crate::journal::usage::{self, GroupBy};
use crate::state::AppState;

/// A usage question: the time range and the grouping.
pub struct UsageQuery {
    pub from: chrono::DateTime<Utc>,
    pub to: chrono::DateTime<Utc>,
    pub group_by: Option<GroupBy>,
}

/// Parses `from`, `to` (date or RFC 3339; default: the last 30 days) and `group_by`.
pub fn usage_params(q: &HashMap<String, String>) -> Result<UsageQuery, String> {
    let time = |name: &str| -> Result<Option<chrono::DateTime<Utc>>, String> {
        match q.get(name) {
            None => Ok(None),
            Some(v) => usage::parse_time(v).map(Some).ok_or_else(|| {
                format!("{name}: {v:?} is not a date (YYYY-MM-DD) or RFC 3339 time")
            }),
        }
    };
    let to = time("to")?.unwrap_or_else(Utc::now);
    let from = time("from")?.unwrap_or(to - Duration::days(30));
    if from > to {
        return Err("from must not be after to".into());
    }
    let group_by = match q.get("group_by").map(String::as_str) {
        None | Some("") => None,
        Some(g) => Some(
            GroupBy::parse(g)
                .ok_or_else(|| format!("group_by: {g:?} is not route, action or day"))?,
        ),
    };
    Ok(UsageQuery { from, to, group_by })
}

/// The first instant an account's tier still shows (`history_days`); `None`: everything, also
/// for an account whose tier is no longer configured.
fn cutoff(state: &AppState, tier: &str) -> Option<chrono::DateTime<Utc>> {
    let days = state.config().tier(tier).and_then(|t| t.history_days());
    usage::history_cutoff(days, Utc::now())
}

/// Usage of an account; a range reaching back past its tier's `history_days` starts at that
/// limit instead (the answer's `from` says so).
pub async fn account_usage(
    state: &AppState,
    account_id: &str,
    q: &HashMap<String, String>,
) -> Result<Value, DomainError> {
    let UsageQuery { from, to, group_by } = usage_params(q).map_err(DomainError::Invalid)?;
    let tier: Option<String> = sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(&state.pg)
        .await?;
    let not_before = tier.and_then(|t| cutoff(state, &t));
    usage_since(state, account_id, from, to, group_by, not_before).await
}

async fn usage_since(
    state: &AppState,
    account_id: &str,
    from: chrono::DateTime<Utc>,
    to: chrono::DateTime<Utc>,
    group_by: Option<GroupBy>,
    not_before: Option<chrono::DateTime<Utc>>,
) -> Result<Value, DomainError> {
    let from = not_before.map_or(from, |n| from.max(n));
    let rows = if from < to {
        usage::usage(&state.pg, account_id, from, to, group_by).await?
    } else {
        Vec::new()
    };
    Ok(usage::usage_json(rows, group_by, from, to))
}

/// The account's tier, or 404.
async fn require_account(state: &AppState, id: &str) -> Result<String, DomainError> {
    match crate::store::accounts::get(&state.pg, id).await? {
        Some(row) => Ok(row.tier),
        None => Err(DomainError::NotFound(format!("no account {id:?}"))),
    }
}

/// Usage of an account that must exist (`NotFound` otherwise), in the range and grouping of
/// `q`, from its tier's `history_days` at the earliest.
pub async fn usage_of(
    state: &AppState,
    id: &str,
    q: &HashMap<String, String>,
) -> Result<Value, DomainError> {
    let tier = require_account(state, id).await?;
    let UsageQuery { from, to, group_by } = usage_params(q).map_err(DomainError::Invalid)?;
    usage_since(state, id, from, to, group_by, cutoff(state, &tier)).await
}

/// A page of the account's journal (`limit`, 1-500, default 50; `cursor` from the previous
/// page), newest first, from its tier's `history_days` at the earliest.
pub async fn history(
    state: &AppState,
    id: &str,
    q: &HashMap<String, String>,
) -> Result<Value, DomainError> {
    let tier = require_account(state, id).await?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| DomainError::Invalid("limit must be between 1 and 500".into()))?,
    };
    let cursor = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            usage::decode_cursor(c)
                .ok_or_else(|| DomainError::Invalid("cursor is not valid".into()))?,
        ),
    };
    let (entries, next) =
        usage::history(&state.pg, id, limit, cursor, cutoff(state, &tier)).await?;
    Ok(json!({"entries": entries, "next_cursor": next}))
}
