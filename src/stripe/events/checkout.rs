//! `checkout.session.completed` / `async_payment_succeeded`: a credit pack bought (credited
//! once per session) or a subscription started by Checkout.

use super::payload::{self, CheckoutSession};
use super::*;
use crate::domain::purchases::{self, PackPurchase};

impl Cx<'_, '_> {
    pub(super) async fn checkout_completed(
        &mut self,
        account_id: &str,
    ) -> Result<Outcome, HandlerError> {
        let s: CheckoutSession = payload::read(&self.event.object);
        match s.mode.as_deref() {
            Some("payment") => self.purchase(account_id, &s).await,
            Some("subscription") => self.subscription_checkout(account_id, &s).await,
            other => Ok(ignored(format!(
                "checkout mode {} is not sold by tollgate",
                other.unwrap_or("(none)")
            ))),
        }
    }

    /// A credit pack paid: credits + bonus into `purchased` (paying any debt first, since
    /// purchased may be negative), a `purchase` journal entry, a `purchases` row.
    pub(super) async fn purchase(
        &mut self,
        account_id: &str,
        s: &CheckoutSession,
    ) -> Result<Outcome, HandlerError> {
        let Some(session_id) = s.id.as_deref() else {
            return Ok(ignored("the session has no id"));
        };
        let paid = s.payment_status.as_deref();
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
        let amount = s
            .amount_total
            .unwrap_or_else(|| i64::try_from(pack.price_cents).unwrap_or(i64::MAX));
        let currency = s.currency.as_deref().unwrap_or(&pack.currency);
        let recorded = purchases::record_purchase(
            self.tx,
            &PackPurchase {
                session_id,
                account_id,
                pack: &pack,
                amount_cents: amount,
                currency,
                payment_intent: s.payment_intent.as_deref(),
                event_id: &self.event.id,
            },
        )
        .await?;
        let Some(credit) = recorded else {
            return Ok(Outcome::AlreadyApplied);
        };
        self.remember_customer(account_id).await?;
        self.credit(&credit.request()).await?;
        tracing::info!(account = %account_id, pack = %pack.id, session = %session_id, "credit pack purchased");
        Ok(Outcome::Applied)
    }

    /// A subscription bought through Checkout: the subscription is stored and the account
    /// moves to its tier.
    pub(super) async fn subscription_checkout(
        &mut self,
        account_id: &str,
        s: &CheckoutSession,
    ) -> Result<Outcome, HandlerError> {
        let Some(sub_id) = s.subscription.as_deref() else {
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
        .bind(s.customer.as_deref())
        .execute(&mut **self.tx)
        .await?;
        self.remember_customer(account_id).await?;
        self.change_tier(account_id, &tier).await?;
        tracing::info!(account = %account_id, tier = %tier, subscription = %sub_id, "subscription started");
        Ok(Outcome::Applied)
    }
}
