//! Billing through Stripe: the catalogue, Checkout Sessions for credit packs and subscriptions,
//! an account's subscription (read, cancel, change tier with proration), and the webhook
//! endpoint. Stripe is the source of truth for subscriptions: the calls here ask Stripe for a
//! change, and the account follows when Stripe's webhook reports it (so the order of events,
//! not the order of API calls, decides).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::AdminError;
use super::extract::JsonBody;
use crate::config::{Config, StripeConfig};
use crate::state::AppState;
use crate::stripe::catalog::{self, Interval};
use crate::stripe::{client, events, webhook};

/// Subscription statuses that still bill (a second subscription is refused).
const LIVE: &[&str] = &["active", "trialing", "past_due", "incomplete", "unpaid"];

fn stripe_config(config: &Config) -> Result<&StripeConfig, AdminError> {
    config.stripe.as_ref().ok_or_else(|| {
        AdminError::StripeNotConfigured("Stripe is not configured (no [stripe] section)".into())
    })
}

/// A Stripe idempotency key: readable when it fits in Stripe's 255 characters, hashed when not.
fn idempotency_key(parts: &[&str], caller_key: Option<&str>) -> Result<String, AdminError> {
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

async fn require_account(state: &AppState, id: &str) -> Result<(), AdminError> {
    match crate::store::accounts::get(&state.pg, id).await? {
        Some(_) => Ok(()),
        None => Err(AdminError::NotFound(format!("no account {id:?}"))),
    }
}

fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `GET /v1/catalog`.
pub async fn catalog(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(catalog::catalog_json(&state.config()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackCheckout {
    pub account_id: String,
    pub pack_id: String,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub success_url: Option<String>,
    #[serde(default)]
    pub cancel_url: Option<String>,
}

/// `POST /v1/checkout/credit-packs` → a payment-mode Checkout Session.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCheckout {
    pub account_id: String,
    pub tier: String,
    /// `month` (default) or `year`.
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub success_url: Option<String>,
    #[serde(default)]
    pub cancel_url: Option<String>,
}

fn parse_interval(given: Option<&str>, default: Interval) -> Result<Interval, AdminError> {
    match given {
        None => Ok(default),
        Some(i) => Interval::parse(i).ok_or_else(|| {
            AdminError::BadRequest(format!("interval {i:?} must be \"month\" or \"year\""))
        }),
    }
}

/// The Stripe price of a tier for an interval, or why it cannot be sold.
fn tier_price_id(config: &Config, tier: &str, interval: Interval) -> Result<String, AdminError> {
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
        .filter(|t| first && t.raw.setup_fee_cents.is_some())
        .and_then(|t| t.raw.stripe_setup_price_id.clone());
    let setup_fee_cents = setup_price_id
        .as_ref()
        .and(tier.and_then(|t| t.raw.setup_fee_cents));
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
async fn live_subscription(
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
struct SubscriptionRow {
    subscription_id: String,
    customer_id: Option<String>,
    tier: String,
    billing_interval: String,
    price_id: Option<String>,
    amount_cents: Option<i64>,
    currency: Option<String>,
    status: String,
    cancel_at_period_end: bool,
    current_period_start: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    canceled_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

/// The account's current subscription: the newest that still bills, else the newest.
async fn current_subscription(
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

/// `GET /v1/accounts/{id}/subscription`.
pub async fn get_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    require_account(&state, &id).await?;
    let row = current_subscription(&state, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("account {id:?} has no subscription")))?;
    let grace_until: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT grace_until FROM accounts WHERE id = $1")
            .bind(&id)
            .fetch_one(&state.pg)
            .await?;
    Ok(Json(json!({
        "account_id": id,
        "subscription_id": row.subscription_id,
        "customer_id": row.customer_id,
        "tier": row.tier,
        "interval": row.billing_interval,
        "status": row.status,
        "cancel_at_period_end": row.cancel_at_period_end,
        "current_period_start": row.current_period_start,
        "current_period_end": row.current_period_end,
        "canceled_at": row.canceled_at,
        "price_id": row.price_id,
        "amount_cents": row.amount_cents,
        "currency": row.currency,
        "grace_until": grace_until,
        "updated_at": row.updated_at,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// `true` (default): at the end of the paid period; `false`: now.
    #[serde(default)]
    pub at_period_end: Option<bool>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/accounts/{id}/subscription/cancel` (body optional).
pub async fn cancel_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let body: Cancel = if body.iter().all(u8::is_ascii_whitespace) {
        Cancel::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))?
    };
    let config = state.config();
    let cfg = stripe_config(&config)?;
    require_account(&state, &id).await?;
    let sub = live_subscription(&state, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("account {id:?} has no live subscription")))?;
    let at_period_end = body.at_period_end.unwrap_or(true);
    let key = idempotency_key(
        &[
            "cancel",
            &sub,
            if at_period_end { "period-end" } else { "now" },
        ],
        body.idempotency_key.as_deref(),
    )?;
    let stripe = client::client(cfg)?;
    let s = client::cancel(cfg, &stripe, &sub, at_period_end, key).await?;
    tracing::info!(account = %id, subscription = %sub, at_period_end, "subscription cancellation requested");
    Ok(Json(json!({
        "account_id": id,
        "subscription_id": s.id,
        "status": s.status,
        "cancel_at_period_end": s.cancel_at_period_end,
        "applies": "the account follows when Stripe's customer.subscription.updated/deleted webhook arrives",
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionChange {
    pub tier: String,
    /// Defaults to the subscription's current interval.
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `PUT /v1/accounts/{id}/subscription` → the subscription moves to the tier's price, with
/// proration; the tier follows with the webhook.
pub async fn change_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SubscriptionChange>,
) -> Result<Json<Value>, AdminError> {
    let config = state.config();
    let cfg = stripe_config(&config)?;
    require_account(&state, &id).await?;
    let row = current_subscription(&state, &id)
        .await?
        .filter(|r| LIVE.contains(&r.status.as_str()))
        .ok_or_else(|| {
            AdminError::NotFound(format!(
                "account {id:?} has no live subscription; start one with POST /v1/checkout/subscriptions"
            ))
        })?;
    let current_interval = Interval::parse(&row.billing_interval).unwrap_or(Interval::Month);
    let interval = parse_interval(body.interval.as_deref(), current_interval)?;
    let price_id = tier_price_id(&config, &body.tier, interval)?;
    if row.price_id.as_deref() == Some(price_id.as_str()) {
        return Ok(Json(json!({
            "account_id": id,
            "subscription_id": row.subscription_id,
            "tier": body.tier,
            "interval": interval.as_str(),
            "status": row.status,
            "changed": false,
        })));
    }
    let key = idempotency_key(
        &[
            "change",
            &row.subscription_id,
            &body.tier,
            interval.as_str(),
        ],
        body.idempotency_key.as_deref(),
    )?;
    let stripe = client::client(cfg)?;
    let s = client::change_price(
        cfg,
        &stripe,
        &row.subscription_id,
        &price_id,
        metadata(&[
            ("account_id", &id),
            ("tier", &body.tier),
            ("interval", interval.as_str()),
            ("kind", "subscription"),
        ]),
        key,
    )
    .await?;
    tracing::info!(account = %id, subscription = %s.id, tier = %body.tier, "subscription change requested");
    Ok(Json(json!({
        "account_id": id,
        "subscription_id": s.id,
        "tier": body.tier,
        "interval": interval.as_str(),
        "status": s.status,
        "price_id": s.price_id,
        "changed": true,
        "applies": "the account's tier follows when Stripe's customer.subscription.updated webhook arrives",
    })))
}

/// `POST /webhooks/stripe`: no admin token; the raw body is verified against
/// `Stripe-Signature` before anything is parsed.
pub async fn stripe_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let config = state.config();
    let secret = stripe_config(&config)?
        .webhook_secret
        .as_deref()
        .ok_or_else(|| {
            AdminError::StripeNotConfigured("the Stripe webhook secret is not set".into())
        })?;
    let count = |outcome: &str| {
        state
            .metrics
            .stripe_webhooks
            .with_label_values(&[outcome])
            .inc();
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = webhook::verify(signature, &body, secret.as_bytes(), Utc::now().timestamp()) {
        tracing::warn!(error = %e, "Stripe webhook refused");
        count("invalid_signature");
        return Err(AdminError::InvalidSignature(e.to_string()));
    }
    let event = webhook::parse_event(&body).map_err(|e| {
        count("bad_request");
        AdminError::BadRequest(e)
    })?;
    let processed = events::process(&state, &event).await.map_err(|e| {
        count("error");
        AdminError::Internal(format!(
            "Stripe event {} ({}) failed; Stripe will retry: {e}",
            event.id, event.kind
        ))
    })?;
    count(processed.outcome.label());
    tracing::info!(
        event = %event.id,
        kind = %event.kind,
        outcome = processed.outcome.label(),
        detail = processed.outcome.detail().unwrap_or(""),
        account = processed.account_id.as_deref().unwrap_or(""),
        "Stripe event"
    );
    Ok(Json(json!({
        "received": true,
        "event_id": event.id,
        "type": event.kind,
        "outcome": processed.outcome.label(),
        "detail": processed.outcome.detail(),
    })))
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
