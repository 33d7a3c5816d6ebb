//! Accounts: create, read, change tier, suspend / reinstate.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::extract::JsonBody;
use crate::state::AppState;
use crate::store::accounts::{self, AccountRow};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub id: String,
    pub tier: String,
}

fn account_json(row: &AccountRow) -> Value {
    json!({
        "id": row.id,
        "tier": row.tier,
        "status": row.status,
        "period_start": row.period_start,
        "period_end": row.period_end,
        "created_at": row.created_at,
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<NewAccount>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    if !accounts::valid_id(&body.id) {
        return Err(AdminError::BadRequest(
            "id must be 1-128 characters of letters, digits, '_', '-', '.', '@'".into(),
        ));
    }
    if state.config().tier(&body.tier).is_none() {
        return Err(AdminError::UnknownTier(body.tier));
    }
    let Some(row) = accounts::create(&state.pg, &body.id, &body.tier).await? else {
        return Err(AdminError::Conflict(format!(
            "account {:?} already exists",
            body.id
        )));
    };
    tracing::info!(account = %row.id, tier = %row.tier, "account created");
    let config = state.config();
    match account_with_balance(&state, &config, row.clone()).await {
        Ok(body) => Ok((StatusCode::CREATED, Json(body))),
        // Created in Postgres; Redis will hydrate it on first use.
        Err(_) => Ok((StatusCode::CREATED, Json(account_json(&row)))),
    }
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let row = accounts::get(&state.pg, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {id:?}")))?;
    account_with_balance(&state, &state.config(), row)
        .await
        .map(Json)
}

/// An account's live Redis state, hydrating it first if Redis does not hold it.
pub async fn live_state(
    state: &AppState,
    config: &crate::config::Config,
    id: &str,
) -> Result<Option<crate::ledger::AccountState>, crate::ledger::LedgerError> {
    let mut conn = state.redis.clone();
    if let Some(live) = state.ledger.state(&mut conn, id).await? {
        return Ok(Some(live));
    }
    match state.ledger.hydrate(&mut conn, &state.pg, config, id).await {
        Ok(created) => {
            if created {
                state.metrics.hydrations.inc();
            }
            state.ledger.state(&mut conn, id).await
        }
        Err(crate::ledger::LedgerError::NoSuchAccount(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierChange {
    pub tier: String,
}

/// Moves an account to another tier at once: features, quotas and rate follow immediately on
/// every instance; the allowance becomes the new tier's monthly credits (journaled as a
/// `subscription` entry); purchased credits are untouched.
pub async fn set_tier(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TierChange>,
) -> Result<Json<Value>, AdminError> {
    let config = state.config();
    let tier = config
        .tier(&body.tier)
        .ok_or_else(|| AdminError::UnknownTier(body.tier.clone()))?;
    let monthly = match tier.raw.monthly_credits {
        crate::config::MonthlyCredits::Limited(c) => Some(c),
        crate::config::MonthlyCredits::Unlimited => None,
    };
    // Make sure Redis holds the account (with the old tier) so the change is journaled there.
    if live_state(&state, &config, &id).await?.is_none() {
        return Err(AdminError::NotFound(format!("no account {id:?}")));
    }
    let row = accounts::set_tier(&state.pg, &id, &body.tier)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {id:?}")))?;
    let entry_id = format!("{id}:tier:{}", uuid::Uuid::now_v7().simple());
    let mut conn = state.redis.clone();
    state
        .ledger
        .set_tier(&mut conn, &id, &body.tier, monthly, &entry_id)
        .await?;
    crate::auth::invalidation::tier_changed(&mut conn, &config, &state.caches, &id, &body.tier)
        .await;
    tracing::info!(account = %id, tier = %body.tier, "tier changed");
    account_with_balance(&state, &config, row).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    pub status: String,
}

/// Suspends (`suspended`) or reinstates (`active`) an account. Needs Redis only: applied there
/// at once (every instance drops the account's cached keys within 2 s), recorded in the auth
/// outbox and written to Postgres by the drainer, now or when Postgres is back.
pub async fn set_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<StatusChange>,
) -> Result<Json<Value>, AdminError> {
    if !matches!(body.status.as_str(), "active" | "suspended") {
        return Err(AdminError::BadRequest(
            "status must be \"active\" or \"suspended\"".into(),
        ));
    }
    let config = state.config();
    let prefix = config.redis.key_prefix.clone();
    let mut conn = state.redis.clone();
    // The account must exist: Redis knows it if it was ever used; otherwise ask Postgres.
    let in_redis = state.ledger.state(&mut conn, &id).await?.is_some();
    if !in_redis {
        let found = accounts::get(&state.pg, &id).await.map_err(|e| {
            AdminError::Unavailable(format!("postgres (account {id:?} is not in redis): {e}"))
        })?;
        if found.is_none() {
            return Err(AdminError::NotFound(format!("no account {id:?}")));
        }
    }
    let index = crate::auth::redis_keys::KeyIndex::new(&prefix, config.redis.shards);
    let change = crate::auth::outbox::Change::Status {
        account_id: id.clone(),
        status: body.status.clone(),
        at: crate::auth::redis_keys::now_version(),
    };
    crate::auth::outbox::submit(&mut conn, &prefix, &index, &state.ledger, &change).await?;
    if let Err(e) = crate::auth::invalidation::publish(
        &mut conn,
        &prefix,
        &state.caches,
        crate::auth::invalidation::Invalidation::Account(&id),
    )
    .await
    {
        tracing::error!(error = %e, account = %id, "could not announce the status change");
    }
    crate::auth::outbox::nudge(Arc::clone(&state)).await;
    tracing::info!(account = %id, status = %body.status, "account status changed");
    Ok(Json(json!({"id": id, "status": body.status})))
}

async fn account_with_balance(
    state: &AppState,
    config: &crate::config::Config,
    row: AccountRow,
) -> Result<Value, AdminError> {
    let live = live_state(state, config, &row.id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {:?}", row.id)))?;
    let unlimited = config
        .tier(&live.tier)
        .is_some_and(|t| t.raw.monthly_credits == crate::config::MonthlyCredits::Unlimited);
    let mut conn = state.redis.clone();
    let counters = state.ledger.counters(&mut conn, &row.id).await?;
    Ok(json!({
        "id": row.id,
        "tier": live.tier,
        "status": live.status,
        "balance": {
            "allowance": live.allowance,
            "purchased": live.purchased,
            "total": live.total(),
        },
        "unlimited": unlimited,
        "period_start": chrono::DateTime::from_timestamp(live.period_start, 0),
        "period_end": chrono::DateTime::from_timestamp(live.period_end, 0),
        "period_usage": {
            "requests": counters.requests,
            "tokens": counters.tokens,
            "resources": counters.resources,
        },
        "created_at": row.created_at,
    }))
}
