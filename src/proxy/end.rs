//! The request's end (`logging`): settle what it used (a hold at its true cost, a refund under
//! the route's policy, the concurrency lease released), then its metrics, trace and log line.

use pingora::proxy::Session;
use tracing::Instrument;

use super::{observe, refund_policy, settle, Gateway, RequestCtx};

impl Gateway {
    pub(super) async fn ended(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if ctx.counted_in_flight {
            self.state.metrics.in_flight.dec();
        }
        if let Some(charge) = ctx.billing.charge().filter(|c| c.counted.is_some()) {
            // A resource is counted only by a request that succeeded upstream.
            if ctx.upstream_status.is_none_or(|s| s >= 400) {
                settle::uncount(&self.state, charge, &ctx.request_id)
                    .instrument(ctx.span.clone())
                    .await;
            }
        }
        if let Some(m) = ctx.metered.as_mut().filter(|m| m.hold.is_some()) {
            settle::finish_hold(
                &self.state,
                m,
                ctx.body_bytes,
                ctx.upstream_status,
                &ctx.request_id,
            )
            .instrument(ctx.span.clone())
            .await;
        } else if let Some(route) = &ctx.route {
            let upstream_5xx = ctx.upstream_status.is_some_and(|s| s >= 500);
            let refund_now = upstream_5xx
                && refund_policy::should_refund(route, Some(refund_policy::Failure::Upstream5xx))
                && ctx.billing.mark_refunded();
            if let Some(charge) = ctx.billing.charge() {
                if refund_now {
                    settle::refund(
                        &self.state,
                        route,
                        charge,
                        &ctx.request_id,
                        refund_policy::Failure::Upstream5xx,
                    )
                    .instrument(ctx.span.clone())
                    .await;
                }
                settle::release(&self.state, charge, &ctx.request_id)
                    .instrument(ctx.span.clone())
                    .await;
            }
        }
        self.record(session, e, ctx);
    }

    /// The request's metrics, trace and debug line.
    fn record(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut RequestCtx) {
        let route = ctx.route.as_ref().map_or(ctx.unrouted, |r| r.name.as_str());
        let total = ctx.started.elapsed();
        let upstream_wait = ctx.upstream_started.map(|started| {
            ctx.upstream_done.map_or_else(
                || started.elapsed(),
                |done| done.saturating_duration_since(started),
            )
        });
        let metrics = &self.state.metrics;
        let handles = ctx.route_metrics.as_deref();
        if let Some(wait) = upstream_wait {
            let seconds = wait.as_secs_f64();
            match handles {
                Some(h) => h.upstream_seconds.observe(seconds),
                None => metrics
                    .upstream_seconds
                    .with_label_values(&[route])
                    .observe(seconds),
            }
        }
        let overhead = total
            .saturating_sub(upstream_wait.unwrap_or_default())
            .as_secs_f64();
        match handles {
            Some(h) => h.overhead_seconds.observe(overhead),
            None => metrics
                .overhead_seconds
                .with_label_values(&[route])
                .observe(overhead),
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // A forwarded request the upstream itself answered 5xx is told apart, so upstream
        // failures show on every route (tollgate's own 502/504 carry their error code).
        let outcome = match (e, ctx.outcome) {
            (_, "forwarded") if status >= 500 => "upstream_5xx",
            (Some(_), "forwarded") => "client_error",
            (_, outcome) => outcome,
        };
        match handles {
            Some(h) if outcome == "forwarded" => h.forwarded.inc(),
            _ => metrics.requests.with_label_values(&[route, outcome]).inc(),
        }
        let trace = ctx.trace.take();
        observe::finish(session, ctx, trace, route, status, outcome);
        let _in_span = ctx.span.enter();
        tracing::debug!(
            request_id = %ctx.request_id,
            route,
            status,
            outcome,
            account = ctx.identity.as_ref().map_or("", |i| i.account_id.as_str()),
            elapsed_us = ctx.started.elapsed().as_micros() as u64,
            "request"
        );
    }
}
