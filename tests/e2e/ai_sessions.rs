//! AI pricing with real clients and long sessions: the official OpenAI Python client through
//! tollgate (JSON, streaming, a stream cut for lack of credits), Anthropic-style streams,
//! upstream cuts settled by the no-usage rule, and per-minute metering of WebSocket sessions
//! and long SSE streams, ended cleanly when the balance runs out.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{poll_until, App, TestEnv};
use crate::journal_util::{assert_balance_is_journal_sum, assert_caught_up, balance};
use crate::ledger_util::wait_total;
use crate::upstream::{run_openai_client, FakeUpstream};
use crate::ws_client::{ws_url, WsClient};

fn config(upstream: &str, path: &str, pricing: &str, monthly: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "ai"
url = "{upstream}"

[[routes]]
name = "ai"
path_prefix = "{path}"
upstream = "ai"
pricing = {pricing}

[tiers.basic]
monthly_credits = {monthly}
"#
    )
}

/// Waits for the account's settle entry and returns it.
async fn wait_settle(pg: &sqlx::PgPool, account: &str) -> (String, i64, String) {
    assert!(
        poll_until(Duration::from_secs(10), || async {
            entries(pg, account).await.iter().any(|e| e.0 == "settle")
        })
        .await,
        "no settle entry: {:?}",
        entries(pg, account).await
    );
    entries(pg, account)
        .await
        .into_iter()
        .find(|e| e.0 == "settle")
        .unwrap()
}

async fn total(app: &App, account: &str) -> i64 {
    balance(app, account).await.2
}

/// `duration_ms` of the account's (first) settle entry: the duration its started steps are
/// billed for.
async fn settle_duration_ms(pg: &sqlx::PgPool, account: &str) -> i64 {
    let d: Option<i32> = sqlx::query_scalar(
        "SELECT duration_ms FROM ledger_entries
          WHERE account_id = $1 AND kind = 'settle' ORDER BY created_at, entry_id LIMIT 1",
    )
    .bind(account)
    .fetch_one(pg)
    .await
    .expect("reading the settle entry");
    i64::from(d.expect("a settle entry records its duration"))
}

/// `(kind, amount µc, reason)` of every journal entry of the account, oldest first.
async fn entries(pg: &sqlx::PgPool, account: &str) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT kind, amount, COALESCE(reason, '') FROM ledger_entries
          WHERE account_id = $1 AND kind <> 'reset' ORDER BY created_at, entry_id",
    )
    .bind(account)
    .fetch_all(pg)
    .await
    .expect("reading the journal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_through_tollgate() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ per_request = 0.01, input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5, reserve = 1 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/chat/completions", pricing, "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let base = app.proxy_url("/v1");
    let got = run_openai_client(&[&base, &key]).await;
    assert_eq!(
        got["nonstream"]["content"], "Hello from the fake upstream.",
        "{got}"
    );
    assert_eq!(got["nonstream"]["usage"]["total_tokens"], 30, "{got}");
    assert_eq!(got["stream"]["content"], "tok0 tok1 tok2 ", "{got}");
    assert_eq!(got["stream"]["usage"]["completion_tokens"], 20, "{got}");
    // The tollgate key never reached the upstream.
    for r in up.requests() {
        assert!(
            !r.any_header_contains(&key),
            "the tollgate key leaked upstream"
        );
    }
    // Two calls of 10 in / 20 out: 2 × (0.01 + 0.005 + 0.03) = 0.09
    wait_total(&app, &account, "99.91").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_sees_a_typed_error_when_a_stream_is_cut() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 0.1 credit per output token: the script's first two calls (20 tokens each) cost 2 each,
    // and the 4 left pay for about 40 events of its third, 200-event stream.
    let pricing = "{ output_per_1k_tokens = 100, reserve = 1 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/chat/completions", pricing, "8"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let base = app.proxy_url("/v1");
    let got = run_openai_client(&[
        &base,
        &key,
        "--expect-cut",
        "--cut-query",
        "n=200",
        "--cut-query",
        "delay_ms=5",
    ])
    .await;
    let cut = &got["cut"];
    assert_eq!(cut["raised"], true, "{got}");
    assert_eq!(cut["is_api_error"], true, "{got}");
    assert!(
        cut["message"]
            .as_str()
            .is_some_and(|m| m.contains("credits ran out")),
        "{got}"
    );
    // The stream was settled at what it held: everything the balance had, never more.
    let pg = env.pg().await;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            entries(&pg, &account)
                .await
                .iter()
                .any(|e| e.0 == "settle" && e.2 == "insufficient_credits")
        })
        .await,
        "{:?}",
        entries(&pg, &account).await
    );
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_eq!(
        total(&app, &account).await,
        0,
        "the cut stream did not take exactly what the balance had: {:?}",
        entries(&pg, &account).await
    );
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_streams_are_settled_from_their_message_events() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ input_per_1k_tokens = 3, output_per_1k_tokens = 15, reserve = 5, include_usage = false }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/messages", pricing, "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let resp = app
        .client()
        .post(app.proxy_url("/v1/messages?prompt_tokens=1000&completion_tokens=2000&n=4"))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude-fake", "max_tokens": 1024, "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let sent: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");
    // 1 × 3 + 2 × 15 = 33
    wait_total(&app, &account, "67").await;

    // Non-streaming JSON in Anthropic's shape.
    let resp = app
        .client()
        .post(app.proxy_url("/v1/messages?prompt_tokens=2000&completion_tokens=100"))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude-fake", "max_tokens": 1024, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // 2 × 3 + 0.1 × 15 = 7.5
    wait_total(&app, &account, "59.5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cut_mid_stream_is_settled_by_the_no_usage_rule() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 100, reserve = 0.5 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/chat/completions", pricing, "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let resp = app
        .client()
        .post(app.proxy_url("/v1/chat/completions?cut_after=20&completion_tokens=999"))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    while let Ok(Some(_)) = resp.chunk().await {}
    // No usage arrived: the larger of the reserve (0.5) and the running estimate (20 events
    // at 0.1 = 2, plus the input estimated from the request size, priced at 0).
    let pg = env.pg().await;
    let settle = wait_settle(&pg, &account).await;
    let spent = 100_000_000 - total(&app, &account).await;
    // charged = events × price: 20 × 0.1 credit.
    assert_eq!(
        spent,
        20 * 100_000,
        "a cut stream of 20 events: {:?}",
        entries(&pg, &account).await
    );
    assert_eq!(settle.2, "no_usage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_is_debited_per_started_step_and_closed_when_credits_run_out() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 0.6 per minute billed per started second: 0.01 a second; the balance pays for 3.
    let pricing = "{ per_minute = 0.6, tick_seconds = 1 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/voice", pricing, "0.03"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let mut ws = WsClient::connect_bearer(&ws_url(app.proxy_addr(), "/voice/ws"), &key).await;
    ws.send_text("hello").await;
    assert_eq!(ws.recv_text(Duration::from_secs(5)).await, "hello");
    // The first second is paid up front.
    assert_eq!(total(&app, &account).await, 20_000);

    // Talk until tollgate closes the session.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if ws.try_send_text("frame").await.is_err() {
                break None;
            }
            match ws.next_event(Duration::from_millis(300)).await {
                Some(crate::ws_client::WsEvent::Close { code, reason }) => {
                    break Some((code, reason))
                }
                Some(crate::ws_client::WsEvent::Gone(_)) => break None,
                _ => {}
            }
        }
    })
    .await
    .expect("the session was not closed when the balance ran out");
    let (code, reason) = closed.expect("the session ended without a close frame");
    assert_eq!(code, Some(4002), "{reason}");
    assert_eq!(reason, "insufficient_credits");

    // Each started second was debited as it started (journaled as extends); the session
    // spent exactly the balance and never went below zero.
    let pg = env.pg().await;
    wait_settle(&pg, &account).await;
    let e = entries(&pg, &account).await;
    let extends = e.iter().filter(|x| x.0 == "extend").count();
    // 0.01 held at the upgrade, 0.01 at the start of seconds 2 and 3; nothing left for 4.
    assert_eq!(extends, 2, "{e:?}");
    assert_eq!(total(&app, &account).await, 0, "{e:?}");
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

/// Pingora 0.9.1 tore an upgraded tunnel down right after the 101 whenever it read the
/// upstream's answer before the upgrade request's own empty body (cloudflare/pingora#946): a few
/// percent of sessions to a fast upstream got the 101 and then EOF. tollgate builds Pingora's
/// proxy with the fix (vendor/pingora-proxy): every session must carry its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_websocket_session_carries_traffic_when_the_upstream_answers_at_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(
            &up.url(),
            "/voice",
            "{ per_minute = 0.6, tick_seconds = 60 }",
            "1000",
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    const SESSIONS: usize = 300;
    const AT_ONCE: usize = 6;
    let url = ws_url(app.proxy_addr(), "/voice/ws");
    let mut torn_down = Vec::new();
    for batch in 0..SESSIONS / AT_ONCE {
        let sessions = (0..AT_ONCE).map(|i| {
            let (url, key) = (url.clone(), key.clone());
            async move {
                let mut ws = WsClient::connect_bearer(&url, &key).await;
                let said = format!("hello {batch}/{i}");
                let answer = match ws.try_send_text(&said).await {
                    Ok(()) => ws.next_event(Duration::from_secs(5)).await,
                    Err(e) => panic!("session {batch}/{i}: the first send failed: {e}"),
                };
                match answer {
                    Some(crate::ws_client::WsEvent::Text(t)) if t == said => {
                        ws.close(1000, "done").await;
                        None
                    }
                    other => Some(format!("{batch}/{i}: {other:?}")),
                }
            }
        });
        torn_down.extend(
            futures_util::future::join_all(sessions)
                .await
                .into_iter()
                .flatten(),
        );
    }
    assert!(
        torn_down.is_empty(),
        "sessions without an echo: {torn_down:?}"
    );

    // Each session paid its one started minute (0.6); none was settled as dropped.
    let left = 1_000_000_000 - SESSIONS as i64 * 600_000;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            total(&app, &account).await == left
        })
        .await,
        "balance {} µc, expected {left}",
        total(&app, &account).await
    );
    let pg = env.pg().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let dropped = entries(&pg, &account)
        .await
        .into_iter()
        .filter(|e| e.2 == "upgrade_dropped")
        .count();
    assert_eq!(dropped, 0);
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_debited_per_started_step_while_open() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ per_request = 0.1, per_minute = 6, tick_seconds = 1 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/events", pricing, "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    // An SSE stream of 12 events 250 ms apart: about 2.75 s, 3 started seconds.
    let resp = app
        .client()
        .get(app.proxy_url("/v1/events/sse?n=12&delay_ms=250"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let mut seen_debits = Vec::new();
    while let Ok(Some(_)) = resp.chunk().await {
        seen_debits.push(total(&app, &account).await);
    }
    // Debited while the stream was open, not only at the end.
    assert!(
        seen_debits.windows(2).any(|w| w[1] < w[0]),
        "no debit during the stream: {seen_debits:?}"
    );
    let pg = env.pg().await;
    wait_settle(&pg, &account).await;
    // 0.1 + each started second of the recorded duration × 0.1 (about 2.75 s: 3 seconds,
    // more on a slow machine, but never a second the journal does not show).
    let duration_ms = settle_duration_ms(&pg, &account).await;
    assert!(duration_ms >= 2750, "the stream lasted {duration_ms} ms");
    let seconds = (duration_ms + 999) / 1000;
    let spent = 100_000_000 - total(&app, &account).await;
    assert_eq!(
        spent,
        100_000 + seconds * 100_000,
        "{duration_ms} ms: {:?}",
        entries(&pg, &account).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_is_settled_never_at_zero() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pricing = "{ output_per_1k_tokens = 10, reserve = 0.5 }";
    let app = env
        .config()
        .toml(config(&up.url(), "/v1/chat/completions", pricing, "100"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let mut resp = app
        .client()
        .post(app.proxy_url("/v1/chat/completions?forever=1&delay_ms=50"))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for _ in 0..3 {
        resp.chunk().await.unwrap();
    }
    drop(resp);
    // The upstream stream stops too (tollgate drops it), and the request settles by the
    // no-usage rule: the reserve, as the few events streamed are worth less.
    let pg = env.pg().await;
    let settle = wait_settle(&pg, &account).await;
    assert_eq!((settle.1, settle.2.as_str()), (0, "no_usage"));
    assert_eq!(total(&app, &account).await, 99_500_000);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            !up.sse_ended().is_empty()
        })
        .await,
        "the upstream stream kept running after the client left"
    );
}
