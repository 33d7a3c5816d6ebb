//! API keys: created with their plaintext shown once; revoked everywhere within 2 s.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::components::{BadRequest, Internal, NotFound, StoreUnavailable, Unauthorized};
use super::error::AdminError;
use super::extract::JsonBody;
use crate::domain;
use crate::state::AppState;

/// A JSON object; `{}` is enough.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A label, at most 200 bytes. Default `default`.
    #[schema(max_length = 200)]
    #[serde(default)]
    pub name: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/keys",
    tag = "keys",
    operation_id = "createKey",
    summary = "Create an API key (its plaintext is shown only in this answer)",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body = NewKey,
    responses(
        (status = 201, description = "The new key.", body = domain::keys::CreatedKey),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, description = "`seat_limit_reached`: the tier's `max_keys` seats are all \
            taken.", body = AdminError),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<(StatusCode, Json<domain::keys::CreatedKey>), AdminError> {
    let created = domain::keys::create(&state, &account_id, body.name).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(
    delete,
    path = "/v1/keys/{key_id}",
    tag = "keys",
    operation_id = "revokeKey",
    summary = "Revoke an API key",
    description = "The key stops working on every instance within 2 s. Needs Redis only (the \
        change reaches Postgres through the auth outbox); a key Redis has no record of needs \
        Postgres to be found (503 `store_unavailable` while it is down).",
    params(("key_id" = String, Path,
        description = "The key's id (`key_` + 16 base62 characters), as returned at creation.",
        example = "key_3fP9aQ1xYt7LmZ2c")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no live key with this id (unknown or already \
            revoked).", body = AdminError),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
/// Revokes a key everywhere (see [`domain::keys::revoke`]).
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, AdminError> {
    domain::keys::revoke(&state, &key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
