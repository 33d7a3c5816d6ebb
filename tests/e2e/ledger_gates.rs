//! Plan gates before and around the debit: tier features (403 naming the cheapest tier that has
//! the feature; a tier change applies at once), the per-key burst rate (429 `rate_limited`),
//! requests in flight (`max_concurrent`, leases released on completion, on client disconnect,
//! and by TTL when an instance dies) and the body size (413 without a charge).

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use reqwest::Method;
use serde_json::json;

use crate::harness::{http_client_no_pool, metric_value, poll_until, TestEnv};
use crate::ledger_util::{
    balance, call_with, get, get_ok, grant, leases_key, total, wait_metric_at_least, wait_total,
};
use crate::upstream::FakeUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_gate_names_the_cheapest_tier_and_a_tier_change_applies_at_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(format!(
        r#"
[[upstreams]]
name = "up"
url = "{}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
feature = "chat"
cost = 1

[[routes]]
name = "other"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.free]
monthly_credits = 10
price_cents_monthly = 0

[tiers.team]
monthly_credits = 500
price_cents_monthly = 9900
features = ["chat", "voice"]

[tiers.pro]
monthly_credits = 50
price_cents_monthly = 2900
features = ["chat"]

[tiers.basic]
monthly_credits = 20
price_cents_monthly = 900
features = ["voice"]
"#,
        up.url()
    ));
    let a = config.spawn().await;
    let b = config.spawn().await;
    let (account, key) = a.account_with_key("free").await;
    let (status, body) = grant(&a, &account, json!(1.5), "before-upgrade").await;
    assert_eq!(status, 201, "{body}");

    for app in [&a, &b] {
        let r = get(app, &key, "/v1/chat/completions").await;
        r.assert_error(403, "feature_not_in_tier");
        assert_eq!(r.body["required_tier"], "pro", "{}", r.body);
        assert_eq!(r.body["tier"], "free", "{}", r.body);
        assert_eq!(r.body["feature"], "chat", "{}", r.body);
        get_ok(app, &key, "/v1/other").await;
    }
    assert_eq!(up.request_count(), 2);
    assert_eq!(total(&a, &account).await, "9.5", "a 403 costs nothing");
    wait_metric_at_least(
        &a,
        "tollgate_plan_rejections_total",
        &[("reason", "feature_not_in_tier")],
        1.0,
    )
    .await;

    // Upgrade: the allowance becomes pro's 50, purchased stays, the feature works at once.
    let (status, body) = a
        .admin_put(
            &format!("/v1/accounts/{account}/tier"),
            json!({"tier": "pro"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tier"], "pro", "{body}");
    assert_eq!(body["balance"]["allowance"].to_string(), "50", "{body}");
    assert_eq!(body["balance"]["purchased"].to_string(), "1.5", "{body}");
    let r = get_ok(&a, &key, "/v1/chat/completions").await;
    assert_eq!(r.remaining().as_deref(), Some("50.5"));
    // The other instance had the old tier cached: it follows within moments (waited for
    // with a margin for a slow machine).
    let ok = poll_until(Duration::from_secs(5), || async {
        get(&b, &key, "/v1/chat/completions").await.status == 200
    })
    .await;
    assert!(ok, "the other instance still refuses the upgraded account");
    assert_eq!(
        balance(&b, &account).await,
        ("48".to_string(), "1.5".to_string(), "49.5".to_string())
    );

    // Downgrade: refused again at once on the instance that made the change.
    let (status, body) = a
        .admin_put(
            &format!("/v1/accounts/{account}/tier"),
            json!({"tier": "basic"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balance"]["allowance"].to_string(), "20", "{body}");
    let r = get(&a, &key, "/v1/chat/completions").await;
    r.assert_error(403, "feature_not_in_tier");
    assert_eq!(r.body["required_tier"], "pro", "{}", r.body);
    assert_eq!(r.body["tier"], "basic", "{}", r.body);

    // An unknown tier is refused and changes nothing.
    let (status, body) = a
        .admin_put(
            &format!("/v1/accounts/{account}/tier"),
            json!({"tier": "gold"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "unknown_tier", "{body}");
    assert_eq!(total(&a, &account).await, "21.5");

    // "Changing" to the tier the account already has is not a refill of the allowance.
    get_ok(&a, &key, "/v1/other").await;
    let (status, body) = a
        .admin_put(
            &format!("/v1/accounts/{account}/tier"),
            json!({"tier": "basic"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tier"], "basic", "{body}");
    assert_eq!(body["balance"]["allowance"].to_string(), "19", "{body}");
    assert_eq!(
        balance(&b, &account).await,
        ("19".to_string(), "1.5".to_string(), "20.5".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_rate_per_second_gets_429_with_retry_after() {
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
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.bursty]
monthly_credits = 100
rate_per_second = 2
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("bursty").await;
    let mut ok = 0;
    let mut limited = 0;
    // Eight at once: far more than 2 per second, whatever the machine's speed.
    let client = http_client_no_pool();
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all(
        (0..8).map(|_| call_with(&client, &app, &key, Method::GET, "/v1/x")),
    )
    .await;
    // The window the limiter saw is within this one: a burst of 2, then one more every 500 ms.
    let window = started.elapsed();
    for r in answers {
        if r.status == 200 {
            ok += 1;
            continue;
        }
        r.assert_error(429, "rate_limited");
        let retry_after: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
        limited += 1;
    }
    assert!(ok >= 2, "the burst of 2 is allowed ({ok} passed)");
    let replenished = (window.as_millis() / 500) as usize;
    assert!(
        ok <= 2 + replenished,
        "{ok} of 8 passed in {window:?}: more than the burst of 2 plus {replenished} at 2/s"
    );
    assert!(
        limited >= 1,
        "8 requests at once are not all allowed at 2/s"
    );
    assert_eq!(up.request_count(), ok);
    assert_eq!(total(&app, &account).await, (100 - ok).to_string());
    wait_metric_at_least(
        &app,
        "tollgate_plan_rejections_total",
        &[("reason", "rate_limited")],
        f64::from(limited),
    )
    .await;
}

fn concurrency_config(upstream: &str) -> String {
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

[tiers.single]
monthly_credits = 100
max_concurrent = 1
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_one_and_the_lease_is_released_on_completion_and_disconnect() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(concurrency_config(&up.url()))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("single").await;
    let client = http_client_no_pool();

    // A slow request holds the only slot.
    let slow = {
        let (client, url, key) = (
            client.clone(),
            app.proxy_url("/v1/slow?ms=1500"),
            key.clone(),
        );
        tokio::spawn(async move { client.get(url).bearer_auth(key).send().await })
    };
    up.wait_for_requests(1, Duration::from_secs(5)).await;
    let r = call_with(&client, &app, &key, Method::GET, "/v1/fast").await;
    r.assert_error(429, "rate_limited");
    assert_eq!(r.body["limit"], 1, "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow:1500");
    // Released when the request ends.
    let ok = poll_until(Duration::from_secs(5), || async {
        call_with(&client, &app, &key, Method::GET, "/v1/fast")
            .await
            .status
            == 200
    })
    .await;
    assert!(ok, "the slot was not released after the slow request ended");
    assert_eq!(total(&app, &account).await, "98", "the 429 cost nothing");

    // A client that gives up mid-request: the slot is released when tollgate notices, long
    // before the upstream would have answered.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .no_proxy()
        .build()
        .unwrap();
    let gone = impatient
        .get(app.proxy_url("/v1/slow?ms=8000"))
        .bearer_auth(&key)
        .send()
        .await;
    assert!(gone.is_err(), "the client should have timed out");
    let ok = poll_until(Duration::from_secs(4), || async {
        call_with(&client, &app, &key, Method::GET, "/v1/fast")
            .await
            .status
            == 200
    })
    .await;
    assert!(ok, "the slot is still held after the client disconnected");
    let mut conn = env.redis().await;
    let leases: i64 = redis::cmd("ZCARD")
        .arg(leases_key(&env, &account))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(leases <= 1, "{leases} leases left");
    wait_metric_at_least(
        &app,
        "tollgate_plan_rejections_total",
        &[("reason", "max_concurrent")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_does_not_leak_its_slot_beyond_the_lease_ttl() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env
        .config()
        .toml(concurrency_config(&up.url()))
        .redis("lease_ttl_seconds = 2");
    let mut a = config.spawn().await;
    let b = config.spawn().await;
    let (account, key) = a.account_with_key("single").await;

    let slow = {
        let (url, key) = (a.proxy_url("/v1/slow?ms=10000"), key.clone());
        tokio::spawn(async move { http_client_no_pool().get(url).bearer_auth(key).send().await })
    };
    up.wait_for_requests(1, Duration::from_secs(5)).await;
    let r = get(&b, &key, "/v1/fast").await;
    r.assert_error(429, "rate_limited");

    // SIGKILL: nobody releases the lease; its TTL does.
    a.kill();
    let _ = slow.await;
    let ok = poll_until(Duration::from_secs(8), || async {
        get(&b, &key, "/v1/fast").await.status == 200
    })
    .await;
    assert!(ok, "the dead instance's slot is still held");
    // The crashed request was charged (it reached the upstream); the 429s were not.
    assert_eq!(total(&b, &account).await, "98");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_request_mb_get_413_without_a_charge() {
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
name = "upload"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.small]
monthly_credits = 10
max_request_mb = 1
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("small").await;
    let client = http_client_no_pool();
    const MIB: usize = 1 << 20;

    // Declared by Content-Length: refused before anything is charged or forwarded.
    let resp = client
        .post(app.proxy_url("/v1/upload"))
        .bearer_auth(&key)
        .body(vec![b'x'; 2 * MIB])
        .send()
        .await
        .unwrap();
    let (status, _, body) = crate::harness::json_response(resp).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "payload_too_large", "{body}");
    assert_eq!(body["limit_mb"], 1, "{body}");
    assert_eq!(up.request_count(), 0);
    assert_eq!(total(&app, &account).await, "10");

    // Exactly the limit is fine.
    let resp = client
        .post(app.proxy_url("/v1/upload"))
        .bearer_auth(&key)
        .body(vec![b'y'; MIB])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), MIB);
    assert_eq!(total(&app, &account).await, "9");

    // Chunked, no Content-Length: found out while streaming; the charge is returned.
    let chunks = (0..40).map(|_| Ok::<Bytes, std::io::Error>(Bytes::from(vec![b'z'; 64 * 1024])));
    let sent = client
        .post(app.proxy_url("/v1/upload"))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(stream::iter(chunks)))
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let (status, _, body) = crate::harness::json_response(resp).await;
            assert_eq!(status, 413, "{body}");
            assert_eq!(body["error"], "payload_too_large", "{body}");
        }
        // Tollgate may answer 413 and close while the client is still sending: the client
        // then sees the connection go, not a timeout (the metric below shows the refusal).
        Err(e) => assert!(
            !e.is_timeout() && (e.is_request() || e.is_body()),
            "the chunked upload failed otherwise: {e:?}"
        ),
    }
    wait_total(&app, &account, "9").await;
    // And stays there (no late charge).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(total(&app, &account).await, "9");
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "tollgate_plan_rejections_total",
            &[("reason", "payload_too_large")]
        ),
        Some(2.0),
        "the declared and the chunked over-limit bodies: {text}"
    );
}
