//! Manual grants: credits into the `purchased` bucket (never expire), idempotent on
//! `idempotency_key`: the same key twice credits once, even across retries after a crash
//! (Postgres records the grant, a Redis mark guards the credit itself).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::extract::JsonBody;
use crate::ledger::reconcile::{RecordedCredit, CREATED_MS};
use crate::ledger::{self, CreditOutcome};
use crate::money::Credits;
use crate::state::AppState;

/// The largest single grant, in credits. Balances must stay where micro-credit integers are
/// exact in the ledger scripts (below 2^53 µc ≈ 9 billion credits); a typo like an extra
/// dozen zeros is refused here with a clear 400 instead of failing in Redis.
const MAX_GRANT_CREDITS: i64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    pub credits: Credits,
    pub reason: String,
    pub idempotency_key: String,
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    JsonBody(body): JsonBody<NewGrant>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    if body.credits.micros() <= 0 {
        return Err(AdminError::BadRequest(
            "credits must be greater than 0".into(),
        ));
    }
    if Credits::from_credits(MAX_GRANT_CREDITS).is_some_and(|max| body.credits > max) {
        return Err(AdminError::BadRequest(format!(
            "credits must be at most {MAX_GRANT_CREDITS} per grant"
        )));
    }
    let reason = body.reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(AdminError::BadRequest(
            "reason must be 1-500 characters".into(),
        ));
    }
    let key = body.idempotency_key.trim();
    if key.is_empty() || key.len() > 200 {
        return Err(AdminError::BadRequest(
            "idempotency_key must be 1-200 characters".into(),
        ));
    }
    let config = state.config();
    if super::accounts::live_state(&state, &config, &account_id)
        .await?
        .is_none()
    {
        return Err(AdminError::NotFound(format!("no account {account_id:?}")));
    }

    // The record's time dates the journal entry (the same whoever applies it: `reconcile`).
    let inserted: Option<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO grants (account_id, idempotency_key, credits, reason) VALUES ($1, $2, $3, $4)
         ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING {CREATED_MS}"
    ))
    .bind(&account_id)
    .bind(key)
    .bind(body.credits.micros())
    .bind(reason)
    .fetch_optional(&state.pg)
    .await?;
    let mut credit = RecordedCredit::grant(
        &account_id,
        key,
        body.credits,
        reason,
        inserted.unwrap_or_default(),
    );
    if inserted.is_none() {
        let (credits, applied, stored_reason, recorded_ms): (i64, bool, String, i64) =
            sqlx::query_as(&format!(
                "SELECT credits, applied, reason, {CREATED_MS} FROM grants
                  WHERE account_id = $1 AND idempotency_key = $2"
            ))
            .bind(&account_id)
            .bind(key)
            .fetch_one(&state.pg)
            .await?;
        if credits != body.credits.micros() {
            return Err(AdminError::Conflict(format!(
                "idempotency_key {key:?} was already used for a grant of {} credits",
                Credits::from_micros(credits)
            )));
        }
        if applied {
            // The same answer as the first time (201), as idempotent APIs do; `duplicate`
            // tells the two apart.
            let live = super::accounts::live_state(&state, &config, &account_id).await?;
            return Ok((
                StatusCode::CREATED,
                Json(grant_json(&account_id, &body, key, true, live)),
            ));
        }
        // Recorded but not applied (a crash in between): apply now, as recorded; the Redis
        // mark makes this safe if the first attempt did reach Redis.
        credit = RecordedCredit::grant(&account_id, key, body.credits, &stored_reason, recorded_ms);
    }

    let mut conn = state.redis.clone();
    let outcome = state.ledger.credit(&mut conn, &credit.request()).await?;
    if outcome == CreditOutcome::Missing {
        return Err(AdminError::Unavailable(
            "account vanished from Redis during the grant".into(),
        ));
    }
    sqlx::query("UPDATE grants SET applied = true WHERE account_id = $1 AND idempotency_key = $2")
        .bind(&account_id)
        .bind(key)
        .execute(&state.pg)
        .await?;
    tracing::info!(account = %account_id, credits = %body.credits, key, "grant applied");
    let live = super::accounts::live_state(&state, &config, &account_id).await?;
    let duplicate = matches!(outcome, CreditOutcome::Duplicate { .. });
    Ok((
        StatusCode::CREATED,
        Json(grant_json(&account_id, &body, key, duplicate, live)),
    ))
}

fn grant_json(
    account_id: &str,
    body: &NewGrant,
    key: &str,
    duplicate: bool,
    live: Option<ledger::AccountState>,
) -> Value {
    json!({
        "account_id": account_id,
        "credits": body.credits,
        "reason": body.reason.trim(),
        "idempotency_key": key,
        "duplicate": duplicate,
        "balance": live.map(|l| json!({
            "allowance": l.allowance,
            "purchased": l.purchased,
            "total": l.total(),
        })),
    })
}
