//! What a tier change will cost, before it is made: Stripe's own invoice preview of the
//! subscription moved to the new price, at a `proration_date` the change then passes back so
//! Stripe charges exactly what was shown. The admin API (`GET .../subscription/preview`) and
//! the portal's confirm page both call [`preview`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::Utc;
use serde::Serialize;
use utoipa::ToSchema;

use super::billing::{stripe_config, tier_move, TierMove};
use super::components::{
    BadRequestOrUnknownTier, Internal, StripeError, StripeOrStoreUnavailable, Unauthorized,
};
use super::error::AdminError;
use crate::state::AppState;
use crate::stripe::client;

/// A change's cost as Stripe computes it; amounts in the currency's minor units (cents).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = SubscriptionPreview)]
pub struct Preview {
    pub tier: String,
    /// Lowercase ISO currency code, e.g. `usd`.
    pub currency: String,
    /// Charged now (positive) or credited (negative) for the rest of the period.
    pub proration_minor: i64,
    /// What the previewed invoice asks for in total.
    pub amount_due_minor: i64,
    /// Unix seconds; pass it as `proration_date` to `PUT .../subscription`.
    pub proration_date: i64,
}

/// Stripe's preview of `account_id`'s live subscription moved to `tier` (at the current
/// interval unless `interval` is given), prorated as of now.
pub async fn preview(
    state: &AppState,
    account_id: &str,
    tier: &str,
    interval: Option<&str>,
) -> Result<Preview, AdminError> {
    let config = state.config();
    let cfg = stripe_config(&config)?;
    let TierMove {
        row,
        interval,
        price_id,
    } = tier_move(state, &config, account_id, tier, interval).await?;
    if row.price_id.as_deref() == Some(price_id.as_str()) {
        return Err(AdminError::Conflict(format!(
            "the subscription is already on tier {tier:?} ({}ly); there is no change to preview",
            interval.as_str()
        )));
    }
    let stripe = client::client(cfg)?;
    let p = client::preview_change(
        cfg,
        &stripe,
        &row.subscription_id,
        &price_id,
        Utc::now().timestamp(),
    )
    .await?;
    Ok(Preview {
        tier: tier.to_string(),
        currency: p.currency,
        proration_minor: p.proration_minor,
        amount_due_minor: p.amount_due_minor,
        proration_date: p.proration_date,
    })
}

/// `GET /v1/accounts/{id}/subscription/preview?tier=X[&interval=month|year]`.
#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/subscription/preview",
    tag = "billing",
    operation_id = "previewSubscriptionChange",
    summary = "What moving the live subscription to another tier costs, as Stripe computes it",
    description = "Stripe's invoice preview (`POST /v1/invoices/create_preview`) of the \
        subscription moved to the tier's price now, with prorations created as \
        `PUT /v1/accounts/{id}/subscription` creates them. Pass the answer's `proration_date` to \
        that `PUT` (within an hour) so Stripe prorates exactly as previewed. Amounts are integers \
        in the currency's minor units (cents). The customer portal's confirm page shows this same \
        preview.",
    params(
        ("id" = String, Path, description = "The account id (1-128 letters, digits, `_`, `-`, `.`, `@`).", example = "acme"),
        ("tier" = String, Query, description = "The tier to move to."),
        ("interval" = Option<String>, Query, description = "`month` or `year` (also `monthly`, \
            `yearly`); default the subscription's current interval."),
    ),
    responses(
        (status = 200, description = "Stripe's preview of the change.", body = Preview),
        (status = 400, response = BadRequestOrUnknownTier),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`not_found`: no such account, or the account has no live \
            subscription.", body = AdminError),
        (status = 409, description = "`conflict`: the subscription already has the tier's price; \
            there is nothing to preview.", body = AdminError),
        (status = 500, response = Internal),
        (status = 502, response = StripeError),
        (status = 503, response = StripeOrStoreUnavailable),
    )
)]
pub async fn get_preview(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Preview>, AdminError> {
    let tier = q
        .get("tier")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AdminError::BadRequest("the tier query parameter is required".into()))?;
    let p = preview(&state, &id, tier, q.get("interval").map(String::as_str)).await?;
    tracing::info!(account = %id, tier, proration = p.proration_minor, "subscription change previewed");
    Ok(Json(p))
}
