//! The operator console, `/console/` on the admin listener only (the proxy listener never
//! routes here). Sign-in with the admin token starts a session; every action calls the admin
//! API's own handler functions, so the console can do nothing the API could not.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::session::{self, Session, Surface};
use super::{render, render_status, show_time, WebError};
use crate::domain::DomainError;
use crate::money::Credits;
use crate::state::AppState;

mod revenue;
mod traffic;

/// The console's routes, to be merged into the admin router (state applied there).
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    traffic::start_sampling();
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(accounts))
        .route("/console/signin", get(signin_page).post(signin))
        .route("/console/signout", post(signout))
        .route("/console/accounts/{id}", get(account))
        .route("/console/accounts/{id}/grant", post(grant))
        .route("/console/accounts/{id}/tier", post(tier))
        .route("/console/accounts/{id}/status", post(status))
        .route("/console/accounts/{id}/portal-link", post(portal_link))
        .route("/console/revenue", get(revenue::revenue))
        .route("/console/traffic", get(traffic::traffic))
        .route("/console/assets/app.css", get(super::assets::css))
        .route("/console/assets/app.js", get(super::assets::js))
        .route_layer(middleware::from_fn_with_state(
            state,
            super::security_headers,
        ))
}

async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Session, WebError> {
    session::require(state, Surface::Console, headers).await
}

async fn signin_page() -> Result<Response, WebError> {
    render(
        "console_signin.html",
        minijinja::context! { title => "Sign in", surface => "console" },
    )
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
}

async fn signin(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Result<Response, WebError> {
    super::same_origin(&headers)?;
    // The admin listener is private; one bucket for all its clients.
    session::count_signin(&state, Surface::Console, "admin").await?;
    let config = state.config();
    let expected = config.admin_token.as_deref().unwrap_or_default();
    let given = form.token.trim();
    if expected.is_empty() || !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return render_status(
            StatusCode::UNAUTHORIZED,
            "console_signin.html",
            minijinja::context! {
                title => "Sign in", surface => "console", error => "That is not the admin token.",
            },
        );
    }
    let ttl = config.portal.session_ttl_seconds;
    let sid = session::start(&state, Surface::Console, None, ttl).await?;
    tracing::info!("console sign-in");
    let mut response = Redirect::to("/console/").into_response();
    // The admin listener speaks plain HTTP (it is never public), so no `Secure` flag.
    if let Ok(v) =
        header::HeaderValue::from_str(&session::set_cookie(Surface::Console, &sid, ttl, false))
    {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn signout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    session::end(&state, &s).await?;
    let mut response = Redirect::to("/console/signin").into_response();
    if let Ok(v) = header::HeaderValue::from_str(&session::clear_cookie(Surface::Console, false)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

#[derive(Deserialize, Default)]
struct AccountFilter {
    #[serde(default)]
    q: String,
    #[serde(default)]
    tier: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    low: String,
}

/// Accounts shown per list page.
const LIST_LIMIT: i64 = 100;

async fn accounts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<AccountFilter>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    let config = state.config();
    let some = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_string());
    let rows = crate::store::accounts::search(
        &state.pg,
        f.q.trim(),
        some(&f.tier).as_deref(),
        some(&f.status).as_deref(),
        LIST_LIMIT,
    )
    .await?;
    let low_only = !f.low.is_empty();
    let mut list = Vec::new();
    for row in rows {
        // Live balances from Redis (hydrated on first look), as the account page shows them.
        let live = crate::domain::accounts::live_state(&state, &config, &row.id).await?;
        let (balance, low) = match &live {
            Some(l) => {
                let threshold = config.tier(&l.tier).and_then(|t| t.low_balance_credits());
                (
                    l.total().to_string(),
                    threshold.is_some_and(|t| l.total() < t),
                )
            }
            None => ("?".to_string(), false),
        };
        if low_only && !low {
            continue;
        }
        list.push(json!({
            "id": row.id,
            "tier": live.as_ref().map_or(row.tier.clone(), |l| l.tier.clone()),
            "status": live.as_ref().map_or(row.status.clone(), |l| l.status.clone()),
            "balance": balance,
            "low": low,
            "created": row.created_at.format("%Y-%m-%d").to_string(),
        }));
    }
    render(
        "console_accounts.html",
        minijinja::context! {
            title => "Accounts", surface => "console", nav => "accounts", csrf => s.csrf,
            accounts => list, tiers => config.tiers.keys().collect::<Vec<_>>(),
            q => f.q, tier => f.tier, status => f.status, low => low_only,
        },
    )
}

/// What an account page may show above its data after an action.
#[derive(Default)]
struct Flash {
    notice: Option<String>,
    error: Option<String>,
    link: Option<(String, String)>,
}

async fn account_page(
    state: &Arc<AppState>,
    s: &Session,
    id: &str,
    flash: Flash,
) -> Result<Response, WebError> {
    let config = state.config();
    let row = crate::store::accounts::get(&state.pg, id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no account {id:?}")))?;
    let live = crate::domain::accounts::live_state(state, &config, id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no account {id:?}")))?;
    let used = super::keys_last_used(state, id).await;
    let keys: Vec<Value> = crate::store::keys::list_for_account(&state.pg, id)
        .await?
        .into_iter()
        .map(|k| {
            json!({
                "id": k.id, "name": k.name, "prefix": k.prefix,
                "last_used": used.get(&k.id).map(|at| show_time(*at)),
                "created": k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                "revoked": k.revoked_at.map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default(),
            })
        })
        .collect();
    let mut q = HashMap::new();
    q.insert("limit".to_string(), "50".to_string());
    let ledger = crate::domain::usage::history(state, id, &q).await?;
    let status = if flash.error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let (link, link_expires) = flash.link.unzip();
    render_status(
        status,
        "console_account.html",
        minijinja::context! {
            title => format!("Account {id}"), surface => "console", nav => "accounts",
            csrf => s.csrf,
            account => json!({"id": row.id}),
            live => json!({
                "total": live.total().to_string(),
                "allowance": live.allowance.to_string(),
                "purchased": live.purchased.to_string(),
                "tier": live.tier,
                "status": live.status,
                "period_end": show_time(live.period_end),
            }),
            tiers => config.tiers.keys().collect::<Vec<_>>(),
            keys => keys,
            entries => super::portal::entries_for_page(&ledger),
            grant_key => session::random_token(),
            notice => flash.notice, error => flash.error,
            link => link, link_expires => link_expires,
        },
    )
}

async fn account(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    account_page(&state, &s, &id, Flash::default()).await
}

/// Shows a domain call's refusal on the account page instead of an error page.
fn flash_of(result: Result<String, DomainError>) -> Result<Flash, WebError> {
    match result {
        Ok(notice) => Ok(Flash {
            notice: Some(notice),
            ..Flash::default()
        }),
        Err(
            e @ (DomainError::Invalid(_)
            | DomainError::UnknownTier(_)
            | DomainError::Conflict(_)
            | DomainError::NotFound(_)),
        ) => Ok(Flash {
            error: Some(e.to_string()),
            ..Flash::default()
        }),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct GrantForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    credits: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    idempotency_key: String,
}

/// A grant through the same domain call as the admin API's; the form carries an idempotency key made
/// when the page was rendered, so a double submit credits once.
async fn grant(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<GrantForm>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let result = match Credits::parse(form.credits.trim()) {
        Err(e) => Err(DomainError::Invalid(format!("credits: {e}"))),
        Ok(credits) => {
            crate::domain::credits::grant(&state, &id, credits, &form.reason, &form.idempotency_key)
                .await
                .map(|_| format!("Granted {credits} credits."))
        }
    };
    let flash = flash_of(result)?;
    account_page(&state, &s, &id, flash).await
}

#[derive(Deserialize)]
struct TierForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tier: String,
}

async fn tier(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TierForm>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let result = crate::domain::accounts::set_tier(&state, &id, &form.tier)
        .await
        .map(|_| format!("Moved to the {} tier.", form.tier));
    let flash = flash_of(result)?;
    account_page(&state, &s, &id, flash).await
}

#[derive(Deserialize)]
struct StatusForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    status: String,
}

async fn status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<StatusForm>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let result = crate::domain::accounts::set_status(&state, &id, &form.status)
        .await
        .map(|_| format!("Status set to {}.", form.status));
    let flash = flash_of(result)?;
    account_page(&state, &s, &id, flash).await
}

async fn portal_link(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    if crate::store::accounts::get(&state.pg, &id).await?.is_none() {
        return Err(WebError::NotFound(format!("no account {id:?}")));
    }
    let (url, expires) = super::portal::create_link(&state, &id).await?;
    let flash = Flash {
        notice: Some("A single-use portal link was made; send it to the customer.".into()),
        link: Some((url, expires.format("%Y-%m-%d %H:%M UTC").to_string())),
        ..Flash::default()
    };
    account_page(&state, &s, &id, flash).await
}
