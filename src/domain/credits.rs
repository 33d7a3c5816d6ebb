//! Credits given by hand: manual grants into the `purchased` bucket (never expire),
//! idempotent on the caller's key: the same key twice credits once, even across retries after
//! a crash (Postgres records the grant, a Redis mark guards the credit itself).

use super::DomainError;
use crate::ledger::reconcile::{RecordedCredit, CREATED_MS};
use crate::ledger::{self, CreditOutcome};
use crate::money::Credits;
use crate::state::AppState;

/// The largest single grant, in credits. Balances must stay where micro-credit integers are
/// exact in the ledger scripts (below 2^53 µc ≈ 9 billion credits); a typo like an extra
/// dozen zeros is refused here with a clear 400 instead of failing in Redis.
pub const MAX_GRANT_CREDITS: i64 = 1_000_000_000;

/// A grant applied (now or by an earlier call with the same key).
pub struct Granted {
    /// An earlier call with this key already credited it.
    pub duplicate: bool,
    /// The balance after it, if Redis holds the account.
    pub live: Option<ledger::AccountState>,
}

/// Grants `credits` to `account_id` once per `idempotency_key` (both it and `reason` are
/// trimmed). A key reused with another amount is a `Conflict`.
pub async fn grant(
    state: &AppState,
    account_id: &str,
    credits: Credits,
    reason: &str,
    idempotency_key: &str,
) -> Result<Granted, DomainError> {
    if credits.micros() <= 0 {
        return Err(DomainError::Invalid(
            "credits must be greater than 0".into(),
        ));
    }
    if Credits::from_credits(MAX_GRANT_CREDITS).is_some_and(|max| credits > max) {
        return Err(DomainError::Invalid(format!(
            "credits must be at most {MAX_GRANT_CREDITS} per grant"
        )));
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(DomainError::Invalid(
            "reason must be 1-500 characters".into(),
        ));
    }
    let key = idempotency_key.trim();
    if key.is_empty() || key.len() > 200 {
        return Err(DomainError::Invalid(
            "idempotency_key must be 1-200 characters".into(),
        ));
    }
    let config = state.config();
    if super::accounts::live_state(state, &config, account_id)
        .await?
        .is_none()
    {
        return Err(DomainError::NotFound(format!("no account {account_id:?}")));
    }

    // The record's time dates the journal entry (the same whoever applies it: `reconcile`).
    let inserted: Option<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO grants (account_id, idempotency_key, credits, reason) VALUES ($1, $2, $3, $4)
         ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING {CREATED_MS}"
    ))
    .bind(account_id)
    .bind(key)
    .bind(credits.micros())
    .bind(reason)
    .fetch_optional(&state.pg)
    .await?;
    let mut credit = RecordedCredit::grant(
        account_id,
        key,
        credits,
        reason,
        inserted.unwrap_or_default(),
    );
    if inserted.is_none() {
        let (stored, applied, stored_reason, recorded_ms): (i64, bool, String, i64) =
            sqlx::query_as(&format!(
                "SELECT credits, applied, reason, {CREATED_MS} FROM grants
                  WHERE account_id = $1 AND idempotency_key = $2"
            ))
            .bind(account_id)
            .bind(key)
            .fetch_one(&state.pg)
            .await?;
        if stored != credits.micros() {
            return Err(DomainError::Conflict(format!(
                "idempotency_key {key:?} was already used for a grant of {} credits",
                Credits::from_micros(stored)
            )));
        }
        if applied {
            // The same answer as the first time (201), as idempotent APIs do; `duplicate`
            // tells the two apart.
            let live = super::accounts::live_state(state, &config, account_id).await?;
            return Ok(Granted {
                duplicate: true,
                live,
            });
        }
        // Recorded but not applied (a crash in between): apply now, as recorded; the Redis
        // mark makes this safe if the first attempt did reach Redis.
        credit = RecordedCredit::grant(account_id, key, credits, &stored_reason, recorded_ms);
    }

    let mut conn = state.redis.clone();
    let outcome = state.ledger.credit(&mut conn, &credit.request()).await?;
    if outcome == CreditOutcome::Missing {
        return Err(DomainError::Unavailable(
            "account vanished from Redis during the grant".into(),
        ));
    }
    sqlx::query("UPDATE grants SET applied = true WHERE account_id = $1 AND idempotency_key = $2")
        .bind(account_id)
        .bind(key)
        .execute(&state.pg)
        .await?;
    tracing::info!(account = %account_id, credits = %credits, key, "grant applied");
    let live = super::accounts::live_state(state, &config, account_id).await?;
    let duplicate = matches!(outcome, CreditOutcome::Duplicate { .. });
    Ok(Granted { duplicate, live })
}
