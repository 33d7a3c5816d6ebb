//! Usage statistics and journal history for an account (admin), shared with the
//! self-service `/_tollgate/v1/usage`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{Duration, Utc};
use serde_json::{json, Value};

use super::error::AdminError;
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

pub async fn account_usage(
    state: &AppState,
    account_id: &str,
    q: &HashMap<String, String>,
) -> Result<Value, AdminError> {
    let UsageQuery { from, to, group_by } = usage_params(q).map_err(AdminError::BadRequest)?;
    let rows = usage::usage(&state.pg, account_id, from, to, group_by).await?;
    Ok(usage::usage_json(rows, group_by, from, to))
}

async fn require_account(state: &AppState, id: &str) -> Result<(), AdminError> {
    match crate::store::accounts::get(&state.pg, id).await? {
        Some(_) => Ok(()),
        None => Err(AdminError::NotFound(format!("no account {id:?}"))),
    }
}

pub async fn get_usage(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, AdminError> {
    require_account(&state, &id).await?;
    account_usage(&state, &id, &q).await.map(Json)
}

pub async fn get_ledger(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, AdminError> {
    require_account(&state, &id).await?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| AdminError::BadRequest("limit must be between 1 and 500".into()))?,
    };
    let cursor = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            usage::decode_cursor(c)
                .ok_or_else(|| AdminError::BadRequest("cursor is not valid".into()))?,
        ),
    };
    let (entries, next) = usage::history(&state.pg, &id, limit, cursor).await?;
    Ok(Json(json!({"entries": entries, "next_cursor": next})))
}
