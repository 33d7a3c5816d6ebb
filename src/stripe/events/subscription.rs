//! `customer.subscription.created` / `updated` / `deleted`: the account follows the
//! subscription's plan and status (an older event arriving late changes nothing).

use super::payload::{self, Subscription};
use super::*;

/// The price of a subscription's (first) item, and the periods on it.
pub(super) struct Item<'a> {
    price_id: Option<&'a str>,
    amount_cents: Option<i64>,
    currency: Option<&'a str>,
    interval: Option<&'a str>,
    period_start: Option<i64>,
    period_end: Option<i64>,
}

pub(super) fn first_item(sub: &Subscription) -> Item<'_> {
    let item = sub.first_item.as_ref();
    let price = item.and_then(|i| i.price.as_ref());
    Item {
        price_id: price.and_then(|p| p.id.as_deref()).or_else(|| {
            item.and_then(|i| i.plan.as_ref())
                .and_then(|p| p.id.as_deref())
        }),
        amount_cents: price.and_then(|p| p.unit_amount),
        currency: price.and_then(|p| p.currency.as_deref()),
        interval: price
            .and_then(|p| p.recurring.as_ref())
            .and_then(|r| r.interval.as_deref()),
        // Since 2025 the periods are on the items; before, on the subscription.
        period_start: item
            .and_then(|i| i.current_period_start)
            .or(sub.current_period_start),
        period_end: item
            .and_then(|i| i.current_period_end)
            .or(sub.current_period_end),
    }
}

impl Cx<'_, '_> {
    /// Plan changes, cancellation at period end, and the end of a subscription: the tier
    /// follows the subscription's price; when it ends, the account returns to the default tier.
    pub(super) async fn subscription_changed(
        &mut self,
        account_id: &str,
    ) -> Result<Outcome, HandlerError> {
        let sub: Subscription = payload::read(&self.event.object);
        let Some(sub_id) = sub.id.as_deref() else {
            return Ok(ignored("the subscription has no id"));
        };
        let status = sub.status.as_deref().unwrap_or("active");
        let deleted = self.event.kind == "customer.subscription.deleted" || status == "canceled";
        let item = first_item(&sub);
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
        let cancel_at_period_end = sub.cancel_at_period_end.unwrap_or(false);
        if deleted {
            let ended = sub
                .ended_at
                .or(sub.canceled_at)
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
    pub(super) async fn lock_subscription(
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
        store::lock_subscription(
            self.tx,
            &store::NewSubscription {
                id: sub_id,
                account_id,
                customer_id: id_at(&self.event.object, &["customer"]),
                tier,
                interval: interval.as_str(),
                price_id,
                amount_cents,
                currency,
                status,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subscription_items_read_both_api_versions() {
        let new = json!({"items": {"data": [{"price": {"id": "price_1", "unit_amount": 900, "currency": "usd",
            "recurring": {"interval": "year"}}, "current_period_start": 1, "current_period_end": 2}]}});
        let new: Subscription = payload::read(&new);
        let item = first_item(&new);
        assert_eq!(item.price_id, Some("price_1"));
        assert_eq!(item.amount_cents, Some(900));
        assert_eq!(item.interval, Some("year"));
        assert_eq!((item.period_start, item.period_end), (Some(1), Some(2)));
        let old = json!({"current_period_start": 3, "current_period_end": 4,
            "items": {"data": [{"plan": {"id": "plan_1"}}]}});
        let old: Subscription = payload::read(&old);
        let item = first_item(&old);
        assert_eq!(item.price_id, Some("plan_1"));
        assert_eq!((item.period_start, item.period_end), (Some(3), Some(4)));
    }
}
