//! Plan limits beyond credits: tokens per period, counted resources (`counts` / `limits`),
//! per-action concurrency, and seats (`max_keys`).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{poll_until, TestEnv};
use crate::ledger_util::{get, Answer};
use crate::upstream::FakeUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_month_counts_settled_tokens_and_refuses_past_the_quota() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "ai"
url = "{}"

[[routes]]
name = "chat"
path_prefix = "/v1"
upstream = "ai"
pricing = {{ input_per_1k_tokens = 0.001, output_per_1k_tokens = 0.001, reserve = 0.01 }}

[tiers.free]
monthly_credits = 100
tokens_per_month = 1000
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("free").await;
    let chat = |tokens: u64| {
        let client = app.client().clone();
        let url = app.proxy_url(&format!(
            "/v1/chat/completions?prompt_tokens={tokens}&completion_tokens={tokens}"
        ));
        let key = key.clone();
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "m", "messages": []}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // 2 × 300 + 2 × 300 = 1200 tokens: the second request is admitted (600 < 1000) and its
    // true usage recorded; the third is refused.
    assert_eq!(chat(300).await, StatusCode::OK);
    assert_eq!(chat(300).await, StatusCode::OK);
    // Tokens count once a request settles: wait until both are in the journal (the settle
    // script counts them in Redis in the same step), then the third is refused, at once.
    let usage_path = format!("/v1/accounts/{account}/usage");
    let settled = poll_until(Duration::from_secs(10), || async {
        let (_, u) = app.admin_get(&usage_path).await;
        u["tokens_in"] == 600 && u["tokens_out"] == 600
    })
    .await;
    assert!(settled, "{:?}", app.admin_get(&usage_path).await);
    assert_eq!(chat(1).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        up.request_count(),
        2,
        "a refused request reached the upstream"
    );
    let resp = app
        .client()
        .post(app.proxy_url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(body["quota"], "tokens_per_month", "{body}");
    assert_eq!(body["limit"], 1000, "{body}");
}

fn resource_config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
url = "{upstream}"

[[routes]]
name = "create_agent"
method = "POST"
path_prefix = "/agents"
upstream = "app"
cost = 0
counts = {{ agents = 1 }}

[[routes]]
name = "delete_agent"
method = "DELETE"
path_prefix = "/agents"
upstream = "app"
cost = 0
counts = {{ agents = -1 }}

[[routes]]
name = "sandbox"
path_prefix = "/sandbox"
upstream = "app"
cost = 0

[[routes]]
name = "other"
path_prefix = "/other"
upstream = "app"
cost = 0

[tiers.free]
monthly_credits = 10
limits = {{ agents = 2 }}
action_quotas = {{ sandbox = {{ max_concurrent = 1 }} }}
max_keys = 2

[tiers.pro]
monthly_credits = 10
price_cents_monthly = 1499
limits = {{ agents = 10 }}

[tiers.enterprise]
monthly_credits = "unlimited"
price_cents_monthly = 9999
"#
    )
}

async fn call(app: &crate::harness::App, key: &str, method: reqwest::Method, path: &str) -> Answer {
    crate::ledger_util::call_with(app.client(), app, key, method, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_resources_stop_at_the_tier_limit_and_failures_do_not_count() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(resource_config(&up.url())).spawn().await;
    let (account, key) = app.account_with_key("free").await;
    let post = reqwest::Method::POST;
    assert_eq!(
        call(&app, &key, post.clone(), "/agents/a").await.status,
        200
    );
    // A failed creation (upstream 4xx) does not take a slot.
    let failed = call(&app, &key, post.clone(), "/agents/status/409").await;
    assert_eq!(failed.status, 409);
    assert_eq!(
        call(&app, &key, post.clone(), "/agents/b").await.status,
        200
    );
    let a = call(&app, &key, post.clone(), "/agents/c").await;
    a.assert_error(403, "limit_reached");
    assert_eq!(a.body["resource"], "agents");
    assert_eq!(a.body["limit"], 2);
    assert_eq!(a.body["tier"], "free");
    assert_eq!(a.body["required_tier"], "pro", "{}", a.body);
    let view = crate::ledger_util::account(&app, &account).await;
    assert_eq!(view["period_usage"]["resources"]["agents"], 2, "{view}");
    // Deleting one frees a slot.
    let d = call(&app, &key, reqwest::Method::DELETE, "/agents/a").await;
    assert_eq!(d.status, 200);
    assert_eq!(call(&app, &key, post, "/agents/c").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_action_concurrency_leaves_other_routes_free() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(resource_config(&up.url())).spawn().await;
    let (_, key) = app.account_with_key("free").await;
    // One sandbox session open (a slow request) ...
    let client = app.client().clone();
    let url = app.proxy_url("/sandbox/slow?ms=1500");
    let k = key.clone();
    let open = tokio::spawn(async move {
        client
            .get(url)
            .bearer_auth(k)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(
        poll_until(Duration::from_secs(5), || async { up.request_count() >= 1 }).await,
        "the first session did not start"
    );
    // ... a second is refused, while other routes still work.
    let second = get(&app, &key, "/sandbox/echo").await;
    second.assert_error(429, "rate_limited");
    assert_eq!(second.body["limit"], 1);
    assert_eq!(get(&app, &key, "/other/echo").await.status, 200);
    assert_eq!(open.await.unwrap(), 200);
    // Released when it ends.
    assert_eq!(get(&app, &key, "/sandbox/echo").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_cap_the_live_keys_of_an_account() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(resource_config(&up.url())).spawn().await;
    let (account, first_key) = app.account_with_key("free").await;
    let (status, second) = app
        .admin_post(
            &format!("/v1/accounts/{account}/keys"),
            json!({"name": "member"}),
        )
        .await;
    assert_eq!(status, 201, "{second}");
    let (status, third) = app
        .admin_post(
            &format!("/v1/accounts/{account}/keys"),
            json!({"name": "one too many"}),
        )
        .await;
    assert_eq!(status, 409, "{third}");
    assert_eq!(third["error"], "seat_limit_reached", "{third}");
    // Revoking a member frees the seat; both members spend the same balance.
    let second_id = second["id"].as_str().unwrap();
    app.revoke_key(second_id).await;
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{account}/keys"),
            json!({"name": "new member"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let new_key = body["key"].as_str().unwrap();
    assert_eq!(get(&app, &first_key, "/other/echo").await.status, 200);
    assert_eq!(get(&app, new_key, "/other/echo").await.status, 200);
}
