//! What the event families share in Postgres: the event log (`stripe_events`: a redelivery is
//! found, an event is claimed once and its outcome recorded), which account an object belongs
//! to, the Stripe customer of an account, an account's tier row and the subscription row.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

type Tx<'a, 't> = &'a mut Transaction<'t, Postgres>;

/// Whether this event id was processed (or is being processed) already.
pub(super) async fn seen(pg: &PgPool, event_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM stripe_events WHERE event_id = $1)")
        .bind(event_id)
        .fetch_one(pg)
        .await
}

/// Claims the event for this transaction: false when another delivery has it (a concurrent
/// duplicate waits on the primary key until the first commits, then finds it).
pub(super) async fn claim(
    tx: Tx<'_, '_>,
    event_id: &str,
    kind: &str,
    created: DateTime<Utc>,
    account_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO stripe_events (event_id, type, created, outcome, account_id)
         VALUES ($1, $2, $3, 'processing', $4) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(kind)
    .bind(created)
    .bind(account_id)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Records how the event ended and the object it was about.
pub(super) async fn finish(
    tx: Tx<'_, '_>,
    event_id: &str,
    outcome: &str,
    object_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE stripe_events SET outcome = $2, object_id = $3 WHERE event_id = $1")
        .bind(event_id)
        .bind(outcome)
        .bind(object_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The account of a subscription tollgate recorded.
pub(super) async fn account_of_subscription(
    pg: &PgPool,
    subscription_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT account_id FROM subscriptions WHERE subscription_id = $1")
        .bind(subscription_id)
        .fetch_optional(pg)
        .await
}

/// The account of a credit-pack purchase, by its payment intent.
pub(super) async fn account_of_payment(
    pg: &PgPool,
    payment_intent: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT account_id FROM purchases WHERE payment_intent_id = $1 LIMIT 1")
        .bind(payment_intent)
        .fetch_optional(pg)
        .await
}

/// The account of a Stripe customer.
pub(super) async fn account_of_customer(
    pg: &PgPool,
    customer_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT account_id FROM stripe_customers WHERE customer_id = $1")
        .bind(customer_id)
        .fetch_optional(pg)
        .await
}

/// Remembers an account's Stripe customer (the first one stays).
pub(super) async fn remember_customer(
    tx: Tx<'_, '_>,
    account_id: &str,
    customer_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stripe_customers (account_id, customer_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(account_id)
    .bind(customer_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The account's tier, its row locked for this transaction.
pub(super) async fn lock_tier(tx: Tx<'_, '_>, account_id: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account_id)
        .fetch_one(&mut **tx)
        .await
}

pub(super) async fn set_tier(
    tx: Tx<'_, '_>,
    account_id: &str,
    tier: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE accounts SET tier = $2, updated_at = now() WHERE id = $1")
        .bind(account_id)
        .bind(tier)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A subscription as an event first describes it.
pub(super) struct NewSubscription<'a> {
    pub id: &'a str,
    pub account_id: &'a str,
    pub customer_id: Option<&'a str>,
    pub tier: &'a str,
    pub interval: &'a str,
    pub price_id: Option<&'a str>,
    pub amount_cents: Option<i64>,
    pub currency: Option<&'a str>,
    pub status: &'a str,
}

/// The subscription row, locked for this transaction.
#[derive(sqlx::FromRow)]
pub(super) struct SubRow {
    pub status: String,
    pub plan_event_at: DateTime<Utc>,
    pub payment_event_at: DateTime<Utc>,
    /// Inserted by this event (no event applied to it yet).
    pub fresh: bool,
}

impl SubRow {
    /// Ended before this event: nothing revives it.
    pub fn ended(&self) -> bool {
        self.status == "canceled" && !self.fresh
    }
}

/// Inserts the subscription row if it is new (timestamps at the epoch, so the event that
/// created it applies) and locks it.
pub(super) async fn lock_subscription(
    tx: Tx<'_, '_>,
    s: &NewSubscription<'_>,
) -> Result<SubRow, sqlx::Error> {
    sqlx::query(
        "INSERT INTO subscriptions (subscription_id, account_id, customer_id, tier, billing_interval,
             price_id, amount_cents, currency, status, plan_event_at, payment_event_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp(0), to_timestamp(0))
         ON CONFLICT (subscription_id) DO NOTHING",
    )
    .bind(s.id)
    .bind(s.account_id)
    .bind(s.customer_id)
    .bind(s.tier)
    .bind(s.interval)
    .bind(s.price_id)
    .bind(s.amount_cents)
    .bind(s.currency)
    .bind(s.status)
    .execute(&mut **tx)
    .await?;
    sqlx::query_as::<_, SubRow>(
        "SELECT status, plan_event_at, payment_event_at,
                (plan_event_at = to_timestamp(0) AND payment_event_at = to_timestamp(0)) AS fresh
           FROM subscriptions WHERE subscription_id = $1 FOR UPDATE",
    )
    .bind(s.id)
    .fetch_one(&mut **tx)
    .await
}
