//! Phase 7 — settle when the request ends: refund the charge where the route's refund policy
//! says so (connect error, timeout, upstream 5xx), as a journal entry, and release the
//! concurrency lease. Runs from `fail_to_proxy` (so a 502/504 body can say it was refunded) or
//! from `logging`, exactly once per request.

use std::time::Duration;

use crate::config::RouteConfig;
use crate::ledger::holds::{SettleOutcome, SettleRequest};
use crate::ledger::{self, CreditOutcome, CreditRequest};
use crate::money::Credits;
use crate::pricing::{started_ticks, Measured};
use crate::proxy::debit::Charge;
use crate::proxy::hold::Hold;
use crate::proxy::meter::{Metered, Usage, UsageMeter};
use crate::proxy::phase::HoldPhase;
use crate::proxy::refund_policy::Failure;
use crate::state::AppState;

/// How long the refund's idempotency mark lives: far longer than any retry of the same request.
const REFUND_MARK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Returns the whole charge to the buckets it came from. `true` when the refund is recorded.
pub async fn refund(
    state: &AppState,
    route: &RouteConfig,
    charge: &Charge,
    request_id: &str,
    failure: Failure,
) -> bool {
    if charge.from_allowance == crate::money::Credits::ZERO
        && charge.from_purchased == crate::money::Credits::ZERO
        && charge.cost == crate::money::Credits::ZERO
    {
        return true;
    }
    if charge.slice {
        // Given back in the slice's next report, exactly as the report took it.
        state.leases.refund(
            &charge.account_id,
            &charge.charge_id,
            (charge.cost.micros(), &route.name, &route.action, request_id),
        );
        return true;
    }
    // Keyed by the charge, not the request id: a client may send the same X-Request-Id again
    // (a retry), and that second failure must be refunded too.
    let entry_id = format!("{}:refund", charge.charge_id);
    let external_id = format!("refund:{}", charge.charge_id);
    let request = CreditRequest {
        account_id: &charge.account_id,
        kind: "refund",
        to_allowance: charge.from_allowance,
        to_purchased: charge.from_purchased,
        counted: -charge.cost,
        entry_id: &entry_id,
        external_id: &external_id,
        mark_ttl: REFUND_MARK_TTL,
        route: &route.name,
        action: &route.action,
        request_id,
        reason: failure.reason(),
        now_ms: ledger::now_ms(),
    };
    let mut conn = state.redis.clone();
    match state.ledger.credit(&mut conn, &request).await {
        Ok(CreditOutcome::Applied { .. } | CreditOutcome::Duplicate { .. }) => true,
        Ok(CreditOutcome::Missing) => {
            tracing::error!(request_id, account = %charge.account_id, "refund skipped: account vanished from Redis");
            false
        }
        Err(e) => {
            state
                .metrics
                .redis_errors
                .with_label_values(&["refund"])
                .inc();
            tracing::error!(request_id, account = %charge.account_id, error = %e, "refund failed");
            false
        }
    }
}

/// Takes back the resource count of a request that did not succeed upstream.
pub async fn uncount(state: &AppState, charge: &Charge, request_id: &str) {
    let Some((resource, delta)) = &charge.counted else {
        return;
    };
    let mut conn = state.redis.clone();
    if let Err(e) = state
        .ledger
        .uncount(&mut conn, &charge.account_id, resource, *delta)
        .await
    {
        tracing::error!(request_id, error = %e, resource, "could not take back a resource count");
    }
}

pub async fn release(state: &AppState, charge: &Charge, request_id: &str) {
    if charge.slice {
        state.leases.finish(&charge.account_id, &charge.charge_id);
    }
    if !charge.lease {
        return;
    }
    let mut conn = state.redis.clone();
    if let Err(e) = state
        .ledger
        .release_lease(
            &mut conn,
            &charge.account_id,
            &charge.charge_id,
            charge.action_lease.then_some(charge.action.as_str()),
        )
        .await
    {
        // The lease expires by itself (redis.lease_ttl_seconds).
        tracing::warn!(request_id, error = %e, "could not release the concurrency lease");
    }
}

/// The true cost of a held request, by the documented rules (README "Pricing AI routes"):
/// 1. refund policy applies → 0;
/// 2. the stream was cut for lack of credits → what is held (all the balance had);
/// 3. the response ended and reported usage → its tokens at the route's (model's) prices;
/// 4. token-priced, no usage, upstream answered < 400 (incl. client disconnect, upstream cut)
///    → the larger of what is held and the running estimate: never zero;
/// 5. token-priced, no usage, upstream error (or none) → the fixed parts only;
/// 6. not token-priced → exactly what was measured (per request, body size, duration);
/// 7. an upgraded (WebSocket) session that carried no byte either way → 0.
///
/// `elapsed_ms` is the request's duration, the one journaled with the settle, so the steps
/// billed are exactly the started steps of the recorded duration.
///
/// Returns the cost (`None` = settle at what is held), the reason and the reported tokens.
pub fn true_cost(
    m: &mut Metered,
    hold: &Hold,
    body_bytes: u64,
    status: Option<u16>,
    elapsed_ms: u64,
) -> (Option<Credits>, &'static str, Usage) {
    let rates = m.rates.unwrap_or(hold.rates);
    let held = hold.held();
    let ticks = if rates.per_tick == Credits::ZERO {
        0
    } else {
        started_ticks(elapsed_ms, rates.tick_ms).max(1)
    };
    let running = m.running_cost(body_bytes);
    let usage = m.response.as_mut().and_then(UsageMeter::finish);
    let reported = usage.unwrap_or_default();
    if let Some(failure) = m.refund {
        return (Some(Credits::ZERO), failure.reason(), reported);
    }
    let response_bytes = m.response.as_ref().map_or(0, |r| r.bytes);
    if status == Some(101) && body_bytes == 0 && response_bytes == 0 {
        // An upgraded session that never carried a byte either way was dropped at birth (a
        // client gone at once, or a tunnel torn down right after the 101 as Pingora 0.9.1 did,
        // cloudflare/pingora#946, patched in vendor/pingora-proxy): nothing was served, nothing
        // is charged.
        return (Some(Credits::ZERO), "upgrade_dropped", reported);
    }
    if m.cut_sent || hold.must_cut() {
        return (None, "insufficient_credits", reported);
    }
    let measured = |u: Usage| Measured {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        request_body_bytes: body_bytes,
        ticks,
    };
    let cost = |u: Usage| rates.cost(&measured(u)).ok();
    if let Some(u) = usage.filter(|_| m.complete) {
        return (cost(u), "usage", reported);
    }
    if !rates.by_tokens {
        return (cost(Usage::default()), "measured", reported);
    }
    match status {
        Some(s) if s < 400 => {
            let estimate = running.unwrap_or(held).max(held);
            (Some(estimate), "no_usage", reported)
        }
        _ => (cost(Usage::default()), "upstream_error", reported),
    }
}

/// Settles a held request once: stops its keeper, computes the true cost and applies it.
pub async fn finish_hold(
    state: &AppState,
    m: &mut Metered,
    body_bytes: u64,
    status: Option<u16>,
    request_id: &str,
) {
    if matches!(m.phase, HoldPhase::Settled { .. }) {
        return;
    }
    let Some(hold) = m.hold.clone() else {
        return;
    };
    hold.stop();
    // One reading of the clock for the price and the journal's `duration_ms`.
    let elapsed_ms = hold.started.elapsed().as_millis() as u64;
    let (cost, reason, usage) = true_cost(m, &hold, body_bytes, status, elapsed_ms);
    // Settled from here on: no second settle, whatever happens below.
    m.phase = HoldPhase::Settled {
        cost: cost.unwrap_or_else(|| hold.held()),
    };
    let request = SettleRequest {
        account_id: &hold.account_id,
        charge_id: &hold.charge_id,
        cost,
        tokens_in: usage.input_tokens,
        tokens_out: usage.output_tokens,
        status: status.unwrap_or(0),
        duration_ms: elapsed_ms,
        reason,
        action: &hold.action,
    };
    if let Some(sliced) = &hold.sliced {
        settle_in_slice(state, &hold, sliced, &request, request_id);
        return;
    }
    let mut conn = state.redis.clone();
    for attempt in 0..2 {
        let started = std::time::Instant::now();
        let outcome = state.ledger.settle(&mut conn, &request).await;
        state
            .metrics
            .redis_script_seconds
            .with_label_values(&["settle"])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(SettleOutcome::Settled { delta, .. }) => {
                let direction = if delta.micros() > 0 { "extra" } else { "back" };
                state
                    .metrics
                    .credits_settled_micros
                    .with_label_values(&[direction])
                    .inc_by(delta.micros().unsigned_abs());
                state.metrics.settles.with_label_values(&[reason]).inc();
                tracing::debug!(request_id, %delta, reason, "settled");
                return;
            }
            Ok(SettleOutcome::NotFound) => {
                tracing::warn!(
                    request_id,
                    "the hold was already settled (expired and swept?)"
                );
                return;
            }
            Ok(SettleOutcome::AccountGone) => {
                tracing::error!(request_id, account = %hold.account_id, "settle skipped: the account vanished from Redis");
                return;
            }
            Err(e) => {
                state
                    .metrics
                    .redis_errors
                    .with_label_values(&["settle"])
                    .inc();
                if attempt == 1 {
                    // The hold expires and is settled at what it holds by a sweeper.
                    tracing::error!(request_id, error = %e, "settle failed; the hold will be settled at its reserve when it expires");
                }
            }
        }
    }
}

/// Settles a hold taken from the credit slice: in process, the row goes in the slice's next
/// report (no Redis call of its own).
fn settle_in_slice(
    state: &AppState,
    hold: &Hold,
    sliced: &crate::proxy::hold::Sliced,
    request: &SettleRequest<'_>,
    request_id: &str,
) {
    let cost = request.cost.unwrap_or_else(|| hold.held());
    let usage = crate::lease::SettleUsage {
        tokens_in: request.tokens_in,
        tokens_out: request.tokens_out,
        status: request.status,
        duration_ms: request.duration_ms,
        reason: request.reason,
    };
    let row = (
        sliced.route.as_str(),
        hold.action.as_str(),
        sliced.request_id.as_str(),
    );
    match state.leases.settle(
        &hold.account_id,
        &hold.charge_id,
        cost.micros(),
        &usage,
        row,
    ) {
        Some(settled) => {
            let direction = if settled.delta > 0 { "extra" } else { "back" };
            state
                .metrics
                .credits_settled_micros
                .with_label_values(&[direction])
                .inc_by(settled.delta.unsigned_abs());
            state
                .metrics
                .settles
                .with_label_values(&[request.reason])
                .inc();
            tracing::debug!(
                request_id,
                delta = settled.delta,
                reason = request.reason,
                "settled in the slice"
            );
        }
        None => tracing::warn!(request_id, "the slice hold was already settled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Rates;
    use std::sync::Arc;

    fn micros(n: i64) -> Credits {
        Credits::from_micros(n)
    }

    /// The README's worked example: 0.01 per request, 0.5 / 1.5 per 1k tokens in / out,
    /// reserve 5.
    fn rates(by_tokens: bool) -> Rates {
        Rates {
            per_request: micros(10_000),
            input_per_1k: if by_tokens {
                micros(500_000)
            } else {
                Credits::ZERO
            },
            output_per_1k: if by_tokens {
                micros(1_500_000)
            } else {
                Credits::ZERO
            },
            per_mb: micros(1_000_000),
            reserve: micros(5_000_000),
            by_tokens,
            ..Rates::default()
        }
    }

    fn cost_of(
        rates: Rates,
        refund: Option<Failure>,
        body: u64,
        status: u16,
    ) -> (Option<Credits>, &'static str) {
        let hold = Hold::new(
            "acct",
            "ch",
            "ai",
            rates,
            rates.reserve,
            Some(micros(95_000_000)),
            300_000,
            None,
        );
        let mut m = Metered {
            rates: Some(rates),
            hold: Some(Arc::clone(&hold)),
            refund,
            ..Metered::default()
        };
        let (cost, reason, _) = true_cost(&mut m, &hold, body, Some(status), 0);
        (cost, reason)
    }

    #[test]
    fn true_cost_follows_the_documented_rules() {
        let mb = crate::pricing::BYTES_PER_MB;
        // The refund policy applies: the whole hold goes back.
        assert_eq!(
            cost_of(rates(true), Some(Failure::Upstream5xx), mb, 503),
            (Some(Credits::ZERO), "upstream_5xx")
        );
        // An upgraded session that carried no byte: nothing is charged.
        assert_eq!(
            cost_of(rates(false), None, 0, 101),
            (Some(Credits::ZERO), "upgrade_dropped")
        );
        // Token-priced, answered < 400 without usage: the larger of what is held and the
        // running estimate, never zero (no response meter: what is held).
        assert_eq!(
            cost_of(rates(true), None, mb, 200),
            (Some(micros(5_000_000)), "no_usage")
        );
        // Token-priced, upstream error without usage: the fixed parts only (per request and
        // body size), not the reserve.
        assert_eq!(
            cost_of(rates(true), None, mb, 500),
            (Some(micros(1_010_000)), "upstream_error")
        );
        // Not token-priced: exactly what was measured.
        assert_eq!(
            cost_of(rates(false), None, 2 * mb, 200),
            (Some(micros(2_010_000)), "measured")
        );
    }
}
