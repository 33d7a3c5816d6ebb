//! Phase 4 — the debit: one script call that rolls the period, checks status, quotas,
//! concurrency and balance, takes the price from allowance then purchased, and journals it.
//! A missing account is hydrated once and the call retried.

use std::time::Instant;

use crate::auth::Identity;
use crate::config::{MonthlyCredits, RouteConfig, TierConfig};
use crate::error::GatewayError;
use crate::ledger::{self, DebitOutcome, DebitRequest, LedgerError};
use crate::money::Credits;
use crate::state::{AppState, Snapshot};

/// What was taken for this request; refunded or released when it ends.
#[derive(Debug, Clone)]
pub struct Charge {
    pub account_id: String,
    /// Unique id of this debit (minted here, not the client's request id): the refund's
    /// idempotency key and the concurrency lease use it.
    pub charge_id: String,
    pub cost: Credits,
    pub from_allowance: Credits,
    pub from_purchased: Credits,
    /// Balance after the debit (`None` for unlimited tiers).
    pub remaining: Option<Credits>,
    pub low: bool,
    /// The tier's low-balance threshold, to re-decide `low` after a refund.
    pub low_threshold: Option<Credits>,
    /// A concurrency lease is held under the request id.
    pub lease: bool,
    /// The amount is held until settle (metered routes), not final.
    pub hold: bool,
    /// The route's action (its per-action lease, if any, is released with the charge).
    pub action: String,
    pub action_lease: bool,
    /// The resource this request counted (taken back if the request does not succeed).
    pub counted: Option<(String, i64)>,
}

/// What to debit: a fixed price, or a hold for a metered route.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Admission needs this much; it is taken.
    pub cost: Credits,
    pub hold: Option<HoldSpec>,
}

/// A hold: the debit is settled later with the true cost.
#[derive(Debug, Clone, Copy)]
pub struct HoldSpec {
    pub ttl_ms: u64,
    /// Take up to this much when the balance has it (`None`: all of it).
    pub wanted: Option<Credits>,
}

/// The debit's verdict.
pub enum Debit {
    Charged(Charge),
    /// Redis holds another tier: gate again with it.
    TierChanged(String),
}

fn monthly(tier: &TierConfig) -> Option<Credits> {
    match tier.raw.monthly_credits {
        MonthlyCredits::Limited(c) => Some(c),
        MonthlyCredits::Unlimited => None,
    }
}

pub async fn debit(
    state: &AppState,
    snap: &Snapshot,
    route: &RouteConfig,
    identity: &Identity,
    tier: &TierConfig,
    ask: Ask,
    request_id: &str,
) -> Result<Debit, DebitError> {
    let cost = ask.cost;
    let t = &tier.raw;
    let quota = t.action_quotas.get(&route.action);
    let charge_id = uuid::Uuid::now_v7().simple().to_string();
    let request = DebitRequest {
        account_id: &identity.account_id,
        tier: &tier.name,
        monthly: monthly(tier),
        cost,
        now_ms: ledger::now_ms(),
        request_id,
        charge_id: &charge_id,
        route: &route.name,
        action: &route.action,
        requests_per_hour: t.requests_per_hour.unwrap_or(0),
        requests_per_month: t.requests_per_month.unwrap_or(0),
        action_per_hour: quota.and_then(|q| q.per_hour).unwrap_or(0),
        action_per_month: quota.and_then(|q| q.per_month).unwrap_or(0),
        max_concurrent: t.max_concurrent.unwrap_or(0),
        lease_ttl_ms: snap.config.redis.lease_ttl_seconds * 1000,
        deadline_ms: 0,
        hold_ttl_ms: ask.hold.map_or(0, |h| h.ttl_ms),
        wanted: ask.hold.and_then(|h| h.wanted),
        tokens_per_month: t.tokens_per_month.unwrap_or(0),
        counts: route
            .counts
            .as_ref()
            .map(|(resource, delta)| (resource.as_str(), *delta, t.limits.get(resource).copied())),
        action_max_concurrent: quota.and_then(|q| q.max_concurrent).unwrap_or(0),
    };
    let mut request = request;
    let mut conn = state.redis.clone();
    for attempt in 0..2 {
        let started = Instant::now();
        request.deadline_ms = state.ledger.deadline_ms();
        let outcome = state.ledger.debit(&mut conn, &request).await;
        state
            .metrics
            .redis_script_seconds
            .with_label_values(&["debit"])
            .observe(started.elapsed().as_secs_f64());
        let outcome = outcome.map_err(|e| {
            state
                .metrics
                .redis_errors
                .with_label_values(&["debit"])
                .inc();
            if crate::ledger::unanswered::outcome_unknown(&e) {
                // It may have charged: refunded later if the journal shows it ran.
                state
                    .unanswered
                    .note(crate::ledger::unanswered::Unanswered {
                        account_id: identity.account_id.clone(),
                        charge_id: charge_id.clone(),
                        request_id: request_id.to_string(),
                        route: route.name.clone(),
                        action: route.action.clone(),
                        deadline_ms: request.deadline_ms,
                        hold: ask.hold.is_some(),
                        noted: Instant::now(),
                    });
            }
            DebitError::Unavailable(e)
        })?;
        let rejected = |err: GatewayError| Err(DebitError::Rejected(err));
        match outcome {
            DebitOutcome::Charged {
                from_allowance,
                from_purchased,
                allowance,
                purchased,
                taken,
                ..
            } => {
                state
                    .metrics
                    .credits_debited_micros
                    .with_label_values(&[&route.name, &tier.name])
                    .inc_by(taken.micros().max(0) as u64);
                let remaining = request.monthly.map(|_| allowance + purchased);
                let low = match (remaining, t.low_balance_credits) {
                    (Some(r), Some(threshold)) => r < threshold,
                    _ => false,
                };
                return Ok(Debit::Charged(Charge {
                    account_id: identity.account_id.clone(),
                    charge_id: charge_id.clone(),
                    cost: taken,
                    from_allowance,
                    from_purchased,
                    remaining,
                    low,
                    low_threshold: t.low_balance_credits,
                    lease: request.max_concurrent > 0 || request.action_max_concurrent > 0,
                    hold: ask.hold.is_some(),
                    action: route.action.clone(),
                    action_lease: request.action_max_concurrent > 0,
                    counted: route.counts.clone(),
                }));
            }
            DebitOutcome::Missing if attempt == 0 => {
                match state
                    .ledger
                    .hydrate(&mut conn, &state.pg, &snap.config, &identity.account_id)
                    .await
                {
                    Ok(created) => {
                        // Only a load that happened counts (another instance may have won).
                        if created {
                            state.metrics.hydrations.inc();
                        }
                        continue;
                    }
                    Err(LedgerError::NoSuchAccount(_)) => {
                        return rejected(GatewayError::InvalidCredentials)
                    }
                    Err(LedgerError::UnknownTier { tier, .. }) => {
                        return rejected(GatewayError::AccountInactive {
                            status: format!("on tier {tier:?}, which no longer exists"),
                        })
                    }
                    Err(e) => return Err(DebitError::Unavailable(e)),
                }
            }
            DebitOutcome::Missing => {
                return Err(DebitError::Unavailable(LedgerError::Reply(
                    "account still missing after hydration".into(),
                )))
            }
            DebitOutcome::Insufficient {
                allowance,
                purchased,
            } => {
                state
                    .metrics
                    .plan_rejections
                    .with_label_values(&["insufficient_credits"])
                    .inc();
                return rejected(GatewayError::InsufficientCredits {
                    remaining: allowance + purchased,
                    required: cost,
                    tier: tier.name.clone(),
                });
            }
            DebitOutcome::Quota {
                name,
                limit,
                retry_after_secs,
            } => {
                state
                    .metrics
                    .plan_rejections
                    .with_label_values(&["quota_exceeded"])
                    .inc();
                let window_secs = if name.contains("hour") {
                    3600
                } else {
                    retry_after_secs.max(1)
                };
                return rejected(GatewayError::QuotaExceeded {
                    quota: name,
                    limit,
                    window_secs,
                    retry_after_secs,
                });
            }
            DebitOutcome::Concurrency { limit } => {
                state
                    .metrics
                    .plan_rejections
                    .with_label_values(&["max_concurrent"])
                    .inc();
                return rejected(GatewayError::ConcurrencyLimited { limit });
            }
            DebitOutcome::Inactive { status } => {
                state
                    .metrics
                    .plan_rejections
                    .with_label_values(&["account_inactive"])
                    .inc();
                return rejected(GatewayError::AccountInactive { status });
            }
            DebitOutcome::TierMismatch { tier } => {
                state
                    .caches
                    .apply(&format!("account:{}", identity.account_id));
                return Ok(Debit::TierChanged(tier));
            }
            DebitOutcome::LimitReached { resource, limit } => {
                state
                    .metrics
                    .plan_rejections
                    .with_label_values(&["limit_reached"])
                    .inc();
                let required_tier = crate::proxy::gate::cheapest_tier(&snap.config, |other| {
                    other.raw.limits.get(&resource).is_none_or(|l| *l > limit)
                });
                return rejected(GatewayError::LimitReached {
                    resource,
                    limit,
                    tier: tier.name.clone(),
                    required_tier,
                });
            }
            DebitOutcome::Expired => {
                state
                    .metrics
                    .redis_errors
                    .with_label_values(&["debit"])
                    .inc();
                return Err(DebitError::Unavailable(LedgerError::Timeout(
                    state.ledger.timeout,
                )));
            }
        }
    }
    Err(DebitError::Unavailable(LedgerError::Reply(
        "debit retries exhausted".into(),
    )))
}

/// Why no charge was made.
pub enum DebitError {
    /// The plan refuses (402/403/429).
    Rejected(GatewayError),
    /// Redis (or hydration) failed: the route's fail mode decides.
    Unavailable(LedgerError),
}
