//! Buying: credit packs through Stripe Checkout, the Stripe billing portal, and the pages
//! Stripe returns to.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::overview::live_numbers;
use super::{origin, signed_in, PREFIX};
use crate::admin::extract::JsonBody;
use crate::config::MonthlyCredits;
use crate::state::AppState;
use crate::web::bridge::ClientInfo;
use crate::web::{render, WebError};

pub(super) async fn buy_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    let config = state.config();
    let packs: Vec<Value> = config
        .credit_packs
        .iter()
        .map(|p| {
            json!({
                "id": p.id,
                "credits": crate::stripe::catalog::pack_total(p).to_string(),
                "bonus": p.bonus_credits.to_string(),
                "price": price_text(p.price_cents, &p.currency),
                "sellable": p.stripe_price_id.is_some(),
            })
        })
        .collect();
    let tiers: Vec<Value> = config
        .tiers
        .values()
        .filter(|t| t.stripe_price_id_monthly().is_some())
        .map(|t| {
            json!({
                "name": t.name,
                "price": t.price_cents_monthly().map(|c| price_text(c, t.currency())),
                "credits": match t.monthly_credits() {
                    MonthlyCredits::Limited(c) => c.to_string(),
                    MonthlyCredits::Unlimited => "unlimited".into(),
                },
            })
        })
        .collect();
    let subscription = match crate::admin::subscription::get_subscription(
        State(Arc::clone(&state)),
        Path(account.clone()),
    )
    .await
    {
        Ok(Json(sub)) => Some(sub),
        Err(_) => None,
    };
    let live = live_numbers(&state, &account).await?;
    render(
        "portal_buy.html",
        minijinja::context! {
            title => "Buy credits and plans", surface => "portal", nav => "buy", csrf => s.csrf,
            packs => packs, tiers => tiers, subscription => subscription, live => live,
            stripe => config.stripe.is_some(),
            billing_portal => config.stripe.as_ref().is_some_and(|s| s.billing_portal),
        },
    )
}

pub(super) fn price_text(cents: u64, currency: &str) -> String {
    format!(
        "{}.{:02} {}",
        cents / 100,
        cents % 100,
        currency.to_ascii_uppercase()
    )
}

#[derive(Deserialize)]
pub(super) struct PackForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    pack_id: String,
}

/// Starts a Stripe Checkout for a credit pack and sends the browser there.
pub(super) async fn buy_pack(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    headers: HeaderMap,
    Form(form): Form<PackForm>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let origin = origin(&state.config(), &headers, info.as_deref());
    let Json(session) = crate::admin::billing::checkout_pack(
        State(Arc::clone(&state)),
        JsonBody(crate::admin::billing::PackCheckout {
            account_id: account,
            pack_id: form.pack_id,
            idempotency_key: None,
            success_url: Some(format!("{origin}{PREFIX}/buy/success")),
            cancel_url: Some(format!("{origin}{PREFIX}/buy/cancel")),
        }),
    )
    .await?;
    checkout_redirect(&session)
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `[stripe] billing_portal`: a Stripe billing portal session for the signed-in account's
/// customer (made on first use, like a checkout does), returning to the overview.
pub(super) async fn billing_portal(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let config = state.config();
    let cfg = match config.stripe.as_ref() {
        Some(cfg) if cfg.billing_portal => cfg,
        _ => return Err(WebError::NotFound("no billing portal is configured".into())),
    };
    let origin = origin(&config, &headers, info.as_deref());
    let client = crate::stripe::client::client(cfg)?;
    let customer =
        crate::stripe::client::ensure_customer(&state.pg, cfg, &client, &account).await?;
    let url = crate::stripe::client::billing_portal_session(
        cfg,
        &client,
        &customer,
        &format!("{origin}{PREFIX}/"),
    )
    .await?;
    checkout_redirect(&json!({ "url": url }))
}

pub(super) fn checkout_redirect(session: &Value) -> Result<Response, WebError> {
    let url = session
        .get("url")
        .and_then(Value::as_str)
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or_else(|| WebError::Unavailable("Stripe returned no checkout URL".into()))?;
    Ok(Redirect::to(url).into_response())
}

pub(super) async fn buy_success(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    let live = live_numbers(&state, &account).await?;
    render(
        "message.html",
        minijinja::context! {
            title => "Thank you", surface => "portal", nav => "buy", csrf => s.csrf,
            message => "Payment received. Your credits appear on the overview as soon as Stripe confirms the payment.",
            live => live, back => "/_tollgate/portal/",
        },
    )
}

pub(super) async fn buy_cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let (s, _) = signed_in(&state, &headers).await?;
    render(
        "message.html",
        minijinja::context! {
            title => "Checkout canceled", surface => "portal", nav => "buy", csrf => s.csrf,
            message => "Nothing was charged.", back => "/_tollgate/portal/buy",
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_exact() {
        assert_eq!(price_text(2000, "usd"), "20.00 USD");
        assert_eq!(price_text(5, "eur"), "0.05 EUR");
    }
}
