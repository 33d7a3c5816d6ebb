//! Usage statistics and journal history of an account (the queries: [`crate::domain::usage`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::Value;

use super::components::{
    BadRequest, Internal, NotFound, StoreUnavailable, Unauthorized, UsageParams,
};
use super::error::AdminError;
use super::schemas::{LedgerPage, Usage};
use crate::domain;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/usage",
    tag = "usage",
    operation_id = "getUsage",
    summary = "Usage totals, or groups by route, action or day",
    description = "Metered requests in `[from, to)`, from the journal in Postgres. `credits` is \
        net of refunds; a refunded request still counts as a request.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme"), UsageParams),
    responses(
        (status = 200, description = "Totals without `group_by`; `groups` with it.", body = Usage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn get_usage(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, AdminError> {
    Ok(Json(domain::usage::usage_of(&state, &id, &q).await?))
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/ledger",
    tag = "usage",
    operation_id = "getLedger",
    summary = "The account's journal, newest first",
    description = "Entries older than the account's tier `history_days` are not returned. Months \
        that every tier's retention let go of appear as one `carry_forward` entry per account (the \
        sums of the dropped entries), so the entries still add up to the balance.",
    params(
        ("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme"),
        ("limit" = Option<i64>, Query, description = "Entries per page (1-500, default 50).",
            minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page \
            (opaque); empty or absent = the newest page."),
    ),
    responses(
        (status = 200, description = "One page.", body = LedgerPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn get_ledger(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, AdminError> {
    Ok(Json(domain::usage::history(&state, &id, &q).await?))
}
