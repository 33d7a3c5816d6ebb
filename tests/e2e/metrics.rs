//! `GET /metrics` on metrics_listen: Prometheus text with request and auth-failure counters;
//! every documented family exported from the start; a `route` label that is never empty.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::{metric_value, passthrough_toml, random_id, TestEnv};
use crate::upstream::FakeUpstream;

/// A metric name, labels it must have, and its value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_auth_failure_counters() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(passthrough_toml(&up.url()).replace("path_prefix = \"/\"", "path_prefix = \"/v1\""))
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    let c = app.client();

    for _ in 0..3 {
        let resp = c
            .get(app.proxy_url("/v1/echo"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    for _ in 0..2 {
        let resp = c.get(app.proxy_url("/v1/echo")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    let resp = c
        .get(app.proxy_url("/v1/echo"))
        .bearer_auth(format!("tg_{}", random_id(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c.get(app.proxy_url("/elsewhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    // The upstream's own 503, passed through.
    let resp = c
        .get(app.proxy_url("/v1/status/503"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);

    let resp = c.get(app.metrics_url()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    // Counters are updated when a request is logged, just after its response: poll briefly.
    let want: [Expected; 7] = [
        (
            "tollgate_requests_total",
            &[("route", "all"), ("outcome", "forwarded")],
            3.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "all"), ("outcome", "upstream_5xx")],
            1.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "all"), ("outcome", "missing_credentials")],
            2.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "all"), ("outcome", "invalid_credentials")],
            1.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_unmatched"), ("outcome", "route_not_found")],
            1.0,
        ),
        (
            "tollgate_auth_failures_total",
            &[("reason", "missing")],
            2.0,
        ),
        (
            "tollgate_auth_failures_total",
            &[("reason", "invalid")],
            1.0,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(3);
    let text = loop {
        let text = app.metrics_text().await;
        let ok = want
            .iter()
            .all(|(name, labels, value)| metric_value(&text, name, labels) == Some(*value));
        if ok {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics do not match {want:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric_value(&text, "tollgate_auth_failures_total", &[]).is_some(),
        "no tollgate_auth_failures_total:\n{text}"
    );
    assert!(
        text.contains("# TYPE tollgate_requests_total counter"),
        "{text}"
    );
    // Every request records tollgate's own share of its time, by route.
    assert!(
        text.contains("# TYPE tollgate_overhead_seconds histogram"),
        "{text}"
    );
    let observed = text
        .lines()
        .filter(|l| l.starts_with("tollgate_overhead_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(observed >= 1.0, "no overhead observations:\n{text}");
}

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `tollgate_*` name in `text`, with a histogram's `_bucket`/`_count`/`_sum` series
/// named by their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("tollgate_") {
        if text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        names.insert(family.to_string());
    }
    names
}

/// The families the README's "Metrics" section documents.
fn documented_families() -> BTreeSet<String> {
    let readme = repo_file("README.md");
    let start = readme
        .find("\n## Metrics\n")
        .expect("README.md has a \"## Metrics\" section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let names = metric_names(&section[..end]);
    // A parser gone wrong must not make the test pass on nothing.
    assert!(
        names.len() >= 25,
        "too few families in the README: {names:?}"
    );
    for known in [
        "tollgate_requests_total",
        "tollgate_settles_total",
        "tollgate_journal_maintenance_last_success_timestamp_seconds",
    ] {
        assert!(names.contains(known), "{known} not found in {names:?}");
    }
    names
}

/// The families exported on a scrape (`# TYPE` lines: prometheus leaves a labelled family
/// with no series out entirely).
fn exported_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

const TWO_ROUTES: &str = r#"
[[upstreams]]
name = "up"
url = "UPSTREAM"

# A load-balanced upstream: its per-backend series exist from the start.
[[upstreams]]
name = "pool"
urls = ["UPSTREAM"]

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
cost = 1

[[routes]]
name = "open"
path_prefix = "/v1/open"
upstream = "up"
cost = 1
fail_mode = "open"

[[routes]]
name = "docs"
path_prefix = "/docs"
upstream = "up"
public = true

[tiers.basic]
monthly_credits = 3

[tiers.pro]
monthly_credits = 100
"#;

/// An alert built on `increase()` misses the first event of a series that does not exist
/// yet: every family the README documents (and every one the shipped alert rules and
/// dashboard query) is on the very first scrape, before any request, with the series known up
/// front at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_family_is_exported_before_the_first_request() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(TWO_ROUTES.replace("UPSTREAM", &up.url()))
        .spawn()
        .await;
    let text = app.metrics_text().await;
    let exported = exported_families(&text);

    let documented = documented_families();
    let missing: Vec<&String> = documented.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "documented in the README but not exported at start: {missing:?}\n{text}"
    );
    let mut used = metric_names(&repo_file("deploy/prometheus/alerts.yml"));
    used.extend(metric_names(&repo_file(
        "deploy/grafana/dashboards/tollgate.json",
    )));
    assert!(used.len() >= 15, "too few families in deploy/: {used:?}");
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used by deploy/ but not exported at start: {missing:?}\n{text}"
    );

    // The series alerts and dashboards select, at 0 for every route known up front.
    let zero: [Expected; 12] = [
        (
            "tollgate_requests_total",
            &[("route", "chat"), ("outcome", "metering_unavailable")],
            0.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "docs"), ("outcome", "upstream_5xx")],
            0.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_unmatched"), ("outcome", "route_not_found")],
            0.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_auth"), ("outcome", "missing_credentials")],
            0.0,
        ),
        (
            "tollgate_unmetered_requests_total",
            &[("route", "open")],
            0.0,
        ),
        (
            "tollgate_credits_debited_micros_total",
            &[("route", "chat"), ("tier", "pro")],
            0.0,
        ),
        (
            "tollgate_upstream_duration_seconds_count",
            &[("route", "docs")],
            0.0,
        ),
        (
            "tollgate_auth_failures_total",
            &[("reason", "invalid")],
            0.0,
        ),
        (
            "tollgate_plan_rejections_total",
            &[("reason", "insufficient_credits")],
            0.0,
        ),
        (
            "tollgate_stripe_webhooks_total",
            &[("outcome", "invalid_signature")],
            0.0,
        ),
        (
            "tollgate_journal_flush_errors_total",
            &[("cause", "bad_entry")],
            0.0,
        ),
        ("tollgate_streams_cut_total", &[("kind", "websocket")], 0.0),
    ];
    for (name, labels, value) in zero {
        assert_eq!(
            metric_value(&text, name, labels),
            Some(value),
            "{name}{labels:?}\n{text}"
        );
    }
}

/// Requests without a route of their own are labelled `_auth`, `_self_service` or
/// `_unmatched`; a refused credential on a route keeps the route's name: no series has
/// `route=""`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_series_has_an_empty_route_label() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(passthrough_toml(&up.url()).replace("path_prefix = \"/\"", "path_prefix = \"/v1\""))
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    let c = app.client();
    let status = |path: &str, key: Option<&str>| {
        let mut req = c.get(app.proxy_url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/v1/echo", None).await, 401);
    assert_eq!(status("/_tollgate/v1/balance", None).await, 401);
    assert_eq!(status("/_tollgate/v1/balance", Some(&key)).await, 200);
    assert_eq!(status("/elsewhere", Some(&key)).await, 404);

    let want: [Expected; 4] = [
        (
            "tollgate_requests_total",
            &[("route", "all"), ("outcome", "missing_credentials")],
            1.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_auth"), ("outcome", "missing_credentials")],
            1.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_self_service"), ("outcome", "self_service")],
            1.0,
        ),
        (
            "tollgate_requests_total",
            &[("route", "_unmatched"), ("outcome", "route_not_found")],
            1.0,
        ),
    ];
    // Counters are updated when a request is logged, just after its response: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = app.metrics_text().await;
        if want
            .iter()
            .all(|(name, labels, value)| metric_value(&text, name, labels) == Some(*value))
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics do not match {want:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let empty: Vec<&str> = text.lines().filter(|l| l.contains("route=\"\"")).collect();
    assert!(empty.is_empty(), "series with an empty route: {empty:#?}");
    for name in ["tollgate_overhead_seconds_count", "tollgate_requests_total"] {
        assert!(
            metric_value(&text, name, &[("route", "_self_service")]).is_some(),
            "{name}\n{text}"
        );
    }
}
