//! Phase 7 — settle when the request ends: refund the charge where the route's refund policy
//! says so (connect error, timeout, upstream 5xx), as a journal entry, and release the
//! concurrency lease. Runs from `fail_to_proxy` (so a 502/504 body can say it was refunded) or
//! from `logging`, exactly once per request.

use std::time::Duration;

use crate::config::{RefundOn, RouteConfig};
use crate::ledger::{self, CreditOutcome, CreditRequest};
use crate::proxy::debit::Charge;
use crate::state::AppState;

/// How long the refund's idempotency mark lives: far longer than any retry of the same request.
const REFUND_MARK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a request failed, as far as the refund policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    ConnectError,
    Timeout,
    Upstream5xx,
    /// tollgate itself refused the request after charging (a chunked body over the tier's
    /// limit): always refunded, whatever the route's policy.
    Refused,
}

impl Failure {
    fn policy(self) -> Option<RefundOn> {
        match self {
            Failure::ConnectError => Some(RefundOn::ConnectError),
            Failure::Timeout => Some(RefundOn::Timeout),
            Failure::Upstream5xx => Some(RefundOn::Status5xx),
            Failure::Refused => None,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::ConnectError => "connect_error",
            Failure::Timeout => "timeout",
            Failure::Upstream5xx => "upstream_5xx",
            Failure::Refused => "refused_by_tollgate",
        }
    }
}

pub fn should_refund(route: &RouteConfig, failure: Option<Failure>) -> bool {
    failure.is_some_and(|f| f.policy().is_none_or(|p| route.refunds(p)))
}

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

pub async fn release(state: &AppState, charge: &Charge, request_id: &str) {
    if !charge.lease {
        return;
    }
    let mut conn = state.redis.clone();
    if let Err(e) = state
        .ledger
        .release_lease(&mut conn, &charge.account_id, &charge.charge_id)
        .await
    {
        // The lease expires by itself (redis.lease_ttl_seconds).
        tracing::warn!(request_id, error = %e, "could not release the concurrency lease");
    }
}
