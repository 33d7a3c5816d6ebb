//! `invoice.paid` / `payment_succeeded` / `payment_failed`: a subscription's period paid (the
//! allowance renewed once per invoice) or its payment failed.

use super::payload::{self, Invoice};
use super::*;

/// An invoice's subscription: `parent.subscription_details.subscription` (current API) or
/// `subscription` (before 2025).
pub(super) fn invoice_subscription(inv: &Invoice) -> Option<&str> {
    subscription_details(inv)
        .and_then(|d| d.subscription.as_deref())
        .or(inv.subscription.as_deref())
}

fn subscription_details(inv: &Invoice) -> Option<&payload::SubscriptionDetails> {
    inv.parent
        .as_ref()
        .and_then(|p| p.subscription_details.as_ref())
}

fn lines(inv: &Invoice) -> &[payload::InvoiceLine] {
    inv.lines.as_ref().map_or(&[], |l| l.data.as_slice())
}

/// The service period an invoice pays for: the latest-ending line with a real period.
pub(super) fn invoice_period(inv: &Invoice) -> Option<(i64, i64)> {
    lines(inv)
        .iter()
        .filter_map(|line| {
            let period = line.period.as_ref()?;
            let (start, end) = (period.start?, period.end?);
            (end > start).then_some((start, end))
        })
        .max_by_key(|&(_, end)| end)
}

impl Cx<'_, '_> {
    /// A paid subscription invoice: back in good standing; on a renewal the allowance is reset
    /// to the tier's credits and the period follows the invoice's.
    pub(super) async fn invoice_paid(&mut self, account_id: &str) -> Result<Outcome, HandlerError> {
        let inv: Invoice = payload::read(&self.event.object);
        let (Some(invoice_id), Some(sub_id)) = (inv.id.as_deref(), invoice_subscription(&inv))
        else {
            return Ok(ignored("not a subscription invoice"));
        };
        let period = invoice_period(&inv);
        let reason = inv.billing_reason.as_deref().unwrap_or("");
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
        let tier = store::lock_tier(self.tx, account_id).await?;
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
    pub(super) async fn invoice_failed(
        &mut self,
        account_id: &str,
    ) -> Result<Outcome, HandlerError> {
        let inv: Invoice = payload::read(&self.event.object);
        let (Some(invoice_id), Some(sub_id)) = (inv.id.as_deref(), invoice_subscription(&inv))
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
        let period = invoice_period(&inv);
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
    pub(super) async fn record_invoice(
        &mut self,
        invoice_id: &str,
        outcome: &str,
        sub_id: &str,
        account_id: &str,
        period: Option<(i64, i64)>,
    ) -> Result<bool, sqlx::Error> {
        let inv: Invoice = payload::read(&self.event.object);
        let amount = if outcome == "paid" {
            inv.amount_paid
        } else {
            inv.amount_due
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
        .bind(inv.billing_reason.as_deref())
        .bind(amount.unwrap_or(0))
        .bind(inv.currency.as_deref().unwrap_or("usd"))
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
    pub(super) async fn lock_invoice_subscription(
        &mut self,
        sub_id: &str,
        account_id: &str,
    ) -> Result<SubRow, sqlx::Error> {
        let inv: Invoice = payload::read(&self.event.object);
        let line_price = lines(&inv).first().and_then(|line| {
            line.pricing
                .as_ref()
                .and_then(|p| p.price_details.as_ref())
                .and_then(|d| d.price.as_deref())
                .or_else(|| line.price.as_ref().and_then(|p| p.id.as_deref()))
        });
        let meta = |k: &str| {
            subscription_details(&inv)
                .and_then(|d| d.metadata.as_ref())
                .and_then(|m| m.get(k))
                .and_then(Value::as_str)
        };
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
        let currency = inv.currency.clone();
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
        assert_eq!(invoice_period(&payload::read(&inv)), Some((100, 200)));
        assert_eq!(invoice_period(&payload::read(&json!({}))), None);
    }

    #[test]
    fn invoice_subscription_reads_both_api_versions() {
        let new = json!({"parent": {"subscription_details": {"subscription": "sub_new"}}, "subscription": null});
        let old = json!({"subscription": "sub_old"});
        let (new, old): (Invoice, Invoice) = (payload::read(&new), payload::read(&old));
        assert_eq!(invoice_subscription(&new), Some("sub_new"));
        assert_eq!(invoice_subscription(&old), Some("sub_old"));
    }
}
