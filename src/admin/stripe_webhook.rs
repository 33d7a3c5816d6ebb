//! `POST /webhooks/stripe` on the admin listener: Stripe's signed events, verified on the raw
//! body, then handed to [`crate::stripe::events`] (each done exactly once).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;

use super::billing::stripe_config;
use super::components::Internal;
use super::error::AdminError;
use super::schemas::{StripeEvent, WebhookAck};
use crate::state::AppState;
use crate::stripe::{events, webhook};

/// `POST /webhooks/stripe`: no admin token; the raw body is verified against
/// `Stripe-Signature` before anything is parsed.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "webhooks",
    operation_id = "stripeWebhook",
    summary = "Stripe events (no admin token; Stripe-Signature verified)",
    description = "Point a Stripe webhook endpoint here. The raw body is verified against the \
        `Stripe-Signature` header (HMAC-SHA256 under `[stripe] webhook_secret_env`, any `v1` \
        signature may match, `t` within 300 s of tollgate's clock) before anything is parsed. \
        Events are deduplicated by id and applied once. Handled types: \
        `checkout.session.completed`, `invoice.paid`, `invoice.payment_succeeded`, \
        `invoice.payment_failed`, `customer.subscription.updated`, \
        `customer.subscription.deleted`, `charge.refunded`; any other event, a session tollgate \
        did not create, or an unknown account is acknowledged with 200 and ignored.",
    security(()),
    params(("Stripe-Signature" = String, Header,
        description = "`t=<unix seconds>,v1=<hex HMAC-SHA256 of \"{t}.{raw body}\">[,v1=…][,v0=…]`",
        example = "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd")),
    request_body(content = StripeEvent, content_type = "application/json",
        description = "A Stripe event, read as raw bytes whatever the `Content-Type`; parsed \
            leniently (only the fields tollgate uses)."),
    responses(
        (status = 200, description = "The event was processed (or recorded and ignored).",
            body = WebhookAck),
        (status = 400, description = "`invalid_signature`: the `Stripe-Signature` header is \
            missing, malformed, matches no `v1` signature, or is outside the 300 s tolerance; \
            `invalid_request`: the body is not JSON or lacks `id`, `type`, `created` or \
            `data.object`. Nothing changed.", body = AdminError),
        (status = 500, response = Internal),
        (status = 503, description = "`stripe_not_configured`: no `[stripe]` section, or its \
            webhook secret is not set.", body = AdminError),
    )
)]
pub async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookAck>, AdminError> {
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
    Ok(Json(WebhookAck {
        received: true,
        event_id: event.id,
        kind: event.kind,
        outcome: processed.outcome.label(),
        detail: processed.outcome.detail().map(str::to_string),
    }))
}
