//! Balance-changing admin calls and the caller's own view: grants are idempotent on their
//! key (also when retried concurrently on two instances), reject bad bodies with a JSON 400,
//! and the self-service balance answers to the caller's own key.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{http_client_no_pool, TestEnv};
use crate::ledger_util::{balance, get, get_ok, grant};
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
cost = 1

[tiers.basic]
monthly_credits = 10
low_balance_credits = 9
"#
    )
}

fn b(allowance: &str, purchased: &str, total: &str) -> (String, String, String) {
    (allowance.into(), purchased.into(), total.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_credit_once_per_idempotency_key() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(config(&up.url()));
    let a = config.spawn().await;
    let b2 = config.spawn().await;
    let (account, _key) = a.account_with_key("basic").await;

    let (status, body) = grant(&a, &account, json!(2.5), "k1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["duplicate"], false, "{body}");
    assert_eq!(body["balance"]["purchased"].to_string(), "2.5", "{body}");
    assert_eq!(balance(&a, &account).await, b("10", "2.5", "12.5"));

    // The same grant again, on either instance: credited once, and the answer says so.
    for app in [&a, &b2] {
        let (status, body) = grant(app, &account, json!(2.5), "k1").await;
        assert!(status.is_success(), "{status} {body}");
        assert_eq!(body["duplicate"], true, "{body}");
        assert_eq!(body["balance"]["purchased"].to_string(), "2.5", "{body}");
    }
    assert_eq!(balance(&b2, &account).await, b("10", "2.5", "12.5"));

    // The same key for another amount is a conflict, not a second grant.
    let (status, body) = grant(&a, &account, json!(3), "k1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "conflict", "{body}");

    // Ten concurrent retries of one new grant over two instances: applied exactly once.
    let apps = [&a, &b2];
    let answers = join_all((0..10).map(|i| {
        let app = apps[i % 2];
        let account = account.clone();
        async move { grant(app, &account, json!("1"), "k2").await }
    }))
    .await;
    let mut fresh = 0;
    for (status, body) in &answers {
        assert!(status.is_success(), "{status} {body}");
        if body["duplicate"] == false {
            fresh += 1;
        } else {
            assert_eq!(body["duplicate"], true, "{body}");
        }
    }
    assert_eq!(fresh, 1, "{answers:?}");
    assert_eq!(balance(&a, &account).await, b("10", "3.5", "13.5"));

    // Bad bodies: a JSON 400 each, nothing credited.
    let url = a.admin_url(&format!("/v1/accounts/{account}/grants"));
    let client = http_client_no_pool();
    let raw_bodies = [
        "not json".to_string(),
        "{}".to_string(),
        json!({"credits": 1, "reason": "r"}).to_string(),
        json!({"credits": 1, "idempotency_key": "x1"}).to_string(),
        json!({"reason": "r", "idempotency_key": "x2"}).to_string(),
        json!({"credits": 0, "reason": "r", "idempotency_key": "x3"}).to_string(),
        json!({"credits": -1, "reason": "r", "idempotency_key": "x4"}).to_string(),
        json!({"credits": "abc", "reason": "r", "idempotency_key": "x5"}).to_string(),
        json!({"credits": "0.0000001", "reason": "r", "idempotency_key": "x6"}).to_string(),
        json!({"credits": 1, "reason": "", "idempotency_key": "x7"}).to_string(),
        json!({"credits": 1, "reason": "r", "idempotency_key": ""}).to_string(),
        json!({"credits": 1, "reason": "r", "idempotency_key": "x8", "bonus": 5}).to_string(),
        json!({"credits": null, "reason": "r", "idempotency_key": "x9"}).to_string(),
        // Absurd amounts are refused up front, not half-applied in Redis.
        json!({"credits": "9000000000000", "reason": "r", "idempotency_key": "x10"}).to_string(),
        json!([1, 2]).to_string(),
    ];
    for raw in &raw_bodies {
        let resp = client
            .post(&url)
            .bearer_auth(a.admin_token())
            .header("content-type", "application/json")
            .body(raw.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body: Value = serde_json::from_str(&resp.text().await.unwrap())
            .unwrap_or_else(|e| panic!("non-JSON answer to {raw}: {e}"));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw}: {body}");
        assert!(content_type.starts_with("application/json"), "{raw}");
        assert_eq!(body["error"], "invalid_request", "{raw}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    // The refused absurd grant did not burn its idempotency key: a sane retry under it works.
    let (status, body) = grant(&a, &account, json!("0.5"), "x10").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["duplicate"], false, "{body}");
    assert_eq!(balance(&a, &account).await, b("10", "4", "14"));
    // An unknown account is a 404.
    let (status, body) = grant(&a, "acct_nobody", json!(1), "k3").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    assert_eq!(balance(&a, &account).await, b("10", "4", "14"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_service_balance_answers_to_the_callers_own_key() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url())).spawn().await;
    let (account, key) = app.account_with_key("basic").await;
    let (_other, other_key) = app.account_with_key("basic").await;
    let (status, body) = grant(&app, &account, json!(0.25), "ss").await;
    assert_eq!(status, 201, "{body}");
    get_ok(&app, &key, "/v1/x").await;

    let r = get(&app, &key, "/_tollgate/v1/balance").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(r.body["account_id"], account.as_str(), "{}", r.body);
    assert_eq!(r.body["tier"], "basic", "{}", r.body);
    assert_eq!(
        r.body["balance"]["allowance"].to_string(),
        "9",
        "{}",
        r.body
    );
    assert_eq!(
        r.body["balance"]["purchased"].to_string(),
        "0.25",
        "{}",
        r.body
    );
    assert_eq!(r.body["balance"]["total"].to_string(), "9.25", "{}", r.body);
    assert_eq!(r.body["unlimited"], false, "{}", r.body);
    assert_eq!(r.body["low_balance"], false, "{}", r.body);
    assert!(r.body["period_end"].is_string(), "{}", r.body);
    assert!(r.charged().is_none(), "a balance check is not charged");

    // X-Api-Key works too; another caller sees only their own balance.
    let resp = app
        .client()
        .get(app.proxy_url("/_tollgate/v1/balance"))
        .header("x-api-key", &other_key)
        .send()
        .await
        .unwrap();
    let (status, _, body) = crate::harness::json_response(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["account_id"], account.as_str());
    assert_eq!(body["balance"]["total"].to_string(), "10", "{body}");

    // No credential, a bad one: 401, never forwarded.
    let resp = app
        .client()
        .get(app.proxy_url("/_tollgate/v1/balance"))
        .send()
        .await
        .unwrap();
    crate::harness::assert_error(resp, 401, "missing_credentials").await;
    let r = get(
        &app,
        "tg_not_a_real_key_0123456789abcdef",
        "/_tollgate/v1/balance",
    )
    .await;
    r.assert_error(401, "invalid_credentials");

    // Balance calls cost nothing and never reach the upstream.
    assert_eq!(up.request_count(), 1);
    assert_eq!(balance(&app, &account).await, b("9", "0.25", "9.25"));
    get_ok(&app, &key, "/v1/x").await;
    let r = get(&app, &key, "/_tollgate/v1/balance").await;
    assert_eq!(r.body["balance"]["total"].to_string(), "8.25", "{}", r.body);
    assert_eq!(r.body["low_balance"], true, "{}", r.body);
}
