//! Admin API errors: one HTTP status and one stable code per variant, JSON bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The tier's `max_keys` seats are all taken.
    #[error("the {tier} tier has {limit} seats (active API keys) and all are taken; revoke a key or upgrade")]
    SeatLimit { tier: String, limit: u32 },
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
    #[error("a backing store is unavailable")]
    Unavailable(String),
    /// Postgres does not answer (down, or the schema not migrated yet): the call needs it,
    /// the data plane does not. Answered within the pool's short acquire timeout.
    #[error("Postgres is unavailable; this call needs it (the proxy keeps serving from Redis), retry later")]
    PostgresUnavailable(String),
    #[error("internal error")]
    Internal(String),
    /// Stripe refused a call, failed, or did not answer in time (the message says which).
    #[error("{0}")]
    Stripe(String),
    /// A Stripe feature was called but `[stripe]` is not configured.
    #[error("{0}")]
    StripeNotConfigured(String),
    /// A Stripe webhook whose `Stripe-Signature` does not verify (forged, stale, missing).
    #[error("{0}")]
    InvalidSignature(String),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AdminError::BadRequest(_) | AdminError::UnknownTier(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) | AdminError::SeatLimit { .. } => StatusCode::CONFLICT,
            AdminError::Unavailable(_) | AdminError::PostgresUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Stripe(_) => StatusCode::BAD_GATEWAY,
            AdminError::StripeNotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::InvalidSignature(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized(_) => "unauthorized",
            AdminError::BadRequest(_) => "invalid_request",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::SeatLimit { .. } => "seat_limit_reached",
            AdminError::UnknownTier(_) => "unknown_tier",
            AdminError::Unavailable(_) | AdminError::PostgresUnavailable(_) => "store_unavailable",
            AdminError::Internal(_) => "internal_error",
            AdminError::Stripe(_) => "stripe_error",
            AdminError::StripeNotConfigured(_) => "stripe_not_configured",
            AdminError::InvalidSignature(_) => "invalid_signature",
        }
    }
}

impl From<sqlx::Error> for AdminError {
    fn from(e: sqlx::Error) -> Self {
        if postgres_unreachable(&e) {
            AdminError::PostgresUnavailable(e.to_string())
        } else {
            AdminError::Internal(e.to_string())
        }
    }
}

/// Errors that mean "Postgres cannot be used now" rather than a bug: no connection (down, a
/// wrong URL, refused credentials, a missing database), shutting down, or the schema not
/// migrated yet (it is, in the background, once Postgres answers).
fn postgres_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 28: invalid authorization, 3D000: no such database,
            // 57P0x: shutting down / cannot connect now, 53300: too many connections,
            // 42P01: undefined table (before the migrations ran).
            code.starts_with("08")
                || code.starts_with("28")
                || code.starts_with("57P0")
                || matches!(code.as_ref(), "3D000" | "53300" | "42P01")
        }),
        _ => false,
    }
}

impl From<redis::RedisError> for AdminError {
    fn from(e: redis::RedisError) -> Self {
        AdminError::Unavailable(e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match &self {
            AdminError::PostgresUnavailable(detail) => {
                // Expected during an outage (the probe logs it once): not an error per call.
                tracing::debug!(code = self.code(), %detail, "admin request needs Postgres");
            }
            AdminError::Unavailable(detail) | AdminError::Internal(detail) => {
                tracing::error!(code = self.code(), %detail, "admin request failed");
            }
            AdminError::Stripe(detail) => {
                tracing::warn!(code = self.code(), %detail, "Stripe call failed");
            }
            _ => {}
        }
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        if let AdminError::PostgresUnavailable(_) = self {
            body["dependency"] = json!("postgres");
        }
        (self.status(), Json(body)).into_response()
    }
}

impl From<crate::ledger::LedgerError> for AdminError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        match e {
            crate::ledger::LedgerError::NoSuchAccount(id) => {
                AdminError::NotFound(format!("no account {id:?}"))
            }
            crate::ledger::LedgerError::UnknownTier { account, tier } => {
                AdminError::Conflict(format!(
                    "account {account:?} is on tier {tier:?}, which the config does not define"
                ))
            }
            other => AdminError::Unavailable(other.to_string()),
        }
    }
}
