//! The reference model of one account, written from the README's money rules ("The money
//! model", "Reserve, then settle", debt, refunds, top-ups, period reset, tier change, quotas),
//! not from the Lua: integer micro-credits, no Redis. Each operation returns the reply the
//! ledger API must give and the journal entries the scripts must append.

use chrono::{DateTime, Datelike, NaiveDate};
use tollgate::ledger::holds::{Extended, SettleOutcome};
use tollgate::ledger::{CreditOutcome, DebitOutcome};
use tollgate::money::Credits;

/// A tier as the caller (the proxy) passes it to the debit script.
#[derive(Debug, Clone, Copy)]
pub struct Tier {
    pub name: &'static str,
    /// `None` = unlimited.
    pub monthly: Option<i64>,
    pub per_hour: u64,
    pub per_month: u64,
    pub tokens_per_month: u64,
}

pub const TIERS: [Tier; 3] = [
    Tier {
        name: "free",
        monthly: Some(5_000_000),
        per_hour: 4,
        per_month: 0,
        tokens_per_month: 150,
    },
    Tier {
        name: "pro",
        monthly: Some(20_000_000),
        per_hour: 0,
        per_month: 6,
        tokens_per_month: 0,
    },
    Tier {
        name: "max",
        monthly: None,
        per_hour: 3,
        per_month: 0,
        tokens_per_month: 0,
    },
];

pub const ACCOUNT: &str = "acct";
pub const ACTION: &str = "ai";
/// The account's billing period at the start (anchored on the 31st, so rolls visit Feb 28).
pub const PERIOD_START: i64 = 1_798_675_200; // 2026-12-31T00:00:00Z
pub const PERIOD_END: i64 = 1_801_353_600; // 2027-01-31T00:00:00Z
pub const ANCHOR_DAY: u32 = 31;
/// Grace deadlines (unix s) on either side of every clock the scripts read (the injected one
/// of the debit, Redis's real one of extend and settle).
pub const GRACE_PAST: i64 = 946_684_800; // 2000-01-01
pub const GRACE_LATER: i64 = 4_102_444_800; // 2100-01-01
/// The clock at the start: four hours before the first period boundary.
pub const START_MS: i64 = (PERIOD_END - 4 * 3600) * 1000;

/// One step of a generated sequence. Indices pick among the holds / plain charges made so far,
/// 0 = the newest (the step is skipped while there is none).
#[derive(Debug, Clone)]
pub enum Op {
    /// A plain debit; `stale_tier`: the caller's cached tier is not the account's.
    Debit {
        cost: i64,
        stale_tier: bool,
    },
    /// A debit that holds until settle; `wanted`: take up to this much (`None` = all).
    Hold {
        cost: i64,
        wanted: Option<i64>,
    },
    Extend {
        hold: usize,
        step: i64,
    },
    /// `cost: None` settles at what is held (an expired hold, as the sweeper does).
    Settle {
        hold: usize,
        cost: Option<i64>,
        tokens: u64,
    },
    /// The proxy's refund of a failed plain debit (at most once per charge).
    Refund {
        charge: usize,
    },
    /// An admin grant with one of a few idempotency keys.
    Grant {
        key: u8,
        amount: i64,
    },
    /// A Stripe refund's clawback of purchased credits, idempotent on its key.
    Clawback {
        key: u8,
        amount: i64,
    },
    /// The clock moves on (hour windows, period boundaries).
    Advance {
        ms: i64,
    },
    SetTier {
        tier: usize,
    },
    /// The subscription's payment state: 0 = paid (active), 1 = past due within its grace
    /// period, 2 = past due after it (the allowance is frozen).
    Billing {
        state: u8,
    },
}

/// What the ledger API must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Debit(DebitOutcome),
    Credit(CreditOutcome),
    Settle(SettleOutcome),
    Extend(Option<Extended>),
    Tier(bool),
    Status(Option<String>),
    /// Nothing was called (a clock move, or an index with nothing to pick).
    None,
}

/// A journal entry as the model expects it in the shard stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub kind: &'static str,
    pub amount: i64,
    pub d_allow: i64,
    pub d_purch: i64,
    pub allow_after: i64,
    pub purch_after: i64,
}

#[derive(Debug, Clone)]
pub struct Hold {
    pub charge: String,
    pub held: i64,
    pub from_allow: i64,
    pub from_purch: i64,
    pub unlimited: bool,
    pub extensions: u32,
    /// The true cost once settled.
    pub settled_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Charge {
    pub charge: String,
    pub cost: i64,
    pub from_allow: i64,
    pub from_purch: i64,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub tier: usize,
    pub allowance: i64,
    pub purchased: i64,
    pub period_start: i64,
    pub period_end: i64,
    pub now_ms: i64,
    req_h: u64,
    req_h_idx: i64,
    pub req_p: u64,
    pub tok_p: u64,
    /// See [`Op::Billing`].
    pub billing: u8,
    pub holds: Vec<Hold>,
    pub charges: Vec<Charge>,
    seen: std::collections::HashSet<String>,
    /// Every entry the journal must hold, in order.
    pub journal: Vec<Entry>,
}

/// The period end one calendar month after `ts`, on the anchor day where the month has it.
pub fn add_month(ts: i64, anchor: u32) -> i64 {
    let Some(t) = DateTime::from_timestamp(ts, 0) else {
        return ts;
    };
    let secs = ts.rem_euclid(86_400);
    let (mut y, mut m) = (t.year(), t.month() + 1);
    if m > 12 {
        m = 1;
        y += 1;
    }
    let first = NaiveDate::from_ymd_opt(y, m, 1).unwrap();
    let next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1).unwrap()
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1).unwrap()
    };
    let days_in_month = (next - first).num_days() as u32;
    let day = NaiveDate::from_ymd_opt(y, m, anchor.min(days_in_month)).unwrap();
    day.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() + secs
}

impl Model {
    /// A freshly hydrated account: its opening entry journals the first allowance (and the
    /// purchased credits it starts with).
    pub fn new(tier: usize, purchased: i64) -> Self {
        let allowance = TIERS[tier].monthly.unwrap_or(0);
        let mut m = Model {
            tier,
            allowance,
            purchased,
            period_start: PERIOD_START,
            period_end: PERIOD_END,
            now_ms: START_MS,
            req_h: 0,
            req_h_idx: -1,
            req_p: 0,
            tok_p: 0,
            billing: 0,
            holds: Vec::new(),
            charges: Vec::new(),
            seen: Default::default(),
            journal: Vec::new(),
        };
        m.push(
            format!("{ACCOUNT}:open:{PERIOD_START}"),
            "reset",
            0,
            allowance,
            purchased,
        );
        m
    }

    fn push(&mut self, id: String, kind: &'static str, amount: i64, d_allow: i64, d_purch: i64) {
        self.journal.push(Entry {
            id,
            kind,
            amount,
            d_allow,
            d_purch,
            allow_after: self.allowance,
            purch_after: self.purchased,
        });
    }

    fn balance(&self) -> (Credits, Credits) {
        (
            Credits::from_micros(self.allowance),
            Credits::from_micros(self.purchased),
        )
    }

    pub fn frozen(&self) -> bool {
        self.billing == 2
    }

    /// The allowance that can pay now: none while frozen.
    pub fn usable(&self) -> i64 {
        if self.frozen() {
            0
        } else {
            self.allowance
        }
    }

    pub fn status(&self) -> &'static str {
        if self.billing == 0 {
            "active"
        } else {
            "past_due"
        }
    }

    /// A failed invoice puts the account past due (with a grace deadline), a paid one lifts it.
    pub fn set_billing(&mut self, state: u8) -> Option<String> {
        self.billing = state;
        Some(self.status().to_string())
    }

    /// The tier the caller names: the account's own, or (stale) the next one.
    pub fn caller_tier(&self, stale: bool) -> Tier {
        TIERS[(self.tier + usize::from(stale)) % TIERS.len()]
    }

    /// Period boundary: the allowance becomes the tier's monthly credits (no roll-over, debt in
    /// purchased is not forgiven), period counters restart, one `reset` entry.
    fn roll(&mut self, charge: &str) {
        let now_s = self.now_ms.div_euclid(1000);
        if now_s < self.period_end {
            return;
        }
        while now_s >= self.period_end {
            self.period_start = self.period_end;
            self.period_end = add_month(self.period_end, ANCHOR_DAY);
        }
        let new = TIERS[self.tier].monthly.unwrap_or(0);
        let d = new - self.allowance;
        self.allowance = new;
        self.req_p = 0;
        self.tok_p = 0;
        self.push(
            format!("{charge}:reset:{}", self.period_start),
            "reset",
            0,
            d,
            0,
        );
    }

    /// A debit (a hold when `hold` is `Some(wanted)`): tier check, lazy period roll, quotas,
    /// then allowance first, then purchased; refused (402) when the balance cannot cover it.
    pub fn debit(
        &mut self,
        charge: &str,
        cost: i64,
        stale: bool,
        hold: Option<Option<i64>>,
    ) -> DebitOutcome {
        let caller = self.caller_tier(stale);
        let tier = TIERS[self.tier];
        if caller.name != tier.name {
            return DebitOutcome::TierMismatch {
                tier: tier.name.to_string(),
            };
        }
        self.roll(charge);
        let now_s = self.now_ms.div_euclid(1000);
        let hour = now_s.div_euclid(3600);
        let until_hour = ((hour + 1) * 3600 - now_s).max(1) as u64;
        let until_period = (self.period_end - now_s).max(1) as u64;
        let req_h = if self.req_h_idx == hour {
            self.req_h
        } else {
            0
        };
        let quota = |name: &str, limit: u64, retry: u64| DebitOutcome::Quota {
            name: name.to_string(),
            limit,
            retry_after_secs: retry,
        };
        if tier.per_hour > 0 && req_h >= tier.per_hour {
            return quota("requests_per_hour", tier.per_hour, until_hour);
        }
        if tier.per_month > 0 && self.req_p >= tier.per_month {
            return quota("requests_per_month", tier.per_month, until_period);
        }
        if tier.tokens_per_month > 0 && self.tok_p >= tier.tokens_per_month {
            return quota("tokens_per_month", tier.tokens_per_month, until_period);
        }
        let mut take = cost;
        let (mut fa, mut fp) = (0, 0);
        // Past due after the grace deadline: the allowance is frozen (also on an unlimited
        // tier), only purchased credits pay, 402 when they run out.
        let frozen = self.frozen();
        let usable = self.usable();
        if tier.monthly.is_some() || frozen {
            let total = usable + self.purchased;
            if total < cost {
                return DebitOutcome::Insufficient {
                    allowance: Credits::from_micros(usable),
                    purchased: Credits::from_micros(self.purchased),
                    leased: Credits::ZERO,
                };
            }
            if let Some(wanted) = hold {
                let avail = total.max(cost);
                take = match wanted {
                    None => avail,
                    Some(w) if w > cost => w.min(avail),
                    Some(_) => cost,
                };
            }
            fa = usable.max(0).min(take);
            fp = take - fa;
            self.allowance -= fa;
            self.purchased -= fp;
        }
        self.req_h = req_h + 1;
        self.req_h_idx = hour;
        self.req_p += 1;
        match hold {
            Some(_) => self.holds.push(Hold {
                charge: charge.to_string(),
                held: take,
                from_allow: fa,
                from_purch: fp,
                unlimited: tier.monthly.is_none() && !frozen,
                extensions: 0,
                settled_at: None,
            }),
            None => self.charges.push(Charge {
                charge: charge.to_string(),
                cost,
                from_allow: fa,
                from_purch: fp,
            }),
        }
        self.push(format!("{charge}:debit"), "debit", take, -fa, -fp);
        DebitOutcome::Charged {
            from_allowance: Credits::from_micros(fa),
            from_purchased: Credits::from_micros(fp),
            allowance: Credits::from_micros(self.usable()),
            purchased: Credits::from_micros(self.purchased),
            period_end: self.period_end,
            taken: Credits::from_micros(take),
        }
    }

    /// A top-up of an open hold: the step when the balance has it, else what is left (never
    /// below zero), allowance first.
    pub fn extend(&mut self, i: usize, step: i64) -> Option<Extended> {
        let (allowance, purchased) = (self.usable(), self.purchased);
        let h = &mut self.holds[i];
        if h.settled_at.is_some() {
            return None;
        }
        if step <= 0 {
            return Some(Extended {
                taken: Credits::ZERO,
                held: Credits::from_micros(h.held),
                short: false,
                balance: Credits::from_micros(allowance + purchased),
            });
        }
        let (mut take, mut ta, mut tp) = (step, 0, 0);
        if !h.unlimited {
            take = step.min((allowance + purchased).max(0));
            ta = allowance.max(0).min(take);
            tp = take - ta;
        }
        let mut entry = None;
        if take > 0 {
            h.held += take;
            h.from_allow += ta;
            h.from_purch += tp;
            h.extensions += 1;
            entry = Some(format!("{}:x{}", h.charge, h.extensions));
        }
        let held = h.held;
        if let Some(id) = entry {
            self.allowance -= ta;
            self.purchased -= tp;
            self.push(id, "extend", take, -ta, -tp);
        }
        Some(Extended {
            taken: Credits::from_micros(take),
            held: Credits::from_micros(held),
            short: take < step,
            balance: Credits::from_micros(self.usable() + self.purchased),
        })
    }

    /// Ends a hold at its true cost, exactly once: the difference goes back to purchased first
    /// (as far as the hold took from it), then to the allowance; an extra charge takes the
    /// allowance first, then purchased, which may go below zero (debt).
    pub fn settle(&mut self, i: usize, cost: Option<i64>, tokens: u64) -> SettleOutcome {
        let allowance = self.usable();
        let h = &mut self.holds[i];
        if h.settled_at.is_some() {
            return SettleOutcome::NotFound;
        }
        let cost = cost.unwrap_or(h.held);
        h.settled_at = Some(cost);
        let delta = cost - h.held;
        let (mut da, mut dp) = (0, 0);
        if !h.unlimited {
            if delta < 0 {
                dp = (-delta).min(h.from_purch);
                da = -delta - dp;
            } else if delta > 0 {
                da = -allowance.max(0).min(delta);
                dp = -(delta + da);
            }
        }
        let id = format!("{}:settle", h.charge);
        self.tok_p += tokens;
        self.allowance += da;
        self.purchased += dp;
        self.push(id, "settle", delta, da, dp);
        SettleOutcome::Settled {
            delta: Credits::from_micros(delta),
            allowance: Credits::from_micros(self.allowance),
            purchased: Credits::from_micros(self.purchased),
        }
    }

    /// A credit idempotent on `external`: the same key never applies twice.
    fn credit(
        &mut self,
        external: String,
        id: String,
        kind: &'static str,
        amount: i64,
        to_allow: i64,
        to_purch: i64,
    ) -> CreditOutcome {
        if !self.seen.insert(external) {
            let (allowance, purchased) = self.balance();
            return CreditOutcome::Duplicate {
                allowance,
                purchased,
            };
        }
        self.allowance += to_allow;
        self.purchased += to_purch;
        self.push(id, kind, amount, to_allow, to_purch);
        let (allowance, purchased) = self.balance();
        CreditOutcome::Applied {
            allowance,
            purchased,
        }
    }

    /// The refund of a failed plain debit: back to the buckets it came from, at most once.
    pub fn refund(&mut self, i: usize) -> CreditOutcome {
        let c = self.charges[i].clone();
        self.credit(
            format!("refund:{}", c.charge),
            format!("{}:refund", c.charge),
            "refund",
            -c.cost,
            c.from_allow,
            c.from_purch,
        )
    }

    /// A grant goes to purchased (paying any debt there first).
    pub fn grant(&mut self, key: u8, amount: i64) -> CreditOutcome {
        let id = grant_id(key);
        self.credit(id.clone(), id, "grant", 0, 0, amount)
    }

    /// A clawback takes from purchased, which may go below zero.
    pub fn clawback(&mut self, key: u8, amount: i64) -> CreditOutcome {
        let id = clawback_id(key);
        self.credit(id.clone(), id, "adjustment", 0, 0, -amount)
    }

    /// A tier change: the allowance becomes the new tier's monthly credits at once (journaled
    /// as `subscription`); purchased is untouched; the same tier changes nothing.
    pub fn set_tier(&mut self, tier: usize, entry_id: &str) -> bool {
        if tier == self.tier {
            return true;
        }
        self.tier = tier;
        let new = TIERS[tier].monthly.unwrap_or(0);
        let d = new - self.allowance;
        self.allowance = new;
        self.push(entry_id.to_string(), "subscription", 0, d, 0);
        true
    }
}

pub fn grant_id(key: u8) -> String {
    format!("grant:{ACCOUNT}:k{key}")
}

pub fn clawback_id(key: u8) -> String {
    format!("refund:ch_{key}:100")
}
