//! The customer portal, `/_tollgate/portal/` on the proxy listener (answered through
//! [`super::bridge`]). A session is scoped to one account, taken from the session record and
//! never from the URL, so no id in a link can reach another account's data.
//!
//! Entry: a single-use link from `POST /v1/accounts/{id}/portal-sessions` (admin API), or a
//! sign-in with one of the account's API keys.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::Utc;

mod buy;
mod entry;
mod keys;
mod overview;
mod subscription;
mod usage;

pub use usage::entries_for_page;

use super::bridge::ClientInfo;
use super::session::{self, Session, Surface};
use super::WebError;
use crate::config::Config;
use crate::state::AppState;

/// Everything under this path on the proxy listener is the portal.
pub const PREFIX: &str = crate::domain::portal_links::PREFIX;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(PREFIX, get(|| async { Redirect::to("/_tollgate/portal/") }))
        .route("/_tollgate/portal/", get(overview::overview))
        .route(
            "/_tollgate/portal/signin",
            get(entry::signin_page).post(entry::signin),
        )
        .route("/_tollgate/portal/enter", get(entry::enter))
        .route("/_tollgate/portal/signout", post(entry::signout))
        .route("/_tollgate/portal/live.json", get(overview::live))
        .route("/_tollgate/portal/usage", get(usage::usage_page))
        .route("/_tollgate/portal/activity", get(usage::activity))
        .route(
            "/_tollgate/portal/keys",
            get(keys::keys_page).post(keys::create_key),
        )
        .route("/_tollgate/portal/keys/{id}/revoke", post(keys::revoke_key))
        .route("/_tollgate/portal/buy", get(buy::buy_page))
        .route("/_tollgate/portal/buy/pack", post(buy::buy_pack))
        .route(
            "/_tollgate/portal/buy/subscription",
            post(subscription::subscription),
        )
        .route("/_tollgate/portal/buy/success", get(buy::buy_success))
        .route("/_tollgate/portal/billing", post(buy::billing_portal))
        .route("/_tollgate/portal/buy/cancel", get(buy::buy_cancel))
        .route("/_tollgate/portal/assets/app.css", get(super::assets::css))
        .route("/_tollgate/portal/assets/app.js", get(super::assets::js))
        .fallback(|| async { WebError::NotFound("no such page".into()) })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            super::security_headers,
        ))
        .with_state(state)
}

/// Makes a single-use portal link for an account (the admin API's portal-session call and
/// the console's button). Returns the URL and when it expires.
pub async fn create_link(
    state: &AppState,
    account_id: &str,
) -> Result<(String, chrono::DateTime<Utc>), WebError> {
    crate::domain::portal_links::issue(state, account_id)
        .await
        .map_err(link_store_error)
}

/// Links live in Redis: its failure is this surface's own `store_unavailable` page.
pub(super) fn link_store_error(e: crate::domain::DomainError) -> WebError {
    match e {
        crate::domain::DomainError::Unavailable(detail) => WebError::Unavailable(detail),
        other => WebError::from(other),
    }
}

/// The origin the browser used to reach the portal, for Stripe's return URLs.
pub(super) fn origin(config: &Config, headers: &HeaderMap, info: Option<&ClientInfo>) -> String {
    if let Some(u) = &config.portal.public_url {
        return u.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| config.server.listen.to_string(), str::to_string);
    let scheme = if info.is_some_and(|i| i.tls) {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

pub(super) fn secure(info: Option<&Extension<ClientInfo>>) -> bool {
    info.is_some_and(|i| i.tls)
}

/// A redirect that also sets a cookie.
pub(super) fn redirect_with_cookie(to: &str, cookie: String) -> Response {
    let mut response = Redirect::to(to).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

pub(super) async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Session, String), WebError> {
    let s = session::require(state, Surface::Portal, headers).await?;
    let account = s.account()?.to_string();
    Ok((s, account))
}
