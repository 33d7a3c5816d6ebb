//! Holds of metered (token-priced, SSE) requests taken from a credit slice: a stream's
//! top-ups and the settle at the true cost, in process; their rows go in the next report.

use std::time::Instant;

use super::slice::{Mode, Row, RowKind};
use super::Leases;

/// The answer to [`Leases::extend`].
pub enum Topped {
    /// Taken (`taken` < the step: the slice had no more, the stream runs on what is held).
    Taken {
        taken: i64,
        held: i64,
        /// The balance this instance now sees (µc; `None` on unlimited tiers).
        balance: Option<i64>,
    },
    /// The slice cannot pay the step now: a report may top it up.
    Acquire,
    /// No such hold here (settled).
    Gone,
}

/// What [`Leases::settle`] did.
pub struct SettledHere {
    /// True cost − held (µc; negative = money back).
    pub delta: i64,
    pub balance: Option<i64>,
}

/// The journal usage of a settle (the exact path's settle entry carries the same).
pub struct SettleUsage<'a> {
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub status: u16,
    pub duration_ms: u64,
    pub reason: &'a str,
}

impl Leases {
    /// Takes `step` more from the slice for a running hold (a stream whose running cost passed
    /// what is held). With `or_what_is_left`, takes what the slice has when it is less (the
    /// exact path's extend does the same with the balance); otherwise asks for a report first.
    pub fn extend(
        &self,
        account_id: &str,
        charge_id: &str,
        step: i64,
        or_what_is_left: bool,
        row: (&str, &str, &str),
    ) -> Topped {
        let (route, action, request_id) = row;
        let Some(slot) = self.slot(account_id) else {
            return Topped::Gone;
        };
        let mut s = slot.lock();
        let now = Instant::now();
        // A top-up is not an admission: the exact mode near the end of the balance does not
        // stop it, only a slice that is no longer confirmed.
        let usable = if s.mode != Mode::Returning && now < s.valid_until {
            s.remaining.max(0)
        } else {
            0
        };
        let taken = if usable >= step {
            step
        } else if or_what_is_left {
            usable
        } else {
            return Topped::Acquire;
        };
        let Some(hold) = s.holds.get_mut(charge_id).filter(|h| !h.settled) else {
            return Topped::Gone;
        };
        if taken == 0 {
            let held = hold.held;
            return Topped::Taken {
                taken,
                held,
                balance: (s.monthly >= 0).then(|| s.balance()),
            };
        }
        hold.held += taken;
        hold.extends += 1;
        let (held, n) = (hold.held, hold.extends);
        s.remaining -= taken;
        s.pending_net += taken;
        s.spent_since_report += taken;
        s.spent_in_window += taken;
        s.last_used = now;
        s.pending.push(Row {
            kind: RowKind::Extend,
            charge_id: charge_id.to_string(),
            amount: taken,
            route: route.to_string(),
            action: action.to_string(),
            ts_ms: crate::ledger::now_ms(),
            request_id: request_id.to_string(),
            extra: n.to_string(),
            part: None,
        });
        Topped::Taken {
            taken,
            held,
            balance: (s.monthly >= 0).then(|| s.balance()),
        }
    }

    /// Ends a hold taken from the slice at its true cost (µc): money back returns to the
    /// slice, an extra is taken from it (past it, when it has less: the true cost is always
    /// recorded, as on the exact path). The settle row goes in the next report. `None`: no
    /// such hold here (settled already).
    pub fn settle(
        &self,
        account_id: &str,
        charge_id: &str,
        cost: i64,
        usage: &SettleUsage<'_>,
        row: (&str, &str, &str),
    ) -> Option<SettledHere> {
        let (route, action, request_id) = row;
        let slot = self.slot(account_id)?;
        let mut s = slot.lock();
        let hold = s.holds.get_mut(charge_id).filter(|h| !h.settled)?;
        hold.settled = true;
        let delta = cost - hold.held;
        s.remaining -= delta;
        s.pending_net += delta;
        s.spent_since_report += delta;
        s.spent_in_window += delta.max(0);
        s.last_used = Instant::now();
        s.pending.push(Row {
            kind: RowKind::Settle,
            charge_id: charge_id.to_string(),
            amount: delta,
            route: route.to_string(),
            action: action.to_string(),
            ts_ms: crate::ledger::now_ms(),
            request_id: request_id.to_string(),
            extra: format!(
                "{}|{}|{}|{}|{}",
                usage.tokens_in, usage.tokens_out, usage.status, usage.duration_ms, usage.reason
            ),
            part: None,
        });
        Some(SettledHere {
            delta,
            balance: (s.monthly >= 0).then(|| s.balance()),
        })
    }

    /// A running hold needs `amount` more than the slice has: make the next report ask for at
    /// least that much (now). Returns the shard to report, `None` if no slice is here.
    pub fn want(&self, account_id: &str, amount: i64) -> Option<usize> {
        let slot = self.slot(account_id)?;
        let mut s = slot.lock();
        s.floor = s.floor.max(amount);
        s.urgent = true;
        Some(self.shard(account_id))
    }
}
