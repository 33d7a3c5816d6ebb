//! The ledger's own numbers: an account is hydrated from Postgres once, not per request; the
//! debit, rejection and script-latency metrics are exported.

use crate::harness::{metric_value, TestEnv};
use crate::ledger_util::{account_key, get, get_ok, metric, total, wait_metric_at_least};
use crate::upstream::FakeUpstream;

fn config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
feature = "chat"
cost = 1

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 0.5

[tiers.basic]
monthly_credits = 3

[tiers.pro]
monthly_credits = 100
features = ["chat"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_hydrated_once_not_per_request() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url())).spawn().await;
    let (account, key) = app.account_with_key("basic").await;
    // Creating the account loaded it into Redis (and counted that).
    assert_eq!(metric(&app, "tollgate_hydrations_total", &[]).await, 1.0);
    let (_, other_key) = app.account_with_key("basic").await;
    assert_eq!(metric(&app, "tollgate_hydrations_total", &[]).await, 2.0);
    for _ in 0..3 {
        get_ok(&app, &other_key, "/v1/x").await;
    }
    assert_eq!(
        metric(&app, "tollgate_hydrations_total", &[]).await,
        2.0,
        "requests of a loaded account hydrate it again"
    );

    // As if Redis had lost the account (eviction, failover): the next request loads it.
    let mut conn = env.redis().await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(account_key(&env, &account))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the account hash was not where the layout says");
    let before = 2.0;

    let r = get_ok(&app, &key, "/v1/x").await;
    assert_eq!(r.remaining().as_deref(), Some("2.5"));
    assert_eq!(
        metric(&app, "tollgate_hydrations_total", &[]).await,
        before + 1.0
    );
    for want in ["2", "1.5", "1", "0.5"] {
        let r = get_ok(&app, &key, "/v1/x").await;
        assert_eq!(r.remaining().as_deref(), Some(want));
    }
    assert_eq!(
        metric(&app, "tollgate_hydrations_total", &[]).await,
        before + 1.0,
        "hydrated again on a later request"
    );
    assert_eq!(total(&app, &account).await, "0.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_metrics_are_exported() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url())).spawn().await;
    let (_account, key) = app.account_with_key("basic").await;

    for _ in 0..6 {
        get_ok(&app, &key, "/v1/x").await;
    }
    get(&app, &key, "/v1/x")
        .await
        .assert_error(402, "insufficient_credits");
    get(&app, &key, "/v1/chat/x")
        .await
        .assert_error(403, "feature_not_in_tier");

    wait_metric_at_least(
        &app,
        "tollgate_plan_rejections_total",
        &[("reason", "insufficient_credits")],
        1.0,
    )
    .await;
    let text = app.metrics_text().await;
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(
        value(
            "tollgate_credits_debited_micros_total",
            &[("route", "paid"), ("tier", "basic")]
        ),
        Some(3_000_000.0),
        "{text}"
    );
    assert_eq!(
        value(
            "tollgate_plan_rejections_total",
            &[("reason", "insufficient_credits")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "tollgate_plan_rejections_total",
            &[("reason", "feature_not_in_tier")]
        ),
        Some(1.0),
        "{text}"
    );
    let debits = value(
        "tollgate_redis_script_duration_seconds_count",
        &[("script", "debit")],
    )
    .unwrap_or(0.0);
    assert!(debits >= 7.0, "{debits} debit script calls\n{text}");
    assert!(
        text.contains("tollgate_redis_script_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("tollgate_hydrations_total"), "{text}");
}
