//! AI-aware pricing end to end: `pricing = {…}` routes priced by tokens (from JSON and SSE
//! usage), request size and duration; reserve-then-settle (refunds, extra charges, debt);
//! per-model prices; `cap_max_tokens`; stream cuts when the balance runs out; expired holds
//! settled once after a crash.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{json_response, poll_until, App, TestEnv};
use crate::journal_util::{assert_balance_is_journal_sum, balance, micros, micros_of};
use crate::ledger_util::{grant, wait_total, Answer};
use crate::upstream::FakeUpstream;

/// A config with one `pricing` route at `/v1` and a tier with `monthly` credits.
fn config(upstream: &str, pricing: &str, route_extra: &str, monthly: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "ai"
url = "{upstream}"

[[routes]]
name = "ai"
path_prefix = "/v1"
upstream = "ai"
pricing = {pricing}
{route_extra}

[tiers.basic]
monthly_credits = {monthly}
"#
    )
}

const TOKENS: &str =
    "{ per_request = 0.01, input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5, reserve = 5 }";

async fn post(app: &App, key: &str, path: &str, body: &Value) -> Answer {
    let resp = app
        .client()
        .post(app.proxy_url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let (status, headers, body) = json_response(resp).await;
    Answer {
        status,
        headers,
        body,
    }
}

/// A streamed POST: the status and the whole body as text.
async fn post_stream(app: &App, key: &str, path: &str, body: &Value) -> (StatusCode, String) {
    let resp = app
        .client()
        .post(app.proxy_url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status();
    let mut text = Vec::new();
    let mut resp = resp;
    // A cut stream ends with a broken connection after its error event: keep what came.
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// The account's settle entries in Postgres: (amount µc, reason, tokens in, tokens out).
async fn settles(pg: &sqlx::PgPool, account: &str) -> Vec<(i64, String, i64, i64)> {
    sqlx::query_as(
        "SELECT amount, COALESCE(reason, ''), COALESCE(tokens_in, 0)::BIGINT, COALESCE(tokens_out, 0)::BIGINT
           FROM ledger_entries WHERE account_id = $1 AND kind = 'settle' ORDER BY created_at",
    )
    .bind(account)
    .fetch_all(pg)
    .await
    .expect("reading settle entries")
}

async fn wait_settles(pg: &sqlx::PgPool, account: &str, n: usize) -> Vec<(i64, String, i64, i64)> {
    let ok = poll_until(Duration::from_secs(10), || async {
        settles(pg, account).await.len() >= n
    })
    .await;
    let found = settles(pg, account).await;
    assert!(
        ok,
        "expected {n} settle entries for {account}, found {found:?}"
    );
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_usage_is_settled_exactly_against_the_reserve() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), TOKENS, "", "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    let a = post(
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=1200&completion_tokens=300",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["usage"]["prompt_tokens"], 1200,
        "body passes through"
    );
    // The header goes out before the body: it carries the reserve.
    assert_eq!(a.charged().as_deref(), Some("5"));
    assert_eq!(a.remaining().as_deref(), Some("95"));
    // 0.01 + 1.2 × 0.5 + 0.3 × 1.5 = 1.06
    wait_total(&app, &account, "98.94").await;

    let pg = env.pg().await;
    let s = wait_settles(&pg, &account, 1).await;
    assert_eq!(
        s[0],
        (1_060_000 - 5_000_000, "usage".to_string(), 1200, 300)
    );
    let (status, usage) = app
        .admin_get(&format!("/v1/accounts/{account}/usage"))
        .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(micros(&usage["credits"]), 1_060_000, "{usage}");
    assert_eq!(usage["requests"], 1, "{usage}");
    assert_eq!(usage["tokens_in"], 1200, "{usage}");
    assert_eq!(usage["tokens_out"], 300, "{usage}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_usage_is_asked_for_streamed_through_and_settled() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), TOKENS, "", "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    let resp = app
        .client()
        .post(app.proxy_url(
            "/v1/chat/completions?n=4&delay_ms=300&prompt_tokens=2000&completion_tokens=1000",
        ))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-credits-charged")
            .and_then(|v| v.to_str().ok()),
        Some("5"),
        "streams carry the reserve"
    );
    // The first event arrives while the upstream is still producing the rest.
    let mut resp = resp;
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"));
    assert!(
        up.sse_sent().len() < 5,
        "the first chunk reached the client only after the upstream finished"
    );
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"usage\""), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");

    // tollgate asked the upstream for usage on the client's behalf.
    let sent: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(sent["model"], "gpt-4o-mini");

    // 0.01 + 2 × 0.5 + 1 × 1.5 = 2.51
    wait_total(&app, &account, "97.49").await;
    let pg = env.pg().await;
    let s = wait_settles(&pg, &account, 1).await;
    assert_eq!(s[0].1, "usage");
    assert_eq!((s[0].2, s[0].3), (2000, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_is_never_settled_at_zero() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing =
        "{ input_per_1k_tokens = 1, output_per_1k_tokens = 1, reserve = 2, include_usage = false }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let (status, text) = post_stream(&app, &key, "/v1/chat/completions?n=3", &chat(true)).await;
    assert_eq!(status, 200);
    assert!(!text.contains("\"usage\""), "{text}");
    let sent: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    assert!(
        sent.get("stream_options").is_none(),
        "include_usage = false: {sent}"
    );
    // No usage: the reserve (more than the running estimate of a few events) is the cost.
    wait_total(&app, &account, "98").await;
    let s = wait_settles(&env.pg().await, &account, 1).await;
    assert_eq!((s[0].0, s[0].1.as_str()), (0, "no_usage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_and_per_request_prices_are_exact() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ per_request = 0.1, per_mb_request_body = 2 }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let body = vec![b'x'; 512 * 1024];
    let resp = app
        .client()
        .post(app.proxy_url("/v1/upload"))
        .bearer_auth(&key)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Content-Length is known up front: the hold is the exact price.
    assert_eq!(
        resp.headers()
            .get("x-credits-charged")
            .and_then(|v| v.to_str().ok()),
        Some("1.1")
    );
    assert_eq!(resp.bytes().await.unwrap().len(), body.len());
    wait_total(&app, &account, "98.9").await;

    // A chunked body of unknown size: held at per_request, settled at the measured size.
    let stream = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 256 * 1024]))),
    );
    let resp = app
        .client()
        .post(app.proxy_url("/v1/upload"))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // 0.1 + 1 MiB × 2 = 2.1
    wait_total(&app, &account, "96.8").await;
    crate::journal_util::assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_balance_is_journal_sum(&app, &env.pg().await, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_admission_debt_and_the_top_up_that_pays_it() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 1, reserve = 2 }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "3"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    // 3 covers the reserve; the response really costs 10: the true cost is recorded.
    let a = post(
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=10000",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_total(&app, &account, "-7").await;
    let (allowance, purchased, _) = balance(&app, &account).await;
    assert_eq!(
        (allowance, purchased),
        (0, -7_000_000),
        "debt sits in purchased"
    );

    // In debt: 402 until topped up.
    let a = post(&app, &key, "/v1/chat/completions", &chat(false)).await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(
        micros(&a.body["credits_remaining"]),
        -7_000_000,
        "{}",
        a.body
    );
    assert_eq!(micros(&a.body["credits_required"]), 2_000_000, "{}", a.body);

    // The top-up pays the debt first: 10 − 7 = 3 left, enough for the reserve again.
    let (status, body) = grant(&app, &account, json!(10), "top-up").await;
    assert_eq!(status, 201, "{body}");
    wait_total(&app, &account, "3").await;
    let a = post(
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=500",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_total(&app, &account, "2.5").await;
    let pg = env.pg().await;
    wait_settles(&pg, &account, 2).await;
    crate::journal_util::assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_calls_are_refunded_and_upstream_errors_cost_only_fixed_parts() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ per_request = 0.5, output_per_1k_tokens = 1, reserve = 2 }";
    let app = env
        .config()
        .toml(config(
            &up.url(),
            pricing,
            r#"refund_on = ["connect_error", "5xx", "timeout"]"#,
            "10",
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    // 5xx: the whole hold goes back; the header says nothing was charged.
    let a = post(&app, &key, "/v1/status/503", &chat(false)).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.charged().as_deref(), Some("0"));
    wait_total(&app, &account, "10").await;
    // 4xx without usage: the model did no work, only the per-request price is kept.
    let a = post(&app, &key, "/v1/status/400", &chat(false)).await;
    assert_eq!(a.status, 400);
    wait_total(&app, &account, "9.5").await;

    let pg = env.pg().await;
    let s = wait_settles(&pg, &account, 2).await;
    let reasons: Vec<&str> = s.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(reasons, ["upstream_5xx", "upstream_error"]);
    assert_eq!(s[0].0, -2_000_000);
    assert_eq!(s[1].0, -1_500_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_refund_with_a_body_that_says_so() {
    let env = TestEnv::new().await;
    let closed = crate::upstream::closed_addr();
    let app = env
        .config()
        .toml(config(
            &format!("http://{closed}"),
            "{ per_request = 1, per_mb_request_body = 1 }",
            "",
            "10",
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let a = post(&app, &key, "/v1/x", &json!({"a": 1})).await;
    a.assert_error(502, "upstream_unavailable");
    assert_eq!(a.body["refunded"], true, "{}", a.body);
    wait_total(&app, &account, "10").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_have_their_own_prices() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = r#"{ reserve = 1, models = { "gpt-4o" = { input_per_1k_tokens = 2.5, output_per_1k_tokens = 10 }, "gpt-4o-mini*" = { input_per_1k_tokens = 0.15, output_per_1k_tokens = 0.6 } } }"#;
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let q = "/v1/chat/completions?prompt_tokens=1000&completion_tokens=1000";
    let a = post(&app, &key, q, &json!({"model": "gpt-4o", "messages": []})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_total(&app, &account, "87.5").await;
    let a = post(
        &app,
        &key,
        q,
        &json!({"model": "gpt-4o-mini-2024-07-18", "messages": []}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_total(&app, &account, "86.75").await;
    // Unpriced model: refused before anything is charged or forwarded upstream.
    let before = up.request_count();
    let a = post(&app, &key, q, &json!({"model": "llama-3", "messages": []})).await;
    a.assert_error(400, "model_not_priced");
    assert_eq!(a.body["model"], "llama-3");
    assert_eq!(total_micros(&app, &account).await, 86_750_000);
    // A small body with a Content-Length is priced before the upstream is contacted.
    assert_eq!(up.request_count(), before);
}

async fn total_micros(app: &App, account: &str) -> i64 {
    balance(app, account).await.2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_max_tokens_lowers_the_request_to_what_the_balance_pays_for() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 1, reserve = 0.5 }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "cap_max_tokens = true", "2"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let a = post(
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=1500",
        &json!({"model": "m", "messages": [], "max_tokens": 100000}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let sent: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    // The whole balance (2) is held: it pays for 2000 output tokens.
    assert_eq!(sent["max_tokens"], 2000, "{sent}");
    assert_eq!(a.charged().as_deref(), Some("2"));
    wait_total(&app, &account, "0.5").await;

    // A request under the cap is left alone.
    let a = post(
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=100",
        &json!({"model": "m", "messages": [], "max_tokens": 200}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let sent: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    assert_eq!(sent["max_tokens"], 200, "{sent}");
    wait_total(&app, &account, "0.4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_a_small_balance_are_cut_and_never_overspend() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 0.1 credit per output token; each stream would run 300 events (30 credits).
    let pricing = "{ output_per_1k_tokens = 100, reserve = 1 }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "10"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let streams = 4;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let client = app.client().clone();
        let url = app.proxy_url("/v1/chat/completions?n=300&delay_ms=5&completion_tokens=300");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut resp = client
                .post(url)
                .bearer_auth(key)
                .json(&chat(true))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let mut text = Vec::new();
            while let Ok(Some(c)) = resp.chunk().await {
                text.extend_from_slice(&c);
            }
            (status, String::from_utf8_lossy(&text).into_owned())
        }));
    }
    let mut cut = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        if status == 402 {
            continue;
        }
        assert_eq!(status, 200, "{text}");
        // 10 credits cannot pay for a 30-credit stream: every admitted stream is cut.
        assert!(text.contains("event: error"), "{text}");
        assert!(text.contains("\"insufficient_credits\""), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
        cut += 1;
    }
    assert!(cut >= 1, "no stream was admitted");
    let pg = env.pg().await;
    wait_settles(&pg, &account, cut).await;
    crate::journal_util::assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    // A cut stream costs what it held: all the balance had, never more (README, "Reserve,
    // then settle"). Together the streams took exactly the 10 credits, not one µc beyond.
    let spent = 10_000_000 - total_micros(&app, &account).await;
    assert_eq!(spent, 10_000_000, "spent {spent} µc from a balance of 10");
    let s = wait_settles(&pg, &account, cut).await;
    assert_eq!(s.len(), cut, "one settle per admitted stream: {s:?}");
    assert!(s.iter().all(|r| r.1 == "insufficient_credits"), "{s:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    assert_eq!(
        crate::ledger_util::metric(&app, "tollgate_streams_cut_total", &[("kind", "sse")]).await,
        cut as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_left_by_a_crashed_instance_is_settled_once_at_its_reserve() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 1, reserve = 3 }";
    let builder = env
        .config()
        .toml(config(&up.url(), pricing, "", "10"))
        .redis("lease_ttl_seconds = 2");
    let mut a = builder.spawn().await;
    let b = builder.spawn().await;
    let (account, key) = a.account_with_key("basic").await;

    // A long stream through A; A dies in the middle of it.
    let client = a.client().clone();
    let url = a.proxy_url("/v1/chat/completions?n=100&delay_ms=100");
    let k = key.clone();
    let stream = tokio::spawn(async move {
        let resp = client
            .post(url)
            .bearer_auth(k)
            .json(&chat(true))
            .send()
            .await;
        if let Ok(mut resp) = resp {
            while let Ok(Some(_)) = resp.chunk().await {}
        }
    });
    assert!(
        poll_until(Duration::from_secs(5), || async {
            up.sse_sent().len() >= 3
        })
        .await,
        "the stream did not start"
    );
    wait_total(&b, &account, "7").await;
    a.kill();
    let _ = stream.await;

    // B finds the hold expired and settles it at the reserve, once.
    let pg = env.pg().await;
    let s = wait_settles(&pg, &account, 1).await;
    assert_eq!((s[0].0, s[0].1.as_str()), (0, "hold_expired"), "{s:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(settles(&pg, &account).await.len(), 1, "settled twice");
    assert_eq!(total_micros(&b, &account).await, 7_000_000);
    assert_eq!(
        crate::ledger_util::metric(&b, "tollgate_holds_expired_total", &[]).await,
        1.0
    );
    let holds: Vec<String> = env
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.ends_with(":holds") || k.ends_with(":holddata"))
        .collect();
    assert!(holds.is_empty(), "hold keys left: {holds:?}");
    crate::journal_util::assert_caught_up(&env, Some(&b), Duration::from_secs(10)).await;
    assert_balance_is_journal_sum(&b, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priced_route_configs_are_validated() {
    let env = TestEnv::new().await;
    let bad = [
        (
            "{ input_per_1k_tokens = 1 }",
            "",
            "routes[0].pricing.reserve: set reserve",
        ),
        (
            "{ per_request = 1, tick_seconds = 5 }",
            "",
            "tick_seconds: only applies with per_minute",
        ),
        (
            r#"{ reserve = 1, models = { "a*b" = { input_per_1k_tokens = 1 } } }"#,
            "",
            "a model name is exact, or a prefix ending in one `*`",
        ),
        (
            "{ per_request = 1 }",
            "cap_max_tokens = true",
            "cap_max_tokens: needs pricing.output_per_1k_tokens",
        ),
        (
            "{ input_per_1k_tokens = -1, reserve = 1 }",
            "",
            "input_per_1k_tokens: must not be negative",
        ),
    ];
    for (pricing, extra, want) in bad {
        let out = env
            .config()
            .toml(config("http://127.0.0.1:9", pricing, extra, "10"))
            .run_subcommand("check-config", Duration::from_secs(30))
            .await;
        assert!(!out.success(), "{pricing} {extra} was accepted");
        assert!(out.stderr.contains(want), "{pricing}: {}", out.stderr);
    }
    let ok = env
        .config()
        .toml(config(
            "http://127.0.0.1:9",
            TOKENS,
            "cap_max_tokens = true",
            "10",
        ))
        .run_subcommand("check-config", Duration::from_secs(30))
        .await;
    assert!(ok.success(), "{}", ok.stderr);
    let _ = micros_of("1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_and_unreachable_upstreams_on_token_routes() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 1, reserve = 2 }";
    let app = env
        .config()
        .toml(config(&up.url(), pricing, "", "10"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    // A GET has no body to read: it is held and forwarded all the same, and, reporting no
    // usage, settled at the reserve.
    let a = crate::ledger_util::get(&app, &key, "/v1/echo?x=1").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(up.last_request().method, "GET");
    assert!(up.last_request().body.is_empty());
    wait_total(&app, &account, "8").await;

    // An upstream that cannot be reached before the body was read: nothing was held.
    let closed = crate::upstream::closed_addr();
    let app2 = env
        .config()
        .toml(config(&format!("http://{closed}"), pricing, "", "10"))
        .spawn()
        .await;
    let (account2, key2) = app2.account_with_key("basic").await;
    let a = post(&app2, &key2, "/v1/chat/completions", &chat(false)).await;
    a.assert_error(502, "upstream_unavailable");
    assert_eq!(a.body["refunded"], true, "{}", a.body);
    assert_eq!(total_micros(&app2, &account2).await, 10_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_priced_before_the_upstream_and_large_or_chunked_ones_as_they_arrive() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), TOKENS, "", "100"))
        .toml("[tiers.poor]\nmonthly_credits = 1\n")
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let q = "/v1/chat/completions?prompt_tokens=1000&completion_tokens=0";

    // A small body with a Content-Length: forwarded with its exact (rewritten) length.
    let a = post(&app, &key, q, &chat(true)).await;
    assert_eq!(a.status, 200);
    let r = up.last_request();
    let sent: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(r.body.len().to_string().as_str())
    );
    wait_total(&app, &account, "99.49").await;

    // A 200 KB body: priced when it has arrived, forwarded chunked, intact.
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(200_000)}]});
    let a = post(&app, &key, q, &big).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = up.last_request();
    assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap(), big);
    wait_total(&app, &account, "98.98").await;

    // A chunked body of unknown length: the same.
    let text = serde_json::to_vec(&chat(false)).unwrap();
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> = text
        .chunks(7)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let resp = app
        .client()
        .post(app.proxy_url(q))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.last_request().body.as_ref(), text.as_slice());
    wait_total(&app, &account, "98.47").await;

    // A refusal on a small body never reaches the upstream at all.
    let (_, poor_key) = app.account_with_key("poor").await;
    let before = up.request_count();
    let a = post(&app, &poor_key, q, &chat(false)).await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(
        up.request_count(),
        before,
        "a refused request reached the upstream"
    );
}
