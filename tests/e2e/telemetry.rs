//! `[telemetry]`: OpenTelemetry traces sent to a local OTLP/HTTP receiver written here (it
//! decodes the exporter's protobuf), W3C `traceparent` continued from the client and passed to
//! the fake upstream, JSON log lines, and the access log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;

use crate::harness::{poll_until, App, TestEnv};
use crate::upstream::FakeUpstream;

/// Spans the receiver got, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| hex::encode(&s.trace_id) == trace_id)
            .collect()
    }

    async fn wait_for(&self, trace_id: &str, n: usize) -> Vec<Span> {
        let found = poll_until(Duration::from_secs(20), || async {
            self.of_trace(trace_id).len() >= n
        })
        .await;
        assert!(
            found,
            "{n} spans of trace {trace_id}; got {:#?}",
            self.spans()
        );
        self.of_trace(trace_id)
    }
}

/// A local OTLP/HTTP collector: `POST /v1/traces` with an `ExportTraceServiceRequest`.
async fn otlp_receiver() -> (SocketAddr, Received) {
    async fn traces(State(got): State<Received>, body: Bytes) -> (StatusCode, Vec<u8>) {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return (StatusCode::BAD_REQUEST, Vec::new());
        };
        let mut spans = got.0.lock().unwrap();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        // An empty ExportTraceServiceResponse.
        (StatusCode::OK, Vec::new())
    }
    let got = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

fn attr(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn str_attr(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(AnyValue::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {span:#?}"),
    }
}

fn int_attr(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(AnyValue::IntValue(i)) => i,
        other => panic!("{key}: {other:?} in {span:#?}"),
    }
}

fn config(upstream: &str, telemetry: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "health"
path_prefix = "/health"
upstream = "up"
public = true

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 2.5

[tiers.basic]
monthly_credits = 5

[telemetry]
{telemetry}
"#
    )
}

/// Spans are exported every 100 ms instead of every 5 s (the SDK's standard variable).
const FAST_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

async fn call(
    app: &App,
    key: Option<&str>,
    path: &str,
    traceparent: Option<&str>,
) -> reqwest::Response {
    let mut req = app.client().get(app.proxy_url(path));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    req.send().await.unwrap()
}

/// The one server span of a trace, and its spans of kind `kind`.
fn split(spans: &[Span]) -> (Span, Vec<Span>) {
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .cloned()
        .collect();
    assert_eq!(servers.len(), 1, "one request span per trace: {spans:#?}");
    let clients = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .cloned()
        .collect();
    (servers[0].clone(), clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_request_continued_from_the_client_and_passed_upstream() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let (collector, received) = otlp_receiver().await;
    let app = env
        .config()
        .toml(config(
            &up.url(),
            &format!("otlp_endpoint = \"http://{collector}\"\nservice_name = \"tollgate-e2e\""),
        ))
        .env(FAST_EXPORT.0, FAST_EXPORT.1)
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    // The client's trace is continued: same trace id, the client's span as parent.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let r = call(
        &app,
        Some(&key),
        "/v1/x",
        Some(&format!("00-{trace_id}-{client_span}-01")),
    )
    .await;
    assert_eq!(r.status(), 200);
    let spans = received.wait_for(trace_id, 2).await;
    let (server, clients) = split(&spans);
    assert_eq!(hex::encode(&server.parent_span_id), client_span);
    assert_eq!(server.name, "GET paid");
    assert_eq!(str_attr(&server, "tollgate.route"), "paid");
    assert_eq!(str_attr(&server, "tollgate.account"), account);
    assert_eq!(str_attr(&server, "tollgate.tier"), "basic");
    assert_eq!(int_attr(&server, "tollgate.charge_micros"), 2_500_000);
    assert_eq!(str_attr(&server, "tollgate.outcome"), "forwarded");
    assert_eq!(int_attr(&server, "http.response.status_code"), 200);
    assert_eq!(
        str_attr(&server, "tollgate.request_id"),
        r.headers()["x-request-id"].to_str().unwrap()
    );

    // The upstream call: a child span, and the upstream got a traceparent naming it.
    assert_eq!(clients.len(), 1, "{spans:#?}");
    let upstream_span = &clients[0];
    assert_eq!(upstream_span.parent_span_id, server.span_id);
    assert_eq!(str_attr(upstream_span, "tollgate.upstream"), "up");
    assert_eq!(int_attr(upstream_span, "http.response.status_code"), 200);
    let sent = up
        .last_request()
        .header("traceparent")
        .expect("a traceparent upstream");
    assert_eq!(
        sent,
        format!("00-{trace_id}-{}-01", hex::encode(&upstream_span.span_id)),
        "the upstream's traceparent"
    );
    assert!(received
        .spans()
        .iter()
        .all(|(service, _)| service == "tollgate-e2e"));

    // Without a traceparent: a new trace, still one per request, propagated upstream too.
    let r = call(&app, Some(&key), "/v1/y", None).await;
    assert_eq!(r.status(), 200);
    let sent = up
        .last_request()
        .header("traceparent")
        .expect("a traceparent upstream");
    let new_trace = sent.split('-').nth(1).unwrap().to_string();
    assert_ne!(new_trace, trace_id);
    let spans = received.wait_for(&new_trace, 2).await;
    let (server, _) = split(&spans);
    assert!(server.parent_span_id.is_empty(), "a root span: {server:#?}");
    assert_eq!(int_attr(&server, "tollgate.charge_micros"), 2_500_000);

    // Refused for credits (5 credits, 2.5 each): traced, nothing charged, no upstream span.
    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = call(
        &app,
        Some(&key),
        "/v1/z",
        Some(&format!("00-{refused_trace}-b7ad6b7169203331-01")),
    )
    .await;
    assert_eq!(r.status(), 402);
    let spans = received.wait_for(refused_trace, 1).await;
    let (server, clients) = split(&spans);
    assert!(clients.is_empty(), "{spans:#?}");
    assert_eq!(
        str_attr(&server, "tollgate.outcome"),
        "insufficient_credits"
    );
    assert_eq!(int_attr(&server, "tollgate.charge_micros"), 0);
    assert_eq!(int_attr(&server, "http.response.status_code"), 402);

    // A public route is traced as well (no account).
    let public_trace = "11112222333344445555666677778888";
    let r = call(
        &app,
        None,
        "/health",
        Some(&format!("00-{public_trace}-1111222233334444-01")),
    )
    .await;
    assert_eq!(r.status(), 200);
    let spans = received.wait_for(public_trace, 2).await;
    let (server, clients) = split(&spans);
    assert_eq!(str_attr(&server, "tollgate.route"), "health");
    assert_eq!(str_attr(&server, "tollgate.account"), "");
    assert_eq!(clients.len(), 1);
    let sent = up.last_request().header("traceparent").unwrap();
    assert!(sent.starts_with(&format!("00-{public_trace}-")), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_one_access_line_per_request() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(
            &up.url(),
            "log_format = \"json\"\naccess_log = true",
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let ok = call(&app, Some(&key), "/v1/chat?secret=s3cret", None).await;
    assert_eq!(ok.status(), 200);
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    let public = call(&app, None, "/health", None).await;
    assert_eq!(public.status(), 200);
    let unauth = call(&app, Some("tg_wrong"), "/v1/chat", None).await;
    assert_eq!(unauth.status(), 401);
    let unauth_id = unauth.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();

    let access_lines = |logs: &str| -> Vec<Value> {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "tollgate::access")
            .collect()
    };
    let done = poll_until(Duration::from_secs(10), || async {
        access_lines(&app.logs()).len() >= 3
    })
    .await;
    assert!(done, "three access lines:\n{}", app.logs());

    // Every log line is a JSON object but the `listening` line (a contract of its own).
    let logs = app.logs();
    for line in logs
        .lines()
        .filter(|l| !l.starts_with("listening ") && !l.starts_with("[stdout]"))
    {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let lines = access_lines(&logs);
    assert_eq!(lines.len(), 3, "one line per request:\n{logs}");
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}:\n{logs}"))
            .clone()
    };
    let line = by_id(&ok_id);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/chat", "no query string: {line}");
    assert_eq!(line["status"], 200);
    assert_eq!(line["account"], account.as_str());
    assert_eq!(line["charged"], 2_500_000);
    assert_eq!(line["route"], "paid");
    assert_eq!(line["outcome"], "forwarded");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{line}"
    );
    assert!(!logs.contains("s3cret"));

    let line = by_id(&unauth_id);
    assert_eq!(line["status"], 401);
    assert_eq!(line["charged"], 0);
    assert_eq!(line["account"], "");
    assert_eq!(line["outcome"], "invalid_credentials");

    let health = lines
        .iter()
        .find(|l| l["route"] == "health")
        .expect("the public route's line");
    assert_eq!(health["status"], 200);
    assert_eq!(health["outcome"], "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_access_log_and_nothing_without_it() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), "access_log = true"))
        .spawn()
        .await;
    let (_, key) = app.account_with_key("basic").await;
    let r = call(&app, Some(&key), "/v1/chat", None).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let found = poll_until(Duration::from_secs(10), || async {
        app.logs()
            .lines()
            .any(|l| l.contains(&id) && l.contains(" access "))
    })
    .await;
    assert!(found, "an access line:\n{}", app.logs());
    let logs = app.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&id) && l.contains(" access "))
        .unwrap();
    for part in [
        "method=\"GET\"",
        "path=\"/v1/chat\"",
        "status=200",
        "charged=2500000",
        "route=\"paid\"",
        "outcome=\"forwarded\"",
        "duration_ms=",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(
        serde_json::from_str::<Value>(line).is_err(),
        "text, not JSON: {line}"
    );

    // Off by default.
    let quiet = env.config().toml(config(&up.url(), "")).spawn().await;
    let (_, key) = quiet.account_with_key("basic").await;
    let r = call(&quiet, Some(&key), "/v1/chat", None).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // The request is over once the upstream has it and the response is read; give the
    // logging phase the same time the positive case needed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!quiet.logs().contains(&id), "{}", quiet.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_costs_dropped_spans_and_one_warning() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // A port where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = env
        .config()
        .toml(config(
            &up.url(),
            &format!("otlp_endpoint = \"http://{dead}\""),
        ))
        .env(FAST_EXPORT.0, FAST_EXPORT.1)
        .spawn()
        .await;
    let (_, key) = app.account_with_key("basic").await;
    let warning = "trace export failed";
    // Requests are answered while the export fails.
    let r = call(&app, Some(&key), "/v1/x", None).await;
    assert_eq!(r.status(), 200);
    let warned = poll_until(Duration::from_secs(20), || async {
        app.logs().contains(warning)
    })
    .await;
    assert!(warned, "a warning:\n{}", app.logs());
    // More batches fail (each export gives up within about a second: three quick retries).
    for _ in 0..8 {
        assert_eq!(call(&app, None, "/health", None).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let logs = app.logs();
    assert_eq!(
        logs.matches(warning).count(),
        1,
        "warned once a minute at most:\n{logs}"
    );
}
