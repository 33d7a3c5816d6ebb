//! Plan quotas, global across instances: requests per hour, requests per month and per-action
//! quotas answer 429 `quota_exceeded` with `Retry-After` and the RateLimit headers, cost
//! nothing, and reset with their window (the next hour, the next billing period).

use crate::harness::TestEnv;
use crate::ledger_util::{
    clear_of_the_hour_end, end_period, get, get_ok, hset, total, unix_now, Answer,
};
use crate::upstream::FakeUpstream;

fn assert_quota(a: &Answer, quota: &str, limit: u64, max_retry_after: i64) -> i64 {
    a.assert_error(429, "quota_exceeded");
    assert_eq!(a.body["quota"], quota, "{}", a.body);
    assert_eq!(a.body["limit"], limit, "{}", a.body);
    let retry_after: i64 = a
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=max_retry_after).contains(&retry_after),
        "Retry-After {retry_after} for {quota}"
    );
    assert_eq!(a.body["retry_after"], retry_after, "{}", a.body);
    let policy = a.header("ratelimit-policy").expect("RateLimit-Policy");
    assert!(policy.starts_with(&format!("{limit};w=")), "{policy}");
    let ratelimit = a.header("ratelimit").expect("RateLimit");
    assert!(
        ratelimit.contains(&format!("limit={limit}")) && ratelimit.contains("remaining=0"),
        "{ratelimit}"
    );
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_hour_quota_and_the_next_hour() {
    // The calls are counted in one clock hour (the Retry-After is checked against its end).
    clear_of_the_hour_end(60).await;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(format!(
        r#"
[[upstreams]]
name = "up"
url = "{}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.hourly]
monthly_credits = 100
requests_per_hour = 3
"#,
        up.url()
    ));
    let a = config.spawn().await;
    let b = config.spawn().await;
    let (account, key) = a.account_with_key("hourly").await;

    // The quota is global: two on one instance, one on the other, then both refuse.
    get_ok(&a, &key, "/v1/x").await;
    get_ok(&b, &key, "/v1/x").await;
    get_ok(&a, &key, "/v1/x").await;
    for app in [&b, &a] {
        let r = get(app, &key, "/v1/x").await;
        let retry_after = assert_quota(&r, "requests_per_hour", 3, 3600);
        let now = unix_now();
        let until_hour = (now / 3600 + 1) * 3600 - now;
        assert!(
            (retry_after - until_hour).abs() <= 2,
            "Retry-After {retry_after}, the hour ends in {until_hour}"
        );
        assert_eq!(r.header("ratelimit-policy").as_deref(), Some("3;w=3600"));
    }
    assert_eq!(up.request_count(), 3);
    assert_eq!(
        total(&a, &account).await,
        "97",
        "refused requests cost nothing"
    );

    // The next hour: the counter's hour index is an old one.
    let last_hour = unix_now() / 3600 - 1;
    hset(&env, &account, &[("req_h_idx", last_hour.to_string())]).await;
    for _ in 0..3 {
        get_ok(&b, &key, "/v1/x").await;
    }
    assert_quota(&get(&a, &key, "/v1/x").await, "requests_per_hour", 3, 3600);
    assert_eq!(up.request_count(), 6);
    assert_eq!(total(&a, &account).await, "94");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_and_per_action_quotas_reset_with_the_period() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "up"
url = "{}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
action = "ai_message"
cost = 1

[[routes]]
name = "other"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.capped]
monthly_credits = 100
requests_per_month = 5
action_quotas = {{ ai_message = {{ per_month = 2 }} }}
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("capped").await;
    let period = 32 * 86_400;

    get_ok(&app, &key, "/v1/chat/a").await;
    get_ok(&app, &key, "/v1/chat/b").await;
    let r = get(&app, &key, "/v1/chat/c").await;
    assert_quota(&r, "action_per_month:ai_message", 2, period);
    // Other actions are not affected by ai_message's quota...
    for _ in 0..3 {
        get_ok(&app, &key, "/v1/other").await;
    }
    // ...but every request counts toward requests_per_month (5 now).
    let r = get(&app, &key, "/v1/other").await;
    assert_quota(&r, "requests_per_month", 5, period);
    let r = get(&app, &key, "/v1/chat/d").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(up.request_count(), 5);
    assert_eq!(total(&app, &account).await, "95");

    // A new billing period resets both.
    end_period(&env, &account, 10).await;
    get_ok(&app, &key, "/v1/chat/e").await;
    get_ok(&app, &key, "/v1/chat/f").await;
    assert_quota(
        &get(&app, &key, "/v1/chat/g").await,
        "action_per_month:ai_message",
        2,
        period,
    );
    for _ in 0..3 {
        get_ok(&app, &key, "/v1/other").await;
    }
    assert_quota(
        &get(&app, &key, "/v1/other").await,
        "requests_per_month",
        5,
        period,
    );
    // The allowance was reset too: 100 - 5.
    assert_eq!(total(&app, &account).await, "95");
    assert_eq!(up.request_count(), 10);
}
