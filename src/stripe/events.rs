//! What each Stripe event does, exactly once.
//!
//! One transaction per event: insert the event id into `stripe_events` (a redelivery finds it
//! and stops; a concurrent duplicate waits on the primary key until the first commits), insert
//! the business row keyed on the Stripe object (purchase per Checkout Session, invoice, refund
//! state; a second event about the same object stops there), apply the Redis effect (itself
//! idempotent on the object, by a mark), commit. A Redis failure rolls everything back and
//! answers 500, so Stripe retries; if the failed attempt did reach Redis, the mark turns the
//! retry's effect into a no-op. Events about a subscription carry Stripe's `created` time,
//! stored per facet (plan, payment) on the `subscriptions` row: an older event arriving late is
//! recorded and changes nothing.

use std::time::Duration;

use chrono::{DateTime, Datelike, Months, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};

use super::catalog::{self, Interval};
use super::webhook::{at, bool_at, i64_at, id_at, str_at, Event};
use crate::config::Config;
use crate::ledger::billing::{RenewOutcome, Renewal};
use crate::ledger::reconcile::{RecordedCredit, CREATED_MS};
use crate::ledger::{self, CreditOutcome, CreditRequest, LedgerError};
use crate::money::{mul_div_ceil, Credits};
use crate::state::AppState;

/// How long Redis remembers an applied purchase, refund or renewal. Postgres remembers the
/// event and the object forever; the mark has to outlive Stripe's retries of one event and
/// the window in which lost credits are re-applied (`ledger::reconcile`).
const MARK_TTL: Duration = ledger::reconcile::STRIPE_MARK_TTL;

/// Subscription statuses in which the account should have the subscribed tier.
const LIVE: &[&str] = &["active", "trialing", "past_due"];

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Other(String),
}

/// How an event ended; recorded in `stripe_events.outcome` and answered to Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect was applied now.
    Applied,
    /// This event id was processed before (a redelivery): nothing done.
    Duplicate,
    /// Another event already applied the same object (session, invoice, refund state).
    AlreadyApplied,
    /// Older than what was already applied to the object: recorded, nothing changed.
    Stale,
    /// Not an event (or object) tollgate acts on; the reason.
    Ignored(String),
    /// Names an account tollgate does not have.
    UnknownAccount(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::AlreadyApplied => "already_applied",
            Outcome::Stale => "stale",
            Outcome::Ignored(_) => "ignored",
            Outcome::UnknownAccount(_) => "unknown_account",
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Outcome::Ignored(why) => Some(why),
            Outcome::UnknownAccount(id) => Some(id),
            _ => None,
        }
    }
}

/// The result of one event.
#[derive(Debug, Clone)]
pub struct Processed {
    pub outcome: Outcome,
    pub account_id: Option<String>,
}

fn ignored(why: impl Into<String>) -> Outcome {
    Outcome::Ignored(why.into())
}

fn time(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// The one call the webhook endpoint makes (after the signature check).
pub async fn process(state: &AppState, event: &Event) -> Result<Processed, HandlerError> {
    let config = state.config();
    // A redelivery stops here without touching Redis (the insert below is what decides).
    let seen: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM stripe_events WHERE event_id = $1)")
            .bind(&event.id)
            .fetch_one(&state.pg)
            .await?;
    if seen {
        return Ok(Processed {
            outcome: Outcome::Duplicate,
            account_id: None,
        });
    }
    let handled = matches!(
        event.kind.as_str(),
        "checkout.session.completed"
            | "checkout.session.async_payment_succeeded"
            | "invoice.paid"
            | "invoice.payment_succeeded"
            | "invoice.payment_failed"
            | "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "charge.refunded"
    );
    // Which account, and make sure Redis holds it, before the transaction: hydration reads
    // Postgres through the pool, and a transaction waiting on a second pooled connection could
    // starve the pool under a burst of webhooks.
    let account_id = if handled {
        resolve_account(&state.pg, event).await?
    } else {
        None
    };
    let known = match &account_id {
        Some(id) => crate::admin::accounts::live_state(state, &config, id)
            .await
            .map_err(|e| match e {
                LedgerError::UnknownTier { .. } => HandlerError::Other(e.to_string()),
                other => HandlerError::Ledger(other),
            })?
            .is_some(),
        None => false,
    };

    let mut tx = state.pg.begin().await?;
    let fresh = sqlx::query(
        "INSERT INTO stripe_events (event_id, type, created, outcome, account_id)
         VALUES ($1, $2, $3, 'processing', $4) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(time(event.created))
    .bind(&account_id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        tx.rollback().await?;
        return Ok(Processed {
            outcome: Outcome::Duplicate,
            account_id,
        });
    }

    let mut cx = Cx {
        state,
        config: &config,
        event,
        tx: &mut tx,
        tier_changed: None,
    };
    let outcome = match (&account_id, handled) {
        (_, false) => ignored(format!("{} events are not handled", event.kind)),
        (None, true) => ignored("no tollgate account found for this event's object"),
        (Some(id), true) if !known => Outcome::UnknownAccount(id.clone()),
        (Some(id), true) => match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                cx.checkout_completed(id).await?
            }
            "invoice.paid" | "invoice.payment_succeeded" => cx.invoice_paid(id).await?,
            "invoice.payment_failed" => cx.invoice_failed(id).await?,
            "charge.refunded" => cx.charge_refunded(id).await?,
            _ => cx.subscription_changed(id).await?,
        },
    };
    let tier_changed = cx.tier_changed.take();
    sqlx::query("UPDATE stripe_events SET outcome = $2, object_id = $3 WHERE event_id = $1")
        .bind(&event.id)
        .bind(outcome.label())
        .bind(str_at(&event.object, &["id"]))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    if let (Some(tier), Some(id)) = (tier_changed, &account_id) {
        // After the commit, so other instances re-read the new tier.
        let mut conn = state.redis.clone();
        crate::auth::invalidation::tier_changed(&mut conn, &config, &state.caches, id, &tier).await;
    }
    Ok(Processed {
        outcome,
        account_id,
    })
}

/// The tollgate account an event is about: from what tollgate put on the object
/// (`client_reference_id`, `metadata.account_id`, on the subscription too), else from what
/// tollgate recorded (the subscription, the purchase, the Stripe customer).
async fn resolve_account(pg: &PgPool, event: &Event) -> Result<Option<String>, sqlx::Error> {
    let o = &event.object;
    let direct = str_at(o, &["client_reference_id"])
        .or_else(|| str_at(o, &["metadata", "account_id"]))
        .or_else(|| {
            str_at(
                o,
                &["parent", "subscription_details", "metadata", "account_id"],
            )
        })
        .or_else(|| str_at(o, &["subscription_details", "metadata", "account_id"]))
        .filter(|id| crate::store::accounts::valid_id(id));
    if let Some(id) = direct {
        return Ok(Some(id.to_string()));
    }
    let subscription = match event.kind.as_str() {
        k if k.starts_with("customer.subscription.") => str_at(o, &["id"]),
        k if k.starts_with("invoice.") => invoice_subscription(o),
        _ => None,
    };
    if let Some(sub) = subscription {
        let found: Option<String> =
            sqlx::query_scalar("SELECT account_id FROM subscriptions WHERE subscription_id = $1")
                .bind(sub)
                .fetch_optional(pg)
                .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    if event.kind == "charge.refunded" {
        if let Some(pi) = id_at(o, &["payment_intent"]) {
            let found: Option<String> = sqlx::query_scalar(
                "SELECT account_id FROM purchases WHERE payment_intent_id = $1 LIMIT 1",
            )
            .bind(pi)
            .fetch_optional(pg)
            .await?;
            if found.is_some() {
                return Ok(found);
            }
        }
    }
    if let Some(customer) = id_at(o, &["customer"]) {
        return sqlx::query_scalar(
            "SELECT account_id FROM stripe_customers WHERE customer_id = $1",
        )
        .bind(customer)
        .fetch_optional(pg)
        .await;
    }
    Ok(None)
}

/// An invoice's subscription: `parent.subscription_details.subscription` (current API) or
/// `subscription` (before 2025).
fn invoice_subscription(inv: &Value) -> Option<&str> {
    id_at(inv, &["parent", "subscription_details", "subscription"])
        .or_else(|| id_at(inv, &["subscription"]))
}

/// The service period an invoice pays for: the latest-ending line with a real period.
fn invoice_period(inv: &Value) -> Option<(i64, i64)> {
    at(inv, &["lines", "data"])?
        .as_array()?
        .iter()
        .filter_map(|line| {
            let start = i64_at(line, &["period", "start"])?;
            let end = i64_at(line, &["period", "end"])?;
            (end > start).then_some((start, end))
        })
        .max_by_key(|&(_, end)| end)
}

/// The price of a subscription's (first) item, and the periods on it.
struct Item<'a> {
    price_id: Option<&'a str>,
    amount_cents: Option<i64>,
    currency: Option<&'a str>,
    interval: Option<&'a str>,
    period_start: Option<i64>,
    period_end: Option<i64>,
}

fn first_item(sub: &Value) -> Item<'_> {
    let item = at(sub, &["items", "data"])
        .and_then(|d| d.get(0))
        .unwrap_or(&Value::Null);
    Item {
        price_id: str_at(item, &["price", "id"]).or_else(|| str_at(item, &["plan", "id"])),
        amount_cents: i64_at(item, &["price", "unit_amount"]),
        currency: str_at(item, &["price", "currency"]),
        interval: str_at(item, &["price", "recurring", "interval"]),
        // Since 2025 the periods are on the items; before, on the subscription.
        period_start: i64_at(item, &["current_period_start"])
            .or_else(|| i64_at(sub, &["current_period_start"])),
        period_end: i64_at(item, &["current_period_end"])
            .or_else(|| i64_at(sub, &["current_period_end"])),
    }
}

/// The subscription row, locked for this transaction.
#[derive(sqlx::FromRow)]
struct SubRow {
    status: String,
    plan_event_at: DateTime<Utc>,
    payment_event_at: DateTime<Utc>,
    /// Inserted by this event (no event applied to it yet).
    fresh: bool,
}

impl SubRow {
    /// Ended before this event: nothing revives it.
    fn ended(&self) -> bool {
        self.status == "canceled" && !self.fresh
    }
}

/// The state one event works with.
struct Cx<'a, 't> {
    state: &'a AppState,
    config: &'a Config,
    event: &'a Event,
    tx: &'a mut Transaction<'t, Postgres>,
    /// The tier the event moved the account to, if it did.
    tier_changed: Option<String>,
}

impl Cx<'_, '_> {
    fn created(&self) -> DateTime<Utc> {
        time(self.event.created)
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        str_at(&self.event.object, &["metadata", key])
    }

    async fn remember_customer(&mut self, account_id: &str) -> Result<(), sqlx::Error> {
        if let Some(customer) = id_at(&self.event.object, &["customer"]) {
            sqlx::query(
                "INSERT INTO stripe_customers (account_id, customer_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(account_id)
            .bind(customer)
            .execute(&mut **self.tx)
            .await?;
        }
        Ok(())
    }

    // ----- checkout.session.completed / async_payment_succeeded -----------------------------

    async fn checkout_completed(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        match str_at(&self.event.object, &["mode"]) {
            Some("payment") => self.purchase(account_id).await,
            Some("subscription") => self.subscription_checkout(account_id).await,
            other => Ok(ignored(format!(
                "checkout mode {} is not sold by tollgate",
                other.unwrap_or("(none)")
            ))),
        }
    }

    /// A credit pack paid: credits + bonus into `purchased` (paying any debt first, since
    /// purchased may be negative), a `purchase` journal entry, a `purchases` row.
    async fn purchase(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let s = &self.event.object;
        let Some(session_id) = str_at(s, &["id"]) else {
            return Ok(ignored("the session has no id"));
        };
        let paid = str_at(s, &["payment_status"]);
        if paid != Some("paid") {
            // Delayed payment methods: checkout.session.async_payment_succeeded follows.
            return Ok(ignored(format!(
                "payment_status is {}, not paid",
                paid.unwrap_or("(none)")
            )));
        }
        let Some(pack_id) = self.metadata("pack_id") else {
            return Ok(ignored("the session carries no pack_id"));
        };
        let Some(pack) = catalog::pack(self.config, pack_id).cloned() else {
            tracing::error!(session = %session_id, pack = %pack_id, account = %account_id,
                "a paid Checkout Session names a credit pack the config no longer has; credit it by hand");
            return Ok(ignored(format!("unknown credit pack {pack_id:?}")));
        };
        let amount = i64_at(s, &["amount_total"])
            .unwrap_or_else(|| i64::try_from(pack.price_cents).unwrap_or(i64::MAX));
        let currency = str_at(s, &["currency"]).unwrap_or(&pack.currency);
        let inserted: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO purchases (session_id, account_id, pack_id, credits, bonus_credits,
                 amount_cents, currency, payment_intent_id, event_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (session_id) DO NOTHING
             RETURNING {CREATED_MS}"
        ))
        .bind(session_id)
        .bind(account_id)
        .bind(&pack.id)
        .bind(pack.credits.micros())
        .bind(pack.bonus_credits.micros())
        .bind(amount)
        .bind(currency)
        .bind(id_at(s, &["payment_intent"]))
        .bind(&self.event.id)
        .fetch_optional(&mut **self.tx)
        .await?;
        let Some(recorded_ms) = inserted else {
            return Ok(Outcome::AlreadyApplied);
        };
        self.remember_customer(account_id).await?;
        let credit = RecordedCredit::purchase(
            account_id,
            session_id,
            &pack.id,
            catalog::pack_total(&pack),
            recorded_ms,
        );
        self.credit(&credit.request()).await?;
        tracing::info!(account = %account_id, pack = %pack.id, session = %session_id, "credit pack purchased");
        Ok(Outcome::Applied)
    }

    /// A subscription bought through Checkout: the subscription is stored and the account
    /// moves to its tier.
    async fn subscription_checkout(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let s = &self.event.object;
        let Some(sub_id) = id_at(s, &["subscription"]) else {
            return Ok(ignored("the session has no subscription"));
        };
        let Some(tier) = self
            .metadata("tier")
            .filter(|t| self.config.tier(t).is_some())
        else {
            tracing::error!(account = %account_id, subscription = %sub_id,
                "a subscription checkout names no tier the config has");
            return Ok(ignored("the session names no known tier"));
        };
        let tier = tier.to_string();
        let interval = self
            .metadata("interval")
            .and_then(Interval::parse)
            .unwrap_or(Interval::Month);
        let price = self
            .config
            .tier(&tier)
            .map(|t| catalog::tier_price(t, interval));
        let row = self
            .lock_subscription(
                sub_id,
                account_id,
                &tier,
                interval,
                price.as_ref().and_then(|p| p.stripe_price_id.as_deref()),
                price
                    .as_ref()
                    .and_then(|p| p.amount_cents)
                    .and_then(|c| i64::try_from(c).ok()),
                price.as_ref().map(|p| p.currency.as_str()),
                "active",
            )
            .await?;
        if row.ended() || self.created() < row.plan_event_at {
            return Ok(Outcome::Stale);
        }
        sqlx::query(
            "UPDATE subscriptions SET tier = $2, billing_interval = $3, plan_event_at = $4,
                 customer_id = COALESCE(customer_id, $5), updated_at = now()
             WHERE subscription_id = $1",
        )
        .bind(sub_id)
        .bind(&tier)
        .bind(interval.as_str())
        .bind(self.created())
        .bind(id_at(s, &["customer"]))
        .execute(&mut **self.tx)
        .await?;
        self.remember_customer(account_id).await?;
        self.change_tier(account_id, &tier).await?;
        tracing::info!(account = %account_id, tier = %tier, subscription = %sub_id, "subscription started");
        Ok(Outcome::Applied)
    }

    // ----- invoices ------------------------------------------------------------------------

    /// A paid subscription invoice: back in good standing; on a renewal the allowance is reset
    /// to the tier's credits and the period follows the invoice's.
    async fn invoice_paid(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let inv = &self.event.object;
        let (Some(invoice_id), Some(sub_id)) = (str_at(inv, &["id"]), invoice_subscription(inv))
        else {
            return Ok(ignored("not a subscription invoice"));
        };
        let period = invoice_period(inv);
        let reason = str_at(inv, &["billing_reason"]).unwrap_or("");
        let was_failed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM invoices WHERE invoice_id = $1 AND outcome = 'failed')",
        )
        .bind(invoice_id)
        .fetch_one(&mut **self.tx)
        .await?;
        if !self
            .record_invoice(invoice_id, "paid", sub_id, account_id, period)
            .await?
        {
            return Ok(Outcome::AlreadyApplied);
        }
        let renewal = matches!(reason, "subscription_cycle" | "subscription_create");
        if !renewal && !was_failed {
            // Prorations and other invoices: revenue, no change of state.
            return Ok(Outcome::Applied);
        }
        let row = self.lock_invoice_subscription(sub_id, account_id).await?;
        if row.ended() || self.created() < row.payment_event_at {
            return Ok(Outcome::Stale);
        }
        sqlx::query(
            "UPDATE subscriptions SET status = CASE WHEN status IN ('past_due', 'unpaid', 'incomplete')
                     THEN 'active' ELSE status END,
                 payment_event_at = $2,
                 current_period_start = COALESCE($3, current_period_start),
                 current_period_end = COALESCE($4, current_period_end), updated_at = now()
             WHERE subscription_id = $1",
        )
        .bind(sub_id)
        .bind(self.created())
        .bind(period.map(|p| time(p.0)))
        .bind(period.map(|p| time(p.1)))
        .execute(&mut **self.tx)
        .await?;
        sqlx::query("UPDATE accounts SET grace_until = NULL, updated_at = now() WHERE id = $1")
            .bind(account_id)
            .execute(&mut **self.tx)
            .await?;

        let Some((start, end)) = period.filter(|_| renewal) else {
            // A failed invoice that is not a renewal, now paid: only the payment state changes.
            self.billing_status(account_id, None).await?;
            return Ok(Outcome::Applied);
        };
        // Allowances are monthly even on yearly plans: the period is the first month of the
        // invoice's; the debit script rolls the following months on the same anchor day.
        let end = time(start)
            .checked_add_months(Months::new(1))
            .map_or(end, |month| end.min(month.timestamp()));
        let anchor_day = time(start).day();
        let tier: String = sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(account_id)
            .fetch_one(&mut **self.tx)
            .await?;
        let Some(tier_config) = self.config.tier(&tier) else {
            return Err(HandlerError::Other(format!(
                "account {account_id:?} is on tier {tier:?}, which the config does not define"
            )));
        };
        sqlx::query(
            "UPDATE accounts SET period_start = $2, period_end = $3, anchor_day = $4, updated_at = now()
             WHERE id = $1 AND period_start <= $2",
        )
        .bind(account_id)
        .bind(time(start))
        .bind(time(end))
        .bind(i16::try_from(anchor_day).unwrap_or(1))
        .execute(&mut **self.tx)
        .await?;
        let entry_id = format!("renew:{invoice_id}");
        let mut conn = self.state.redis.clone();
        let outcome = self
            .state
            .ledger
            .renew(
                &mut conn,
                &Renewal {
                    account_id,
                    tier: &tier,
                    monthly: catalog::monthly(tier_config),
                    period_start: start,
                    period_end: end,
                    anchor_day,
                    reset: reason == "subscription_cycle",
                    entry_id: &entry_id,
                    mark_ttl: MARK_TTL,
                    now_ms: ledger::now_ms(),
                },
            )
            .await?;
        if outcome == RenewOutcome::Missing {
            return Err(missing(account_id));
        }
        tracing::info!(account = %account_id, invoice = %invoice_id, reason, ?outcome, "subscription invoice paid");
        Ok(Outcome::Applied)
    }

    /// A failed subscription invoice: past due. The account keeps being served during the
    /// grace period (from the first failure; retries of the same invoice do not extend it).
    async fn invoice_failed(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let inv = &self.event.object;
        let (Some(invoice_id), Some(sub_id)) = (str_at(inv, &["id"]), invoice_subscription(inv))
        else {
            return Ok(ignored("not a subscription invoice"));
        };
        let paid: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM invoices WHERE invoice_id = $1 AND outcome = 'paid')",
        )
        .bind(invoice_id)
        .fetch_one(&mut **self.tx)
        .await?;
        if paid {
            return Ok(Outcome::Stale);
        }
        let period = invoice_period(inv);
        if !self
            .record_invoice(invoice_id, "failed", sub_id, account_id, period)
            .await?
        {
            return Ok(Outcome::AlreadyApplied);
        }
        let row = self.lock_invoice_subscription(sub_id, account_id).await?;
        if row.ended() || self.created() < row.payment_event_at {
            return Ok(Outcome::Stale);
        }
        sqlx::query(
            "UPDATE subscriptions SET status = 'past_due', payment_event_at = $2, updated_at = now()
             WHERE subscription_id = $1",
        )
        .bind(sub_id)
        .bind(self.created())
        .execute(&mut **self.tx)
        .await?;
        let grace = self
            .config
            .stripe
            .as_ref()
            .map_or(Duration::ZERO, |s| s.past_due_grace);
        let proposed = self.created() + chrono::Duration::seconds(grace.as_secs() as i64);
        let grace_until: DateTime<Utc> = sqlx::query_scalar(
            "UPDATE accounts SET grace_until = COALESCE(grace_until, $2), updated_at = now()
             WHERE id = $1 RETURNING grace_until",
        )
        .bind(account_id)
        .bind(proposed)
        .fetch_one(&mut **self.tx)
        .await?;
        self.billing_status(account_id, Some(grace_until.timestamp()))
            .await?;
        tracing::warn!(account = %account_id, invoice = %invoice_id, %grace_until, "subscription invoice failed: past due");
        Ok(Outcome::Applied)
    }

    /// `true` when this invoice outcome is new.
    async fn record_invoice(
        &mut self,
        invoice_id: &str,
        outcome: &str,
        sub_id: &str,
        account_id: &str,
        period: Option<(i64, i64)>,
    ) -> Result<bool, sqlx::Error> {
        let inv = &self.event.object;
        let amount = if outcome == "paid" {
            i64_at(inv, &["amount_paid"])
        } else {
            i64_at(inv, &["amount_due"])
        };
        Ok(sqlx::query(
            "INSERT INTO invoices (invoice_id, outcome, subscription_id, account_id, billing_reason,
                 amount_cents, currency, period_start, period_end, event_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
        )
        .bind(invoice_id)
        .bind(outcome)
        .bind(sub_id)
        .bind(account_id)
        .bind(str_at(inv, &["billing_reason"]))
        .bind(amount.unwrap_or(0))
        .bind(str_at(inv, &["currency"]).unwrap_or("usd"))
        .bind(period.map(|p| time(p.0)))
        .bind(period.map(|p| time(p.1)))
        .bind(&self.event.id)
        .execute(&mut **self.tx)
        .await?
        .rows_affected()
            == 1)
    }

    /// The subscription row of an invoice's subscription, created from what the invoice says
    /// when the invoice arrives before the subscription's own events.
    async fn lock_invoice_subscription(
        &mut self,
        sub_id: &str,
        account_id: &str,
    ) -> Result<SubRow, sqlx::Error> {
        let inv = &self.event.object;
        let line_price = at(inv, &["lines", "data"])
            .and_then(|d| d.get(0))
            .and_then(|line| {
                str_at(line, &["pricing", "price_details", "price"])
                    .or_else(|| str_at(line, &["price", "id"]))
            });
        let meta = |k: &str| str_at(inv, &["parent", "subscription_details", "metadata", k]);
        let (tier, interval) = match line_price
            .and_then(|p| catalog::tier_for_price(self.config, p))
        {
            Some((t, i)) => (t.to_string(), i),
            None => {
                let current: String = sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1")
                    .bind(account_id)
                    .fetch_one(&mut **self.tx)
                    .await?;
                (
                    meta("tier")
                        .filter(|t| self.config.tier(t).is_some())
                        .map_or(current, str::to_string),
                    meta("interval")
                        .and_then(Interval::parse)
                        .unwrap_or(Interval::Month),
                )
            }
        };
        let currency = str_at(inv, &["currency"]).map(str::to_string);
        self.lock_subscription(
            sub_id,
            account_id,
            &tier,
            interval,
            line_price,
            None,
            currency.as_deref(),
            "active",
        )
        .await
    }

    // ----- customer.subscription.* -----------------------------------------------------------

    /// Plan changes, cancellation at period end, and the end of a subscription: the tier
    /// follows the subscription's price; when it ends, the account returns to the default tier.
    async fn subscription_changed(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let sub = &self.event.object;
        let Some(sub_id) = str_at(sub, &["id"]) else {
            return Ok(ignored("the subscription has no id"));
        };
        let status = str_at(sub, &["status"]).unwrap_or("active");
        let deleted = self.event.kind == "customer.subscription.deleted" || status == "canceled";
        let item = first_item(sub);
        let mapped = item
            .price_id
            .and_then(|p| catalog::tier_for_price(self.config, p));
        let (tier, interval) = match mapped {
            Some((t, i)) => (Some(t.to_string()), Some(i)),
            None => (
                self.metadata("tier")
                    .filter(|t| self.config.tier(t).is_some())
                    .map(str::to_string),
                item.interval
                    .or_else(|| self.metadata("interval"))
                    .and_then(Interval::parse),
            ),
        };
        let current: String = sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_one(&mut **self.tx)
            .await?;
        let row = self
            .lock_subscription(
                sub_id,
                account_id,
                tier.as_deref().unwrap_or(&current),
                interval.unwrap_or(Interval::Month),
                item.price_id,
                item.amount_cents,
                item.currency,
                status,
            )
            .await?;
        if row.ended() {
            return Ok(if deleted {
                Outcome::AlreadyApplied
            } else {
                Outcome::Stale
            });
        }
        if self.created() < row.plan_event_at {
            return Ok(Outcome::Stale);
        }
        let cancel_at_period_end = bool_at(sub, &["cancel_at_period_end"]).unwrap_or(false);
        if deleted {
            let ended = i64_at(sub, &["ended_at"])
                .or_else(|| i64_at(sub, &["canceled_at"]))
                .unwrap_or(self.event.created);
            sqlx::query(
                "UPDATE subscriptions SET status = 'canceled', canceled_at = $2,
                     cancel_at_period_end = $3, plan_event_at = $4, updated_at = now()
                 WHERE subscription_id = $1",
            )
            .bind(sub_id)
            .bind(time(ended))
            .bind(cancel_at_period_end)
            .bind(self.created())
            .execute(&mut **self.tx)
            .await?;
            let other_live: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE account_id = $1
                     AND subscription_id <> $2 AND status = ANY($3))",
            )
            .bind(account_id)
            .bind(sub_id)
            .bind(LIVE)
            .fetch_one(&mut **self.tx)
            .await?;
            if !other_live {
                let default_tier = self
                    .config
                    .stripe
                    .as_ref()
                    .map_or_else(|| "free".to_string(), |s| s.default_tier.clone());
                sqlx::query(
                    "UPDATE accounts SET grace_until = NULL, updated_at = now() WHERE id = $1",
                )
                .bind(account_id)
                .execute(&mut **self.tx)
                .await?;
                self.billing_status(account_id, None).await?;
                if self.config.tier(&default_tier).is_some() {
                    self.change_tier(account_id, &default_tier).await?;
                }
            }
            tracing::info!(account = %account_id, subscription = %sub_id, "subscription ended");
            return Ok(Outcome::Applied);
        }
        sqlx::query(
            "UPDATE subscriptions SET status = $2, cancel_at_period_end = $3, tier = COALESCE($4, tier),
                 billing_interval = COALESCE($5, billing_interval), price_id = COALESCE($6, price_id),
                 amount_cents = COALESCE($7, amount_cents), currency = COALESCE($8, currency),
                 current_period_start = COALESCE($9, current_period_start),
                 current_period_end = COALESCE($10, current_period_end),
                 plan_event_at = $11, updated_at = now()
             WHERE subscription_id = $1",
        )
        .bind(sub_id)
        .bind(status)
        .bind(cancel_at_period_end)
        .bind(&tier)
        .bind(interval.map(Interval::as_str))
        .bind(item.price_id)
        .bind(item.amount_cents)
        .bind(item.currency)
        .bind(item.period_start.map(time))
        .bind(item.period_end.map(time))
        .bind(self.created())
        .execute(&mut **self.tx)
        .await?;
        self.remember_customer(account_id).await?;
        if let Some(tier) = tier.filter(|_| LIVE.contains(&status)) {
            self.change_tier(account_id, &tier).await?;
        }
        Ok(Outcome::Applied)
    }

    /// Inserts the subscription row if it is new (timestamps at the epoch, so the event that
    /// created it applies) and locks it.
    #[allow(clippy::too_many_arguments)]
    async fn lock_subscription(
        &mut self,
        sub_id: &str,
        account_id: &str,
        tier: &str,
        interval: Interval,
        price_id: Option<&str>,
        amount_cents: Option<i64>,
        currency: Option<&str>,
        status: &str,
    ) -> Result<SubRow, sqlx::Error> {
        sqlx::query(
            "INSERT INTO subscriptions (subscription_id, account_id, customer_id, tier, billing_interval,
                 price_id, amount_cents, currency, status, plan_event_at, payment_event_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp(0), to_timestamp(0))
             ON CONFLICT (subscription_id) DO NOTHING",
        )
        .bind(sub_id)
        .bind(account_id)
        .bind(id_at(&self.event.object, &["customer"]))
        .bind(tier)
        .bind(interval.as_str())
        .bind(price_id)
        .bind(amount_cents)
        .bind(currency)
        .bind(status)
        .execute(&mut **self.tx)
        .await?;
        sqlx::query_as::<_, SubRow>(
            "SELECT status, plan_event_at, payment_event_at,
                    (plan_event_at = to_timestamp(0) AND payment_event_at = to_timestamp(0)) AS fresh
               FROM subscriptions WHERE subscription_id = $1 FOR UPDATE",
        )
        .bind(sub_id)
        .fetch_one(&mut **self.tx)
        .await
    }

    // ----- charge.refunded -----------------------------------------------------------------

    /// A refunded pack purchase: the credits are clawed back pro rata to
    /// `amount_refunded / amount` (cumulative, so partial refunds add up exactly to the whole
    /// pack), even below zero; one `adjustment` journal entry per refund state.
    async fn charge_refunded(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let ch = &self.event.object;
        let Some(charge_id) = str_at(ch, &["id"]) else {
            return Ok(ignored("the charge has no id"));
        };
        let Some(pi) = id_at(ch, &["payment_intent"]) else {
            return Ok(ignored("the charge has no payment intent"));
        };
        let purchase: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT session_id, credits, bonus_credits, clawed_back FROM purchases
             WHERE payment_intent_id = $1 AND account_id = $2 FOR UPDATE",
        )
        .bind(pi)
        .bind(account_id)
        .fetch_optional(&mut **self.tx)
        .await?;
        let Some((session_id, credits, bonus, clawed_back)) = purchase else {
            return Ok(ignored("the charge is not a credit-pack purchase"));
        };
        let amount = i64_at(ch, &["amount"]).unwrap_or(0);
        let refunded = i64_at(ch, &["amount_refunded"]).unwrap_or(0).min(amount);
        if amount <= 0 || refunded <= 0 {
            return Ok(ignored("nothing refunded"));
        }
        let inserted: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO purchase_refunds
                 (charge_id, amount_refunded, session_id, clawed_back, event_id, charge_amount_cents)
             VALUES ($1, $2, $3, 0, $4, $5) ON CONFLICT DO NOTHING
             RETURNING {CREATED_MS}"
        ))
        .bind(charge_id)
        .bind(refunded)
        .bind(&session_id)
        .bind(&self.event.id)
        .bind(amount)
        .fetch_optional(&mut **self.tx)
        .await?;
        let Some(recorded_ms) = inserted else {
            return Ok(Outcome::AlreadyApplied);
        };
        let total = Credits::from_micros(credits) + Credits::from_micros(bonus);
        let target = mul_div_ceil(total, refunded as u64, amount as u64)
            .ok_or_else(|| HandlerError::Other("refund amount out of range".into()))?;
        let delta = target - Credits::from_micros(clawed_back);
        sqlx::query(
            "UPDATE purchases SET refunded_cents = GREATEST(refunded_cents, $2),
                 clawed_back = clawed_back + GREATEST($3, 0)
             WHERE session_id = $1",
        )
        .bind(&session_id)
        .bind(refunded)
        .bind(delta.micros())
        .execute(&mut **self.tx)
        .await?;
        if delta.micros() <= 0 {
            // An earlier refund state arriving after a larger one.
            return Ok(Outcome::Stale);
        }
        sqlx::query(
            "UPDATE purchase_refunds SET clawed_back = $3 WHERE charge_id = $1 AND amount_refunded = $2",
        )
        .bind(charge_id)
        .bind(refunded)
        .bind(delta.micros())
        .execute(&mut **self.tx)
        .await?;
        let credit = RecordedCredit::clawback(
            account_id,
            charge_id,
            &session_id,
            refunded,
            amount,
            delta,
            recorded_ms,
        );
        self.credit(&credit.request()).await?;
        tracing::info!(account = %account_id, charge = %charge_id, clawed_back = %delta, "refund clawed back");
        Ok(Outcome::Applied)
    }

    // ----- Redis effects ---------------------------------------------------------------------

    async fn credit(&self, request: &CreditRequest<'_>) -> Result<(), HandlerError> {
        let mut conn = self.state.redis.clone();
        match self.state.ledger.credit(&mut conn, request).await? {
            CreditOutcome::Missing => Err(missing(request.account_id)),
            // Duplicate: an earlier attempt of this event reached Redis before failing.
            CreditOutcome::Applied { .. } | CreditOutcome::Duplicate { .. } => Ok(()),
        }
    }

    async fn billing_status(
        &self,
        account_id: &str,
        grace_until: Option<i64>,
    ) -> Result<(), HandlerError> {
        let mut conn = self.state.redis.clone();
        match self
            .state
            .ledger
            .set_billing_status(&mut conn, account_id, grace_until)
            .await?
        {
            Some(_) => Ok(()),
            None => Err(missing(account_id)),
        }
    }

    /// The same change as `PUT /v1/accounts/{id}/tier` (Postgres, Redis, cache invalidation
    /// after the commit), when the tier differs.
    async fn change_tier(&mut self, account_id: &str, tier: &str) -> Result<(), HandlerError> {
        let Some(tier_config) = self.config.tier(tier) else {
            return Err(HandlerError::Other(format!(
                "tier {tier:?} is not configured"
            )));
        };
        let current: String =
            sqlx::query_scalar("SELECT tier FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(account_id)
                .fetch_one(&mut **self.tx)
                .await?;
        let mut conn = self.state.redis.clone();
        let live = self.state.ledger.state(&mut conn, account_id).await?;
        if current == tier && live.as_ref().is_some_and(|l| l.tier == tier) {
            return Ok(());
        }
        sqlx::query("UPDATE accounts SET tier = $2, updated_at = now() WHERE id = $1")
            .bind(account_id)
            .bind(tier)
            .execute(&mut **self.tx)
            .await?;
        let entry_id = format!("{account_id}:tier:{}", self.event.id);
        let applied = self
            .state
            .ledger
            .set_tier(
                &mut conn,
                account_id,
                tier,
                catalog::monthly(tier_config),
                &entry_id,
            )
            .await?;
        if !applied {
            return Err(missing(account_id));
        }
        self.tier_changed = Some(tier.to_string());
        tracing::info!(account = %account_id, from = %current, to = %tier, "tier follows the subscription");
        Ok(())
    }
}

fn missing(account_id: &str) -> HandlerError {
    HandlerError::Other(format!(
        "account {account_id:?} vanished from Redis while the event was applied"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn invoice_periods_come_from_the_latest_line() {
        let inv = json!({"lines": {"data": [
            {"period": {"start": 10, "end": 10}},
            {"period": {"start": 100, "end": 200}},
            {"period": {"start": 50, "end": 150}},
        ]}});
        assert_eq!(invoice_period(&inv), Some((100, 200)));
        assert_eq!(invoice_period(&json!({})), None);
    }

    #[test]
    fn invoice_subscription_reads_both_api_versions() {
        let new = json!({"parent": {"subscription_details": {"subscription": "sub_new"}}, "subscription": null});
        let old = json!({"subscription": "sub_old"});
        assert_eq!(invoice_subscription(&new), Some("sub_new"));
        assert_eq!(invoice_subscription(&old), Some("sub_old"));
    }

    #[test]
    fn subscription_items_read_both_api_versions() {
        let new = json!({"items": {"data": [{"price": {"id": "price_1", "unit_amount": 900, "currency": "usd",
            "recurring": {"interval": "year"}}, "current_period_start": 1, "current_period_end": 2}]}});
        let item = first_item(&new);
        assert_eq!(item.price_id, Some("price_1"));
        assert_eq!(item.amount_cents, Some(900));
        assert_eq!(item.interval, Some("year"));
        assert_eq!((item.period_start, item.period_end), (Some(1), Some(2)));
        let old = json!({"current_period_start": 3, "current_period_end": 4,
            "items": {"data": [{"plan": {"id": "plan_1"}}]}});
        let item = first_item(&old);
        assert_eq!(item.price_id, Some("plan_1"));
        assert_eq!((item.period_start, item.period_end), (Some(3), Some(4)));
    }
}
