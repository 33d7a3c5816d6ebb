//! Admin API errors: one HTTP status and one stable code per variant, JSON bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::domain::DomainError;
use crate::stripe::error::StripeCallError;

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
        AdminError::from(DomainError::from(e))
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
        AdminError::from(DomainError::from(e))
    }
}

/// The edge of the domain core: each domain failure keeps its message and gets its status.
impl From<DomainError> for AdminError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Invalid(m) => AdminError::BadRequest(m),
            DomainError::NotFound(m) => AdminError::NotFound(m),
            DomainError::Conflict(m) => AdminError::Conflict(m),
            DomainError::SeatLimit { tier, limit } => AdminError::SeatLimit { tier, limit },
            DomainError::UnknownTier(t) => AdminError::UnknownTier(t),
            DomainError::Unavailable(m) => AdminError::Unavailable(m),
            DomainError::PostgresUnavailable(m) => AdminError::PostgresUnavailable(m),
            DomainError::Internal(m) => AdminError::Internal(m),
        }
    }
}

impl From<StripeCallError> for AdminError {
    fn from(e: StripeCallError) -> Self {
        match e {
            StripeCallError::Call(m) => AdminError::Stripe(m),
            StripeCallError::NotConfigured(m) => AdminError::StripeNotConfigured(m),
            StripeCallError::Invalid(m) => AdminError::BadRequest(m),
            StripeCallError::Postgres(e) => AdminError::from(e),
        }
    }
}
