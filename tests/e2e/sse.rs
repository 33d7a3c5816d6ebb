//! Streaming: SSE chunks reach the client as the upstream writes them, not at the end.

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::json;

use crate::harness::{passthrough_toml, TestEnv};
use crate::upstream::{FakeUpstream, SSE_DONE};

/// Reads a response body chunk by chunk: (arrival time, bytes so far) after each chunk.
async fn read_timed(resp: reqwest::Response) -> Vec<(Instant, Vec<u8>)> {
    let mut stream = resp.bytes_stream();
    let mut all = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("reading the stream");
        all.extend_from_slice(&chunk);
        arrivals.push((Instant::now(), all.clone()));
    }
    arrivals
}

/// When the `n`-th complete SSE event (0-based) had arrived.
fn event_arrival(arrivals: &[(Instant, Vec<u8>)], n: usize) -> Instant {
    arrivals
        .iter()
        .find(|(_, so_far)| String::from_utf8_lossy(so_far).matches("\n\n").count() > n)
        .map(|(at, _)| *at)
        .unwrap_or_else(|| panic!("event {n} never arrived"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_while_the_upstream_is_still_writing() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;
    let (_account, key) = app.account_with_key("default").await;

    let resp = app
        .client()
        .get(app.proxy_url("/v1/sse?n=5&delay_ms=300"))
        .bearer_auth(&key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let arrivals = read_timed(resp).await;
    let sent = up.sse_sent();
    assert_eq!(sent.len(), 6, "5 events and [DONE]");

    // Byte-exact.
    let expected: Vec<u8> = sent.iter().flat_map(|w| w.bytes.to_vec()).collect();
    let (_, received) = arrivals.last().expect("some bytes");
    assert_eq!(
        String::from_utf8_lossy(received),
        String::from_utf8_lossy(&expected)
    );
    assert!(String::from_utf8_lossy(received).ends_with(SSE_DONE));

    // Streamed, not buffered: the upstream spends ~1.2 s writing 5 events 300 ms apart, and
    // each of the first three reached the client before the upstream wrote the last one (an
    // order of events, not a speed: a proxy that buffers the body cannot pass it).
    let last_sent = sent[4].at;
    for i in 0..3 {
        let arrived = event_arrival(&arrivals, i);
        assert!(
            arrived < last_sent,
            "event {i} arrived only after the last event was sent (buffered?)"
        );
    }
    assert!(
        arrivals.len() >= 3,
        "delivered in several chunks, got {}",
        arrivals.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_stream_and_json_pass_through() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;
    let (_account, key) = app.account_with_key("default").await;

    // Non-streaming: the upstream's JSON, usage included.
    let request = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]});
    let resp = app
        .client()
        .post(app.proxy_url("/v1/chat/completions?prompt_tokens=7&completion_tokens=3"))
        .bearer_auth(&key)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["model"], "gpt-x");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    let seen = up.last_request();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&seen.body).unwrap(),
        request
    );

    // Streaming with a usage chunk.
    let request = json!({
        "model": "gpt-x",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]
    });
    let resp = app
        .client()
        .post(app.proxy_url("/v1/chat/completions?n=4&delay_ms=20"))
        .bearer_auth(&key)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 6, "4 chunks, usage, [DONE]: {text}");
    assert_eq!(events[5], "data: [DONE]");
    let usage: serde_json::Value =
        serde_json::from_str(events[4].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["total_tokens"], 30);
}
