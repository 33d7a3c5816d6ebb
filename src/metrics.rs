//! Longer than 500 lines because one constructor registers every metric family in one place
//! (tests/e2e/deploy_files.rs reads this file for their names).
//!
//! Prometheus metrics, served as text on `metrics_listen` `/metrics`. Names are `tollgate_*`
//! with the conventional `_total` / `_seconds` suffixes.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Config;

/// `route` label of a request refused before any route was known: an auth failure on a path
/// with no route of its own (a self-service call with a bad key), or a request Pingora refused
/// before tollgate saw it. A route's own auth failures carry the route's name.
pub const ROUTE_AUTH: &str = "_auth";
/// `route` label of the self-service API (`/_tollgate/v1/...`), once the caller is known.
pub const ROUTE_SELF_SERVICE: &str = "_self_service";
/// `route` label of a path no route matches (404 `route_not_found`).
pub const ROUTE_UNMATCHED: &str = "_unmatched";

/// The `outcome` label values of `tollgate_config_reloads_total`.
pub const RELOAD_OUTCOMES: [&str; 3] = ["applied", "invalid", "restart_required"];

/// Outcomes of a request on a configured route (`tollgate_requests_total{outcome}`) that are
/// not error codes; [`Metrics::expect_routes`] adds every [`crate::error::CODES`] entry but
/// `route_not_found`. Each exists at 0 per route from the start, so `increase()` and ratio
/// alerts see the first one.
const ROUTE_OUTCOMES: [&str; 4] = ["forwarded", "upstream_5xx", "client_error", "unmetered"];

pub struct Metrics {
    pub registry: Registry,
    /// Requests by route and outcome (`forwarded` or the stable error code).
    pub requests: IntCounterVec,
    /// Time from sending the request upstream to the end of its response, by route.
    pub upstream_seconds: HistogramVec,
    /// Time spent in tollgate itself per request (total minus waiting on the upstream), by
    /// route: what metering costs in production.
    pub overhead_seconds: HistogramVec,
    /// Authentication failures by reason.
    pub auth_failures: IntCounterVec,
    /// Credits debited (micro-credits) by route and tier.
    pub credits_debited_micros: IntCounterVec,
    /// Requests refused by the plan (402/403/429/413) by reason.
    pub plan_rejections: IntCounterVec,
    /// Round-trip time of ledger script calls, by script.
    pub redis_script_seconds: HistogramVec,
    /// Ledger script failures (timeouts, connection errors) by script.
    pub redis_errors: IntCounterVec,
    /// Accounts loaded from Postgres into Redis.
    pub hydrations: IntCounter,
    /// Group commit (`debit`, `settle`): grouped script calls made, and the requests they
    /// carried (the ratio is the mean group size).
    pub grouped_calls: IntCounterVec,
    pub grouped_requests: IntCounterVec,
    /// Metered requests by how they were admitted: `slice` (no Redis call) or `exact`.
    pub admissions: IntCounterVec,
    /// Credit-slice reports (one script call per shard) by outcome.
    pub slice_reports: IntCounterVec,
    /// Requests forwarded unmetered because Redis was unavailable on a `fail_mode = "open"` route.
    pub unmetered: IntCounterVec,
    /// Requests currently being proxied.
    pub in_flight: IntGauge,
    /// Journal entries written to Postgres (by this process).
    pub journal_flushed: IntCounter,
    /// Time to write and acknowledge one journal batch.
    pub journal_batch_seconds: Histogram,
    /// Entries waiting in the shard streams (the flush lag), sampled.
    pub journal_backlog: IntGauge,
    /// Age of the oldest entry still in a shard stream (from its stream id's timestamp), 0
    /// when they are empty: how long the journal has been waiting for Postgres.
    pub journal_backlog_oldest_seconds: IntGauge,
    /// 1 while Postgres answers, 0 while it does not (the data plane goes on from Redis).
    pub postgres_up: IntGauge,
    /// Failed attempts to reach Postgres by the background probe.
    pub postgres_connect_failures: IntCounter,
    /// Unix seconds since which Postgres has been unreachable, 0 while it answers (for
    /// `/readyz`'s body; not exported).
    pub postgres_down_since: std::sync::atomic::AtomicI64,
    /// Flusher failures by cause (postgres, redis, bad_entry).
    pub journal_errors: IntCounterVec,
    /// Holds settled, by the rule that priced them (usage, no_usage, refund reasons, ...).
    pub settles: IntCounterVec,
    /// Micro-credits moved by settles: `extra` charged beyond the hold, `back` returned.
    pub credits_settled_micros: IntCounterVec,
    /// Holds found expired (their instance stopped) and settled at what they held.
    pub holds_expired: IntCounter,
    /// Streams and sessions ended because the balance ran out, by kind (sse, websocket, other).
    pub streams_cut: IntCounterVec,
    /// Stripe webhooks received, by outcome (the event outcomes, or invalid_signature,
    /// bad_request, error: Stripe retries those).
    pub stripe_webhooks: IntCounterVec,
    /// Debits whose reply was lost (timeout, dropped connection), by how they were resolved:
    /// voided (the journal shows the debit ran; refunded), not_run, gave_up.
    pub unanswered_debits: IntCounterVec,
    /// Recorded credits (purchase, adjustment, grant) Redis had lost and that were applied
    /// again; `error` counts failed reconciliation passes.
    pub credits_reapplied: IntCounterVec,
    /// Outgoing alert webhooks: delivered, retry (a failed attempt to be retried), failed
    /// (given up after `alerts.max_attempts`).
    pub alert_deliveries: IntCounterVec,
    /// The config version serving now: 1 at start, +1 per successful reload (SIGHUP or
    /// `POST /v1/config/reload`), so a fleet whose pods disagree shows it.
    pub config_version: IntGauge,
    /// Reload attempts by outcome: applied, invalid (the file did not validate), restart_required
    /// (it changed a field only a restart applies). The old config keeps serving on the last two.
    pub config_reloads: IntCounterVec,
    /// Attempts sent to each backend of a load-balanced upstream (`urls`), by upstream and
    /// backend (`host:port` as configured).
    pub backend_requests: IntCounterVec,
    /// Connections to a backend that failed (the backend is then ejected for `eject_ms`).
    pub backend_errors: IntCounterVec,
    /// 1 while a backend passes its active health checks, else 0 (1 without health checks).
    pub backend_healthy: IntGaugeVec,
    /// Each configured route's per-request series, resolved once ([`Metrics::expect_routes`]).
    routes: ArcSwap<HashMap<String, Arc<RouteMetrics>>>,
}

/// The series every request of a route touches, as handles: a label lookup (hashing the label
/// values, a lock, a map probe) per series per request would be most of what metrics cost on
/// the pass-through path. Outcomes other than `forwarded` are rare and looked up by label.
pub struct RouteMetrics {
    /// `tollgate_requests_total{route, outcome="forwarded"}`.
    pub forwarded: IntCounter,
    /// `tollgate_upstream_duration_seconds{route}`.
    pub upstream_seconds: Histogram,
    /// `tollgate_overhead_seconds{route}`.
    pub overhead_seconds: Histogram,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let upstream_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        let fast_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ];
        let hydrations = IntCounter::new(
            "tollgate_hydrations_total",
            "Accounts loaded from Postgres into Redis",
        )?;
        r.register(Box::new(hydrations.clone()))?;
        let in_flight = IntGauge::new(
            "tollgate_requests_in_flight",
            "Requests currently being proxied",
        )?;
        r.register(Box::new(in_flight.clone()))?;
        let journal_flushed = IntCounter::new(
            "tollgate_journal_entries_flushed_total",
            "Journal entries written to Postgres",
        )?;
        r.register(Box::new(journal_flushed.clone()))?;
        let journal_batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_journal_batch_duration_seconds",
                "Time to write and acknowledge one journal batch",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        r.register(Box::new(journal_batch_seconds.clone()))?;
        let journal_backlog = IntGauge::new(
            "tollgate_journal_backlog",
            "Journal entries waiting in Redis streams (flush lag)",
        )?;
        r.register(Box::new(journal_backlog.clone()))?;
        let journal_backlog_oldest_seconds = IntGauge::new(
            "tollgate_journal_backlog_oldest_seconds",
            "Age of the oldest journal entry still waiting in a Redis stream (0: none)",
        )?;
        r.register(Box::new(journal_backlog_oldest_seconds.clone()))?;
        // Down until the first probe answers: a process that never reached Postgres says so.
        let postgres_up = IntGauge::new(
            "tollgate_postgres_up",
            "1 while Postgres answers, 0 while it does not",
        )?;
        r.register(Box::new(postgres_up.clone()))?;
        let postgres_connect_failures = IntCounter::new(
            "tollgate_postgres_connect_failures_total",
            "Failed attempts to reach Postgres",
        )?;
        r.register(Box::new(postgres_connect_failures.clone()))?;
        let config_version = IntGauge::new(
            "tollgate_config_version",
            "Config version serving: 1 at start, +1 per successful reload",
        )?;
        r.register(Box::new(config_version.clone()))?;
        config_version.set(1);
        let m = Metrics {
            config_version,
            config_reloads: counter(
                &r,
                "tollgate_config_reloads_total",
                "Config reload attempts by outcome",
                &["outcome"],
            )?,
            journal_backlog_oldest_seconds,
            postgres_up,
            postgres_connect_failures,
            postgres_down_since: std::sync::atomic::AtomicI64::new(0),
            journal_errors: counter(
                &r,
                "tollgate_journal_flush_errors_total",
                "Journal flusher failures by cause",
                &["cause"],
            )?,
            settles: counter(
                &r,
                "tollgate_settles_total",
                "Holds settled, by the rule that priced them",
                &["reason"],
            )?,
            credits_settled_micros: counter(
                &r,
                "tollgate_credits_settled_micros_total",
                "Micro-credits moved by settles (extra charged, or back to the account)",
                &["direction"],
            )?,
            holds_expired: {
                let c = IntCounter::new(
                    "tollgate_holds_expired_total",
                    "Holds found expired and settled at what they held",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            streams_cut: counter(
                &r,
                "tollgate_streams_cut_total",
                "Streams and sessions ended because the balance ran out",
                &["kind"],
            )?,
            stripe_webhooks: counter(
                &r,
                "tollgate_stripe_webhooks_total",
                "Stripe webhooks received, by outcome",
                &["outcome"],
            )?,
            unanswered_debits: counter(
                &r,
                "tollgate_unanswered_debits_total",
                "Debits whose reply was lost, by resolution (voided, not_run, gave_up)",
                &["outcome"],
            )?,
            backend_requests: counter(
                &r,
                "tollgate_backend_requests_total",
                "Attempts sent to each backend of a load-balanced upstream",
                &["upstream", "backend"],
            )?,
            backend_errors: counter(
                &r,
                "tollgate_backend_errors_total",
                "Failed connections to a backend of a load-balanced upstream",
                &["upstream", "backend"],
            )?,
            backend_healthy: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tollgate_backend_healthy",
                        "1 while a backend of a load-balanced upstream passes its health checks, else 0",
                    ),
                    &["upstream", "backend"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            credits_reapplied: counter(
                &r,
                "tollgate_credits_reapplied_total",
                "Recorded credits Redis had lost, applied again, by kind (error: failed passes)",
                &["kind"],
            )?,
            alert_deliveries: counter(
                &r,
                "tollgate_alert_deliveries_total",
                "Outgoing alert webhook attempts by outcome (delivered, retry, failed)",
                &["outcome"],
            )?,
            journal_flushed,
            journal_batch_seconds,
            journal_backlog,
            requests: counter(
                &r,
                "tollgate_requests_total",
                "Requests by route and outcome",
                &["route", "outcome"],
            )?,
            upstream_seconds: histogram(
                &r,
                "tollgate_upstream_duration_seconds",
                "Upstream response time",
                &["route"],
                upstream_buckets,
            )?,
            overhead_seconds: histogram(
                &r,
                "tollgate_overhead_seconds",
                "Time in tollgate per request, excluding the wait on the upstream",
                &["route"],
                vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ],
            )?,
            auth_failures: counter(
                &r,
                "tollgate_auth_failures_total",
                "Authentication failures by reason",
                &["reason"],
            )?,
            credits_debited_micros: counter(
                &r,
                "tollgate_credits_debited_micros_total",
                "Micro-credits debited by route and tier",
                &["route", "tier"],
            )?,
            plan_rejections: counter(
                &r,
                "tollgate_plan_rejections_total",
                "Requests refused by the plan, by reason",
                &["reason"],
            )?,
            redis_script_seconds: histogram(
                &r,
                "tollgate_redis_script_duration_seconds",
                "Ledger script round trip",
                &["script"],
                fast_buckets,
            )?,
            redis_errors: counter(
                &r,
                "tollgate_redis_errors_total",
                "Ledger script failures",
                &["script"],
            )?,
            unmetered: counter(
                &r,
                "tollgate_unmetered_requests_total",
                "Requests forwarded unmetered (fail_mode = open)",
                &["route"],
            )?,
            admissions: counter(
                &r,
                "tollgate_metered_admissions_total",
                "Metered requests by admission path: slice (served from this instance's credit slice, no Redis call) or exact (one debit call)",
                &["path"],
            )?,
            slice_reports: counter(
                &r,
                "tollgate_slice_reports_total",
                "Credit-slice reports sent to Redis, by outcome (ok, error)",
                &["outcome"],
            )?,
            hydrations,
            grouped_calls: counter(
                &r,
                "tollgate_redis_grouped_calls_total",
                "Grouped ledger script calls (group commit), by script",
                &["script"],
            )?,
            grouped_requests: counter(
                &r,
                "tollgate_redis_grouped_requests_total",
                "Requests carried by grouped ledger script calls, by script",
                &["script"],
            )?,
            in_flight,
            registry: r,
            routes: ArcSwap::from_pointee(HashMap::new()),
        };
        // Rare events exist at 0 from the start, so `increase()` sees their first occurrence
        // (a labelled family with no series is not exported at all).
        for reason in ["missing", "invalid", "store_unavailable"] {
            m.auth_failures.with_label_values(&[reason]);
        }
        for reason in [
            "insufficient_credits",
            "quota_exceeded",
            "max_concurrent",
            "rate_limited",
            "feature_not_in_tier",
            "payload_too_large",
            "account_inactive",
            "limit_reached",
        ] {
            m.plan_rejections.with_label_values(&[reason]);
        }
        m.redis_script_seconds.with_label_values(&["debit"]);
        m.redis_script_seconds.with_label_values(&["slice"]);
        m.redis_script_seconds.with_label_values(&["settle"]);
        m.redis_script_seconds.with_label_values(&["extend"]);
        for path in ["slice", "exact"] {
            m.admissions.with_label_values(&[path]);
        }
        for outcome in ["ok", "error"] {
            m.slice_reports.with_label_values(&[outcome]);
        }
        for script in ["debit", "settle"] {
            m.grouped_calls.with_label_values(&[script]);
            m.grouped_requests.with_label_values(&[script]);
        }
        for script in ["debit", "extend", "settle", "refund", "slice"] {
            m.redis_errors.with_label_values(&[script]);
        }
        for cause in ["postgres", "redis", "bad_entry"] {
            m.journal_errors.with_label_values(&[cause]);
        }
        for reason in [
            "usage",
            "measured",
            "no_usage",
            "upstream_error",
            "insufficient_credits",
            "upgrade_dropped",
            "connect_error",
            "timeout",
            "upstream_5xx",
            "refused_by_tollgate",
        ] {
            m.settles.with_label_values(&[reason]);
        }
        for direction in ["extra", "back"] {
            m.credits_settled_micros.with_label_values(&[direction]);
        }
        for kind in ["sse", "websocket", "other"] {
            m.streams_cut.with_label_values(&[kind]);
        }
        for outcome in [
            "applied",
            "duplicate",
            "already_applied",
            "stale",
            "ignored",
            "unknown_account",
            "invalid_signature",
            "bad_request",
            "error",
        ] {
            m.stripe_webhooks.with_label_values(&[outcome]);
        }
        for outcome in ["voided", "not_run", "gave_up"] {
            m.unanswered_debits.with_label_values(&[outcome]);
        }
        for kind in ["purchase", "adjustment", "grant", "error"] {
            m.credits_reapplied.with_label_values(&[kind]);
        }
        for outcome in ["delivered", "retry", "failed"] {
            m.alert_deliveries.with_label_values(&[outcome]);
        }
        for outcome in RELOAD_OUTCOMES {
            m.config_reloads.with_label_values(&[outcome]);
        }
        Ok(m)
    }

    /// Creates at 0 the per-route series the config makes known up front: every route (and
    /// the [`ROUTE_AUTH`], [`ROUTE_SELF_SERVICE`], [`ROUTE_UNMATCHED`] labels) with its
    /// request outcomes and latency histograms, and each metered route's debits per tier, so
    /// an alert sees a route's first failure and a dashboard lists every route from the start.
    /// Also resolves each route's [`RouteMetrics`].
    pub fn expect_routes(&self, config: &Config) {
        let mut handles = HashMap::with_capacity(config.routes.len());
        for route in &config.routes {
            let name = route.name.as_str();
            let codes = crate::error::CODES
                .iter()
                .filter(|c| **c != "route_not_found");
            for outcome in ROUTE_OUTCOMES.iter().chain(codes) {
                self.requests.with_label_values(&[name, outcome]);
            }
            handles.insert(
                name.to_string(),
                Arc::new(RouteMetrics {
                    forwarded: self.requests.with_label_values(&[name, "forwarded"]),
                    upstream_seconds: self.upstream_seconds.with_label_values(&[name]),
                    overhead_seconds: self.overhead_seconds.with_label_values(&[name]),
                }),
            );
            if !route.public {
                self.unmetered.with_label_values(&[name]);
                for tier in config.tiers.keys() {
                    self.credits_debited_micros.with_label_values(&[name, tier]);
                }
            }
        }
        for outcome in [
            "missing_credentials",
            "invalid_credentials",
            "metering_unavailable",
        ] {
            self.requests.with_label_values(&[ROUTE_AUTH, outcome]);
        }
        self.requests
            .with_label_values(&[ROUTE_UNMATCHED, "route_not_found"]);
        self.requests
            .with_label_values(&[ROUTE_SELF_SERVICE, "self_service"]);
        for label in [ROUTE_AUTH, ROUTE_SELF_SERVICE, ROUTE_UNMATCHED] {
            self.overhead_seconds.with_label_values(&[label]);
        }
        self.routes.store(Arc::new(handles));
    }

    /// The handles of route `name`; `None` for a route added by a reload after startup (its
    /// series are then looked up by label).
    pub fn route(&self, name: &str) -> Option<Arc<RouteMetrics>> {
        self.routes.load().get(name).cloned()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
[[routes]]
name = "open"
path_prefix = "/"
upstream = "u"
public = true
"#;

    /// A series line; the family prefix is added here so that `tests/e2e/deploy_files.rs`,
    /// which scans this file for quoted metric names, does not take these lines for
    /// registrations.
    fn series(rest: &str) -> String {
        ["tollgate", rest].join("_")
    }

    /// The handles the request path uses are the exported labelled series, not copies.
    #[test]
    fn route_handles_update_the_labelled_series() {
        let config = crate::config::for_tests(ROUTES);
        let m = Metrics::new().unwrap();
        assert!(m.route("open").is_none(), "no handles before expect_routes");
        m.expect_routes(&config);
        let h = m.route("open").unwrap();
        h.forwarded.inc();
        h.overhead_seconds.observe(0.001);
        h.upstream_seconds.observe(0.002);
        let text = m.render();
        assert!(
            text.contains(&series(
                r#"requests_total{outcome="forwarded",route="open"} 1"#
            )),
            "{text}"
        );
        assert!(
            text.contains(&series(r#"overhead_seconds_count{route="open"} 1"#)),
            "{text}"
        );
        assert!(
            text.contains(&series(
                r#"upstream_duration_seconds_count{route="open"} 1"#
            )),
            "{text}"
        );
        assert!(m.route("unknown").is_none());
    }
}
