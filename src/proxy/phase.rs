//! The request's money state as types: what it was charged ([`Billing`]) and, on a metered
//! route, where its hold is ([`HoldPhase`]). Each is one enum of its phases, so an impossible
//! combination (refunded without a charge, settled twice, held while still reading the body
//! that prices it) cannot be written.

use crate::money::Credits;
use crate::proxy::debit::Charge;

/// What the request was charged.
#[derive(Debug, Default)]
pub enum Billing {
    /// Nothing: a public or unmetered request, one refused before the debit, or a
    /// token-priced one whose body (its price) has not been read yet.
    #[default]
    Free,
    Charged(Charge),
    /// The charge went back (or the refund policy decided it will): never a second time.
    Refunded(Charge),
}

impl Billing {
    /// The charge, refunded or not (a refunded request still releases its leases).
    pub fn charge(&self) -> Option<&Charge> {
        match self {
            Billing::Free => None,
            Billing::Charged(c) | Billing::Refunded(c) => Some(c),
        }
    }

    /// The charge, while it stands (not refunded).
    pub fn standing(&self) -> Option<&Charge> {
        match self {
            Billing::Charged(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_free(&self) -> bool {
        matches!(self, Billing::Free)
    }

    /// Charged → refunded. `false` when there was nothing left to refund.
    pub fn mark_refunded(&mut self) -> bool {
        match std::mem::take(self) {
            Billing::Charged(c) => {
                *self = Billing::Refunded(c);
                true
            }
            other => {
                *self = other;
                false
            }
        }
    }
}

/// Where a metered request's hold is.
#[derive(Debug)]
pub enum HoldPhase {
    /// Token-priced: the body is being read and held back; nothing is held yet, since the
    /// price depends on the body. `limit` bounds what is buffered.
    AwaitingBody { body: Vec<u8>, limit: u64 },
    /// The hold is taken. `forwarded`: the body as sent upstream when it was held back to be
    /// priced (kept for a retried upstream attempt); `None` when the hold was taken up front
    /// and the body streams through untouched.
    Held { forwarded: Option<Forwarded> },
    /// The true cost is applied: exactly once.
    Settled { cost: Credits },
}

impl Default for HoldPhase {
    fn default() -> Self {
        HoldPhase::Held { forwarded: None }
    }
}

/// A priced body as it went upstream.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub body: bytes::Bytes,
    /// Read whole in `request_filter` (a small body with a Content-Length), so it goes with
    /// its exact length; otherwise it went chunked.
    pub early: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge() -> Charge {
        Charge {
            account_id: "a".into(),
            charge_id: "c".into(),
            cost: Credits::from_micros(5),
            from_allowance: Credits::from_micros(5),
            from_purchased: Credits::ZERO,
            remaining: None,
            low: false,
            low_threshold: None,
            lease: false,
            hold: false,
            action: "x".into(),
            action_lease: false,
            counted: None,
            slice: false,
        }
    }

    #[test]
    fn a_charge_is_refunded_at_most_once_and_nothing_is_never_refunded() {
        let mut b = Billing::Free;
        assert!(!b.mark_refunded());
        assert!(b.is_free());
        let mut b = Billing::Charged(charge());
        assert!(b.standing().is_some());
        assert!(b.mark_refunded());
        assert!(!b.mark_refunded(), "a second refund");
        assert!(b.standing().is_none());
        assert_eq!(b.charge().map(|c| c.cost), Some(Credits::from_micros(5)));
    }
}
