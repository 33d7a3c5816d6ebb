//! `/_tollgate/v1/*` on the proxy listener: a caller's own balance (and usage), answered with
//! the caller's own credential, never forwarded.

use pingora::proxy::Session;
use serde_json::json;

use crate::auth::Identity;
use crate::error::GatewayError;
use crate::money::Credits;
use crate::state::{AppState, Snapshot};

pub const PREFIX: &str = "/_tollgate/";

/// Answers a self-service call; `Err` is the error to send instead.
pub async fn answer(
    state: &AppState,
    snap: &Snapshot,
    session: &Session,
    identity: &Identity,
) -> Result<(u16, serde_json::Value), GatewayError> {
    let req = session.req_header();
    let path = req.uri.path();
    if req.method != http::Method::GET {
        return Err(GatewayError::RouteNotFound {
            method: req.method.to_string(),
            path: path.to_string(),
        });
    }
    match path {
        "/_tollgate/v1/balance" => balance(state, snap, identity).await.map(|b| (200, b)),
        "/_tollgate/v1/usage" => usage(state, identity, req.uri.query()).await,
        _ => Err(GatewayError::RouteNotFound {
            method: req.method.to_string(),
            path: path.to_string(),
        }),
    }
}

async fn usage(
    state: &AppState,
    identity: &Identity,
    query: Option<&str>,
) -> Result<(u16, serde_json::Value), GatewayError> {
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    match crate::domain::usage::account_usage(state, &identity.account_id, &q).await {
        Ok(body) => Ok((200, body)),
        Err(crate::domain::DomainError::Invalid(message)) => {
            Ok((400, json!({"error": "invalid_request", "message": message})))
        }
        Err(e) => {
            tracing::error!(error = %e, "usage lookup failed");
            Err(GatewayError::MeteringUnavailable)
        }
    }
}

async fn balance(
    state: &AppState,
    snap: &Snapshot,
    identity: &Identity,
) -> Result<serde_json::Value, GatewayError> {
    let account = crate::domain::accounts::live_state(state, &snap.config, &identity.account_id)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "balance lookup failed");
            GatewayError::MeteringUnavailable
        })?;
    let Some(account) = account else {
        return Err(GatewayError::InvalidCredentials);
    };
    let tier = snap.config.tier(&account.tier);
    let low = tier
        .and_then(|t| t.low_balance_credits())
        .is_some_and(|threshold| account.total() < threshold);
    let unlimited =
        tier.is_some_and(|t| t.monthly_credits() == crate::config::MonthlyCredits::Unlimited);
    Ok(json!({
        "account_id": identity.account_id,
        "tier": account.tier,
        "status": account.status,
        "balance": {
            "allowance": account.allowance,
            "purchased": account.purchased,
            "total": account.total(),
        },
        "unlimited": unlimited,
        "low_balance": low,
        "period_end": chrono::DateTime::from_timestamp(account.period_end, 0),
        "currency_unit": "credits",
        "micro_credits_per_credit": Credits::from_credits(1).map_or(0, Credits::micros),
    }))
}
