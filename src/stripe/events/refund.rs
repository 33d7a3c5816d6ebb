//! `charge.refunded`: purchased credits clawed back in proportion to the amount refunded,
//! once per refund state.

use super::payload::{self, Charge};
use super::*;
use crate::domain::purchases::{self, ChargeRefund, Clawback};

impl Cx<'_, '_> {
    /// A refunded pack purchase: the credits clawed back pro rata
    /// ([`purchases::claw_back`]), even below zero; one `adjustment` journal entry per refund
    /// state.
    pub(super) async fn charge_refunded(
        &mut self,
        account_id: &str,
    ) -> Result<Outcome, HandlerError> {
        let ch: Charge = payload::read(&self.event.object);
        let Some(charge_id) = ch.id.as_deref() else {
            return Ok(ignored("the charge has no id"));
        };
        let Some(pi) = ch.payment_intent.as_deref() else {
            return Ok(ignored("the charge has no payment intent"));
        };
        let clawback = purchases::claw_back(
            self.tx,
            &ChargeRefund {
                charge_id,
                payment_intent: pi,
                account_id,
                amount_cents: ch.amount.unwrap_or(0),
                refunded_cents: ch.amount_refunded.unwrap_or(0),
                event_id: &self.event.id,
            },
        )
        .await?;
        let credit = match clawback {
            Clawback::Apply(credit) => credit,
            Clawback::NotAPurchase => {
                return Ok(ignored("the charge is not a credit-pack purchase"))
            }
            Clawback::NothingRefunded => return Ok(ignored("nothing refunded")),
            Clawback::AlreadyApplied => return Ok(Outcome::AlreadyApplied),
            Clawback::Stale => return Ok(Outcome::Stale),
        };
        self.credit(&credit.request()).await?;
        tracing::info!(account = %account_id, charge = %charge_id, clawed_back = %-credit.to_purchased, "refund clawed back");
        Ok(Outcome::Applied)
    }
}
