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
    /// Served from this instance's credit slice: refunds go into its next report, and the
    /// split above is an estimate until that report decides it.
    pub slice: bool,
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
    /// The route takes per-minute steps as the session runs (the exact path's keeper does).
    pub ticking: bool,
}

/// The debit's verdict.
pub enum Debit {
    Charged(Charge),
    /// Redis holds another tier: gate again with it.
    TierChanged(String),
}

fn monthly(tier: &TierConfig) -> Option<Credits> {
    match tier.monthly_credits() {
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
    let quota = tier.action_quotas().get(&route.action);
    let charge_id = uuid::Uuid::now_v7().simple().to_string();
    if let Some(charge) =
        from_slice(state, route, identity, tier, ask, request_id, &charge_id).await
    {
        return Ok(Debit::Charged(charge));
    }
    state.metrics.admissions.with_label_values(&["exact"]).inc();
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
        requests_per_hour: tier.requests_per_hour().unwrap_or(0),
        requests_per_month: tier.requests_per_month().unwrap_or(0),
        action_per_hour: quota.and_then(|q| q.per_hour).unwrap_or(0),
        action_per_month: quota.and_then(|q| q.per_month).unwrap_or(0),
        max_concurrent: tier.max_concurrent().unwrap_or(0),
        lease_ttl_ms: snap.config.redis.lease_ttl_seconds * 1000,
        deadline_ms: 0,
        hold_ttl_ms: ask.hold.map_or(0, |h| h.ttl_ms),
        wanted: ask.hold.and_then(|h| h.wanted),
        tokens_per_month: tier.tokens_per_month().unwrap_or(0),
        counts: route.counts.as_ref().map(|(resource, delta)| {
            (
                resource.as_str(),
                *delta,
                tier.limits().get(resource).copied(),
            )
        }),
        action_max_concurrent: quota.and_then(|q| q.max_concurrent).unwrap_or(0),
    };
    let mut request = request;
    let mut conn = state.redis.clone();
    let mut attempt = 0;
    // Set once other instances were asked to give their slices of the account back.
    let mut recall_until: Option<Instant> = None;
    loop {
        attempt += 1;
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
                let low = match (remaining, tier.low_balance_credits()) {
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
                    low_threshold: tier.low_balance_credits(),
                    lease: request.max_concurrent > 0 || request.action_max_concurrent > 0,
                    hold: ask.hold.is_some(),
                    action: route.action.clone(),
                    action_lease: request.action_max_concurrent > 0,
                    counted: route.counts.clone(),
                    slice: false,
                }));
            }
            DebitOutcome::Missing if attempt == 1 => {
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
                leased,
            } => {
                // Other instances' slices hold money this request could use: ask for it back
                // and wait (bounded) before refusing — no false 402.
                if leased > Credits::ZERO && allowance + purchased >= cost {
                    let until = *recall_until.get_or_insert_with(|| {
                        Instant::now()
                            + std::time::Duration::from_millis(state.leases.cfg.recall_wait_ms)
                    });
                    if attempt == 1 || Instant::now() < until {
                        if attempt == 1 {
                            state.leases.recall(&identity.account_id, true);
                            let prefix = &snap.config.redis.key_prefix;
                            if let Err(e) = crate::lease::recall::publish(
                                &mut conn,
                                prefix,
                                &identity.account_id,
                            )
                            .await
                            {
                                tracing::warn!(error = %e, "cannot ask other instances for their credit slices");
                            }
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                }
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
                    other.limits().get(&resource).is_none_or(|l| *l > limit)
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
}

/// The slice path: a fixed-price request or a hold on an eligible plan is charged in process,
/// with no Redis call (or one report when this instance has no slice of the account yet).
/// `None`: take the exact path.
async fn from_slice(
    state: &AppState,
    route: &RouteConfig,
    identity: &Identity,
    tier: &TierConfig,
    ask: Ask,
    request_id: &str,
    charge_id: &str,
) -> Option<Charge> {
    let leases = &state.leases;
    if !leases.cfg.enabled {
        return None;
    }
    // A hold is taken whole (what the exact path would hold when the balance has it); one
    // that wants "all of the balance" cannot come from a slice.
    let cost = match ask.hold {
        None if crate::lease::eligible(tier, route) => ask.cost,
        Some(HoldSpec {
            wanted: Some(wanted),
            ticking,
            ..
        }) if crate::lease::eligible_hold(tier, route, ticking) => wanted.max(ask.cost),
        _ => return None,
    };
    let lease_ask = crate::lease::Ask {
        account_id: &identity.account_id,
        tier,
        cost: cost.micros(),
        route: &route.name,
        action: &route.action,
        charge_id,
        request_id,
        hold: ask.hold.is_some(),
    };
    let served = match leases.serve(&lease_ask) {
        crate::lease::Served::Acquire => {
            let shard = leases.prepare(&identity.account_id, tier, cost.micros());
            let waiting = Some((identity.account_id.as_str(), cost.micros()));
            if let Err(e) =
                crate::lease::report::report_shard_for(leases, state, shard, false, waiting).await
            {
                tracing::debug!(error = %e, "no credit slice; exact debit");
                return None;
            }
            leases.serve(&lease_ask)
        }
        other => other,
    };
    let crate::lease::Served::Charged {
        balance,
        from_allowance,
    } = served
    else {
        return None;
    };
    state.metrics.admissions.with_label_values(&["slice"]).inc();
    state
        .metrics
        .credits_debited_micros
        .with_label_values(&[&route.name, &tier.name])
        .inc_by(cost.micros().max(0) as u64);
    let remaining = balance.map(Credits::from_micros);
    let low = match (remaining, tier.low_balance_credits()) {
        (Some(r), Some(threshold)) => r < threshold,
        _ => false,
    };
    let from_allowance = Credits::from_micros(from_allowance);
    Some(Charge {
        account_id: identity.account_id.clone(),
        charge_id: charge_id.to_string(),
        cost,
        from_allowance,
        from_purchased: cost - from_allowance,
        remaining,
        low,
        low_threshold: tier.low_balance_credits(),
        lease: false,
        hold: ask.hold.is_some(),
        action: route.action.clone(),
        action_lease: false,
        counted: None,
        slice: true,
    })
}

/// Why no charge was made.
pub enum DebitError {
    /// The plan refuses (402/403/429).
    Rejected(GatewayError),
    /// Redis (or hydration) failed: the route's fail mode decides.
    Unavailable(LedgerError),
}
