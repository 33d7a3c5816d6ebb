//! What each Stripe event does, exactly once: here the dispatch and the shared context; one
//! file per event family (`checkout`, `invoice`, `subscription`, `refund`), what they share in
//! Postgres in `store`, their payloads read into lenient typed structs (`payload`).
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

mod checkout;
mod invoice;
mod payload;
mod refund;
mod store;
mod subscription;

use super::catalog::{self, Interval};
use super::webhook::{id_at, str_at, Event};
use crate::config::Config;
use crate::ledger::billing::{RenewOutcome, Renewal};
use crate::ledger::{self, CreditOutcome, CreditRequest, LedgerError};
use crate::state::AppState;
use invoice::invoice_subscription;
use store::SubRow;

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
    Domain(#[from] crate::domain::DomainError),
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
    if store::seen(&state.pg, &event.id).await? {
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
        Some(id) => crate::domain::accounts::live_state(state, &config, id)
            .await
            .map_err(|e| match e {
                LedgerError::UnknownTier { .. } => HandlerError::Other(e.to_string()),
                other => HandlerError::Ledger(other),
            })?
            .is_some(),
        None => false,
    };

    let mut tx = state.pg.begin().await?;
    let fresh = store::claim(
        &mut tx,
        &event.id,
        &event.kind,
        time(event.created),
        account_id.as_deref(),
    )
    .await?;
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
    store::finish(
        &mut tx,
        &event.id,
        outcome.label(),
        str_at(&event.object, &["id"]),
    )
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
    let invoice: Option<payload::Invoice> =
        event.kind.starts_with("invoice.").then(|| payload::read(o));
    let subscription = match event.kind.as_str() {
        k if k.starts_with("customer.subscription.") => str_at(o, &["id"]),
        _ => invoice.as_ref().and_then(invoice_subscription),
    };
    if let Some(sub) = subscription {
        let found = store::account_of_subscription(pg, sub).await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    if event.kind == "charge.refunded" {
        if let Some(pi) = id_at(o, &["payment_intent"]) {
            let found = store::account_of_payment(pg, pi).await?;
            if found.is_some() {
                return Ok(found);
            }
        }
    }
    if let Some(customer) = id_at(o, &["customer"]) {
        return store::account_of_customer(pg, customer).await;
    }
    Ok(None)
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
            store::remember_customer(self.tx, account_id, customer).await?;
        }
        Ok(())
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
        let current = store::lock_tier(self.tx, account_id).await?;
        let mut conn = self.state.redis.clone();
        let live = self.state.ledger.state(&mut conn, account_id).await?;
        if current == tier && live.as_ref().is_some_and(|l| l.tier == tier) {
            return Ok(());
        }
        store::set_tier(self.tx, account_id, tier).await?;
        let entry_id = format!("{account_id}:tier:{}", self.event.id);
        // Slices served under the old tier are charged before its allowance is replaced.
        crate::lease::recall::drain(&self.state.leases, self.state, account_id).await;
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
