//! The admin API (axum) on `admin_listen`: never public, every `/v1` call carries the admin
//! token. Health and readiness answer without it, for load balancers and probes.

pub mod accounts;
pub mod billing;
pub mod components;
pub mod config;
pub mod error;
pub mod extract;
pub mod grants;
pub mod health;
pub mod keys;
pub mod openapi;
pub mod portal;
pub mod proration;
pub mod reports;
pub mod schemas;
pub mod stripe_webhook;
pub mod subscription;
pub mod subscription_preview;
pub mod usage;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::Router;
use subtle::ConstantTimeEq;

use crate::state::AppState;
use error::AdminError;

/// The admin API's routes; the server adds the operator console beside them.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/accounts", post(accounts::create))
        .route("/v1/accounts/{id}", get(accounts::get))
        .route("/v1/accounts/{id}/tier", put(accounts::set_tier))
        .route("/v1/accounts/{id}/status", put(accounts::set_status))
        .route("/v1/accounts/{id}/grants", post(grants::create))
        .route("/v1/accounts/{id}/keys", post(keys::create))
        .route("/v1/accounts/{id}/usage", get(usage::get_usage))
        .route("/v1/accounts/{id}/ledger", get(usage::get_ledger))
        .route("/v1/keys/{key_id}", delete(keys::revoke))
        .route("/v1/catalog", get(billing::catalog))
        .route("/v1/checkout/credit-packs", post(billing::checkout_pack))
        .route(
            "/v1/checkout/subscriptions",
            post(billing::checkout_subscription),
        )
        .route(
            "/v1/accounts/{id}/subscription",
            get(subscription::get_subscription).put(subscription::change_subscription),
        )
        .route(
            "/v1/accounts/{id}/subscription/preview",
            get(subscription_preview::get_preview),
        )
        .route(
            "/v1/accounts/{id}/subscription/cancel",
            post(subscription::cancel_subscription),
        )
        .route("/v1/reports/revenue", get(reports::revenue))
        .route("/v1/config/reload", post(config::reload))
        .route("/v1/accounts/{id}/portal-sessions", post(portal::create))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        // Stripe signs its webhooks (checked on the raw body); no admin token.
        .route("/webhooks/stripe", post(stripe_webhook::receive))
        .merge(v1)
        .fallback(|| async { AdminError::NotFound("no such admin endpoint".into()) })
        .with_state(state)
}

/// `Authorization: Bearer <admin token>`, compared in constant time.
async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let config = state.config();
    let expected = config.admin_token.as_deref().unwrap_or_default();
    match presented {
        Some(token)
            if !expected.is_empty() && bool::from(token.as_bytes().ct_eq(expected.as_bytes())) =>
        {
            Ok(next.run(req).await)
        }
        Some(_) => Err(AdminError::Unauthorized("invalid admin token")),
        None => Err(AdminError::Unauthorized(
            "send Authorization: Bearer <admin token>",
        )),
    }
}
