//! Selling through Stripe: the catalogue and Checkout Sessions for credit packs and
//! subscriptions, and what the subscription calls share (the account's current subscription,
//! tier prices, idempotency keys); an account's subscription itself (read, cancel, change tier)
//! is `subscription`, the webhook endpoint `stripe_webhook`. Stripe is the source of truth for subscriptions: the calls here ask Stripe for a
//! change, and the account follows when Stripe's webhook reports it (so the order of events,
//! not the order of API calls, decides).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::components::{
    BadRequest, BadRequestOrUnknownTier, Internal, NotFound, StripeError, StripeOrStoreUnavailable,
    Unauthorized,
};
use super::error::AdminError;
use super::extract::JsonBody;
use super::schemas;
use crate::config::{Config, StripeConfig};
use crate::state::AppState;
use crate::stripe::catalog::{self, Interval};
use crate::stripe::client;

/// Subscription statuses that still bill (a second subscription is refused).
pub(super) const LIVE: &[&str] = &["active", "trialing", "past_due", "incomplete", "unpaid"];

pub(super) fn stripe_config(config: &Config) -> Result<&StripeConfig, AdminError> {
    config.stripe.as_ref().ok_or_else(|| {
        AdminError::StripeNotConfigured("Stripe is not configured (no [stripe] section)".into())
    })
}

/// A Stripe idempotency key: readable when it fits in Stripe's 255 characters, hashed when not.
pub(super) fn idempotency_key(
    parts: &[&str],
    caller_key: Option<&str>,
) -> Result<String, AdminError> {
    let caller = match caller_key.map(str::trim) {
        Some(k) if k.is_empty() || k.len() > 200 => {
            return Err(AdminError::BadRequest(
                "idempotency_key must be 1-200 characters".into(),
            ))
        }
        Some(k) => k.to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let readable = format!("tollgate-{}-{caller}", parts.join("-"));
    if readable.len() <= 255 {
        Ok(readable)
    } else {
        Ok(format!(
            "tollgate-{}",
            hex::encode(Sha256::digest(readable.as_bytes()))
        ))
    }
}

fn return_url(given: Option<String>, default: &str, field: &str) -> Result<String, AdminError> {
    match given {
        None => Ok(default.to_string()),
        Some(u) if url::Url::parse(&u).is_ok() => Ok(u),
        Some(u) => Err(AdminError::BadRequest(format!(
            "{field} {u:?} is not a URL"
        ))),
    }
}

pub(super) async fn require_account(state: &AppState, id: &str) -> Result<(), AdminError> {
    match crate::store::accounts::get(&state.pg, id).await? {
        Some(_) => Ok(()),
        None => Err(AdminError::NotFound(format!("no account {id:?}"))),
    }
}

pub(super) fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `GET /v1/catalog`.
#[utoipa::path(
    get,
    path = "/v1/catalog",
    tag = "billing",
    operation_id = "getCatalog",
    summary = "Tiers and credit packs as the config defines them",
    responses(
        (status = 200, description = "The catalogue.", body = schemas::Catalog),
        (status = 401, response = Unauthorized),
    )
)]
pub async fn catalog(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(catalog::catalog_json(&state.config()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PackCheckout {
    pub account_id: String,
    /// A `[[credit_packs]]` id with a `stripe_price_id` (else 400).
    pub pack_id: String,
    /// 1-200 bytes after trimming; becomes part of the Stripe idempotency key. Pass the same
    /// key to make a retried call return the same result; default a random one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Where Stripe sends the customer after paying (an absolute URL). Default
    /// `[stripe] success_url`.
    #[serde(default)]
    pub success_url: Option<String>,
    /// Where Stripe sends a customer who gives up (an absolute URL). Default
    /// `[stripe] cancel_url`.
    #[serde(default)]
    pub cancel_url: Option<String>,
}

/// `POST /v1/checkout/credit-packs` → a payment-mode Checkout Session.
#[utoipa::path(
    post,
    path = "/v1/checkout/credit-packs",
    tag = "billing",
    operation_id = "checkoutCreditPack",
    summary = "A Stripe Checkout Session (payment mode) for a credit pack",
    description = "Redirect the customer to `url`. The purchased credits arrive with Stripe's \
        `checkout.session.completed` webhook. Each account gets one Stripe customer, created on \
        its first checkout.",
    request_body = PackCheckout,
    responses(
        (status = 200, description = "The session.", body = schemas::PackCheckoutSession),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such account, or no credit pack with this \
            id.", body = AdminError),
        (status = 500, response = Internal),
        (status = 502, response = StripeError),
        (status = 503, response = StripeOrStoreUnavailable),
    )
)]
pub async fn checkout_pack(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<PackCheckout>,
) -> Result<Json<Value>, AdminError> {
    let config = state.config();
    let cfg = stripe_config(&config)?;
    require_account(&state, &body.account_id).await?;
    let pack = catalog::pack(&config, &body.pack_id)
        .ok_or_else(|| AdminError::NotFound(format!("no credit pack {:?}", body.pack_id)))?;
    let price_id = pack.stripe_price_id.as_deref().ok_or_else(|| {
        AdminError::BadRequest(format!(
            "credit pack {:?} has no stripe_price_id, so it cannot be sold",
            pack.id
        ))
    })?;
    let success_url = return_url(body.success_url, &cfg.success_url, "success_url")?;
    let cancel_url = return_url(body.cancel_url, &cfg.cancel_url, "cancel_url")?;
    let key = idempotency_key(
        &["pack", &body.account_id, &pack.id],
        body.idempotency_key.as_deref(),
    )?;
    let stripe = client::client(cfg)?;
    let customer = client::ensure_customer(&state.pg, cfg, &stripe, &body.account_id).await?;
    let session = client::pack_session(
        cfg,
        &stripe,
        client::SessionRequest {
            account_id: &body.account_id,
            customer_id: &customer,
            price_id,
            setup_price_id: None,
            metadata: metadata(&[
                ("account_id", &body.account_id),
                ("pack_id", &pack.id),
                ("kind", "credit_pack"),
            ]),
            success_url: &success_url,
            cancel_url: &cancel_url,
            idempotency_key: key,
        },
    )
    .await?;
    tracing::info!(account = %body.account_id, pack = %pack.id, session = %session.id, "checkout session for a credit pack");
    Ok(Json(json!({
        "session_id": session.id,
        "url": session.url,
        "account_id": body.account_id,
        "pack_id": pack.id,
        "customer_id": customer,
    })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCheckout {
    pub account_id: String,
    /// A tier with a Stripe price for the interval (else 400 `unknown_tier` or
    /// `invalid_request`).
    pub tier: String,
    /// `month` (default) or `year` (also `monthly`, `yearly`).
    #[serde(default)]
    pub interval: Option<String>,
    /// 1-200 bytes after trimming; becomes part of the Stripe idempotency key. Pass the same
    /// key to make a retried call return the same result; default a random one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Where Stripe sends the customer after paying (an absolute URL). Default
    /// `[stripe] success_url`.
    #[serde(default)]
    pub success_url: Option<String>,
    /// Where Stripe sends a customer who gives up (an absolute URL). Default
    /// `[stripe] cancel_url`.
    #[serde(default)]
    pub cancel_url: Option<String>,
}

pub(super) fn parse_interval(
    given: Option<&str>,
    default: Interval,
) -> Result<Interval, AdminError> {
    match given {
        None => Ok(default),
        Some(i) => Interval::parse(i).ok_or_else(|| {
            AdminError::BadRequest(format!("interval {i:?} must be \"month\" or \"year\""))
        }),
    }
}

/// The Stripe price of a tier for an interval, or why it cannot be sold.
pub(super) fn tier_price_id(
    config: &Config,
    tier: &str,
    interval: Interval,
) -> Result<String, AdminError> {
    let t = config
        .tier(tier)
        .ok_or_else(|| AdminError::UnknownTier(tier.to_string()))?;
    catalog::tier_price(t, interval)
        .stripe_price_id
        .ok_or_else(|| {
            AdminError::BadRequest(format!(
                "tier {tier:?} has no Stripe price for interval {:?} (stripe_price_id_{}ly)",
                interval.as_str(),
                interval.as_str()
            ))
        })
}

/// `POST /v1/checkout/subscriptions` → a subscription-mode Checkout Session.
#[utoipa::path(
    post,
    path = "/v1/checkout/subscriptions",
    tag = "billing",
    operation_id = "checkoutSubscription",
    summary = "A Stripe Checkout Session (subscription mode) for a tier",
    description = "The account's tier follows when Stripe's webhooks report the subscription.",
    request_body = SubscriptionCheckout,
    responses(
        (status = 200, description = "The session.", body = schemas::SubscriptionCheckoutSession),
        (status = 400, response = BadRequestOrUnknownTier),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, description = "`conflict`: the account already has a subscription that \
            still bills; change it with `PUT /v1/accounts/{id}/subscription`.", body = AdminError),
        (status = 500, response = Internal),
        (status = 502, response = StripeError),
        (status = 503, response = StripeOrStoreUnavailable),
    )
)]
pub async fn checkout_subscription(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<SubscriptionCheckout>,
) -> Result<Json<Value>, AdminError> {
    let config = state.config();
    let cfg = stripe_config(&config)?;
    let interval = parse_interval(body.interval.as_deref(), Interval::Month)?;
    let price_id = tier_price_id(&config, &body.tier, interval)?;
    require_account(&state, &body.account_id).await?;
    if let Some(sub) = live_subscription(&state, &body.account_id).await? {
        return Err(AdminError::Conflict(format!(
            "account {:?} already has subscription {sub}; change it with PUT /v1/accounts/{}/subscription",
            body.account_id, body.account_id
        )));
    }
    let success_url = return_url(body.success_url, &cfg.success_url, "success_url")?;
    let cancel_url = return_url(body.cancel_url, &cfg.cancel_url, "cancel_url")?;
    let key = idempotency_key(
        &[
            "subscription",
            &body.account_id,
            &body.tier,
            interval.as_str(),
        ],
        body.idempotency_key.as_deref(),
    )?;
    // A tier's setup fee is charged once: on the account's first subscription to that tier.
    let first: bool = !sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE account_id = $1 AND tier = $2)",
    )
    .bind(&body.account_id)
    .bind(&body.tier)
    .fetch_one(&state.pg)
    .await?;
    let tier = config.tier(&body.tier);
    let setup_price_id = tier
        .filter(|t| first && t.setup_fee_cents().is_some())
        .and_then(|t| t.stripe_setup_price_id().map(str::to_string));
    let setup_fee_cents = setup_price_id
        .as_ref()
        .and(tier.and_then(|t| t.setup_fee_cents()));
    let stripe = client::client(cfg)?;
    let customer = client::ensure_customer(&state.pg, cfg, &stripe, &body.account_id).await?;
    let session = client::subscription_session(
        cfg,
        &stripe,
        client::SessionRequest {
            account_id: &body.account_id,
            customer_id: &customer,
            price_id: &price_id,
            setup_price_id: setup_price_id.as_deref(),
            metadata: metadata(&[
                ("account_id", &body.account_id),
                ("tier", &body.tier),
                ("interval", interval.as_str()),
                ("kind", "subscription"),
            ]),
            success_url: &success_url,
            cancel_url: &cancel_url,
            idempotency_key: key,
        },
    )
    .await?;
    tracing::info!(account = %body.account_id, tier = %body.tier, session = %session.id, "checkout session for a subscription");
    Ok(Json(json!({
        "session_id": session.id,
        "url": session.url,
        "account_id": body.account_id,
        "tier": body.tier,
        "interval": interval.as_str(),
        "customer_id": customer,
        "setup_fee_cents": setup_fee_cents,
    })))
}

/// The id of the account's subscription that still bills, if any.
pub(super) async fn live_subscription(
    state: &AppState,
    account_id: &str,
) -> Result<Option<String>, AdminError> {
    Ok(sqlx::query_scalar(
        "SELECT subscription_id FROM subscriptions WHERE account_id = $1 AND status = ANY($2)
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(account_id)
    .bind(LIVE)
    .fetch_optional(&state.pg)
    .await?)
}

#[derive(sqlx::FromRow)]
pub(super) struct SubscriptionRow {
    pub(super) subscription_id: String,
    pub(super) customer_id: Option<String>,
    pub(super) tier: String,
    pub(super) billing_interval: String,
    pub(super) price_id: Option<String>,
    pub(super) amount_cents: Option<i64>,
    pub(super) currency: Option<String>,
    pub(super) status: String,
    pub(super) cancel_at_period_end: bool,
    pub(super) current_period_start: Option<DateTime<Utc>>,
    pub(super) current_period_end: Option<DateTime<Utc>>,
    pub(super) canceled_at: Option<DateTime<Utc>>,
    pub(super) updated_at: DateTime<Utc>,
}

/// A tier change of the account's live subscription, as both the preview and the change
/// compute it: the subscription, the interval (its own unless one is given) and the price to
/// move to.
pub(super) struct TierMove {
    pub row: SubscriptionRow,
    pub interval: Interval,
    pub price_id: String,
}

pub(super) async fn tier_move(
    state: &AppState,
    config: &Config,
    account_id: &str,
    tier: &str,
    interval: Option<&str>,
) -> Result<TierMove, AdminError> {
    require_account(state, account_id).await?;
    let row = current_subscription(state, account_id)
        .await?
        .filter(|r| LIVE.contains(&r.status.as_str()))
        .ok_or_else(|| {
            AdminError::NotFound(format!(
                "account {account_id:?} has no live subscription; start one with POST /v1/checkout/subscriptions"
            ))
        })?;
    let current_interval = Interval::parse(&row.billing_interval).unwrap_or(Interval::Month);
    let interval = parse_interval(interval, current_interval)?;
    let price_id = tier_price_id(config, tier, interval)?;
    Ok(TierMove {
        row,
        interval,
        price_id,
    })
}

/// The account's current subscription: the newest that still bills, else the newest.
pub(super) async fn current_subscription(
    state: &AppState,
    account_id: &str,
) -> Result<Option<SubscriptionRow>, AdminError> {
    Ok(sqlx::query_as::<_, SubscriptionRow>(
        "SELECT subscription_id, customer_id, tier, billing_interval, price_id, amount_cents, currency,
                status, cancel_at_period_end, current_period_start, current_period_end, canceled_at,
                updated_at
           FROM subscriptions WHERE account_id = $1
          ORDER BY (status = ANY($2)) DESC, created_at DESC LIMIT 1",
    )
    .bind(account_id)
    .bind(LIVE)
    .fetch_optional(&state.pg)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_stay_within_stripes_limit() {
        let k = idempotency_key(&["pack", "acme", "p1"], Some("abc")).unwrap();
        assert_eq!(k, "tollgate-pack-acme-p1-abc");
        let long = "x".repeat(128);
        let k = idempotency_key(&["pack", &long, &long], Some(&"y".repeat(100))).unwrap();
        assert!(k.len() <= 255, "{k}");
        assert!(idempotency_key(&["a"], Some("")).is_err());
        let a = idempotency_key(&["a"], None).unwrap();
        let b = idempotency_key(&["a"], None).unwrap();
        assert_ne!(a, b);
    }
}
