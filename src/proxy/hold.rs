//! A request's hold while it runs: what is held so far, and a keeper task that renews the hold
//! (so long streams never expire) and, on `per_minute` routes, takes each started step. Stream
//! top-ups (a stream whose running cost passed what is held) run on the side too, so the
//! response's bytes never wait for Redis.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::money::Credits;
use crate::pricing::Rates;
use crate::state::AppState;

/// A hold taken from this instance's credit slice: its top-ups and settle are rows of the
/// slice's next report, which name the request.
#[derive(Debug, Clone)]
pub struct Sliced {
    pub route: String,
    pub request_id: String,
}

/// Shared between the request's phases and its background tasks.
#[derive(Debug)]
pub struct Hold {
    pub account_id: String,
    pub charge_id: String,
    pub action: String,
    /// Taken from the credit slice (no Redis record; see [`crate::lease`]).
    pub sliced: Option<Sliced>,
    pub rates: Rates,
    pub started: Instant,
    ttl_ms: u64,
    held: AtomicI64,
    /// Balance after the last hold operation.
    balance: AtomicI64,
    /// The balance could not pay a full top-up: the stream runs on what is held, no further.
    short: AtomicBool,
    /// A duration step could not be paid: end the session now.
    cut: AtomicBool,
    extending: AtomicBool,
    keeper: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Hold {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        account_id: &str,
        charge_id: &str,
        action: &str,
        rates: Rates,
        held: Credits,
        balance: Option<Credits>,
        ttl_ms: u64,
        sliced: Option<Sliced>,
    ) -> Arc<Hold> {
        Arc::new(Hold {
            account_id: account_id.to_string(),
            charge_id: charge_id.to_string(),
            action: action.to_string(),
            sliced,
            rates,
            started: Instant::now(),
            ttl_ms,
            held: AtomicI64::new(held.micros()),
            balance: AtomicI64::new(balance.map_or(i64::MAX, Credits::micros)),
            short: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            extending: AtomicBool::new(false),
            keeper: Mutex::new(None),
        })
    }

    pub fn held(&self) -> Credits {
        Credits::from_micros(self.held.load(Ordering::Relaxed))
    }

    /// The balance after the last hold operation (`None` on unlimited tiers).
    pub fn balance(&self) -> Option<Credits> {
        match self.balance.load(Ordering::Relaxed) {
            i64::MAX => None,
            b => Some(Credits::from_micros(b)),
        }
    }

    pub fn is_short(&self) -> bool {
        self.short.load(Ordering::Relaxed)
    }

    /// A duration step went unpaid: the session must end.
    pub fn must_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    fn record(&self, e: &crate::ledger::holds::Extended) {
        self.held.store(e.held.micros(), Ordering::Relaxed);
        if self.balance.load(Ordering::Relaxed) != i64::MAX {
            self.balance.store(e.balance.micros(), Ordering::Relaxed);
        }
        if e.short {
            self.short.store(true, Ordering::Relaxed);
        }
    }

    /// Starts the keeper: renews the hold every third of its ttl and takes each started
    /// duration step after the first (which the reserve paid).
    /// The keeper holds only a weak reference: when the request's context goes away, so does
    /// the keeper, even if no phase stopped it.
    pub fn start_keeper(self: &Arc<Self>, state: Arc<AppState>) {
        let hold = Arc::downgrade(self);
        let task = tokio::spawn(async move { Hold::keep(hold, state).await });
        if let Ok(mut keeper) = self.keeper.lock() {
            *keeper = Some(task.abort_handle());
        }
    }

    async fn keep(weak: std::sync::Weak<Hold>, state: Arc<AppState>) {
        let Some(first) = weak.upgrade() else {
            return;
        };
        let renew_every = Duration::from_millis((first.ttl_ms / 3).max(100));
        let tick = Duration::from_millis(first.rates.tick_ms.max(1));
        let ticking = first.rates.per_tick != Credits::ZERO;
        let started = first.started;
        drop(first);
        let mut next_renew = Instant::now() + renew_every;
        let mut steps_paid: u32 = 1;
        loop {
            let next_tick = started + tick * steps_paid;
            let (at, is_tick) = if ticking && next_tick <= next_renew {
                (next_tick, true)
            } else {
                (next_renew, false)
            };
            tokio::time::sleep_until(at.into()).await;
            let Some(hold) = weak.upgrade() else {
                return;
            };
            let step = if is_tick {
                hold.rates.per_tick
            } else {
                Credits::ZERO
            };
            let reason = if is_tick { "duration" } else { "renew" };
            match hold.extend_exact(&state, step, reason).await {
                Ok(Some(e)) => {
                    hold.record(&e);
                    if is_tick {
                        steps_paid += 1;
                        if e.short {
                            tracing::info!(account = %hold.account_id, "the balance ran out during a metered session; ending it");
                            hold.cut.store(true, Ordering::Relaxed);
                            return;
                        }
                    } else {
                        next_renew = Instant::now() + renew_every;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // Retried at the next renewal; a hold that cannot be renewed at all
                    // expires and is settled at what it holds.
                    tracing::warn!(error = %e, account = %hold.account_id, "could not extend a hold");
                    state
                        .metrics
                        .redis_errors
                        .with_label_values(&["extend"])
                        .inc();
                    if is_tick {
                        // An unpaid step is not given away: it is settled at the end.
                        steps_paid += 1;
                    } else {
                        next_renew = Instant::now() + renew_every;
                    }
                }
            }
        }
    }

    /// Takes `step` more for a stream whose running cost passed what is held, on the side
    /// (one top-up in flight at a time).
    pub fn top_up(self: &Arc<Self>, state: &Arc<AppState>, step: Credits) {
        if self.is_short() || self.extending.swap(true, Ordering::AcqRel) {
            return;
        }
        let hold = Arc::clone(self);
        let state = Arc::clone(state);
        if let Some(sliced) = self.sliced.clone() {
            tokio::spawn(async move {
                hold.top_up_from_slice(&state, &sliced, step).await;
                hold.extending.store(false, Ordering::Release);
            });
            return;
        }
        tokio::spawn(async move {
            match hold.extend_exact(&state, step, "stream").await {
                Ok(Some(e)) => hold.record(&e),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, account = %hold.account_id, "could not top up a stream's hold");
                    state
                        .metrics
                        .redis_errors
                        .with_label_values(&["extend"])
                        .inc();
                }
            }
            hold.extending.store(false, Ordering::Release);
        });
    }

    /// One `extend.lua` call for this (exact) hold, timed as the `extend` script.
    async fn extend_exact(
        &self,
        state: &AppState,
        step: Credits,
        reason: &str,
    ) -> Result<Option<crate::ledger::holds::Extended>, crate::ledger::LedgerError> {
        let mut conn = state.redis.clone();
        let started = Instant::now();
        let outcome = state
            .ledger
            .extend(
                &mut conn,
                &self.account_id,
                &self.charge_id,
                step,
                self.ttl_ms,
                reason,
                &self.action,
            )
            .await;
        state
            .metrics
            .redis_script_seconds
            .with_label_values(&["extend"])
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// A top-up from the credit slice: in process when the slice has the step, else after one
    /// report that asks for it; when even then the slice has less, what it has (short: the
    /// stream runs on what is held, as on the exact path when the balance has less).
    async fn top_up_from_slice(&self, state: &AppState, sliced: &Sliced, step: Credits) {
        let leases = &state.leases;
        let row = (
            sliced.route.as_str(),
            self.action.as_str(),
            sliced.request_id.as_str(),
        );
        for attempt in 0..2 {
            let last = attempt == 1;
            match leases.extend(&self.account_id, &self.charge_id, step.micros(), last, row) {
                crate::lease::Topped::Taken {
                    taken,
                    held,
                    balance,
                } => {
                    self.record(&crate::ledger::holds::Extended {
                        taken: Credits::from_micros(taken),
                        held: Credits::from_micros(held),
                        short: taken < step.micros(),
                        balance: Credits::from_micros(balance.unwrap_or(0)),
                    });
                    return;
                }
                crate::lease::Topped::Gone => return,
                crate::lease::Topped::Acquire => {
                    let Some(shard) = leases.want(&self.account_id, step.micros()) else {
                        return;
                    };
                    let waiting = Some((self.account_id.as_str(), step.micros()));
                    if let Err(e) =
                        crate::lease::report::report_shard_for(leases, state, shard, false, waiting)
                            .await
                    {
                        tracing::warn!(error = %e, account = %self.account_id, "could not top up a stream's slice");
                    }
                }
            }
        }
    }

    /// Stops the keeper (the request is ending; settle follows).
    pub fn stop(&self) {
        if let Ok(mut keeper) = self.keeper.lock() {
            if let Some(task) = keeper.take() {
                task.abort();
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps a fixed-price request's concurrency leases alive while it runs (a long session on a
/// `cost` route must keep its `max_concurrent` slot past `lease_ttl_seconds`). Stops when
/// dropped with the request's context.
#[derive(Debug)]
pub struct LeaseKeeper(tokio::task::AbortHandle);

impl LeaseKeeper {
    pub fn start(state: Arc<AppState>, charge: &crate::proxy::debit::Charge, ttl_ms: u64) -> Self {
        let account_id = charge.account_id.clone();
        let charge_id = charge.charge_id.clone();
        let action = charge.action_lease.then(|| charge.action.clone());
        let task = tokio::spawn(async move {
            let every = Duration::from_millis((ttl_ms / 3).max(100));
            loop {
                tokio::time::sleep(every).await;
                let mut conn = state.redis.clone();
                if let Err(e) = state
                    .ledger
                    .renew_lease(
                        &mut conn,
                        &account_id,
                        &charge_id,
                        action.as_deref(),
                        ttl_ms,
                    )
                    .await
                {
                    tracing::warn!(error = %e, account = %account_id, "could not renew a concurrency lease");
                }
            }
        });
        LeaseKeeper(task.abort_handle())
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::holds::Extended;

    fn extended(held: i64, balance: i64, short: bool) -> Extended {
        Extended {
            taken: Credits::ZERO,
            held: Credits::from_micros(held),
            short,
            balance: Credits::from_micros(balance),
        }
    }

    #[test]
    fn a_top_up_updates_what_is_held_and_the_balance() {
        let h = Hold::new(
            "a",
            "c",
            "ai",
            Rates::default(),
            Credits::from_micros(5),
            Some(Credits::from_micros(95)),
            1000,
            None,
        );
        assert_eq!(
            (h.held(), h.balance()),
            (Credits::from_micros(5), Some(Credits::from_micros(95)))
        );
        h.record(&extended(8, 92, false));
        assert_eq!(
            (h.held(), h.balance()),
            (Credits::from_micros(8), Some(Credits::from_micros(92)))
        );
        assert!(!h.is_short());
        // Short once, short for good: a later full top-up does not un-cut the stream.
        h.record(&extended(10, 0, true));
        h.record(&extended(10, 0, false));
        assert!(h.is_short());
        assert!(!h.must_cut());
    }

    #[test]
    fn an_unlimited_hold_has_no_balance() {
        let h = Hold::new(
            "a",
            "c",
            "ai",
            Rates::default(),
            Credits::from_micros(5),
            None,
            1000,
            None,
        );
        h.record(&extended(8, -3, false));
        assert_eq!(h.held(), Credits::from_micros(8));
        assert_eq!(h.balance(), None);
    }
}
