//! A fake upstream (axum, in process, on 127.0.0.1:0) that records every request it gets, plus
//! two broken upstreams: an address where nothing listens and a blackhole that accepts TCP
//! connections and never answers.
//!
//! Endpoints, chosen by the end of the path so they work under any base path:
//! - `…/binary`: the 256 byte values 0..=255 (`application/octet-stream`);
//! - `…/sse?n=5&delay_ms=200&usage=1`: `n` OpenAI chat-completion chunks as SSE, `delay_ms`
//!   apart, an optional usage chunk, then `data: [DONE]`; each write is timestamped
//!   ([`FakeUpstream::sse_sent`]);
//! - `…/slow?ms=1500`: answers `slow:<ms>` after sleeping (the request is recorded on arrival);
//! - `…/status/{code}`: that status with a JSON body `{"upstream_status": code}`;
//! - `…/chat/completions`: an OpenAI-style chat completion with `usage`; with `"stream": true`
//!   in the JSON body, SSE chunks (`?n=`, `?delay_ms=`) and, when the body asks for
//!   `stream_options.include_usage`, a usage chunk. Token counts come from `?prompt_tokens=` /
//!   `?completion_tokens=` or the `x-fake-prompt-tokens` / `x-fake-completion-tokens` headers
//!   (defaults 10 and 20). More knobs, each a query parameter or an `x-fake-<knob>` header
//!   (`_` written `-`), query first:
//!   - `no_usage=1`: no `usage` object in the JSON, and never a usage chunk in the stream;
//!   - `status=NNN` (not 2xx): that status with an OpenAI error body
//!     `{"error":{"message","type","param","code"}}`, streamed or not;
//!   - `cut_after=K` (SSE): K chunk events (none with a `finish_reason`), then the body stream
//!     fails, so the connection is dropped without the terminating chunk and without `[DONE]`;
//!   - `forever=1` (SSE): chunk events every `delay_ms` (default 20) until the client goes
//!     away; each is logged in [`FakeUpstream::sse_sent`] and the end in
//!     [`FakeUpstream::sse_ended`];
//!   - `error_event=1` (SSE): after the chunks (all `n`, or `cut_after` of them), an OpenAI
//!     error event `data: {"error":{…}}` and the end of the stream (no usage, no `[DONE]`);
//! - `POST …/messages` (Anthropic Messages API): a `message` with `content` and
//!   `usage: {input_tokens, output_tokens}`; with `"stream": true`, Anthropic SSE
//!   (`message_start` with the input tokens, `content_block_start`, `ping`, `n`
//!   `content_block_delta`s, `content_block_stop`, `message_delta` with the output tokens,
//!   `message_stop`). Same knobs as chat completions (`status=` answers an Anthropic error
//!   body `{"type":"error","error":{"type","message"}}`);
//! - `GET …/ws`: a WebSocket echo: every text or binary message comes back as it is, except a
//!   text `close <code> <reason>` to which the server answers with that close frame; a close
//!   from the client is answered with a close. Data messages received are counted
//!   ([`FakeUpstream::ws_messages`], [`FakeUpstream::ws_received`]);
//! - anything else: echo. The body comes back verbatim with the request's content type (or
//!   `application/octet-stream`), status `?echo_status=` (default 200), and headers
//!   `x-echo-method`, `x-echo-uri` (path and query as received), `x-echo-query`,
//!   `x-upstream: fake`, and `x-multi: a` + `x-multi: b`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Whether any header value contains `needle`.
    pub fn any_header_contains(&self, needle: &str) -> bool {
        self.headers
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v.as_bytes()).contains(needle))
    }
}

/// One SSE write: which request (its index in [`FakeUpstream::requests`]), which event, when,
/// and the bytes.
#[derive(Debug, Clone)]
pub struct SseWrite {
    pub request: usize,
    pub index: usize,
    pub at: Instant,
    pub bytes: Bytes,
}

/// One data message the WebSocket echo received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsReceived {
    Text(String),
    Binary(Vec<u8>),
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    sse: Mutex<Vec<SseWrite>>,
    /// Requests (indexes) whose scripted SSE stream is over: finished, failed on purpose, or
    /// dropped because the client went away.
    sse_ended: Mutex<Vec<usize>>,
    ws: Mutex<Vec<WsReceived>>,
}

/// The running fake upstream; stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// The most recent request; panics when there is none.
    pub fn last_request(&self) -> RecordedRequest {
        lock(&self.shared.requests)
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// Waits until at least `n` requests arrived; panics after `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the upstream received {} requests, expected {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every SSE write so far, in order.
    pub fn sse_sent(&self) -> Vec<SseWrite> {
        lock(&self.shared.sse).clone()
    }

    /// The SSE writes of one request (its index in [`FakeUpstream::requests`]), in order.
    pub fn sse_sent_for(&self, request: usize) -> Vec<SseWrite> {
        lock(&self.shared.sse)
            .iter()
            .filter(|w| w.request == request)
            .cloned()
            .collect()
    }

    /// Requests (indexes) whose stream from the chat-completions or messages endpoint is over:
    /// it finished, failed on purpose (`cut_after`), or was dropped because the client went
    /// away (`forever`).
    pub fn sse_ended(&self) -> Vec<usize> {
        lock(&self.shared.sse_ended).clone()
    }

    /// Waits until the stream of request `request` is over (see [`FakeUpstream::sse_ended`]);
    /// panics after `timeout`.
    pub async fn wait_sse_ended(&self, request: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.sse_ended().contains(&request) {
            assert!(
                Instant::now() < deadline,
                "the upstream's stream for request {request} did not end within {timeout:?} \
                 ({} events sent)",
                self.sse_sent_for(request).len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many data (text or binary) messages the WebSocket echo received, over all
    /// connections.
    pub fn ws_messages(&self) -> usize {
        lock(&self.shared.ws).len()
    }

    /// The data messages the WebSocket echo received, in order.
    pub fn ws_received(&self) -> Vec<WsReceived> {
        lock(&self.shared.ws).clone()
    }

    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
        lock(&self.shared.sse).clear();
        lock(&self.shared.sse_ended).clear();
        lock(&self.shared.ws).clear();
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn response(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 512 << 20)
        .await
        .unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        uri: parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        ),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
        received_at: Instant::now(),
    };
    let request_index = {
        let mut requests = lock(&shared.requests);
        requests.push(recorded.clone());
        requests.len() - 1
    };
    let last_segment = parts.uri.path().split('/').rfind(|s| !s.is_empty());
    if last_segment == Some("ws") && parts.method == http::Method::GET {
        return websocket(shared, &mut parts).await;
    }
    let query = query_map(parts.uri.query());
    let num = |name: &str, default: u64| {
        query
            .get(name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let segments: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        [.., "binary"] => response(
            StatusCode::OK,
            "application/octet-stream",
            Body::from((0..=255u8).collect::<Vec<u8>>()),
        ),
        [.., "sse"] => {
            let n = num("n", 5) as usize;
            let chunks = (0..n)
                .map(|i| chunk_event(i, n))
                .chain(
                    (query.get("usage").map(String::as_str) == Some("1"))
                        .then(|| usage_event(10, 20)),
                )
                .collect();
            sse(
                shared,
                request_index,
                chunks,
                n,
                Duration::from_millis(num("delay_ms", 0)),
            )
        }
        [.., "slow"] => {
            let ms = num("ms", 1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            response(
                StatusCode::OK,
                "text/plain",
                Body::from(format!("slow:{ms}")),
            )
        }
        [.., "status", code] => {
            let code = code.parse::<u16>().unwrap_or(500);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = if code == 204 || code == 304 || code < 200 {
                Body::empty()
            } else {
                Body::from(json!({"upstream_status": code}).to_string())
            };
            response(status, "application/json", body)
        }
        [.., "chat", "completions"] => {
            let knobs = Knobs::new(&query, &parts.headers);
            chat_completions(shared, request_index, &knobs, &body)
        }
        [.., "messages"] if parts.method == http::Method::POST => {
            let knobs = Knobs::new(&query, &parts.headers);
            anthropic_messages(shared, request_index, &knobs, &body)
        }
        _ => echo(&parts, query, body),
    }
}

fn echo(parts: &http::request::Parts, query: BTreeMap<String, String>, body: Bytes) -> Response {
    let status = query
        .get("echo_status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut resp = response(status, &content_type, Body::from(body));
    let h = resp.headers_mut();
    let uri = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let text = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("?"));
    h.insert("x-echo-method", text(parts.method.as_str()));
    h.insert("x-echo-uri", text(&uri));
    h.insert("x-echo-query", text(parts.uri.query().unwrap_or_default()));
    h.insert("x-upstream", HeaderValue::from_static("fake"));
    h.append("x-multi", HeaderValue::from_static("a"));
    h.append("x-multi", HeaderValue::from_static("b"));
    resp
}

/// One OpenAI chat-completion chunk as an SSE event.
pub fn chunk_event(i: usize, n: usize) -> String {
    let finish = if i + 1 == n {
        json!("stop")
    } else {
        Value::Null
    };
    let chunk = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": finish}]
    });
    format!("data: {chunk}\n\n")
}

/// The final usage chunk of a stream that asked for `include_usage`.
pub fn usage_event(prompt: u64, completion: u64) -> String {
    let chunk = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    });
    format!("data: {chunk}\n\n")
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Streams `events` (then `[DONE]`); the first `delayed` events after the first are preceded by
/// `delay`, the rest follow at once.
fn sse(
    shared: Arc<Shared>,
    request: usize,
    events: Vec<String>,
    delayed: usize,
    delay: Duration,
) -> Response {
    let mut events = events;
    events.push(SSE_DONE.to_string());
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let shared = Arc::clone(&shared);
        let event = events.get(i).cloned();
        async move {
            let event = event?;
            if i > 0 && i < delayed && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let bytes = Bytes::from(event);
            lock(&shared.sse).push(SseWrite {
                request,
                index: i,
                at: Instant::now(),
                bytes: bytes.clone(),
            });
            Some((Ok::<Bytes, Infallible>(bytes), i + 1))
        }
    });
    let mut resp = response(
        StatusCode::OK,
        "text/event-stream",
        Body::from_stream(stream),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

/// The knobs of the chat-completions and messages endpoints: a query parameter, else an
/// `x-fake-<knob>` header (`_` written `-`; the first value counts).
struct Knobs {
    values: BTreeMap<String, String>,
}

impl Knobs {
    fn new(query: &BTreeMap<String, String>, headers: &HeaderMap) -> Knobs {
        let mut values = BTreeMap::new();
        for (name, value) in headers {
            if let (Some(knob), Ok(value)) = (name.as_str().strip_prefix("x-fake-"), value.to_str())
            {
                values
                    .entry(knob.replace('-', "_"))
                    .or_insert_with(|| value.to_string());
            }
        }
        for (name, value) in query {
            values.insert(name.clone(), value.clone());
        }
        Knobs { values }
    }

    fn opt_num(&self, name: &str) -> Option<u64> {
        self.values.get(name).and_then(|v| v.parse::<u64>().ok())
    }

    fn num(&self, name: &str, default: u64) -> u64 {
        self.opt_num(name).unwrap_or(default)
    }

    fn flag(&self, name: &str) -> bool {
        matches!(
            self.values.get(name).map(String::as_str),
            Some("1" | "true" | "yes")
        )
    }

    /// `status=NNN` when it is a valid status other than 2xx.
    fn error_status(&self) -> Option<StatusCode> {
        self.opt_num("status")
            .and_then(|code| u16::try_from(code).ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|status| !status.is_success())
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    response(status, "application/json", Body::from(body.to_string()))
}

/// The error `type` an OpenAI-style API gives for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// An OpenAI error body for `status`.
pub fn openai_error_body(status: StatusCode) -> Value {
    json!({"error": {
        "message": format!("fake upstream error (status {})", status.as_u16()),
        "type": error_type(status),
        "param": null,
        "code": null
    }})
}

/// The OpenAI-style error event a stream ends with under `error_event=1`.
pub fn openai_error_event() -> String {
    let error = json!({"error": {
        "message": "fake upstream stream error",
        "type": "server_error",
        "param": null,
        "code": null
    }});
    format!("data: {error}\n\n")
}

fn chat_completions(shared: Arc<Shared>, request: usize, knobs: &Knobs, body: &Bytes) -> Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(status) = knobs.error_status() {
        return json_response(status, &openai_error_body(status));
    }
    let prompt = knobs.num("prompt_tokens", 10);
    let completion = knobs.num("completion_tokens", 20);
    let with_usage = !knobs.flag("no_usage");
    let model = body["model"].as_str().unwrap_or("fake-model");
    if body["stream"] != json!(true) {
        let mut answer = json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                "finish_reason": "stop"
            }],
        });
        if with_usage {
            answer["usage"] = json!({
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion
            });
        }
        return json_response(StatusCode::OK, &answer);
    }
    let delay_ms = knobs.opt_num("delay_ms");
    if knobs.flag("forever") {
        let delay = Duration::from_millis(delay_ms.unwrap_or(20));
        let next: fn(usize) -> String = |i| chunk_event(i, usize::MAX);
        return scripted_sse(
            shared,
            request,
            Vec::new(),
            0..0,
            delay,
            SseEnd::Forever(next),
        );
    }
    let delay = Duration::from_millis(delay_ms.unwrap_or(0));
    let error_event = knobs.flag("error_event");
    if let Some(k) = knobs.opt_num("cut_after") {
        let k = k as usize;
        let mut events: Vec<String> = (0..k).map(|i| chunk_event(i, usize::MAX)).collect();
        let end = if error_event {
            events.push(openai_error_event());
            SseEnd::Finish
        } else {
            SseEnd::Abort
        };
        return scripted_sse(shared, request, events, 0..k, delay, end);
    }
    let n = knobs.num("n", 3) as usize;
    let include_usage = body["stream_options"]["include_usage"] == json!(true);
    let mut events: Vec<String> = (0..n).map(|i| chunk_event(i, n)).collect();
    if error_event {
        events.push(openai_error_event());
    } else {
        if include_usage && with_usage {
            events.push(usage_event(prompt, completion));
        }
        events.push(SSE_DONE.to_string());
    }
    scripted_sse(shared, request, events, 0..n, delay, SseEnd::Finish)
}

/// One Anthropic SSE event.
pub fn anthropic_event(kind: &str, data: &Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The `i`-th `content_block_delta` of an Anthropic stream (text `tok{i} `).
pub fn anthropic_delta(i: usize) -> String {
    anthropic_event(
        "content_block_delta",
        &json!({
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": format!("tok{i} ")}
        }),
    )
}

/// An Anthropic error body for `status`.
pub fn anthropic_error_body(status: StatusCode) -> Value {
    let kind = match status.as_u16() {
        413 => "request_too_large",
        s if s >= 500 && s != 529 => "api_error",
        _ => error_type(status),
    };
    json!({"type": "error", "error": {
        "type": kind,
        "message": format!("fake upstream error (status {})", status.as_u16())
    }})
}

fn anthropic_messages(
    shared: Arc<Shared>,
    request: usize,
    knobs: &Knobs,
    body: &Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(status) = knobs.error_status() {
        return json_response(status, &anthropic_error_body(status));
    }
    let prompt = knobs.num("prompt_tokens", 10);
    let completion = knobs.num("completion_tokens", 20);
    let with_usage = !knobs.flag("no_usage");
    let model = body["model"].as_str().unwrap_or("claude-fake");
    if body["stream"] != json!(true) {
        let mut answer = json!({
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "Hello from the fake upstream."}],
            "model": model,
            "stop_reason": "end_turn",
            "stop_sequence": null,
        });
        if with_usage {
            answer["usage"] = json!({"input_tokens": prompt, "output_tokens": completion});
        }
        return json_response(StatusCode::OK, &answer);
    }
    let mut message = json!({
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": null,
        "stop_sequence": null,
    });
    if with_usage {
        message["usage"] = json!({"input_tokens": prompt, "output_tokens": 1});
    }
    let mut events = vec![
        anthropic_event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ),
        anthropic_event(
            "content_block_start",
            &json!({
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""}
            }),
        ),
        anthropic_event("ping", &json!({"type": "ping"})),
    ];
    let head = events.len();
    let delay_ms = knobs.opt_num("delay_ms");
    if knobs.flag("forever") {
        let delay = Duration::from_millis(delay_ms.unwrap_or(20));
        return scripted_sse(
            shared,
            request,
            events,
            0..0,
            delay,
            SseEnd::Forever(anthropic_delta),
        );
    }
    let delay = Duration::from_millis(delay_ms.unwrap_or(0));
    let error_event = knobs.flag("error_event");
    let error = || {
        anthropic_event(
            "error",
            &anthropic_error_body(StatusCode::from_u16(529).unwrap_or(StatusCode::BAD_GATEWAY)),
        )
    };
    let (deltas, end) = match knobs.opt_num("cut_after") {
        Some(k) => (k as usize, (!error_event).then_some(SseEnd::Abort)),
        None => (knobs.num("n", 3) as usize, None),
    };
    events.extend((0..deltas).map(anthropic_delta));
    let delayed = head..head + deltas;
    if let Some(end) = end {
        return scripted_sse(shared, request, events, delayed, delay, end);
    }
    if error_event {
        events.push(error());
        return scripted_sse(shared, request, events, delayed, delay, SseEnd::Finish);
    }
    events.push(anthropic_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut message_delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
    });
    if with_usage {
        message_delta["usage"] = json!({"output_tokens": completion});
    }
    events.push(anthropic_event("message_delta", &message_delta));
    events.push(anthropic_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    scripted_sse(shared, request, events, delayed, delay, SseEnd::Finish)
}

/// How a scripted SSE stream ends once its events are out.
enum SseEnd {
    /// The body ends normally.
    Finish,
    /// The body stream fails (50 ms after the last event, so that it is flushed): hyper drops
    /// the connection without the terminating chunk.
    Abort,
    /// `next(0)`, `next(1)`, … forever, each after the delay, until the client goes away.
    Forever(fn(usize) -> String),
}

/// A scripted stream's state; dropping it (the stream finished, failed, or was dropped because
/// the client went away) records the request in `sse_ended`.
struct SseScript {
    shared: Arc<Shared>,
    request: usize,
    events: Vec<String>,
    delayed: std::ops::Range<usize>,
    delay: Duration,
    end: SseEnd,
    next: usize,
    aborted: bool,
}

impl Drop for SseScript {
    fn drop(&mut self) {
        lock(&self.shared.sse_ended).push(self.request);
    }
}

/// Streams `events` as SSE, logging each write; event `i > 0` in `delayed` is preceded by
/// `delay`. Then ends as `end` says.
fn scripted_sse(
    shared: Arc<Shared>,
    request: usize,
    events: Vec<String>,
    delayed: std::ops::Range<usize>,
    delay: Duration,
    end: SseEnd,
) -> Response {
    let script = SseScript {
        shared,
        request,
        events,
        delayed,
        delay,
        end,
        next: 0,
        aborted: false,
    };
    let stream = futures_util::stream::unfold(script, |mut script| async move {
        let i = script.next;
        let wait = !script.delay.is_zero() && i > 0;
        let event = match (script.events.get(i), &script.end) {
            (Some(event), _) => {
                if wait && script.delayed.contains(&i) {
                    tokio::time::sleep(script.delay).await;
                }
                event.clone()
            }
            (None, SseEnd::Finish) => return None,
            (None, SseEnd::Abort) => {
                if script.aborted {
                    return None;
                }
                script.aborted = true;
                // hyper drops what it has buffered when the body fails: a pause (it flushes
                // while the body is pending) gets the events above onto the wire first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let error = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fake upstream: stream cut on purpose",
                );
                return Some((Err(error), script));
            }
            (None, SseEnd::Forever(next)) => {
                if wait {
                    tokio::time::sleep(script.delay).await;
                }
                next(i - script.events.len())
            }
        };
        let bytes = Bytes::from(event);
        lock(&script.shared.sse).push(SseWrite {
            request: script.request,
            index: i,
            at: Instant::now(),
            bytes: bytes.clone(),
        });
        script.next += 1;
        Some((Ok::<Bytes, std::io::Error>(bytes), script))
    });
    let mut resp = response(
        StatusCode::OK,
        "text/event-stream",
        Body::from_stream(stream),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

async fn websocket(shared: Arc<Shared>, parts: &mut http::request::Parts) -> Response {
    match WebSocketUpgrade::from_request_parts(parts, &()).await {
        Ok(upgrade) => upgrade.on_upgrade(move |socket| ws_echo(socket, shared)),
        Err(rejection) => rejection.into_response(),
    }
}

/// Echoes data messages; `close <code> <reason>` makes the server close. Reading goes on after
/// a close so that the close reply gets flushed and the handshake completes.
async fn ws_echo(mut socket: WebSocket, shared: Arc<Shared>) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => {
                lock(&shared.ws).push(WsReceived::Text(text.to_string()));
                match text.as_str().strip_prefix("close ") {
                    Some(command) => {
                        let (code, reason) = command.split_once(' ').unwrap_or((command, ""));
                        Message::Close(Some(CloseFrame {
                            code: code.parse().unwrap_or(1000),
                            reason: reason.into(),
                        }))
                    }
                    None => Message::Text(text),
                }
            }
            Message::Binary(bytes) => {
                lock(&shared.ws).push(WsReceived::Binary(bytes.to_vec()));
                Message::Binary(bytes)
            }
            // axum answers pings, and replies to a close on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// An address on 127.0.0.1 where nothing listens: the port stays bound (never listening) for
/// the rest of the test process, so no other test's listener can take it and answer.
pub fn closed_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("binding a port");
    let addr = socket.local_addr().expect("local addr");
    std::mem::forget(socket);
    addr
}

/// Accepts TCP connections and never answers (nor closes them) until dropped.
pub struct Blackhole {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the blackhole");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Blackhole { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Self-tests of the fake (no tollgate): each knob, hit directly with reqwest, the WebSocket echo
// through `ws_client`, and the official OpenAI Python client.
// ---------------------------------------------------------------------------------------------

async fn post_json(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads a streamed body chunk by chunk until it ends; `Err` if it broke off.
async fn read_stream(resp: reqwest::Response) -> (String, Result<(), String>) {
    use futures_util::StreamExt;
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(e) => return (text, Err(format!("{e:?}"))),
        }
    }
    (text, Ok(()))
}

fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn fake_upstream_chat_json_usage_knobs() {
    let up = FakeUpstream::start().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 7});
    let url = format!("{}/v1/chat/completions", up.url());

    let resp = post_json(&format!("{url}?prompt_tokens=11"), &body).await;
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["model"], "gpt-4o-mini");
    assert_eq!(
        got["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 20, "total_tokens": 31})
    );
    let recorded: Value = serde_json::from_slice(&up.last_request().body).unwrap();
    assert_eq!(recorded["max_tokens"], 7);

    // headers work as before, and any knob as an x-fake-* header
    let resp = reqwest::Client::new()
        .post(&url)
        .header("x-fake-completion-tokens", "5")
        .header("x-fake-no-usage", "0")
        .json(&body)
        .send()
        .await
        .unwrap();
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["usage"]["completion_tokens"], 5);

    let got: Value = post_json(&format!("{url}?no_usage=1"), &body)
        .await
        .json()
        .await
        .unwrap();
    assert!(got.get("usage").is_none(), "{got}");
    assert_eq!(
        got["choices"][0]["message"]["content"],
        "Hello from the fake upstream."
    );
}

#[tokio::test]
async fn fake_upstream_chat_status_knob() {
    let up = FakeUpstream::start().await;
    let url = format!("{}/v1/chat/completions", up.url());
    for (status, kind) in [
        (429, "rate_limit_error"),
        (500, "server_error"),
        (400, "invalid_request_error"),
    ] {
        for stream in [false, true] {
            let body = json!({"model": "m", "messages": [], "stream": stream});
            let resp = post_json(&format!("{url}?status={status}"), &body).await;
            assert_eq!(resp.status().as_u16(), status);
            let got: Value = resp.json().await.unwrap();
            assert_eq!(got["error"]["type"], kind, "{got}");
            assert!(got["error"]["message"].as_str().unwrap().contains("status"));
            assert!(got.get("usage").is_none());
        }
    }
    // a 2xx status is not an error
    let resp = post_json(&format!("{url}?status=200"), &json!({"messages": []})).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn fake_upstream_chat_sse_usage_and_no_usage() {
    let up = FakeUpstream::start().await;
    let url = format!("{}/v1/chat/completions", up.url());
    let body = json!({"model": "m", "messages": [], "stream": true,
                      "stream_options": {"include_usage": true}});

    let (text, end) =
        read_stream(post_json(&format!("{url}?n=4&completion_tokens=9"), &body).await).await;
    end.unwrap();
    let data = data_lines(&text);
    assert_eq!(data.len(), 6, "{text}"); // 4 chunks, usage, [DONE]
    let usage: Value = serde_json::from_str(&data[4]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 9);
    assert_eq!(data[5], "[DONE]");
    up.wait_sse_ended(0, Duration::from_secs(5)).await;
    assert_eq!(up.sse_sent_for(0).len(), 6);

    let (text, end) = read_stream(post_json(&format!("{url}?no_usage=1"), &body).await).await;
    end.unwrap();
    let data = data_lines(&text);
    assert_eq!(data.len(), 4, "{text}"); // 3 chunks, [DONE]
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(data[3], "[DONE]");
}

#[tokio::test]
async fn fake_upstream_chat_sse_cut_after() {
    let up = FakeUpstream::start().await;
    let url = format!("{}/v1/chat/completions?cut_after=2&delay_ms=10", up.url());
    let body = json!({"model": "m", "messages": [], "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = post_json(&url, &body).await;
    assert_eq!(resp.status(), 200);
    let (text, end) = read_stream(resp).await;
    assert!(end.is_err(), "the body should break off: {text}");
    let data = data_lines(&text);
    assert_eq!(data.len(), 2, "{text}");
    assert!(
        !text.contains("[DONE]") && !text.contains("\"stop\""),
        "{text}"
    );
    up.wait_sse_ended(0, Duration::from_secs(5)).await;
    assert_eq!(up.sse_sent_for(0).len(), 2);

    // with error_event=1 the cut is an OpenAI error event instead
    let url = format!("{}/v1/chat/completions?cut_after=1&error_event=1", up.url());
    let (text, end) = read_stream(post_json(&url, &body).await).await;
    end.unwrap();
    let data = data_lines(&text);
    assert_eq!(data.len(), 2, "{text}");
    let error: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
}

#[tokio::test]
async fn fake_upstream_chat_sse_forever() {
    use futures_util::StreamExt;
    let up = FakeUpstream::start().await;
    let url = format!("{}/v1/chat/completions?forever=1&delay_ms=5", up.url());
    let body = json!({"model": "m", "messages": [], "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = post_json(&url, &body).await;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while data_lines(&text).len() < 10 {
        let bytes = stream.next().await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    drop(stream);
    up.wait_sse_ended(0, Duration::from_secs(5)).await;
    let sent = up.sse_sent_for(0).len();
    assert!(sent >= 10, "{sent}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        up.sse_sent_for(0).len(),
        sent,
        "kept sending after the client left"
    );
    assert!(!text.contains("usage") && !text.contains("[DONE]"));
}

#[tokio::test]
async fn fake_upstream_anthropic_messages() {
    let up = FakeUpstream::start().await;
    let url = format!("{}/v1/messages", up.url());
    let body = json!({"model": "claude-x", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});

    let resp = reqwest::Client::new()
        .post(&url)
        .header("x-fake-prompt-tokens", "12")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["type"], "message");
    assert_eq!(got["model"], "claude-x");
    assert_eq!(got["content"][0]["type"], "text");
    assert_eq!(
        got["usage"],
        json!({"input_tokens": 12, "output_tokens": 20})
    );

    let got: Value = post_json(&format!("{url}?no_usage=1"), &body)
        .await
        .json()
        .await
        .unwrap();
    assert!(got.get("usage").is_none());

    let resp = post_json(&format!("{url}?status=529"), &body).await;
    assert_eq!(resp.status().as_u16(), 529);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["type"], "error");
    assert_eq!(got["error"]["type"], "overloaded_error");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let sse_url = format!("{url}?n=4&prompt_tokens=7&completion_tokens=33&delay_ms=5");
    let (text, end) = read_stream(post_json(&sse_url, &streamed).await).await;
    end.unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        kinds,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = data_lines(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], 7);
    assert_eq!(data[0]["message"]["usage"]["output_tokens"], 1);
    assert_eq!(
        data[8],
        json!({"type": "message_delta",
               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 33}})
    );

    // cut_after: message_start, content_block_start, ping, 1 delta, then the connection drops
    let (text, end) = read_stream(post_json(&format!("{url}?cut_after=1"), &streamed).await).await;
    assert!(end.is_err(), "{text}");
    assert_eq!(data_lines(&text).len(), 4, "{text}");
    assert!(!text.contains("message_delta"));
}

#[tokio::test]
async fn fake_upstream_ws_echo() {
    use crate::ws_client::{ws_url, WsClient, WsEvent};
    let up = FakeUpstream::start().await;
    let t = Duration::from_secs(5);

    let mut ws = WsClient::connect_bearer(&ws_url(up.addr, "/v1/realtime/ws?x=1"), "tg_test").await;
    ws.send_text("hello").await;
    assert_eq!(ws.recv_text(t).await, "hello");
    ws.send_binary(&[0, 1, 2, 255]).await;
    assert_eq!(ws.recv_binary(t).await, vec![0, 1, 2, 255]);
    assert!(ws.next_event(Duration::from_millis(50)).await.is_none());
    ws.close(1000, "bye").await;
    assert_eq!(ws.expect_close(t).await, (Some(1000), "bye".to_string()));
    assert_eq!(up.ws_messages(), 2);
    assert_eq!(
        up.ws_received(),
        [
            WsReceived::Text("hello".into()),
            WsReceived::Binary(vec![0, 1, 2, 255])
        ]
    );
    let upgrade = up.last_request();
    assert_eq!(upgrade.path, "/v1/realtime/ws");
    assert_eq!(upgrade.header("authorization").unwrap(), "Bearer tg_test");

    // the server closes on request
    let mut ws = WsClient::connect(&ws_url(up.addr, "ws"), &[]).await;
    ws.send_text("one").await;
    ws.send_text("close 4001 out of credit").await;
    let (data, end) = ws.wait_close(t).await;
    assert_eq!(data, [WsEvent::Text("one".into())]);
    assert_eq!(
        end,
        WsEvent::Close {
            code: Some(4001),
            reason: "out of credit".into()
        }
    );
    assert_eq!(up.ws_messages(), 4);

    // a plain GET is no upgrade
    let (status, _) = WsClient::expect_rejected(&format!("ws://{}/nows", up.addr), &[]).await;
    assert_eq!(status, 200); // the echo answers a plain GET
    let resp = reqwest::get(format!("{}/ws", up.url())).await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

/// The Python interpreter with the `openai` package that scripts/setup installs
/// (`TOLLGATE_TEST_PYTHON`, exported by target/tollgate-env.sh and scripts/test).
pub fn test_python() -> String {
    match std::env::var("TOLLGATE_TEST_PYTHON") {
        Ok(python) if !python.is_empty() => python,
        _ => panic!(
            "TOLLGATE_TEST_PYTHON is not set: run `bash scripts/setup` (it creates target/py with \
             the openai package) and `. target/tollgate-env.sh`, or use scripts/test"
        ),
    }
}

/// Runs tests/e2e/python/openai_client.py with `args` and returns its JSON line; panics (with
/// its stderr) when it fails.
pub async fn run_openai_client(args: &[&str]) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/python/openai_client.py"
    );
    let python = test_python();
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .args(args)
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} ran over 120 s"))
        .unwrap_or_else(|e| panic!("running {python} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{script} printed no JSON line ({e}):\n{stdout}\n{stderr}"))
}

#[tokio::test]
async fn fake_upstream_openai_python_client_direct() {
    let up = FakeUpstream::start().await;
    let base = format!("{}/v1", up.url());
    let got = run_openai_client(&[&base, "sk-direct", "--max-tokens", "50"]).await;
    assert_eq!(got["nonstream"]["content"], "Hello from the fake upstream.");
    assert_eq!(got["nonstream"]["usage"]["prompt_tokens"], 10, "{got}");
    assert_eq!(got["nonstream"]["usage"]["completion_tokens"], 20);
    assert_eq!(got["stream"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(got["stream"]["chunks"], 4, "{got}"); // 3 chunks + the usage chunk
    assert_eq!(got["stream"]["usage"]["total_tokens"], 30);
    let requests = up.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.header("authorization").unwrap(), "Bearer sk-direct");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["max_tokens"], 50);
    }
    let streamed: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(streamed["stream"], true);
    assert_eq!(streamed["stream_options"]["include_usage"], true);

    // --expect-cut, the connection dropped midway: httpx's error, not an openai.APIError
    let got = run_openai_client(&[
        &base,
        "sk-direct",
        "--expect-cut",
        "--query",
        "completion_tokens=3",
    ])
    .await;
    assert_eq!(got["stream"]["usage"]["completion_tokens"], 3, "{got}");
    let cut = &got["cut"];
    assert_eq!(cut["raised"], true, "{got}");
    assert_eq!(cut["chunks"], 2, "{got}");
    assert_eq!(cut["content"], "tok0 tok1 ", "{got}");
    assert_eq!(cut["is_api_error"], false, "{got}");
    assert_eq!(cut["error_module"], "httpx", "{got}");
    assert_eq!(cut["error_class"], "RemoteProtocolError", "{got}");
    assert_eq!(
        up.last_request().query.as_deref(),
        Some("completion_tokens=3&cut_after=2")
    );

    // --expect-cut against an SSE error event: openai.APIError
    let got = run_openai_client(&[
        &base,
        "sk-direct",
        "--expect-cut",
        "--cut-query",
        "cut_after=1",
        "--cut-query",
        "error_event=1",
    ])
    .await;
    let cut = &got["cut"];
    assert_eq!(cut["raised"], true, "{got}");
    assert_eq!(cut["error_class"], "APIError", "{got}");
    assert_eq!(cut["is_api_error"], true, "{got}");
    assert_eq!(cut["message"], "fake upstream stream error", "{got}");
    assert_eq!(cut["chunks"], 1, "{got}");
}
