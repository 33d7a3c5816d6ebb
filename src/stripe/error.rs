//! What a Stripe API call can fail with. Stripe knows nothing of HTTP answers: the admin API
//! and the portal map these to their status codes at their edge (`502 stripe_error`, …).

/// A failed Stripe call (or one that could not be made).
#[derive(Debug, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe refused a call, failed, or did not answer in time (the message says which).
    #[error("{0}")]
    Call(String),
    /// A Stripe feature was called but `[stripe]` (or its secret key) is not configured.
    #[error("{0}")]
    NotConfigured(String),
    /// The call's own input was unusable (an idempotency key Stripe would refuse).
    #[error("{0}")]
    Invalid(String),
    /// Postgres (where the account's customer id is remembered) failed.
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
}
