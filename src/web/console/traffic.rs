//! The console's traffic page: this process's request counters as rates since the previous
//! look, and the pipeline gauges, from the same series `/metrics` exports.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use prometheus::core::Collector;
use serde_json::{json, Value};

use super::signed_in;
use crate::state::AppState;
use crate::web::{render, WebError};

/// Takes the first sample now, when the console router is built at start.
pub(super) fn start_sampling() {
    LazyLock::force(&TRAFFIC_SAMPLE);
}

/// The previous sample of this process's request counters, kept so the traffic page can show
/// rates over the interval since the last look rather than totals since start. One entry per
/// (route, outcome) label pair, so its size is bounded by the config, not by traffic.
struct TrafficSample {
    at: Instant,
    counts: HashMap<(String, String), u64>,
}

/// Seeded (empty: every counter starts at zero) when the console router is built at start, so
/// the first page load already shows the rate since start.
static TRAFFIC_SAMPLE: LazyLock<Mutex<TrafficSample>> = LazyLock::new(|| {
    Mutex::new(TrafficSample {
        at: Instant::now(),
        counts: HashMap::new(),
    })
});

/// A shorter interval than this is measured against the older sample instead of replacing it,
/// so quick reloads (or several operators polling) do not shrink the window to noise.
const TRAFFIC_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Outcome labels answered with 402 and 429 (see `GatewayError::status`).
const OUTCOMES_402: &[&str] = &["insufficient_credits"];
const OUTCOMES_429: &[&str] = &["rate_limited", "quota_exceeded"];

fn request_counts(m: &crate::metrics::Metrics) -> HashMap<(String, String), u64> {
    let mut counts = HashMap::new();
    for family in m.requests.collect() {
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            counts.insert(
                (label("route"), label("outcome")),
                metric.get_counter().get_value() as u64,
            );
        }
    }
    counts
}

/// Per-route requests/s and 402/429 rates between the two samples.
fn route_rates(
    prev: &HashMap<(String, String), u64>,
    now: &HashMap<(String, String), u64>,
    secs: f64,
) -> Vec<Value> {
    // route → (all, 402, 429) deltas
    let mut by_route: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for ((route, outcome), count) in now {
        let delta = count.saturating_sub(
            prev.get(&(route.clone(), outcome.clone()))
                .copied()
                .unwrap_or(0),
        );
        let e = by_route.entry(route.as_str()).or_default();
        e.0 += delta;
        if OUTCOMES_402.contains(&outcome.as_str()) {
            e.1 += delta;
        }
        if OUTCOMES_429.contains(&outcome.as_str()) {
            e.2 += delta;
        }
    }
    let rate = |n: u64| format!("{:.2}", n as f64 / secs.max(0.001));
    by_route
        .into_iter()
        .filter(|(_, (all, _, _))| *all > 0)
        .map(|(route, (all, r402, r429))| {
            json!({"route": route, "rps": rate(all), "rps_402": rate(r402), "rps_429": rate(r429)})
        })
        .collect()
}

/// This process's own request counters and pipeline gauges (the same series `/metrics`
/// exports): rates over the interval since the previous sample, and totals since start.
pub(super) async fn traffic(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    let m = &state.metrics;
    let counts = request_counts(m);
    let now = Instant::now();
    let (rates, interval) = {
        let mut prev = TRAFFIC_SAMPLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(prev.at);
        let rates = route_rates(&prev.counts, &counts, elapsed.as_secs_f64());
        if elapsed >= TRAFFIC_MIN_INTERVAL {
            *prev = TrafficSample {
                at: now,
                counts: counts.clone(),
            };
        }
        (rates, format!("{:.1}", elapsed.as_secs_f64()))
    };
    let mut rows: Vec<Value> = counts
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(
            |((route, outcome), count)| json!({"route": route, "outcome": outcome, "count": count}),
        )
        .collect();
    rows.sort_by(|a, b| {
        (a["route"].as_str(), a["outcome"].as_str())
            .cmp(&(b["route"].as_str(), b["outcome"].as_str()))
    });
    let gauges = json!([
        {"name": "Requests in flight", "value": m.in_flight.get()},
        {"name": "Journal backlog (entries)", "value": m.journal_backlog.get()},
        {"name": "Journal flush lag (s)", "value": m.journal_backlog_oldest_seconds.get()},
        {"name": "Postgres up", "value": m.postgres_up.get()},
    ]);
    render(
        "console_traffic.html",
        minijinja::context! {
            title => "Traffic", surface => "console", nav => "traffic", csrf => s.csrf,
            rows => rows, gauges => gauges, rates => rates, interval => interval,
        },
    )
}
