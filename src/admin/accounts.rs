//! Accounts: create, read, change tier, suspend / reinstate.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::components::{
    BadRequest, BadRequestOrUnknownTier, Internal, NotFound, StoreUnavailable, Unauthorized,
    UndefinedTier,
};
use super::error::AdminError;
use super::extract::JsonBody;
use super::schemas::{Account, Balance, PeriodUsage, StatusChanged};
use crate::domain;
use crate::state::AppState;
use crate::store::accounts::{self, AccountRow};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    /// 1-128 characters of letters, digits, `_`, `-`, `.`, `@`.
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,128}$", example = "acme")]
    pub id: String,
    /// A tier the config defines (else 400 `unknown_tier`).
    pub tier: String,
}

/// The stored row alone, when Redis did not answer.
fn account_row(row: AccountRow) -> Account {
    Account {
        id: row.id,
        tier: row.tier,
        status: row.status,
        balance: None,
        unlimited: None,
        period_start: Some(row.period_start),
        period_end: Some(row.period_end),
        period_usage: None,
        created_at: row.created_at,
    }
}

#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    operation_id = "createAccount",
    summary = "Create an account",
    request_body = NewAccount,
    responses(
        (status = 201, description = "The account. `balance`, `unlimited` and `period_usage` are \
            present when Redis answered; if it did not, the account is still created (Postgres) and \
            the answer carries the stored row only (Redis loads the account on first use).",
            body = Account),
        (status = 400, response = BadRequestOrUnknownTier),
        (status = 401, response = Unauthorized),
        (status = 409, description = "`conflict`: an account with this id already exists.",
            body = AdminError),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<NewAccount>,
) -> Result<(StatusCode, Json<Account>), AdminError> {
    let row = domain::accounts::create(&state, &body.id, &body.tier).await?;
    let config = state.config();
    match account_with_balance(&state, &config, row.clone()).await {
        Ok(body) => Ok((StatusCode::CREATED, Json(body))),
        // Created in Postgres; Redis will hydrate it on first use.
        Err(_) => Ok((StatusCode::CREATED, Json(account_row(row)))),
    }
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    operation_id = "getAccount",
    summary = "An account with its live balance",
    description = "Loads the account into Redis from Postgres and the journal if Redis does not \
        hold it.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    responses(
        (status = 200, description = "The account.", body = Account),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = UndefinedTier),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Account>, AdminError> {
    let row = accounts::get(&state.pg, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {id:?}")))?;
    account_with_balance(&state, &state.config(), row)
        .await
        .map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierChange {
    /// A tier the config defines (else 400 `unknown_tier`).
    pub tier: String,
}

/// Moves an account to another tier at once (see [`domain::accounts::set_tier`]).
#[utoipa::path(
    put,
    path = "/v1/accounts/{id}/tier",
    tag = "accounts",
    operation_id = "setTier",
    summary = "Move an account to another tier at once",
    description = "Features, quotas and rate follow immediately on every instance; the allowance \
        becomes the new tier's monthly credits (journaled as a `subscription` entry); purchased \
        credits are untouched.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body = TierChange,
    responses(
        (status = 200, description = "The account after the change.", body = Account),
        (status = 400, response = BadRequestOrUnknownTier),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = UndefinedTier),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn set_tier(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TierChange>,
) -> Result<Json<Account>, AdminError> {
    let row = domain::accounts::set_tier(&state, &id, &body.tier).await?;
    account_with_balance(&state, &state.config(), row)
        .await
        .map(Json)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    /// `active` or `suspended`: `suspended` refuses the account's callers (403
    /// `account_inactive`); `active` reinstates it.
    #[schema(pattern = "^(active|suspended)$")]
    pub status: String,
}

/// Suspends (`suspended`) or reinstates (`active`) an account (see
/// [`domain::accounts::set_status`]).
#[utoipa::path(
    put,
    path = "/v1/accounts/{id}/status",
    tag = "accounts",
    operation_id = "setStatus",
    summary = "Suspend or reinstate an account",
    description = "Needs Redis only: applied there at once (every instance refuses the account's \
        keys within 2 s), recorded in the auth outbox and written to Postgres when it answers, in \
        order with any later change. An account Redis does not hold yet needs Postgres to be found \
        (503 `store_unavailable` while it is down).",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body = StatusChange,
    responses(
        (status = 200, description = "The status now in force.", body = StatusChanged),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn set_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<StatusChange>,
) -> Result<Json<StatusChanged>, AdminError> {
    domain::accounts::set_status(&state, &id, &body.status).await?;
    Ok(Json(StatusChanged {
        id,
        status: body.status,
    }))
}

async fn account_with_balance(
    state: &AppState,
    config: &crate::config::Config,
    row: AccountRow,
) -> Result<Account, AdminError> {
    let live = domain::accounts::live_state(state, config, &row.id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no account {:?}", row.id)))?;
    let unlimited = config
        .tier(&live.tier)
        .is_some_and(|t| t.monthly_credits() == crate::config::MonthlyCredits::Unlimited);
    let mut conn = state.redis.clone();
    let counters = state.ledger.counters(&mut conn, &row.id).await?;
    Ok(Account {
        balance: Some(Balance {
            allowance: live.allowance,
            purchased: live.purchased,
            total: live.total(),
            leased: Some(live.leased),
        }),
        id: row.id,
        tier: live.tier,
        status: live.status,
        unlimited: Some(unlimited),
        period_start: chrono::DateTime::from_timestamp(live.period_start, 0),
        period_end: chrono::DateTime::from_timestamp(live.period_end, 0),
        period_usage: Some(PeriodUsage {
            requests: counters.requests,
            tokens: counters.tokens,
            resources: counters.resources,
        }),
        created_at: row.created_at,
    })
}
