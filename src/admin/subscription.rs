//! An account's subscription: read it, cancel it (at period end or now), change its tier with
//! Stripe's proration (at a previewed `proration_date`: `subscription_preview`). Stripe is the
//! source of truth: these calls ask Stripe for a change, and the account follows when Stripe's
//! webhook reports it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;

use super::billing::{
    current_subscription, idempotency_key, live_subscription, metadata, require_account,
    stripe_config, tier_move, TierMove,
};
use super::components::{
    BadRequest, BadRequestOrUnknownTier, Internal, StoreUnavailable, StripeError,
    StripeOrStoreUnavailable, Unauthorized,
};
use super::error::AdminError;
use super::extract::JsonBody;
use super::schemas;
use crate::state::AppState;
use crate::stripe::client;

/// `GET /v1/accounts/{id}/subscription`.
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/subscription",
    tag = "billing",
    operation_id = "getSubscription",
    summary = "The account's current subscription",
    description = "The newest subscription that still bills (`active`, `trialing`, `past_due`, \
        `incomplete`, `unpaid`), else the newest one, as the Stripe webhooks recorded it. Works \
        without `[stripe]`.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    responses(
        (status = 200, description = "The subscription.", body = schemas::Subscription),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such account, or the account has no \
            subscription.", body = AdminError),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn get_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<schemas::Subscription>, AdminError> {
    require_account(&state, &id).await?;
    let row = current_subscription(&state, &id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("account {id:?} has no subscription")))?;
    let grace_until: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT grace_until FROM accounts WHERE id = $1")
            .bind(&id)
            .fetch_one(&state.pg)
            .await?;
    Ok(Json(schemas::Subscription {
        account_id: id,
        subscription_id: row.subscription_id,
        customer_id: row.customer_id,
        tier: row.tier,
        interval: row.billing_interval,
        status: row.status,
        cancel_at_period_end: row.cancel_at_period_end,
        current_period_start: row.current_period_start,
        current_period_end: row.current_period_end,
        canceled_at: row.canceled_at,
        price_id: row.price_id,
        amount_cents: row.amount_cents,
        currency: row.currency,
        grace_until,
        updated_at: row.updated_at,
    }))
}

#[derive(Deserialize, Default, ToSchema)]
#[schema(as = CancelRequest)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// `true` (default): at the end of the paid period; `false`: now.
    #[serde(default)]
    pub at_period_end: Option<bool>,
    /// 1-200 bytes after trimming; becomes part of the Stripe idempotency key. Pass the same
    /// key to make a retried call return the same result; default a random one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/accounts/{id}/subscription/cancel` (body optional).
#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/subscription/cancel",
    tag = "billing",
    operation_id = "cancelSubscription",
    summary = "Cancel the live subscription, at the period's end (default) or now",
    description = "Asks Stripe to cancel; the account follows when Stripe's \
        `customer.subscription.updated`/`deleted` webhook arrives. The body is optional (an empty \
        or whitespace-only body means the defaults); when present it is parsed as JSON whatever \
        its `Content-Type`.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body(content = Option<Cancel>, content_type = "application/json"),
    responses(
        (status = 200, description = "What Stripe answered.", body = schemas::CancelResult),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such account, or the account has no live \
            subscription.", body = AdminError),
        (status = 500, response = Internal),
        (status = 502, response = StripeError),
        (status = 503, response = StripeOrStoreUnavailable),
    )
)]
pub async fn cancel_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<schemas::CancelResult>, AdminError> {
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
    Ok(Json(schemas::CancelResult {
        account_id: id,
        subscription_id: s.id,
        status: s.status,
        cancel_at_period_end: s.cancel_at_period_end,
        applies: "the account follows when Stripe's customer.subscription.updated/deleted webhook arrives",
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionChange {
    pub tier: String,
    /// `month` or `year` (also `monthly`, `yearly`); defaults to the subscription's current
    /// interval.
    #[serde(default)]
    pub interval: Option<String>,
    /// 1-200 bytes after trimming; becomes part of the Stripe idempotency key. Pass the same
    /// key to make a retried call return the same result; default a random one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The `proration_date` of a preview (`GET .../subscription/preview`), so Stripe prorates
    /// exactly as the preview showed; at most an hour old.
    #[serde(default)]
    pub proration_date: Option<i64>,
}

#[utoipa::path(
    put,
    path = "/v1/accounts/{id}/subscription",
    tag = "billing",
    operation_id = "changeSubscription",
    summary = "Move the live subscription to another tier's price (with proration)",
    description = "Asks Stripe to change the subscription's price; the account's tier follows \
        when Stripe's `customer.subscription.updated` webhook arrives. When the subscription \
        already has the target price, nothing is asked of Stripe and `changed` is `false`.",
    params(("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme")),
    request_body = SubscriptionChange,
    responses(
        (status = 200, description = "What was asked of Stripe.",
            body = schemas::SubscriptionChangeResult),
        (status = 400, response = BadRequestOrUnknownTier),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such account, or the account has no live \
            subscription.", body = AdminError),
        (status = 500, response = Internal),
        (status = 502, response = StripeError),
        (status = 503, response = StripeOrStoreUnavailable),
    )
)]
/// `PUT /v1/accounts/{id}/subscription` → the subscription moves to the tier's price, with
/// proration; the tier follows with the webhook.
pub async fn change_subscription(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SubscriptionChange>,
) -> Result<Json<schemas::SubscriptionChangeResult>, AdminError> {
    let config = state.config();
    let cfg = stripe_config(&config)?;
    let TierMove {
        row,
        interval,
        price_id,
    } = tier_move(&state, &config, &id, &body.tier, body.interval.as_deref()).await?;
    if let Some(at) = body.proration_date {
        super::proration::check_proration_date(at, Utc::now().timestamp())?;
    }
    if row.price_id.as_deref() == Some(price_id.as_str()) {
        return Ok(Json(schemas::SubscriptionChangeResult {
            account_id: id,
            subscription_id: row.subscription_id,
            tier: body.tier,
            interval: interval.as_str().to_string(),
            status: row.status,
            changed: false,
            price_id: None,
            applies: None,
        }));
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
        body.proration_date,
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
    Ok(Json(schemas::SubscriptionChangeResult {
        account_id: id,
        subscription_id: s.id,
        tier: body.tier,
        interval: interval.as_str().to_string(),
        status: s.status,
        changed: true,
        price_id: Some(s.price_id),
        applies: Some(
            "the account's tier follows when Stripe's customer.subscription.updated webhook arrives",
        ),
    }))
}
