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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{for_tests, raw};
    use crate::lease::slice::RowKind;
    use crate::lease::{Ask, Served};

    const USAGE: SettleUsage<'static> = SettleUsage {
        tokens_in: 10,
        tokens_out: 20,
        status: 200,
        duration_ms: 35,
        reason: "usage",
    };
    const ROW: (&str, &str, &str) = ("ai", "chat", "req-1");

    /// An instance holding a confirmed slice of `remaining` µc of an account with 100 credits.
    fn sliced(remaining: i64) -> Leases {
        let cfg = for_tests("[tiers.t]\nmonthly_credits = 100\n");
        let leases = Leases::new(raw::Leases::default(), 1);
        let tier = cfg.tier("t").expect("tier t");
        leases.prepare("acct", tier, 1);
        let slot = leases.slot("acct").expect("slot");
        let mut s = slot.lock();
        s.remaining = remaining;
        s.held = true;
        s.urgent = false;
        s.allowance = 100_000_000;
        s.valid_until = Instant::now() + Duration::from_secs(60);
        drop(s);
        leases
    }

    fn hold(leases: &Leases, charge: &str, cost: i64) {
        let cfg = for_tests("[tiers.t]\nmonthly_credits = 100\n");
        let ask = Ask {
            account_id: "acct",
            tier: cfg.tier("t").expect("tier t"),
            cost,
            route: "ai",
            action: "chat",
            charge_id: charge,
            request_id: "req-1",
            hold: true,
        };
        assert!(matches!(leases.serve(&ask), Served::Charged { .. }));
    }

    fn slice_state(leases: &Leases) -> (i64, i64, i64) {
        let slot = leases.slot("acct").expect("slot");
        let s = slot.lock();
        (s.remaining, s.pending_net, s.spent_since_report)
    }

    #[test]
    fn a_hold_its_top_up_and_its_settle_move_the_slice_and_queue_their_rows() {
        let leases = sliced(100);
        hold(&leases, "c1", 10);
        assert_eq!(slice_state(&leases), (90, 10, 10));
        let Topped::Taken { taken, held, .. } = leases.extend("acct", "c1", 5, false, ROW) else {
            panic!("the slice has the step");
        };
        assert_eq!((taken, held), (5, 15));
        assert_eq!(slice_state(&leases), (85, 15, 15));
        // A step the slice cannot pay asks for a report first, then takes what is left.
        assert!(matches!(
            leases.extend("acct", "c1", 500, false, ROW),
            Topped::Acquire
        ));
        let Topped::Taken { taken, held, .. } = leases.extend("acct", "c1", 500, true, ROW) else {
            panic!("what is left");
        };
        assert_eq!((taken, held), (85, 100));
        assert_eq!(slice_state(&leases), (0, 100, 100));
        // Settled at 7: 93 back into the slice, once.
        let settled = leases
            .settle("acct", "c1", 7, &USAGE, ROW)
            .expect("settled");
        assert_eq!(settled.delta, -93);
        assert_eq!(slice_state(&leases), (93, 7, 7));
        assert!(leases.settle("acct", "c1", 7, &USAGE, ROW).is_none());
        assert!(matches!(
            leases.extend("acct", "c1", 1, true, ROW),
            Topped::Gone
        ));

        let report = crate::lease::report::build(&leases, 0, 1, false);
        let sec = &report.sections[0];
        let kinds: Vec<(RowKind, i64, &str)> = sec
            .rows
            .iter()
            .map(|r| (r.kind, r.amount, r.extra.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (RowKind::Debit, 10, ""),
                (RowKind::Extend, 5, "1"),
                (RowKind::Extend, 85, "2"),
                (RowKind::Settle, -93, "10|20|200|35|usage"),
            ]
        );
        // The settle's purchased part from earlier reports: none (every row of the hold is
        // in this report, where the script adds them up).
        assert_eq!(sec.parts, [-1, -1, -1, 0]);
        let slot = leases.slot("acct").expect("slot");
        let s = slot.lock();
        assert!(
            s.holds.is_empty(),
            "the hold's record ends with its settle row"
        );
        assert_eq!((s.pending_net, s.sent_net, s.spent_since_report), (0, 7, 0));
    }

    #[test]
    fn a_settle_over_the_hold_takes_the_extra_past_the_slice() {
        let leases = sliced(12);
        hold(&leases, "c1", 10);
        let settled = leases
            .settle("acct", "c1", 25, &USAGE, ROW)
            .expect("settled");
        assert_eq!(settled.delta, 15);
        // 2 were left: the slice is 13 short until the next report (which charges the
        // extra to the balance, as the exact path's settle does).
        assert_eq!(slice_state(&leases), (-13, 25, 25));
        assert!(!leases.can_serve("acct", 1));
    }

    #[test]
    fn the_purchased_part_of_a_reported_hold_goes_with_its_settle() {
        let leases = sliced(100);
        hold(&leases, "c1", 10);
        let _ = crate::lease::report::build(&leases, 0, 1, false);
        // As the reply of that report would tell it: 4 from the allowance, 6 from purchased.
        {
            let slot = leases.slot("acct").expect("slot");
            let mut s = slot.lock();
            s.holds.get_mut("c1").expect("hold").from_purchased = 6;
        }
        leases
            .settle("acct", "c1", 3, &USAGE, ROW)
            .expect("settled");
        let report = crate::lease::report::build(&leases, 0, 2, false);
        assert_eq!(report.sections[0].parts, [6]);
    }
}
