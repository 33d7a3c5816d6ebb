//! The pricing recipes of `config/examples/` (README "Pricing recipes"): every example passes
//! `check-config`, and each one drives the real tollgate through what its product's write-up
//! promises. The example files are used as they are: the test removes only the deployment
//! sections (`[server]`, `[redis]`, `[postgres]`, `[admin]`, which the harness writes for the
//! test's own listeners, database and Redis prefix) and points `[stripe] api_base` at the fake
//! Stripe; the upstream comes from the `${…_URL}` variable the file names. Tiers, prices,
//! limits, routes and packs are the file's own (one test shortens a duration step, and says
//! so).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use toml_edit::DocumentMut;

use crate::fake_stripe::FakeStripe;
use crate::harness::{json_response, poll_until, run_tollgate, App, TestEnv};
use crate::journal_util::micros;
use crate::ledger_util::{balance, clear_of_the_hour_end, end_period, grant, wait_total, Answer};
use crate::stripe_util::{
    deliver_ok, event, id, now, pack_session, subscription, subscription_session, SECRET_KEY,
    WEBHOOK_SECRET,
};
use crate::upstream::FakeUpstream;
use crate::ws_client::{ws_url, WsClient};

/// Micro-credits in a credit (a token, in the token recipes).
const C: i64 = 1_000_000;
const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

/// Each example and the environment variable its upstream URL comes from.
const EXAMPLES: [(&str, &str); 5] = [
    ("devops-agent", "DEVOPS_AGENT_URL"),
    ("voice-assistant", "VOICE_ASSISTANT_URL"),
    ("token-packages", "VM_PLATFORM_URL"),
    ("degenz-lounge", "LOUNGE_APP_URL"),
    ("saas-tiers", "SAAS_APP_URL"),
];

fn example_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config/examples")
        .join(format!("{name}.toml"))
}

fn upstream_var(name: &str) -> &'static str {
    EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, var)| *var)
        .unwrap_or_else(|| panic!("no example {name}"))
}

/// The example as a config fragment for the harness: its deployment sections removed, Stripe
/// pointed at `stripe_url`, then `edit` (which must say why it changes anything).
fn runnable(name: &str, stripe_url: &str, edit: impl FnOnce(&mut DocumentMut)) -> String {
    let path = example_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut doc: DocumentMut = text
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
    for section in ["server", "redis", "postgres", "admin"] {
        assert!(doc.remove(section).is_some(), "{name}: no [{section}]");
    }
    doc["stripe"]["api_base"] = toml_edit::value(stripe_url);
    edit(&mut doc);
    doc.to_string()
}

/// One recipe running: its database and prefix, the fake upstream and Stripe, tollgate.
struct Recipe {
    env: TestEnv,
    up: FakeUpstream,
    stripe: FakeStripe,
    app: App,
}

async fn recipe(name: &str) -> Recipe {
    recipe_with(name, |_| {}, &[]).await
}

async fn recipe_with(
    name: &str,
    edit: impl FnOnce(&mut DocumentMut),
    redis_lines: &[&str],
) -> Recipe {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let stripe = FakeStripe::start().await;
    let mut config = env
        .config()
        .toml(runnable(name, &stripe.url(), edit))
        .env(upstream_var(name), up.url())
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET);
    for line in redis_lines {
        config = config.redis(*line);
    }
    let app = config.spawn().await;
    Recipe {
        env,
        up,
        stripe,
        app,
    }
}

// ---------------------------------------------------------------------------------------------
// Calls

/// `method path` through the proxy with `key`, with a JSON body when given.
async fn send(app: &App, key: &str, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut req = app
        .client()
        .request(method, app.proxy_url(path))
        .bearer_auth(key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("request {path}: {e}"));
    let (status, headers, body) = json_response(resp).await;
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(app: &App, key: &str, path: &str) -> Answer {
    send(app, key, Method::POST, path, Some(json!({"input": "e2e"}))).await
}

async fn get(app: &App, key: &str, path: &str) -> Answer {
    send(app, key, Method::GET, path, None).await
}

/// Asserts a 200 and the exact `X-Credits-Charged` / `X-Credits-Remaining`.
fn assert_charged(a: &Answer, charged: &str, remaining: &str) {
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.charged().as_deref(), Some(charged), "{:?}", a.headers);
    assert_eq!(a.remaining().as_deref(), Some(remaining), "{:?}", a.headers);
}

/// POSTs `bytes` bytes of body; the answer's status, headers, and its JSON body (tollgate's own
/// errors) or its length (the echo).
async fn upload(app: &App, key: &str, path: &str, bytes: usize) -> (StatusCode, HeaderMap, Value) {
    let resp = app
        .client()
        .post(app.proxy_url(path))
        .bearer_auth(key)
        .header("content-type", "application/octet-stream")
        .body(vec![b'u'; bytes])
        .send()
        .await
        .unwrap_or_else(|e| panic!("upload {path}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("upload answer");
    let value = if headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        json!(body.len())
    };
    (status, headers, value)
}

/// An OpenAI-style chat completion whose response reports these token counts.
async fn chat(app: &App, key: &str, prompt: u64, completion: u64) -> Answer {
    send(
        app,
        key,
        Method::POST,
        &format!("/v1/chat/completions?prompt_tokens={prompt}&completion_tokens={completion}"),
        Some(json!({"model": "assistant", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await
}

/// Opens a WebSocket session through tollgate and checks that it carries a first message (an
/// echo of `hello`).
async fn ws_session(app: &App, path: &str, key: &str) -> WsClient {
    let url = ws_url(app.proxy_addr(), path);
    let mut ws = WsClient::connect_bearer(&url, key).await;
    ws.send_text("hello").await;
    assert_eq!(
        ws.recv_text(WAIT).await,
        "hello",
        "{path}: the first message"
    );
    ws
}

/// Asserts 429 `quota_exceeded` for `quota` with `limit`, and a Retry-After.
fn assert_quota(a: &Answer, quota: &str, limit: u64) {
    a.assert_error(429, "quota_exceeded");
    assert_eq!(a.body["quota"], quota, "{}", a.body);
    assert_eq!(a.body["limit"], limit, "{}", a.body);
    assert!(a.header("retry-after").is_some(), "no Retry-After");
}

/// A new key for `account` (any status): `(status, body)`.
async fn new_key(app: &App, account: &str, name: &str) -> (StatusCode, Value) {
    app.admin_post(
        &format!("/v1/accounts/{account}/keys"),
        json!({ "name": name }),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// What the admin API shows

/// `(tier, monthly credits, monthly cents, yearly cents)` sorted by tier, and
/// `(pack, credits, bonus, cents)` in file order, from `GET /v1/catalog`.
type Catalog = (Vec<TierRow>, Vec<PackRow>);
type TierRow = (String, Value, Option<i64>, Option<i64>);
type PackRow = (String, i64, i64, i64);

async fn catalog(app: &App) -> Catalog {
    let (status, body) = app.admin_get("/v1/catalog").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tiers = body["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["monthly_credits"].clone(),
                t["prices"]["month"]["amount_cents"].as_i64(),
                t["prices"]["year"]["amount_cents"].as_i64(),
            )
        })
        .collect();
    let packs = body["credit_packs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                micros(&p["credits"]) / C,
                micros(&p["bonus_credits"]) / C,
                p["price_cents"].as_i64().unwrap(),
            )
        })
        .collect();
    (tiers, packs)
}

fn tier(id: &str, monthly: Value, month: Option<i64>, year: Option<i64>) -> TierRow {
    (id.to_string(), monthly, month, year)
}

fn pack(id: &str, credits: i64, bonus: i64, cents: i64) -> PackRow {
    (id.to_string(), credits, bonus, cents)
}

/// `(requests, credits µc, tokens in, tokens out)`.
type Totals = (i64, i64, i64, i64);

/// Usage totals per action.
type Usage = BTreeMap<String, Totals>;

fn usage_groups(body: &Value) -> Usage {
    body["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups in {body}"))
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_string(),
                (
                    g["requests"].as_i64().unwrap(),
                    micros(&g["credits"]),
                    g["tokens_in"].as_i64().unwrap(),
                    g["tokens_out"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn usage_by_action(app: &App, account: &str) -> Usage {
    let (status, body) = app
        .admin_get(&format!("/v1/accounts/{account}/usage?group_by=action"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    usage_groups(&body)
}

/// Polls the usage API until it shows `want` (the journal reaches Postgres just after the
/// responses, and metered requests settle after their response ends).
async fn wait_usage(app: &App, account: &str, want: &[(&str, Totals)]) {
    let want: Usage = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let ok = poll_until(WAIT, || async {
        usage_by_action(app, account).await == want
    })
    .await;
    assert!(
        ok,
        "usage of {account} by action:\n{:?}\nexpected:\n{want:?}",
        usage_by_action(app, account).await
    );
}

/// `(kind, reason)` of the account's journal entries, oldest first.
async fn journal_kinds(env: &TestEnv, account: &str) -> Vec<(String, String)> {
    let pg = env.pg().await;
    sqlx::query_as(
        "SELECT kind, COALESCE(reason, '') FROM ledger_entries
          WHERE account_id = $1 ORDER BY created_at, entry_id",
    )
    .bind(account)
    .fetch_all(&pg)
    .await
    .expect("reading the journal")
}

/// Buys `pack` the way a customer does: a Checkout Session from tollgate (the fake Stripe
/// records it), then Stripe's `checkout.session.completed` webhook, signed.
async fn buy_pack(r: &Recipe, account: &str, pack: &str, price_id: &str, cents: i64) {
    let before = r.stripe.calls("POST", "/v1/checkout/sessions").len();
    let (status, body) = r
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": account, "pack_id": pack}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sessions = r.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), before + 1);
    let s = sessions.last().unwrap();
    assert_eq!(s.field("mode"), Some("payment"));
    assert_eq!(s.field("line_items[0][price]"), Some(price_id));
    assert_eq!(s.field("line_items[1][price]"), None);
    let session_id = body["session_id"].as_str().unwrap();
    let mut paid = pack_session(account, pack, session_id, &id("pi"));
    paid["amount_total"] = json!(cents);
    paid["amount_subtotal"] = json!(cents);
    deliver_ok(
        &r.app,
        &event("checkout.session.completed", paid, now()),
        "applied",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Every example

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_every_example_passes_check_config() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = EXAMPLES.iter().map(|(n, _)| format!("{n}.toml")).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "every example has a test here");

    let expected = [
        (
            "devops-agent",
            "1 upstreams, 4 routes, 4 tiers, 4 credit packs",
        ),
        (
            "voice-assistant",
            "1 upstreams, 2 routes, 4 tiers, 0 credit packs",
        ),
        (
            "token-packages",
            "1 upstreams, 5 routes, 1 tiers, 3 credit packs",
        ),
        (
            "degenz-lounge",
            "1 upstreams, 9 routes, 4 tiers, 5 credit packs",
        ),
        (
            "saas-tiers",
            "1 upstreams, 8 routes, 3 tiers, 0 credit packs",
        ),
    ];
    for (name, summary) in expected {
        // Only the upstream URL is given: the secrets (database URL, admin token, Stripe keys)
        // are warnings for check-config, as they are on any machine but the server.
        let path = example_path(name);
        let out = run_tollgate(
            &[
                "check-config".to_string(),
                "--config".into(),
                path.display().to_string(),
            ],
            &[(
                upstream_var(name).to_string(),
                "http://127.0.0.1:7001".to_string(),
            )],
            Duration::from_secs(20),
        )
        .await;
        assert!(out.success(), "{name}:\n{out}");
        assert!(
            out.stdout.contains(&format!("ok ({summary})")),
            "{name}:\n{out}"
        );
        assert!(
            out.stderr.contains("STRIPE_SECRET_KEY is not set"),
            "{name}: the missing secrets are reported:\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. devops-agent.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_devops_agent_messages_tools_packs_and_the_period_reset() {
    let r = recipe("devops-agent").await;
    let app = &r.app;
    let (tiers, packs) = catalog(app).await;
    assert_eq!(
        tiers,
        vec![
            tier("business", json!(3000), Some(19900), None),
            tier("free", json!(20), Some(0), None),
            tier("professional", json!(1000), Some(7900), None),
            tier("starter", json!(200), Some(1900), None),
        ]
    );
    assert_eq!(
        packs,
        vec![
            pack("credits_100", 100, 0, 1000),
            pack("credits_250", 250, 0, 2000),
            pack("credits_500", 500, 0, 3500),
            pack("credits_1000", 1000, 0, 6000),
        ]
    );

    // A free account: 20 messages a month at 1 credit each...
    let (free, key) = app.account_with_key("free").await;
    for n in 1..=20 {
        let a = post(app, &key, "/v1/agent/messages").await;
        assert_charged(&a, "1", &(20 - n).to_string());
    }
    // ... and the 21st gets 402 with the standard body; it never reaches the agent.
    let a = post(app, &key, "/v1/agent/messages").await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(a.body["credits_remaining"], json!(0), "{}", a.body);
    assert_eq!(a.body["credits_required"], json!(1), "{}", a.body);
    assert_eq!(a.body["tier"], "free", "{}", a.body);
    assert!(
        a.body["top_up"].as_str().is_some_and(|t| !t.is_empty()),
        "{}",
        a.body
    );
    assert_eq!(r.up.request_count(), 20);

    // Heavy tools cost 5, other tools nothing, a message 1; a failed tool is refunded.
    let (starter, skey) = app.account_with_key("starter").await;
    assert_charged(&post(app, &skey, "/v1/agent/messages").await, "1", "199");
    assert_charged(
        &post(app, &skey, "/v1/tools/create_instance").await,
        "5",
        "194",
    );
    assert_charged(
        &post(app, &skey, "/v1/tools/create_database").await,
        "5",
        "189",
    );
    assert_charged(
        &post(app, &skey, "/v1/tools/list_instances").await,
        "0",
        "189",
    );
    assert_charged(&post(app, &skey, "/v1/tools/get_logs").await, "0", "189");
    let failed = post(app, &skey, "/v1/tools/create_instance/status/503").await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    assert_eq!(failed.charged().as_deref(), Some("0"));
    assert_charged(
        &post(app, &skey, "/v1/tools/create_instance").await,
        "5",
        "184",
    );
    wait_total(app, &starter, "184").await;

    // A heavy tool needs 5 credits: with 4 left it is refused, and a message still goes.
    let (low, lkey) = app.account_with_key("free").await;
    for _ in 0..16 {
        assert_eq!(post(app, &lkey, "/v1/agent/messages").await.status, 200);
    }
    let a = post(app, &lkey, "/v1/tools/create_database").await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(a.body["credits_remaining"], json!(4), "{}", a.body);
    assert_eq!(a.body["credits_required"], json!(5), "{}", a.body);
    assert_charged(&post(app, &lkey, "/v1/agent/messages").await, "1", "3");
    assert_eq!(balance(app, &low).await.2, "3");

    // Usage stats break the spending down per tool (a refunded call counts as a request, its
    // credits are returned).
    wait_usage(
        app,
        &starter,
        &[
            ("agent_message", (1, C, 0, 0)),
            ("create_database", (1, 5 * C, 0, 0)),
            ("create_instance", (3, 10 * C, 0, 0)),
            ("tool_call", (2, 0, 0, 0)),
        ],
    )
    .await;
    // The customer sees the same with their own key.
    let own = get(app, &skey, "/_tollgate/v1/usage?group_by=action").await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert_eq!(
        usage_groups(&own.body),
        usage_by_action(app, &starter).await
    );

    // The exhausted free account buys 100 credits (Checkout + webhook) and spends 3 of them.
    buy_pack(&r, &free, "credits_100", "price_devops_pack_100", 1000).await;
    let b = balance(app, &free).await;
    assert_eq!((b.0.as_str(), b.1.as_str()), ("0", "100"));
    for left in ["99", "98", "97"] {
        assert_charged(&post(app, &key, "/v1/agent/messages").await, "1", left);
    }

    // The billing period ends: the allowance is back to the tier's 20 (no roll-over), the pack's
    // credits are still there, and the allowance is spent first again.
    end_period(&r.env, &free, 60).await;
    assert_charged(&post(app, &key, "/v1/agent/messages").await, "1", "116");
    let b = balance(app, &free).await;
    assert_eq!(
        (b.0.as_str(), b.1.as_str(), b.2.as_str()),
        ("19", "97", "116")
    );
    assert!(
        poll_until(WAIT, || async {
            journal_kinds(&r.env, &free)
                .await
                .iter()
                .any(|(kind, _)| kind == "reset")
        })
        .await,
        "no reset entry in the journal"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. voice-assistant.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_voice_assistant_tokens_from_responses_and_monthly_quotas() {
    let r = recipe("voice-assistant").await;
    let app = &r.app;
    let (tiers, packs) = catalog(app).await;
    assert_eq!(
        tiers,
        vec![
            tier("basic", json!("unlimited"), Some(2999), Some(29999)),
            tier("enterprise", json!("unlimited"), Some(49999), Some(499999)),
            tier("free", json!("unlimited"), None, None),
            tier("premium", json!("unlimited"), Some(9999), Some(99999)),
        ]
    );
    assert!(packs.is_empty());

    // Free: 10,000 tokens a month, counted from what the responses report.
    let (free, key) = app.account_with_key("free").await;
    let a = chat(app, &key, 1000, 5000).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.remaining(), None, "no credit balance on these plans");
    assert_eq!(a.body["usage"]["total_tokens"], 6000, "{}", a.body);
    wait_usage(app, &free, &[("assistant", (1, 6 * C, 1000, 5000))]).await;
    assert_eq!(chat(app, &key, 1500, 2499).await.status, StatusCode::OK);
    wait_usage(
        app,
        &free,
        &[("assistant", (2, 9999 * C / 1000, 2500, 7499))],
    )
    .await;
    // 9,999 used: still under the quota, so one more is admitted; it brings the month to 10,000.
    assert_eq!(chat(app, &key, 0, 1).await.status, StatusCode::OK);
    wait_usage(app, &free, &[("assistant", (3, 10 * C, 2500, 7500))]).await;
    let a = chat(app, &key, 1, 1).await;
    assert_quota(&a, "tokens_per_month", 10_000);
    // (A token-priced route reads the body before it can admit the request, so the refused
    // request's headers may reach the upstream, but never its body.)
    let complete =
        r.up.requests()
            .iter()
            .filter(|q| serde_json::from_slice::<Value>(&q.body).is_ok())
            .count();
    assert_eq!(complete, 3, "the refused request reached the upstream");

    // Premium: 5,000,000 tokens; enterprise: no token quota at all.
    let (premium, pkey) = app.account_with_key("premium").await;
    assert_eq!(
        chat(app, &pkey, 2_500_000, 2_500_000).await.status,
        StatusCode::OK
    );
    wait_usage(
        app,
        &premium,
        &[("assistant", (1, 5000 * C, 2_500_000, 2_500_000))],
    )
    .await;
    assert_quota(&chat(app, &pkey, 1, 1).await, "tokens_per_month", 5_000_000);

    let (enterprise, ekey) = app.account_with_key("enterprise").await;
    assert_eq!(
        chat(app, &ekey, 3_000_000, 3_000_000).await.status,
        StatusCode::OK
    );
    wait_usage(
        app,
        &enterprise,
        &[("assistant", (1, 6000 * C, 3_000_000, 3_000_000))],
    )
    .await;
    // More than premium's tokens and more than free's 100 requests: all served.
    for _ in 0..101 {
        let a = chat(app, &ekey, 10, 20).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.remaining(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_voice_assistant_sessions_by_the_minute_and_requests_per_month() {
    let r = recipe("voice-assistant").await;
    let app = &r.app;
    let (account, key) = app.account_with_key("free").await;

    // A voice session over WebSocket: one request, metered by the started minute.
    let mut ws = ws_session(app, "/v1/voice/ws", &key).await;
    ws.send_binary(&[1, 2, 3]).await;
    assert_eq!(ws.recv_binary(WAIT).await, vec![1, 2, 3]);
    ws.close(1000, "bye").await;
    ws.wait_close(WAIT).await;
    wait_usage(app, &account, &[("voice_session", (1, C, 0, 0))]).await;
    let settled: Vec<_> = journal_kinds(&r.env, &account)
        .await
        .into_iter()
        .filter(|(kind, _)| kind == "settle")
        .collect();
    assert_eq!(
        settled,
        vec![("settle".to_string(), "measured".to_string())],
        "one minute, as measured"
    );

    // 100 requests a month: the session was the first, text turns make 100 ...
    for _ in 1..100 {
        let a = chat(app, &key, 1, 1).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    // ... and the 101st is refused, text or voice.
    assert_quota(&chat(app, &key, 1, 1).await, "requests_per_month", 100);
    let (status, body) = WsClient::expect_rejected(
        &ws_url(app.proxy_addr(), "/v1/voice/ws"),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    // (The WebSocket client does not read a refused handshake's body: the same call over plain
    // HTTP shows it.)
    assert_quota(
        &get(app, &key, "/v1/voice/ws").await,
        "requests_per_month",
        100,
    );

    // A new billing period: the requests are back.
    end_period(&r.env, &account, 60).await;
    assert_eq!(chat(app, &key, 1, 1).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// 3. token-packages.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_token_packages_rates_per_action_and_a_package_purchase() {
    let r = recipe("token-packages").await;
    let app = &r.app;
    let (tiers, packs) = catalog(app).await;
    assert_eq!(tiers, vec![tier("pay_as_you_go", json!(0), None, None)]);
    assert_eq!(
        packs,
        vec![
            pack("starter", 2000, 0, 1900),
            pack("growth", 6000, 500, 4900),
            pack("pro", 15000, 1500, 9900),
        ]
    );

    // No subscription: nothing works before a package is bought.
    let (account, key) = app.account_with_key("pay_as_you_go").await;
    let a = post(app, &key, "/v1/screenshots").await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(a.body["credits_required"], json!(0.5), "{}", a.body);

    // Growth: 6,000 tokens + 500 bonus.
    buy_pack(&r, &account, "growth", "price_tokens_growth", 4900).await;
    let b = balance(app, &account).await;
    assert_eq!((b.0.as_str(), b.1.as_str()), ("0", "6500"));

    // The rates, exact.
    assert_charged(
        &post(app, &key, "/v1/chat/completions").await,
        "0.2",
        "6499.8",
    );
    assert_charged(&post(app, &key, "/v1/screenshots").await, "0.5", "6499.3");
    assert_charged(&get(app, &key, "/v1/projects").await, "0.1", "6499.2");
    assert_charged(&post(app, &key, "/v1/vms/list").await, "0.1", "6499.1");
    let (status, headers, body) = upload(app, &key, "/v1/files", 3 * MIB / 2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!(3 * MIB / 2), "the upload reached the platform");
    assert_eq!(headers["x-credits-charged"], "1.5");
    let (status, headers, _) = upload(app, &key, "/v1/files", 3 * MIB).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-credits-charged"], "3");
    wait_total(app, &account, "6494.6").await;

    // VM runtime: the first minute is held when the VM session opens; a session shorter than
    // a minute costs exactly 1 token.
    let mut vm = ws_session(app, "/v1/vm-sessions/vm-1/ws", &key).await;
    assert_eq!(
        vm.response_headers
            .get("x-credits-charged")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("1".to_string())
    );
    vm.send_text("uptime").await;
    assert_eq!(vm.recv_text(WAIT).await, "uptime");
    vm.close(1000, "shutdown").await;
    vm.wait_close(WAIT).await;
    let left = 6_494_600_000 - C;
    let ok = poll_until(WAIT, || async {
        balance_micros(app, &account).await == left
    })
    .await;
    assert!(
        ok,
        "balance {} µc, expected {left}",
        balance_micros(app, &account).await
    );

    wait_usage(
        app,
        &account,
        &[
            ("ai_message", (1, C / 5, 0, 0)),
            ("api_call", (2, C / 5, 0, 0)),
            ("file_upload", (2, 4 * C + C / 2, 0, 0)),
            ("screenshot", (1, C / 2, 0, 0)),
            ("vm_runtime", (1, C, 0, 0)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_token_packages_warn_under_500_tokens() {
    let r = recipe("token-packages").await;
    let app = &r.app;
    let (account, key) = app.account_with_key("pay_as_you_go").await;
    let (status, body) = grant(app, &account, json!("500.6"), "welcome").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let a = post(app, &key, "/v1/screenshots").await;
    assert_charged(&a, "0.5", "500.1");
    assert_eq!(a.header("x-credits-low"), None);
    let a = get(app, &key, "/v1/status-page").await;
    assert_charged(&a, "0.1", "500");
    assert_eq!(a.header("x-credits-low"), None, "500 is not under 500");
    let a = get(app, &key, "/v1/status-page").await;
    assert_charged(&a, "0.1", "499.9");
    assert_eq!(a.header("x-credits-low").as_deref(), Some("true"));
    // It stays on while the balance is low, on every priced route.
    let a = post(app, &key, "/v1/chat/completions").await;
    assert_charged(&a, "0.2", "499.7");
    assert_eq!(a.header("x-credits-low").as_deref(), Some("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_token_packages_vm_runtime_is_billed_per_started_step() {
    // The example's price (per_minute = 1) with the step shortened from 60 s to 1 s, so the test
    // does not wait minutes: each started second costs 1/60 token, rounded up to 0.016667.
    let r = recipe_with(
        "token-packages",
        |doc| {
            let routes = doc["routes"].as_array_of_tables_mut().unwrap();
            let vm = routes
                .iter_mut()
                .find(|t| t["name"].as_str() == Some("vm_runtime"))
                .unwrap();
            assert_eq!(vm["pricing"]["per_minute"].as_integer(), Some(1));
            assert_eq!(vm["pricing"]["tick_seconds"].as_integer(), Some(60));
            vm["pricing"]["tick_seconds"] = toml_edit::value(1);
        },
        &[],
    )
    .await;
    let app = &r.app;
    let (account, key) = app.account_with_key("pay_as_you_go").await;
    let (status, body) = grant(app, &account, json!(10), "vm").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let mut vm = ws_session(app, "/v1/vm-sessions/vm-2/ws", &key).await;
    let step = 16_667;
    let start = 10 * C - step;
    let ok = poll_until(WAIT, || async {
        balance_micros(app, &account).await == start
    })
    .await;
    assert!(
        ok,
        "balance {} µc after the first step",
        balance_micros(app, &account).await
    );
    // Debited while the VM runs, step by step, not only at the end.
    let mut seen = vec![start];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        vm.send_text("ping").await;
        assert_eq!(vm.recv_text(WAIT).await, "ping");
        let now = balance_micros(app, &account).await;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    vm.close(1000, "shutdown").await;
    vm.wait_close(WAIT).await;
    assert!(seen.len() >= 3, "not debited per started second: {seen:?}");
    for pair in seen.windows(2) {
        assert_eq!(pair[0] - pair[1], step, "{seen:?}");
    }
    // About 2.5 s (more on a slow machine): exactly the started seconds of the duration the
    // journal recorded, nothing else.
    let settled = poll_until(WAIT, || async {
        journal_kinds(&r.env, &account)
            .await
            .iter()
            .filter(|(kind, _)| kind == "settle")
            .count()
            == 1
    })
    .await;
    assert!(settled, "the session was not settled");
    let pg = r.env.pg().await;
    let duration_ms: Option<i32> = sqlx::query_scalar(
        "SELECT duration_ms FROM ledger_entries WHERE account_id = $1 AND kind = 'settle'",
    )
    .bind(&account)
    .fetch_one(&pg)
    .await
    .expect("reading the settle entry");
    let duration_ms = i64::from(duration_ms.expect("the settle records its duration"));
    assert!(
        duration_ms >= 2500,
        "a 2.5 s session lasted {duration_ms} ms"
    );
    let spent = start - balance_micros(app, &account).await + step;
    assert_eq!(
        spent,
        (duration_ms + 999) / 1000 * step,
        "spent {spent} µc for a session of {duration_ms} ms: {:?}",
        journal_kinds(&r.env, &account).await
    );
}

async fn balance_micros(app: &App, account: &str) -> i64 {
    crate::journal_util::balance(app, account).await.2
}

// ---------------------------------------------------------------------------------------------
// 4. degenz-lounge.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_degenz_lounge_agent_limits_and_feature_gates() {
    let r = recipe("degenz-lounge").await;
    let app = &r.app;
    let (tiers, packs) = catalog(app).await;
    assert_eq!(
        tiers,
        vec![
            tier("enterprise", json!("unlimited"), None, None),
            tier("free", json!(0), None, None),
            tier("pro", json!(0), Some(1499), Some(14999)),
            tier("team", json!(0), Some(3999), Some(39999)),
        ]
    );
    assert_eq!(
        packs,
        vec![
            pack("tokens_100", 100, 0, 99),
            pack("tokens_500", 500, 0, 449),
            pack("tokens_1000", 1000, 0, 849),
            pack("tokens_5000", 5000, 0, 3999),
            pack("tokens_10000", 10000, 0, 6999),
        ]
    );

    // Free: up to 3 agents; the 4th names the tier to upgrade to and never reaches the app.
    let (free, key) = app.account_with_key("free").await;
    assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    // A creation the app refuses takes no slot.
    assert_eq!(post(app, &key, "/v1/agents/status/422").await.status, 422);
    assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    let before = r.up.request_count();
    let a = post(app, &key, "/v1/agents").await;
    a.assert_error(403, "limit_reached");
    assert_eq!(a.body["resource"], "agents", "{}", a.body);
    assert_eq!(a.body["limit"], 3, "{}", a.body);
    assert_eq!(a.body["tier"], "free", "{}", a.body);
    assert_eq!(r.up.request_count(), before);
    // Deleting an agent frees a slot.
    let d = send(app, &key, Method::DELETE, "/v1/agents/agent-1", None).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    post(app, &key, "/v1/agents")
        .await
        .assert_error(403, "limit_reached");

    // Features: premium templates, export and advanced tools are pro's; the workspace is team's.
    for (path, feature) in [
        ("/v1/templates/premium/cyberpunk", "premium_templates"),
        ("/v1/export/agent-1", "export"),
        ("/v1/tools/advanced/browser", "advanced_tools"),
    ] {
        let a = get(app, &key, path).await;
        a.assert_error(403, "feature_not_in_tier");
        assert_eq!(a.body["feature"], feature, "{}", a.body);
        assert_eq!(a.body["tier"], "free", "{}", a.body);
    }
    // The rest of the API is open to every tier.
    assert_eq!(get(app, &key, "/v1/templates").await.status, 200);
    assert_eq!(get(app, &key, "/v1/agents").await.status, 200);

    // Upgraded to pro: the same agents, now 10 of them; the features open, the workspace not.
    let (status, body) = app
        .admin_put(&format!("/v1/accounts/{free}/tier"), json!({"tier": "pro"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for n in 4..=10 {
        assert_eq!(post(app, &key, "/v1/agents").await.status, 200, "agent {n}");
    }
    let a = post(app, &key, "/v1/agents").await;
    a.assert_error(403, "limit_reached");
    assert_eq!(a.body["limit"], 10, "{}", a.body);
    assert_eq!(get(app, &key, "/v1/export/agent-1").await.status, 200);
    assert_eq!(
        get(app, &key, "/v1/templates/premium/cyberpunk")
            .await
            .status,
        200
    );
    let a = get(app, &key, "/v1/workspace").await;
    a.assert_error(403, "feature_not_in_tier");

    // Enterprise: no agent limit, every feature.
    let (_, ekey) = app.account_with_key("enterprise").await;
    for n in 1..=30 {
        assert_eq!(
            post(app, &ekey, "/v1/agents").await.status,
            200,
            "agent {n}"
        );
    }
    assert_eq!(get(app, &ekey, "/v1/workspace").await.status, 200);
}

/// The 403s name the tier to upgrade to: the cheapest with room for one more agent, or with the
/// feature. Enterprise is unlimited and has every feature but no list price ("contact sales"):
/// it is never the answer while a priced tier qualifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_degenz_lounge_refusals_name_the_next_tier_up() {
    let r = recipe("degenz-lounge").await;
    let app = &r.app;
    let (free, key) = app.account_with_key("free").await;
    for _ in 0..3 {
        assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    }
    let a = post(app, &key, "/v1/agents").await;
    a.assert_error(403, "limit_reached");
    let mut hints = vec![("4th agent on free", a.body["required_tier"].clone())];
    for path in [
        "/v1/templates/premium/cyberpunk",
        "/v1/export/agent-1",
        "/v1/tools/advanced/browser",
    ] {
        let a = get(app, &key, path).await;
        a.assert_error(403, "feature_not_in_tier");
        hints.push((path, a.body["required_tier"].clone()));
    }
    let (status, body) = app
        .admin_put(&format!("/v1/accounts/{free}/tier"), json!({"tier": "pro"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..7 {
        assert_eq!(post(app, &key, "/v1/agents").await.status, 200);
    }
    let a = post(app, &key, "/v1/agents").await;
    a.assert_error(403, "limit_reached");
    hints.push(("11th agent on pro", a.body["required_tier"].clone()));
    let a = get(app, &key, "/v1/workspace").await;
    a.assert_error(403, "feature_not_in_tier");
    hints.push(("/v1/workspace on pro", a.body["required_tier"].clone()));
    assert_eq!(
        hints,
        vec![
            ("4th agent on free", json!("pro")),
            ("/v1/templates/premium/cyberpunk", json!("pro")),
            ("/v1/export/agent-1", json!("pro")),
            ("/v1/tools/advanced/browser", json!("pro")),
            ("11th agent on pro", json!("team")),
            ("/v1/workspace on pro", json!("team")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_degenz_lounge_one_sandbox_session_at_a_time_on_free() {
    // Concurrency leases expire after lease_ttl_seconds unless renewed: a short TTL here shows
    // the limit holds for sessions that outlive it (a deployment keeps its 300 s default).
    let r = recipe_with("degenz-lounge", |_| {}, &["lease_ttl_seconds = 2"]).await;
    let app = &r.app;
    let url = ws_url(app.proxy_addr(), "/v1/sandbox/ws");
    let (_, key) = app.account_with_key("free").await;
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];

    let mut first = ws_session(app, "/v1/sandbox/ws", &key).await;
    first.send_text("ls").await;
    assert_eq!(first.recv_text(WAIT).await, "ls");
    let (status, body) = WsClient::expect_rejected(&url, &headers).await;
    assert_eq!(status, 429, "{body}");
    // The same refusal over plain HTTP, with its body (the WebSocket client does not read a
    // refused handshake's body).
    let a = get(app, &key, "/v1/sandbox/ws").await;
    a.assert_error(429, "rate_limited");
    assert_eq!(a.body["limit"], 1, "{}", a.body);
    // Other calls are not sessions: they go on.
    assert_eq!(post(app, &key, "/v1/agents").await.status, 200);

    // Still one at a time after the lease TTL has passed twice over.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    first.send_text("pwd").await;
    assert_eq!(first.recv_text(WAIT).await, "pwd");
    let (status, body) = WsClient::expect_rejected(&url, &headers).await;
    assert_eq!(
        status, 429,
        "a second session opened while the first ran: {body}"
    );

    // Closing the session frees the slot.
    first.close(1000, "done").await;
    first.wait_close(WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    let _next = loop {
        match WsClient::try_connect(&url, &headers).await {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the slot was not freed when the session closed: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Pro: 5 at once.
    let (_, pkey) = app.account_with_key("pro").await;
    let pauth = format!("Bearer {pkey}");
    let pheaders = [("authorization", pauth.as_str())];
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(ws_session(app, "/v1/sandbox/ws", &pkey).await);
    }
    let (status, _) = WsClient::expect_rejected(&url, &pheaders).await;
    assert_eq!(status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_degenz_lounge_team_seats_share_one_balance() {
    let r = recipe("degenz-lounge").await;
    let app = &r.app;
    let team = format!("team_{}", crate::harness::random_id(8));
    app.create_account(&team, "team").await;
    let mut members = Vec::new();
    for n in 1..=5 {
        let (status, body) = new_key(app, &team, &format!("member {n}")).await;
        assert_eq!(status, StatusCode::CREATED, "seat {n}: {body}");
        members.push((
            body["id"].as_str().unwrap().to_string(),
            body["key"].as_str().unwrap().to_string(),
        ));
    }
    let (status, body) = new_key(app, &team, "member 6").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "seat_limit_reached", "{body}");

    // No tokens yet: messages need a pack. A 500-token pack, then every member spends from it.
    let a = post(app, &members[0].1, "/v1/chat/completions").await;
    a.assert_error(402, "insufficient_credits");
    buy_pack(&r, &team, "tokens_500", "price_lounge_tokens_500", 449).await;
    for (n, (_, key)) in members.iter().enumerate() {
        let a = post(app, key, "/v1/chat/completions").await;
        assert_charged(&a, "1", &(499 - n).to_string());
    }
    assert_eq!(balance(app, &team).await.2, "495");

    // A member leaves: the seat is free for someone else; the old key is dead.
    app.revoke_key(&members[4].0).await;
    let (status, body) = new_key(app, &team, "member 6").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let newcomer = body["key"].as_str().unwrap().to_string();
    assert_charged(
        &post(app, &newcomer, "/v1/chat/completions").await,
        "1",
        "494",
    );
    // Until the revocation is seen (within 2 s), the old key may still pass, and pays: count
    // those calls, so the balance says whether a refused call cost anything.
    let passed = std::sync::atomic::AtomicI64::new(0);
    assert!(
        poll_until(WAIT, || async {
            let a = post(app, &members[4].1, "/v1/chat/completions").await;
            if a.status == StatusCode::OK {
                passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return false;
            }
            a.status == StatusCode::UNAUTHORIZED
        })
        .await,
        "a revoked member key still works"
    );
    let passed = passed.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        balance(app, &team).await.2,
        (494 - passed).to_string(),
        "{passed} calls of the revoked key passed"
    );
    let a = get(app, &newcomer, "/v1/workspace").await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "team has the workspace: {}",
        a.body
    );

    // Enterprise: no seat cap, no token balance.
    let (ent, ekey) = app.account_with_key("enterprise").await;
    for n in 2..=8 {
        let (status, body) = new_key(app, &ent, &format!("member {n}")).await;
        assert_eq!(status, StatusCode::CREATED, "seat {n}: {body}");
    }
    let a = post(app, &ekey, "/v1/chat/completions").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.remaining(), None);
}

// ---------------------------------------------------------------------------------------------
// 5. saas-tiers.toml

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_saas_tiers_operation_quotas_hourly_calls_sizes_and_features() {
    clear_of_the_hour_end(40).await;
    let r = recipe("saas-tiers").await;
    let app = &r.app;
    let (tiers, packs) = catalog(app).await;
    assert_eq!(
        tiers,
        vec![
            tier("enterprise", json!("unlimited"), Some(19900), Some(199000)),
            tier("free", json!("unlimited"), Some(0), None),
            tier("professional", json!("unlimited"), Some(4900), Some(49000)),
        ]
    );
    assert!(packs.is_empty());

    // Free: 5 AI operations and 2 data processing jobs a month.
    let (ops, key) = app.account_with_key("free").await;
    for _ in 0..5 {
        assert_eq!(post(app, &key, "/v1/ai/summarize").await.status, 200);
    }
    assert_quota(
        &post(app, &key, "/v1/ai/summarize").await,
        "action_per_month:ai_operation",
        5,
    );
    for _ in 0..2 {
        assert_eq!(post(app, &key, "/v1/jobs/import").await.status, 200);
    }
    assert_quota(
        &post(app, &key, "/v1/jobs/import").await,
        "action_per_month:data_processing",
        2,
    );
    // Next month they are back.
    end_period(&r.env, &ops, 60).await;
    assert_eq!(post(app, &key, "/v1/ai/summarize").await.status, 200);
    assert_eq!(post(app, &key, "/v1/jobs/import").await.status, 200);

    // 10 API calls an hour.
    let (_, key) = app.account_with_key("free").await;
    for _ in 0..10 {
        assert_eq!(get(app, &key, "/v1/projects").await.status, 200);
    }
    assert_quota(
        &get(app, &key, "/v1/projects").await,
        "requests_per_hour",
        10,
    );

    // 50 MB projects: a 51 MB upload is refused before it reaches the app.
    let (_, key) = app.account_with_key("free").await;
    let before = r.up.request_count();
    let (status, _, body) = upload(app, &key, "/v1/projects/upload", 51 * MIB).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "payload_too_large", "{body}");
    assert_eq!(body["limit_mb"], 50, "{body}");
    assert_eq!(r.up.request_count(), before);
    let (status, _, body) = upload(app, &key, "/v1/projects/upload", 2 * MIB).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!(2 * MIB));

    // Features: analytics and webhooks are professional's, SSO and audit logs enterprise's.
    for path in ["/v1/analytics/funnels", "/v1/webhooks"] {
        let a = get(app, &key, path).await;
        a.assert_error(403, "feature_not_in_tier");
        assert_eq!(a.body["required_tier"], "professional", "{}", a.body);
    }

    // Professional: 500 MB, 100 operations, the professional features, not enterprise's.
    let (_, pkey) = app.account_with_key("professional").await;
    let (status, _, body) = upload(app, &pkey, "/v1/projects/upload", 51 * MIB).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!(51 * MIB));
    for _ in 0..6 {
        assert_eq!(post(app, &pkey, "/v1/ai/summarize").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(post(app, &pkey, "/v1/jobs/import").await.status, 200);
    }
    assert_eq!(get(app, &pkey, "/v1/analytics/funnels").await.status, 200);
    for path in ["/v1/sso/config", "/v1/audit-logs"] {
        let a = get(app, &pkey, path).await;
        a.assert_error(403, "feature_not_in_tier");
        assert_eq!(a.body["tier"], "professional", "{}", a.body);
        assert_eq!(a.body["required_tier"], "enterprise", "{}", a.body);
    }

    // Enterprise: operations unlimited, and more than free's calls an hour.
    let (_, ekey) = app.account_with_key("enterprise").await;
    for _ in 0..8 {
        assert_eq!(post(app, &ekey, "/v1/ai/summarize").await.status, 200);
    }
    for _ in 0..4 {
        assert_eq!(post(app, &ekey, "/v1/jobs/import").await.status, 200);
    }
    assert_eq!(get(app, &ekey, "/v1/audit-logs").await.status, 200);
    assert_eq!(get(app, &ekey, "/v1/sso/config").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipes_saas_tiers_enterprise_setup_fee_is_charged_once() {
    let r = recipe("saas-tiers").await;
    let app = &r.app;
    let account = format!("acct_{}", crate::harness::random_id(10));
    app.create_account(&account, "free").await;

    // The first subscription checkout: the plan's price and the one-time setup price.
    let (status, body) = app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": account, "tier": "enterprise", "interval": "month"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["setup_fee_cents"], json!(50000), "{body}");
    let sessions = r.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.field("mode"), Some("subscription"));
    assert_eq!(
        s.field("line_items[0][price]"),
        Some("price_saas_enterprise_monthly")
    );
    assert_eq!(
        s.field("line_items[1][price]"),
        Some("price_saas_enterprise_setup")
    );
    assert_eq!(s.field("line_items[1][quantity]"), Some("1"));
    assert_eq!(s.field("line_items[2][price]"), None);

    // Paid: the account is enterprise.
    let sub = id("sub");
    let t0 = now();
    deliver_ok(
        app,
        &event(
            "checkout.session.completed",
            subscription_session(&account, "enterprise", "month", &sub),
            t0,
        ),
        "applied",
    )
    .await;
    let (status, body) = app.admin_get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["tier"], "enterprise", "{body}");

    // The subscription ends; the customer comes back later: no second setup fee.
    deliver_ok(
        app,
        &event(
            "customer.subscription.deleted",
            subscription(
                &account,
                &sub,
                "price_saas_enterprise_monthly",
                "month",
                "canceled",
                false,
            ),
            t0 + 10,
        ),
        "applied",
    )
    .await;
    let (_, body) = app.admin_get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(body["tier"], "free", "{body}");
    let (status, body) = app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": account, "tier": "enterprise", "interval": "year"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["setup_fee_cents"].is_null(), "{body}");
    let sessions = r.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 2);
    assert_eq!(
        sessions[1].field("line_items[0][price]"),
        Some("price_saas_enterprise_yearly")
    );
    assert_eq!(sessions[1].field("line_items[1][price]"), None);

    // Professional has no setup fee, first subscription or not.
    let other = format!("acct_{}", crate::harness::random_id(10));
    app.create_account(&other, "free").await;
    let (status, body) = app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": other, "tier": "professional"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["setup_fee_cents"].is_null(), "{body}");
    let sessions = r.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(
        sessions[2].field("line_items[0][price]"),
        Some("price_saas_professional_monthly")
    );
    assert_eq!(sessions[2].field("line_items[1][price]"), None);
}
