//! What a domain call can fail with, without HTTP: the admin API, the portal, the console and
//! the proxy's self-service endpoints each map these to their own answers at their edge.

/// A failed domain call. The messages are shown to callers as they are.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The caller's input is unusable (the message says why).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts what is stored (an id taken, an idempotency key reused).
    #[error("{0}")]
    Conflict(String),
    /// The tier's `max_keys` seats are all taken.
    #[error("the {tier} tier has {limit} seats (active API keys) and all are taken; revoke a key or upgrade")]
    SeatLimit { tier: String, limit: u32 },
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
    /// Redis (or Postgres where the message says so) failed.
    #[error("a backing store is unavailable")]
    Unavailable(String),
    /// Postgres does not answer (down, or the schema not migrated yet): the call needs it,
    /// the data plane does not.
    #[error("Postgres is unavailable; this call needs it (the proxy keeps serving from Redis), retry later")]
    PostgresUnavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl From<sqlx::Error> for DomainError {
    fn from(e: sqlx::Error) -> Self {
        if postgres_unreachable(&e) {
            DomainError::PostgresUnavailable(e.to_string())
        } else {
            DomainError::Internal(e.to_string())
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

impl From<redis::RedisError> for DomainError {
    fn from(e: redis::RedisError) -> Self {
        DomainError::Unavailable(e.to_string())
    }
}

impl From<crate::ledger::LedgerError> for DomainError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        match e {
            crate::ledger::LedgerError::NoSuchAccount(id) => {
                DomainError::NotFound(format!("no account {id:?}"))
            }
            crate::ledger::LedgerError::UnknownTier { account, tier } => {
                DomainError::Conflict(format!(
                    "account {account:?} is on tier {tier:?}, which the config does not define"
                ))
            }
            other => DomainError::Unavailable(other.to_string()),
        }
    }
}
