//! `POST /v1/accounts/{id}/portal-sessions`: a single-use link into the customer portal, for
//! a platform to embed or email (the portal itself lives in `web::portal`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::components::{BadRequest, Internal, NotFound, StoreUnavailable, Unauthorized};
use super::error::AdminError;
use super::schemas::PortalSession;
use crate::state::AppState;

/// The body is `{}` today; unknown fields are refused so a future option cannot be silently
/// ignored by an older tollgate.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPortalSession {}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/portal-sessions",
    tag = "accounts",
    operation_id = "createPortalSession",
    summary = "A single-use link into the customer portal",
    description = "The link opens the customer portal (`/_tollgate/portal/` on the proxy \
        listener) signed in as this account, once, within `[portal] link_ttl_seconds` (default \
        900 s); its token is stored only as a SHA-256 hash in Redis. Opening it starts a portal \
        session (cookie: HttpOnly, SameSite=Lax, Secure under TLS; `[portal] \
        session_ttl_seconds`, default 1 h) and lands on the overview. The link's origin is \
        `[portal] public_url`, or the proxy listener's address. The body is optional; when \
        present it must be `{}`.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body(content = Option<NewPortalSession>, content_type = "application/json"),
    responses(
        (status = 201, description = "The link.", body = PortalSession),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<PortalSession>), AdminError> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice::<NewPortalSession>(&body)
            .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))?;
    }
    // Redis first (hydrating from Postgres once), like every account read of the data plane.
    let config = state.config();
    if crate::domain::accounts::live_state(&state, &config, &id)
        .await?
        .is_none()
    {
        return Err(AdminError::NotFound(format!("no account {id:?}")));
    }
    let (url, expires_at) = crate::domain::portal_links::issue(&state, &id).await?;
    tracing::info!(account = %id, "portal link issued");
    Ok((
        StatusCode::CREATED,
        Json(PortalSession {
            url,
            expires_at: expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
    ))
}
