//! Credit slices: metering without a Redis round trip per request.
//!
//! An instance reserves a slice of an account's balance in Redis (`leased` on the account
//! hash; the money stays in allowance/purchased), serves the account's fixed-price requests
//! from it in process, and reports what it served once per batch window — one script call per
//! shard carrying every request's journal row ([`report`]). The report also renews, tops up or
//! gives back each slice and tells the instance the account's tier, status and balance, so a
//! change reaches the slice within one batch window (at once through pub/sub, [`recall`]).
//!
//! Exactness: an instance never spends more than its slice, and nobody else can take reserved
//! money, so there is no over-spend. Money is refused only when the balance outside slices
//! cannot pay *and* recalling the other instances' slices did not free enough (no false 402).
//! A crashed instance's slice expires back to the account after `leases.ttl_ms`; what it served
//! and never reported (at most one batch window, at most 1 s when Redis is slow) is forgiven.
//!
//! Metered (token-priced, SSE) requests take their hold from the slice the same way: the hold
//! is a charge row, a stream's top-ups are `extend` rows taken from the slice, and the settle
//! is a row that gives the unused part back to the slice (or takes the extra) with the exact
//! path's rules ([`Leases::settle`]). A crash after a hold was reported leaves it charged as
//! held, as an expired exact hold is settled at what it holds.
//!
//! Served from slices: fixed prices and holds on tiers without per-request quotas,
//! concurrency limits or counted resources ([`eligible`]), holds also without
//! `tokens_per_month` and without per-minute steps ([`eligible_hold`]); everything else takes
//! the exact path.

pub mod holds;
pub mod recall;
pub mod report;
pub mod reporter;
pub mod slice;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::config::{raw, Config, MonthlyCredits, RouteConfig, TierConfig};
use crate::ledger::keys::shard_of;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;
pub use holds::{SettleUsage, SettledHere, Topped};
use slice::{Mode, Row, RowKind, Slice, SliceHold};

type Slot = Arc<Mutex<Slice>>;

/// What reports and recalls use beyond the slices. Implemented by the composition root, which
/// owns the stores, so this module does not depend on how the process is put together.
pub trait Stores: Send + Sync + 'static {
    /// A handle on the shared Redis connection.
    fn redis(&self) -> RedisConn;
    /// Where an account Redis lost is loaded from.
    fn pg(&self) -> &sqlx::PgPool;
    fn ledger(&self) -> &Ledger;
    fn metrics(&self) -> &Metrics;
    /// The config serving now (an account is loaded with its current tier).
    fn config(&self) -> Arc<Config>;
}

/// This process's slices, by shard (a report covers one shard).
pub struct Leases {
    pub cfg: raw::Leases,
    /// Unique per process: names this instance's slices in Redis.
    pub instance: String,
    shards: Vec<RwLock<HashMap<String, Slot>>>,
    reports: Vec<tokio::sync::Mutex<report::ShardReports>>,
    /// Wakes the reporter early (a recall, an account change).
    pub kick: tokio::sync::Notify,
}

/// What a request asks of the slice.
pub struct Ask<'a> {
    pub account_id: &'a str,
    pub tier: &'a TierConfig,
    pub cost: i64,
    pub route: &'a str,
    pub action: &'a str,
    pub charge_id: &'a str,
    pub request_id: &'a str,
    /// A metered request's hold (settled later with [`Leases::settle`]), not a final price.
    pub hold: bool,
}

/// The answer to [`Leases::serve`].
pub enum Served {
    /// Charged locally: the balance this instance now sees (µc; `None` on unlimited tiers)
    /// and the split it expects (the report decides the real one).
    Charged {
        balance: Option<i64>,
        from_allowance: i64,
    },
    /// No usable slice here yet: acquire one (one report), then ask again.
    Acquire,
    /// Take the exact path (per-request debit).
    Exact,
}

/// Requests the slice path can serve exactly: a fixed price, and nothing on the tier that
/// counts requests one by one across instances.
pub fn eligible(tier: &TierConfig, route: &RouteConfig) -> bool {
    let quota = tier.action_quotas().get(&route.action);
    tier.requests_per_hour().is_none()
        && tier.requests_per_month().is_none()
        && tier.max_concurrent().is_none()
        && route.counts.is_none()
        && quota.is_none_or(|q| {
            q.per_hour.is_none() && q.per_month.is_none() && q.max_concurrent.is_none()
        })
}

/// Holds the slice path can serve exactly: [`eligible`], no `tokens_per_month` (counted at
/// admission against Redis), and no per-minute steps (`per_tick`, taken by the exact path's
/// keeper as the session runs).
pub fn eligible_hold(tier: &TierConfig, route: &RouteConfig, ticking: bool) -> bool {
    !ticking && tier.tokens_per_month().is_none() && eligible(tier, route)
}

fn monthly(tier: &TierConfig) -> i64 {
    match tier.monthly_credits() {
        MonthlyCredits::Limited(c) => c.micros(),
        MonthlyCredits::Unlimited => -1,
    }
}

impl Leases {
    pub fn new(cfg: raw::Leases, shards: u32) -> Self {
        let n = shards.max(1) as usize;
        Leases {
            cfg,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            shards: (0..n).map(|_| RwLock::new(HashMap::new())).collect(),
            reports: (0..n)
                .map(|_| tokio::sync::Mutex::new(report::ShardReports::default()))
                .collect(),
            kick: tokio::sync::Notify::new(),
        }
    }

    fn shard(&self, account_id: &str) -> usize {
        shard_of(account_id, self.shards.len() as u32) as usize
    }

    fn slot(&self, account_id: &str) -> Option<Slot> {
        self.shards[self.shard(account_id)]
            .read()
            .get(account_id)
            .cloned()
    }

    /// How long a reply keeps a slice servable: a slice not confirmed for 1 s (or half its
    /// TTL) stops serving, so a tier change, suspension or clawback reaches it within 1 s
    /// even without pub/sub, and an instance cut off from Redis stops spending.
    pub fn serve_window(&self) -> Duration {
        Duration::from_millis((self.cfg.ttl_ms / 2).min(1_000))
    }

    /// The hot path: no I/O, one short lock.
    pub fn serve(&self, ask: &Ask<'_>) -> Served {
        let Some(slot) = self.slot(ask.account_id) else {
            return Served::Acquire;
        };
        let mut s = slot.lock();
        let now = Instant::now();
        if s.exact(now) || s.mode == Mode::Returning {
            return Served::Exact;
        }
        if s.tier != ask.tier.name {
            if !s.held && s.remaining == 0 {
                // Nothing is out under the old tier: take the next slice under the new one.
                s.tier = ask.tier.name.clone();
                s.monthly = monthly(ask.tier);
                s.low_threshold = ask.tier.low_balance_credits().map(|c| c.micros());
                return Served::Acquire;
            }
            // The caller knows another tier than the slice was taken for: give it back; the
            // exact path checks the tier against Redis.
            s.mode = Mode::Returning;
            self.kick.notify_one();
            return Served::Exact;
        }
        s.floor = s.floor.max(ask.cost);
        if !s.serving(now) || s.remaining < ask.cost {
            return Served::Acquire;
        }
        s.remaining -= ask.cost;
        s.pending_net += ask.cost;
        s.spent_since_report += ask.cost;
        s.spent_in_window += ask.cost;
        s.last_used = now;
        let from_allowance = if s.monthly < 0 {
            0
        } else {
            (s.allowance - s.unconfirmed() + ask.cost).clamp(0, ask.cost)
        };
        s.pending.push(Row {
            kind: RowKind::Debit,
            charge_id: ask.charge_id.to_string(),
            amount: ask.cost,
            route: ask.route.to_string(),
            action: ask.action.to_string(),
            ts_ms: crate::ledger::now_ms(),
            request_id: ask.request_id.to_string(),
            extra: String::new(),
            part: None,
        });
        if ask.hold {
            s.holds.insert(
                ask.charge_id.to_string(),
                SliceHold {
                    held: ask.cost,
                    ..SliceHold::default()
                },
            );
        } else {
            s.in_flight.insert(ask.charge_id.to_string(), None);
        }
        Served::Charged {
            balance: (s.monthly >= 0).then(|| s.balance()),
            from_allowance,
        }
    }

    /// Makes sure a slot exists for the account (so the next report asks for a slice) with
    /// at least `cost` as its floor; returns its shard.
    pub fn prepare(&self, account_id: &str, tier: &TierConfig, cost: i64) -> usize {
        let shard = self.shard(account_id);
        let existing = self.shards[shard].read().get(account_id).cloned();
        let slot = match existing {
            Some(slot) => slot,
            None => {
                let mut map = self.shards[shard].write();
                map.entry(account_id.to_string())
                    .or_insert_with(|| {
                        Arc::new(Mutex::new(Slice::new(
                            &tier.name,
                            monthly(tier),
                            tier.low_balance_credits().map(|c| c.micros()),
                            Instant::now(),
                        )))
                    })
                    .clone()
            }
        };
        let mut s = slot.lock();
        s.floor = s.floor.max(cost);
        if s.held && s.mode == Mode::Serving && !s.urgent {
            s.dry = (s.dry + 1).min(10);
        }
        s.urgent = true;
        if s.mode == Mode::Returning && s.remaining == 0 && s.pending.is_empty() {
            s.mode = Mode::Serving;
        }
        if s.tier != tier.name {
            s.tier = tier.name.clone();
            s.monthly = monthly(tier);
        }
        shard
    }

    /// A slice-served request failed: its charge is given back in the next report, exactly as
    /// it was taken.
    pub fn refund(&self, account_id: &str, charge_id: &str, row: (i64, &str, &str, &str)) {
        let (amount, route, action, request_id) = row;
        let Some(slot) = self.slot(account_id) else {
            tracing::error!(account = %account_id, charge = %charge_id, "refund of a slice charge without its slice");
            return;
        };
        let mut s = slot.lock();
        s.pending_net -= amount;
        s.pending.push(Row {
            kind: RowKind::Refund,
            charge_id: charge_id.to_string(),
            amount,
            route: route.to_string(),
            action: action.to_string(),
            ts_ms: crate::ledger::now_ms(),
            request_id: request_id.to_string(),
            extra: String::new(),
            part: None,
        });
    }

    /// The request of a slice charge ended: its split is no longer needed.
    pub fn finish(&self, account_id: &str, charge_id: &str) {
        if let Some(slot) = self.slot(account_id) {
            slot.lock().in_flight.remove(charge_id);
        }
    }

    /// What this instance has charged (net of refunds) that Redis had not applied when it
    /// had applied report `applied_seq` of the account's shard (µc): balance views subtract
    /// it, so they are exact for one instance.
    pub fn unconfirmed(&self, account_id: &str, applied_seq: u64) -> i64 {
        self.slot(account_id)
            .map_or(0, |slot| slot.lock().unconfirmed_after(applied_seq))
    }

    /// Whether a request of `cost` can be served from the account's slice now (another
    /// waiting request's report may have topped it up meanwhile).
    pub fn can_serve(&self, account_id: &str, cost: i64) -> bool {
        self.slot(account_id).is_some_and(|slot| {
            let s = slot.lock();
            s.mode == Mode::Serving && s.remaining >= cost && Instant::now() < s.valid_until
        })
    }

    /// Whether this instance holds anything for the account (a balance read then also reads
    /// which of its reports Redis has applied).
    pub fn holds(&self, account_id: &str) -> bool {
        self.slot(account_id).is_some()
    }

    /// Gives the account's slice back at the next report (now), e.g. after its tier or
    /// status changed; with `exact`, also keeps the account on the exact path for a while
    /// (another instance needs the money).
    pub fn recall(&self, account_id: &str, exact: bool) {
        if let Some(slot) = self.slot(account_id) {
            let mut s = slot.lock();
            s.mode = if exact {
                Mode::Exact(Instant::now() + Duration::from_millis(1_000))
            } else {
                Mode::Returning
            };
            s.urgent = true;
            drop(s);
            self.kick.notify_one();
        }
    }
}
