//! Credits sold: a credit pack bought (recorded once per Checkout Session) and a refund of it
//! (clawed back pro rata, once per refund state). Recorded in the caller's transaction; the
//! returned [`RecordedCredit`] is what the caller applies to Redis before it commits.

use sqlx::{Postgres, Transaction};

use super::DomainError;
use crate::config::raw::CreditPack;
use crate::ledger::reconcile::{RecordedCredit, CREATED_MS};
use crate::money::{mul_div_ceil, Credits};

/// A paid Checkout Session for a credit pack.
pub struct PackPurchase<'a> {
    pub session_id: &'a str,
    pub account_id: &'a str,
    pub pack: &'a CreditPack,
    /// What was paid, in the currency's minor units.
    pub amount_cents: i64,
    pub currency: &'a str,
    pub payment_intent: Option<&'a str>,
    pub event_id: &'a str,
}

/// Records the purchase; the credit to apply (credits + bonus into `purchased`), or `None`
/// when this session was recorded before.
pub async fn record_purchase(
    tx: &mut Transaction<'_, Postgres>,
    p: &PackPurchase<'_>,
) -> Result<Option<RecordedCredit>, DomainError> {
    let inserted: Option<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO purchases (session_id, account_id, pack_id, credits, bonus_credits,
             amount_cents, currency, payment_intent_id, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (session_id) DO NOTHING
         RETURNING {CREATED_MS}"
    ))
    .bind(p.session_id)
    .bind(p.account_id)
    .bind(&p.pack.id)
    .bind(p.pack.credits.micros())
    .bind(p.pack.bonus_credits.micros())
    .bind(p.amount_cents)
    .bind(p.currency)
    .bind(p.payment_intent)
    .bind(p.event_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(inserted.map(|recorded_ms| {
        RecordedCredit::purchase(
            p.account_id,
            p.session_id,
            &p.pack.id,
            p.pack.credits + p.pack.bonus_credits,
            recorded_ms,
        )
    }))
}

/// A refund state of a charge, as Stripe reports it (cumulative).
pub struct ChargeRefund<'a> {
    pub charge_id: &'a str,
    pub payment_intent: &'a str,
    pub account_id: &'a str,
    /// The charge's amount and the amount refunded so far, in minor units.
    pub amount_cents: i64,
    pub refunded_cents: i64,
    pub event_id: &'a str,
}

/// What a refund state does to the credits.
#[derive(Debug)]
pub enum Clawback {
    /// Take this back (an `adjustment` journal entry).
    Apply(RecordedCredit),
    /// The charge did not buy a credit pack of this account.
    NotAPurchase,
    /// Nothing refunded (or no amount).
    NothingRefunded,
    /// This refund state was recorded before.
    AlreadyApplied,
    /// An earlier (smaller) refund state arriving after a larger one: recorded, nothing taken.
    Stale,
}

/// Records a refund state and computes the clawback: the pack's credits and bonus taken back
/// pro rata to `refunded / amount` (cumulative, so partial refunds add up exactly to the
/// whole pack, rounded up, even below zero), less what earlier states took.
pub async fn claw_back(
    tx: &mut Transaction<'_, Postgres>,
    r: &ChargeRefund<'_>,
) -> Result<Clawback, DomainError> {
    let purchase: Option<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT session_id, credits, bonus_credits, clawed_back FROM purchases
         WHERE payment_intent_id = $1 AND account_id = $2 FOR UPDATE",
    )
    .bind(r.payment_intent)
    .bind(r.account_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((session_id, credits, bonus, clawed_back)) = purchase else {
        return Ok(Clawback::NotAPurchase);
    };
    let amount = r.amount_cents;
    let refunded = r.refunded_cents.min(amount);
    if amount <= 0 || refunded <= 0 {
        return Ok(Clawback::NothingRefunded);
    }
    let inserted: Option<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO purchase_refunds
             (charge_id, amount_refunded, session_id, clawed_back, event_id, charge_amount_cents)
         VALUES ($1, $2, $3, 0, $4, $5) ON CONFLICT DO NOTHING
         RETURNING {CREATED_MS}"
    ))
    .bind(r.charge_id)
    .bind(refunded)
    .bind(&session_id)
    .bind(r.event_id)
    .bind(amount)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(recorded_ms) = inserted else {
        return Ok(Clawback::AlreadyApplied);
    };
    let total = Credits::from_micros(credits) + Credits::from_micros(bonus);
    let Some(target) = mul_div_ceil(total, refunded as u64, amount as u64) else {
        return Err(DomainError::Invalid(format!(
            "a refund of {refunded} of {amount} cents is out of range for {total} credits"
        )));
    };
    let delta = target - Credits::from_micros(clawed_back);
    sqlx::query(
        "UPDATE purchases SET refunded_cents = GREATEST(refunded_cents, $2),
             clawed_back = clawed_back + GREATEST($3, 0)
         WHERE session_id = $1",
    )
    .bind(&session_id)
    .bind(refunded)
    .bind(delta.micros())
    .execute(&mut **tx)
    .await?;
    if delta.micros() <= 0 {
        return Ok(Clawback::Stale);
    }
    sqlx::query(
        "UPDATE purchase_refunds SET clawed_back = $3 WHERE charge_id = $1 AND amount_refunded = $2",
    )
    .bind(r.charge_id)
    .bind(refunded)
    .bind(delta.micros())
    .execute(&mut **tx)
    .await?;
    Ok(Clawback::Apply(RecordedCredit::clawback(
        r.account_id,
        r.charge_id,
        &session_id,
        refunded,
        amount,
        delta,
        recorded_ms,
    )))
}
