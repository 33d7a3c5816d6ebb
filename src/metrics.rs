//! Prometheus metrics, served as text on `metrics_listen` `/metrics`. Names are `tollgate_*`
//! with the conventional `_total` / `_seconds` suffixes.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

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
        let m = Metrics {
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
            hydrations,
            in_flight,
            registry: r,
        };
        // Rare events exist at 0 from the start, so `increase()` sees their first occurrence.
        for outcome in ["voided", "not_run", "gave_up"] {
            m.unanswered_debits.with_label_values(&[outcome]);
        }
        for kind in ["purchase", "adjustment", "grant", "error"] {
            m.credits_reapplied.with_label_values(&[kind]);
        }
        for outcome in ["delivered", "retry", "failed"] {
            m.alert_deliveries.with_label_values(&[outcome]);
        }
        Ok(m)
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
