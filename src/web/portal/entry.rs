//! Entering and leaving the portal: a single-use link, a sign-in with an API key, sign-out.

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use super::{redirect_with_cookie, secure};
use crate::state::AppState;
use crate::web::bridge::ClientInfo;
use crate::web::session::{self, Surface};
use crate::web::{render, WebError};

#[derive(Deserialize)]
pub(super) struct EnterQuery {
    #[serde(default)]
    token: String,
}

/// Opens a portal link: uses it up, starts a session, lands on the overview.
pub(super) async fn enter(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    Query(q): Query<EnterQuery>,
) -> Result<Response, WebError> {
    let Some(account) = crate::domain::portal_links::consume(&state, &q.token)
        .await
        .map_err(super::link_store_error)?
    else {
        return Err(WebError::Forbidden(
            "this portal link is not valid: it was already used or has expired; ask for a new one"
                .into(),
        ));
    };
    let ttl = state.config().portal.session_ttl_seconds;
    let sid = session::start(&state, Surface::Portal, Some(&account), ttl).await?;
    tracing::info!(account = %account, "portal session started from a link");
    Ok(redirect_with_cookie(
        "/_tollgate/portal/",
        session::set_cookie(Surface::Portal, &sid, ttl, secure(info.as_ref())),
    ))
}

pub(super) async fn signin_page() -> Result<Response, WebError> {
    render(
        "portal_signin.html",
        minijinja::context! { title => "Sign in", surface => "portal" },
    )
}

#[derive(Deserialize)]
pub(super) struct SignIn {
    #[serde(default)]
    api_key: String,
}

/// Sign-in with one of the account's API keys (resolved like the proxy resolves it).
pub(super) async fn signin(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Result<Response, WebError> {
    crate::web::same_origin(&headers)?;
    let client = info
        .as_ref()
        .and_then(|i| i.ip)
        .map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    session::count_signin(&state, Surface::Portal, &client).await?;
    let config = state.config();
    let index =
        crate::auth::redis_keys::KeyIndex::new(&config.redis.key_prefix, config.redis.shards);
    let mut redis = state.redis.clone();
    let identity = match state
        .caches
        .resolve_key(&state.pg, &mut redis, &index, form.api_key.trim())
        .await
    {
        Ok(identity) => identity,
        Err(crate::auth::AuthError::Store(e)) => return Err(WebError::Unavailable(e.to_string())),
        Err(_) => {
            return crate::web::render_status(
                StatusCode::UNAUTHORIZED,
                "portal_signin.html",
                minijinja::context! {
                    title => "Sign in", surface => "portal",
                    error => "That key is not valid (unknown or revoked).",
                },
            )
        }
    };
    let ttl = config.portal.session_ttl_seconds;
    let sid = session::start(&state, Surface::Portal, Some(&identity.account_id), ttl).await?;
    tracing::info!(account = %identity.account_id, "portal sign-in with an API key");
    Ok(redirect_with_cookie(
        "/_tollgate/portal/",
        session::set_cookie(Surface::Portal, &sid, ttl, secure(info.as_ref())),
    ))
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    #[serde(default)]
    pub(super) csrf: String,
}

pub(super) async fn signout(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, WebError> {
    let s = session::require(&state, Surface::Portal, &headers).await?;
    s.check_csrf(&form.csrf)?;
    session::end(&state, &s).await?;
    Ok(redirect_with_cookie(
        "/_tollgate/portal/signin",
        session::clear_cookie(Surface::Portal, secure(info.as_ref())),
    ))
}
