//! What the outside sees of a request besides its response: its OpenTelemetry trace (started
//! in `request_filter`, the upstream span in `upstream_peer`, `traceparent` in
//! `upstream_request_filter`) and its access-log line, both finished in `logging`. The work
//! is in [`crate::telemetry`]; this file only reads the request's context for it.

use std::time::{Instant, SystemTime};

use pingora::http::RequestHeader;
use pingora::proxy::Session;

use super::RequestCtx;
use crate::config::RouteConfig;
use crate::telemetry::{access, otel};

/// Starts the request's trace (a no-op returning at once when tracing is off).
pub fn start(session: &Session, ctx: &mut RequestCtx) {
    let req = session.req_header();
    ctx.trace = otel::start_request(&req.method, req.uri.path(), &req.headers, &ctx.request_id)
        .map(Box::new);
}

/// A connection attempt to the route's upstream begins.
pub fn upstream_attempt(trace: Option<&mut otel::RequestTrace>, route: &RouteConfig) {
    if let Some(trace) = trace {
        let up = &route.upstream;
        trace.start_upstream(&up.name, &up.host, up.port);
    }
}

/// The trace context goes upstream: a `traceparent` naming the upstream span.
pub fn propagate(ctx: &RequestCtx, upstream_request: &mut RequestHeader) -> pingora::Result<()> {
    if let Some(trace) = &ctx.trace {
        for (name, value) in trace.upstream_headers() {
            upstream_request.insert_header(name, value)?;
        }
    }
    Ok(())
}

/// What the request cost in the end, in micro-credits: a settled hold's price, a fixed price
/// unless refunded, else 0.
fn charged_micros(ctx: &RequestCtx) -> i64 {
    if let Some(cost) = ctx.metered.as_ref().and_then(|m| m.final_cost()) {
        return cost.micros();
    }
    ctx.billing
        .standing()
        .map_or(0, |charge| charge.cost.micros())
}

/// The request is over: its spans (`trace`, taken from the context) end and its access-log
/// line is written.
pub fn finish(
    session: &Session,
    ctx: &RequestCtx,
    trace: Option<Box<otel::RequestTrace>>,
    route: &str,
    status: u16,
    outcome: &str,
) {
    let access = access::enabled();
    if trace.is_none() && !access {
        return;
    }
    let charged = charged_micros(ctx);
    let account = ctx.identity.as_ref().map_or("", |i| i.account_id.as_str());
    if let Some(trace) = trace {
        let now = (Instant::now(), SystemTime::now());
        trace.finish(&otel::Finish {
            route,
            account,
            tier: ctx.identity.as_ref().map_or("", |i| i.tier.as_str()),
            charged_micros: charged,
            outcome,
            status,
            upstream_status: ctx.upstream_status,
            upstream_end: ctx
                .upstream_done
                .and_then(|done| now.1.checked_sub(now.0.saturating_duration_since(done))),
        });
    }
    if access {
        let req = session.req_header();
        access::log(&access::AccessRecord {
            method: req.method.as_str(),
            path: req.uri.path(),
            status,
            account,
            charged_micros: charged,
            duration_us: ctx.started.elapsed().as_micros() as u64,
            request_id: &ctx.request_id,
            route,
            outcome,
        });
    }
}
