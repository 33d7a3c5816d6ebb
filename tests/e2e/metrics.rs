//! `GET /metrics` on metrics_listen: Prometheus text with request and auth-failure counters.

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
            &[("outcome", "route_not_found")],
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
