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
//!   (defaults 10 and 20);
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
use axum::extract::{Request, State};
use axum::response::Response;
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

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    sse: Mutex<Vec<SseWrite>>,
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

    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
        lock(&self.shared.sse).clear();
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
    let (parts, body) = req.into_parts();
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
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let tokens = |q: &str, h: &str, default: u64| {
                query
                    .get(q)
                    .and_then(|v| v.parse::<u64>().ok())
                    .or_else(|| {
                        parts
                            .headers
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                    })
                    .unwrap_or(default)
            };
            let prompt = tokens("prompt_tokens", "x-fake-prompt-tokens", 10);
            let completion = tokens("completion_tokens", "x-fake-completion-tokens", 20);
            let model = request["model"]
                .as_str()
                .unwrap_or("fake-model")
                .to_string();
            if request["stream"] == json!(true) {
                let n = num("n", 3) as usize;
                let include_usage = request["stream_options"]["include_usage"] == json!(true);
                let chunks = (0..n)
                    .map(|i| chunk_event(i, n))
                    .chain(include_usage.then(|| usage_event(prompt, completion)))
                    .collect();
                sse(
                    shared,
                    request_index,
                    chunks,
                    n,
                    Duration::from_millis(num("delay_ms", 0)),
                )
            } else {
                let body = json!({
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                        "finish_reason": "stop"
                    }],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion
                    }
                });
                response(
                    StatusCode::OK,
                    "application/json",
                    Body::from(body.to_string()),
                )
            }
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
