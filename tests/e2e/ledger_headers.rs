//! What a caller learns from every metered response: `X-Credits-Charged`,
//! `X-Credits-Remaining`, `X-Credits-Low: true` under the tier's threshold, and the 402 once the
//! credits are gone; an unlimited tier is never refused for credits but is still counted.

use crate::harness::TestEnv;
use crate::ledger_util::{
    account, clear_of_the_hour_end, get, get_ok, metric, wait_metric_at_least,
};
use crate::upstream::FakeUpstream;

fn config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 2.5

[tiers.basic]
monthly_credits = 10
low_balance_credits = 5

[tiers.unlimited]
monthly_credits = "unlimited"
requests_per_hour = 25
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charged_remaining_and_low_balance_headers_then_402() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url())).spawn().await;
    let (_account, key) = app.account_with_key("basic").await;

    // "Under" the threshold: 5 itself is not low.
    for (remaining, low) in [("7.5", false), ("5", false), ("2.5", true), ("0", true)] {
        let r = get_ok(&app, &key, "/v1/x").await;
        assert_eq!(r.charged().as_deref(), Some("2.5"), "{:?}", r.headers);
        assert_eq!(r.remaining().as_deref(), Some(remaining), "{:?}", r.headers);
        assert_eq!(
            r.header("x-credits-low").as_deref(),
            low.then_some("true"),
            "at {remaining}: {:?}",
            r.headers
        );
        // The upstream's own answer, untouched (echo).
        assert_eq!(r.header("x-upstream").as_deref(), Some("fake"));
    }
    let r = get(&app, &key, "/v1/x").await;
    r.assert_error(402, "insufficient_credits");
    assert_eq!(r.body["credits_remaining"].to_string(), "0", "{}", r.body);
    assert_eq!(r.body["credits_required"].to_string(), "2.5", "{}", r.body);
    assert_eq!(r.body["tier"], "basic", "{}", r.body);
    assert!(r.charged().is_none(), "{:?}", r.headers);
    assert_eq!(up.request_count(), 4);
    wait_metric_at_least(
        &app,
        "tollgate_plan_rejections_total",
        &[("reason", "insufficient_credits")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_tier_is_never_refused_for_credits_and_still_counts() {
    // The 26th call is refused by the hourly quota only if all fall in one clock hour.
    clear_of_the_hour_end(60).await;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url())).spawn().await;
    let (id, key) = app.account_with_key("unlimited").await;

    for _ in 0..25 {
        let r = get_ok(&app, &key, "/v1/x").await;
        assert_eq!(r.charged().as_deref(), Some("2.5"), "{:?}", r.headers);
        assert!(r.header("x-credits-low").is_none());
    }
    // Counted: its hourly quota applies.
    let r = get(&app, &key, "/v1/x").await;
    r.assert_error(429, "quota_exceeded");
    assert_eq!(up.request_count(), 25);
    // Counted: the credits are in the metrics (25 × 2.5 credits in micro-credits).
    wait_metric_at_least(
        &app,
        "tollgate_credits_debited_micros_total",
        &[("route", "paid"), ("tier", "unlimited")],
        62_500_000.0,
    )
    .await;
    assert_eq!(
        metric(
            &app,
            "tollgate_credits_debited_micros_total",
            &[("route", "paid"), ("tier", "unlimited")]
        )
        .await,
        62_500_000.0
    );
    let shown = account(&app, &id).await;
    assert_eq!(shown["unlimited"], true, "{shown}");
    let r = get(&app, &key, "/_tollgate/v1/balance").await;
    assert_eq!(r.body["unlimited"], true, "{}", r.body);
}
