//! Manual grants (the rules: [`crate::domain::credits`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::components::{
    BadRequest, CreditsInput, Internal, NotFound, StoreUnavailable, Unauthorized,
};
use super::error::AdminError;
use super::extract::JsonBody;
use super::schemas::{Balance, GrantResult};
use crate::domain;
use crate::ledger;
use crate::money::Credits;
use crate::state::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    /// Greater than 0 and at most 1,000,000,000 credits.
    #[schema(value_type = CreditsInput)]
    pub credits: Credits,
    /// 1-500 bytes after trimming whitespace.
    pub reason: String,
    /// 1-200 bytes after trimming. The same key credits once; reusing it with another amount
    /// is 409.
    pub idempotency_key: String,
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/grants",
    tag = "grants",
    operation_id = "createGrant",
    summary = "Credit the purchased bucket (idempotent on idempotency_key)",
    description = "Credits go to `purchased` (they never expire). The same `idempotency_key` \
        credits once, even across retries after a crash.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body = NewGrant,
    responses(
        (status = 201, description = "The grant, whether this call credited it or not: a repeat \
            with the same key and amount answers 201 again with `duplicate: true` and credits \
            nothing.", body = GrantResult),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, description = "`conflict`: the `idempotency_key` was already used for a \
            grant of another amount, or the account is on a tier the config no longer defines.",
            body = AdminError),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    JsonBody(body): JsonBody<NewGrant>,
) -> Result<(StatusCode, Json<GrantResult>), AdminError> {
    let granted = domain::credits::grant(
        &state,
        &account_id,
        body.credits,
        &body.reason,
        &body.idempotency_key,
    )
    .await?;
    let key = body.idempotency_key.trim();
    Ok((
        StatusCode::CREATED,
        Json(grant_json(
            &account_id,
            &body,
            key,
            granted.duplicate,
            granted.live,
        )),
    ))
}

fn grant_json(
    account_id: &str,
    body: &NewGrant,
    key: &str,
    duplicate: bool,
    live: Option<ledger::AccountState>,
) -> GrantResult {
    GrantResult {
        account_id: account_id.to_string(),
        credits: body.credits,
        reason: body.reason.trim().to_string(),
        idempotency_key: key.to_string(),
        duplicate,
        balance: live.map(|l| Balance {
            allowance: l.allowance,
            purchased: l.purchased,
            total: l.total(),
            leased: None,
        }),
    }
}
