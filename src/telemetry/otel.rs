//! OpenTelemetry traces (`[telemetry] otlp_endpoint`): one trace per request, the upstream
//! call as its child span, W3C `traceparent` continued from the client and passed on to the
//! upstream.
//!
//! Export never touches the request path: a finished span goes into the SDK's bounded batch
//! queue (dropped when full) and a dedicated thread POSTs batches as OTLP/HTTP protobuf. An
//! unreachable collector costs dropped spans and one warning a minute at most ([`Warned`]).
//! With no endpoint configured nothing here runs: [`start_request`] is one atomic load that
//! returns `None`, and a request carries no trace state.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use super::TelemetryError;

/// Set once by [`start`]; unset, tracing is off.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// One POST to the collector gives up after this long (the batch is then dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning about failed exports per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The running exporter; [`Tracing::shutdown`] flushes it.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
    }
}

/// Starts the batch exporter to `url` (the full `/v1/traces` URL) and turns tracing on.
/// `sample_ratio` applies to traces that start here; a client's sampled flag decides for the
/// traces it continues.
pub fn start(url: &str, sample_ratio: f64, service_name: &str) -> Result<Tracing, TelemetryError> {
    let client = reqwest::blocking::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Client(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingClient(client))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .with_batch_exporter(Warned::new(exporter))
        .build();
    let _ = TRACER.set(provider.tracer("tollgate"));
    tracing::info!(endpoint = url, sample_ratio, "exporting traces (OTLP/HTTP)");
    Ok(Tracing { provider })
}

/// The OTLP exporter's HTTP client: reqwest's blocking client, called from the batch
/// processor's own thread (it `block_on`s the export), never from the async runtime.
#[derive(Debug)]
struct BlockingClient(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(Vec::from(body))
            .send()?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes()?;
        let mut out = http::Response::builder().status(status).body(body)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// Wraps the exporter to report failures (the SDK's own logging is compiled out): one warning
/// a minute at most, with the number of spans lost since the last one.
#[derive(Debug)]
struct Warned<E> {
    inner: E,
    state: parking_lot::Mutex<WarnState>,
}

#[derive(Debug, Default)]
struct WarnState {
    last: Option<Instant>,
    dropped: u64,
}

impl<E> Warned<E> {
    fn new(inner: E) -> Self {
        Warned {
            inner,
            state: parking_lot::Mutex::new(WarnState::default()),
        }
    }

    fn failed(&self, spans: u64, error: &OTelSdkError) {
        let dropped = {
            let mut state = self.state.lock();
            state.dropped += spans;
            let now = Instant::now();
            if state
                .last
                .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
            {
                return;
            }
            state.last = Some(now);
            std::mem::take(&mut state.dropped)
        };
        tracing::warn!(
            error = %error,
            dropped_spans = dropped,
            "trace export failed; spans dropped (warned at most once a minute)"
        );
    }
}

impl<E: SpanExporter> SpanExporter for Warned<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.failed(spans, e);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A request's trace: its server span (inside the client's context, if it sent one) and the
/// span of the upstream attempt in progress.
pub struct RequestTrace {
    cx: Context,
    method: String,
    upstream: Option<opentelemetry_sdk::trace::Span>,
}

/// The request's span, child of the client's `traceparent` when it sent a valid one; `None`
/// when tracing is off.
pub fn start_request(
    method: &http::Method,
    path: &str,
    headers: &http::HeaderMap,
    request_id: &str,
) -> Option<RequestTrace> {
    let tracer = TRACER.get()?;
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let span = tracer
        .span_builder(method.as_str().to_owned())
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("tollgate.request_id", request_id.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    Some(RequestTrace {
        cx: parent.with_span(span),
        method: method.as_str().to_owned(),
        upstream: None,
    })
}

/// How the request ended, for its span's attributes.
#[derive(Debug)]
pub struct Finish<'a> {
    pub route: &'a str,
    pub account: &'a str,
    pub tier: &'a str,
    pub charged_micros: i64,
    pub outcome: &'a str,
    /// Sent to the client (0: nothing was, the client went away).
    pub status: u16,
    pub upstream_status: Option<u16>,
    /// When the upstream's response ended (the upstream span's end).
    pub upstream_end: Option<SystemTime>,
}

impl RequestTrace {
    /// A child span for a connection attempt to the upstream; a retry ends the previous one.
    pub fn start_upstream(&mut self, upstream: &str, host: &str, port: u16) {
        if let Some(mut previous) = self.upstream.take() {
            previous.set_status(Status::error("retried"));
            previous.end();
        }
        let Some(tracer) = TRACER.get() else {
            return;
        };
        let span = tracer
            .span_builder(format!("upstream {upstream}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("tollgate.upstream", upstream.to_owned()),
                KeyValue::new("server.address", host.to_owned()),
                KeyValue::new("server.port", i64::from(port)),
            ])
            .start_with_context(tracer, &self.cx);
        self.upstream = Some(span);
    }

    /// `traceparent` (and the client's `tracestate`) for the upstream request: the same trace,
    /// the upstream span as parent.
    pub fn upstream_headers(&self) -> Vec<(String, String)> {
        let cx = match &self.upstream {
            Some(span) => Context::new().with_remote_span_context(span.span_context().clone()),
            None => self.cx.clone(),
        };
        let mut headers = Headers(Vec::with_capacity(2));
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        headers.0
    }

    /// Records how the request ended and ends its spans (they go to the batch queue).
    pub fn finish(mut self, f: &Finish<'_>) {
        if let Some(mut upstream) = self.upstream.take() {
            match f.upstream_status {
                Some(status) => {
                    upstream.set_attribute(KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                    if status >= 500 {
                        upstream.set_status(Status::error("upstream answered 5xx"));
                    }
                }
                None => upstream.set_status(Status::error(f.outcome.to_owned())),
            }
            match f.upstream_end {
                Some(at) => upstream.end_with_timestamp(at),
                None => upstream.end(),
            }
        }
        let span = self.cx.span();
        span.update_name(format!("{} {}", self.method, f.route));
        span.set_attributes([
            KeyValue::new("tollgate.route", f.route.to_owned()),
            KeyValue::new("tollgate.account", f.account.to_owned()),
            KeyValue::new("tollgate.tier", f.tier.to_owned()),
            KeyValue::new("tollgate.charge_micros", f.charged_micros),
            KeyValue::new("tollgate.outcome", f.outcome.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(f.status)),
        ]);
        if f.status >= 500 {
            span.set_status(Status::error(f.outcome.to_owned()));
        }
        span.end();
    }
}

/// Collects what the propagator writes.
struct Headers(Vec<(String, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}
