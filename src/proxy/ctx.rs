//! The per-request context Pingora threads through the phases: what the request is, who sent
//! it, what it was charged and how far it got.

use std::sync::Arc;
use std::time::Instant;

use pingora::proxy::Session;

use super::phase::Billing;
use super::{hold, lb, meter};
use crate::auth::Identity;
use crate::config::RouteConfig;
use crate::state::Snapshot;

/// Per-request state, threaded through the phases.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: String,
    /// The config version this request started with (a reload does not affect it).
    pub snapshot: Option<Arc<Snapshot>>,
    pub route: Option<Arc<RouteConfig>>,
    /// The `route` metric label while `route` is `None`: a request always has a non-empty one
    /// ([`crate::metrics::ROUTE_AUTH`] until the request is known to be something else).
    pub unrouted: &'static str,
    pub identity: Option<Identity>,
    /// Header that carried the credential, removed before forwarding.
    pub credential_header: Option<&'static str>,
    pub upstream_started: Option<Instant>,
    /// When the upstream's response ended (its last body byte arrived).
    pub upstream_done: Option<Instant>,
    /// What the request was charged, and whether it went back.
    pub billing: Billing,
    /// Status the upstream answered with.
    pub upstream_status: Option<u16>,
    /// The tier's body limit, enforced on bodies without Content-Length as they stream.
    pub max_body_bytes: Option<u64>,
    pub body_bytes: u64,
    /// Stable outcome label for metrics: `forwarded` or an error code.
    pub outcome: &'static str,
    pub counted_in_flight: bool,
    /// Metering state on `pricing` routes (holds, usage, cuts).
    pub metered: Option<meter::Metered>,
    /// Renews a fixed-price request's concurrency lease while it runs.
    pub lease_keeper: Option<hold::LeaseKeeper>,
    /// The request's tracing span: every log line of the request carries its id and route.
    /// On a `public` route it is a debug span (see `request_filter`).
    pub span: tracing::Span,
    /// The route's metric handles (none before routing, or for a route added by a reload).
    pub route_metrics: Option<Arc<crate::metrics::RouteMetrics>>,
    /// The backends tried on a load-balanced upstream.
    pub lb: lb::Attempts,
    /// The request's OpenTelemetry trace; `None` unless `[telemetry] otlp_endpoint` is set
    /// (boxed: the context stays one pointer larger when tracing is off).
    pub trace: Option<Box<crate::telemetry::otel::RequestTrace>>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            snapshot: None,
            route: None,
            unrouted: crate::metrics::ROUTE_AUTH,
            identity: None,
            credential_header: None,
            upstream_started: None,
            upstream_done: None,
            billing: Billing::Free,
            upstream_status: None,
            max_body_bytes: None,
            body_bytes: 0,
            outcome: "forwarded",
            counted_in_flight: false,
            metered: None,
            lease_keeper: None,
            span: tracing::Span::none(),
            route_metrics: None,
            lb: lb::Attempts::default(),
            trace: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

/// The request's declared body size.
pub(super) fn content_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A client-supplied request id is kept when it is short and printable; otherwise a fresh one.
pub(super) fn request_id(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}
