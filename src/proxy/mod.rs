//! The request path, as Pingora's `ProxyHttp` phases. Each phase's work lives in its own file,
//! in request order: [`route`] → [`auth`] → gate → debit → [`upstream`] → meter → settle.
//! This file only wires the phases together and keeps the per-request context.

pub mod auth;
pub mod debit;
pub mod gate;
pub mod meter;
pub mod respond;
pub mod route;
pub mod selfservice;
pub mod settle;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use tracing::Instrument;

use crate::auth::Identity;
use crate::config::{FailMode, Price, RouteConfig};
use crate::error::GatewayError;
use crate::state::{AppState, Snapshot};

/// The proxy. Cheap to share: everything lives in [`AppState`].
pub struct Gateway {
    pub state: Arc<AppState>,
    pub resolver: upstream::Resolver,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Self {
        Gateway {
            state,
            resolver: upstream::Resolver::default(),
        }
    }
}

/// Per-request state, threaded through the phases.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: String,
    /// The config version this request started with (a reload does not affect it).
    pub snapshot: Option<Arc<Snapshot>>,
    pub route: Option<Arc<RouteConfig>>,
    pub identity: Option<Identity>,
    /// Header that carried the credential, removed before forwarding.
    pub credential_header: Option<&'static str>,
    pub upstream_started: Option<Instant>,
    /// When the upstream's response ended (its last body byte arrived).
    pub upstream_done: Option<Instant>,
    /// What the debit took; `None` on public, unmetered or refused requests.
    pub charge: Option<debit::Charge>,
    /// The charge was refunded (or the policy decided it will be) — never twice.
    pub refunded: bool,
    /// Status the upstream answered with.
    pub upstream_status: Option<u16>,
    /// The tier's body limit, enforced on bodies without Content-Length as they stream.
    pub max_body_bytes: Option<u64>,
    pub body_bytes: u64,
    /// Stable outcome label for metrics: `forwarded` or an error code.
    pub outcome: &'static str,
    pub counted_in_flight: bool,
    /// The request's tracing span: every log line of the request carries its id and route.
    pub span: tracing::Span,
}

/// A client-supplied request id is kept when it is short and printable; otherwise a fresh one.
fn request_id(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())
}

impl Gateway {
    /// Gates and debit for an authenticated caller; fills `ctx.charge`.
    async fn meter(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
        route: &RouteConfig,
        identity: &Identity,
    ) -> Result<(), GatewayError> {
        let cost = match &route.price {
            Some(Price::Fixed(cost)) => *cost,
            // Refused by config validation until metered pricing exists.
            Some(Price::Metered(_)) | None => return Err(GatewayError::Internal),
        };
        let mut tier_name = identity.tier.clone();
        for _ in 0..2 {
            let Some(tier) = snap.config.tier(&tier_name) else {
                return Err(GatewayError::AccountInactive {
                    status: format!("on tier {tier_name:?}, which no longer exists"),
                });
            };
            if let Err(err) =
                gate::check(&snap.config, &snap.limiters, route, identity, tier, session)
            {
                self.state
                    .metrics
                    .plan_rejections
                    .with_label_values(&[err.code()])
                    .inc();
                return Err(err);
            }
            ctx.max_body_bytes = tier
                .raw
                .max_request_mb
                .map(|mb| mb.saturating_mul(gate::BYTES_PER_MB));
            match debit::debit(
                &self.state,
                snap,
                route,
                identity,
                tier,
                cost,
                &ctx.request_id,
            )
            .await
            {
                Ok(debit::Debit::Charged(charge)) => {
                    ctx.charge = Some(charge);
                    return Ok(());
                }
                Ok(debit::Debit::TierChanged(tier)) => tier_name = tier,
                Err(debit::DebitError::Rejected(err)) => return Err(err),
                Err(debit::DebitError::Unavailable(e)) => {
                    return match route.fail_mode {
                        FailMode::Closed => {
                            tracing::error!(error = %e, route = %route.name, "metering unavailable; refusing (fail_mode = closed)");
                            Err(GatewayError::MeteringUnavailable)
                        }
                        FailMode::Open => {
                            tracing::warn!(error = %e, route = %route.name, account = %identity.account_id, "metering unavailable; forwarding unmetered (fail_mode = open)");
                            self.state
                                .metrics
                                .unmetered
                                .with_label_values(&[&route.name])
                                .inc();
                            ctx.outcome = "unmetered";
                            Ok(())
                        }
                    };
                }
            }
        }
        Err(GatewayError::MeteringUnavailable)
    }

    async fn self_service(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
    ) -> pingora::Result<bool> {
        let identity = match auth::authenticate(&self.state, snap, session).await {
            Ok((identity, _)) => identity,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        match selfservice::answer(&self.state, snap, session, &identity).await {
            Ok((status, body)) => {
                ctx.outcome = "self_service";
                respond::json(session, status, &body, &ctx.request_id, &[]).await?;
                Ok(true)
            }
            Err(err) => self.reject(session, ctx, err).await,
        }
    }

    /// Route, auth, gates and debit (the body of `request_filter`, inside the request's span).
    async fn filter_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let snap = self.state.snapshot.load_full();
        ctx.snapshot = Some(Arc::clone(&snap));
        self.state.metrics.in_flight.inc();
        ctx.counted_in_flight = true;

        if session
            .req_header()
            .uri
            .path()
            .starts_with(selfservice::PREFIX)
        {
            return self.self_service(session, ctx, &snap).await;
        }
        let req = session.req_header();
        let Some(route) = snap.router.find(&req.method, req.uri.path()).cloned() else {
            let err = GatewayError::RouteNotFound {
                method: req.method.to_string(),
                path: req.uri.path().to_string(),
            };
            return self.reject(session, ctx, err).await;
        };
        ctx.route = Some(Arc::clone(&route));
        ctx.span.record("route", route.name.as_str());
        if route.public {
            // Not consumed, but a tollgate key must never reach an upstream.
            ctx.credential_header = auth::credential(session)
                .filter(|(_, token)| crate::auth::keys::looks_like_key(token))
                .map(|(header, _)| header.name());
            return Ok(false);
        }

        let (identity, header) = match auth::authenticate(&self.state, &snap, session).await {
            Ok(found) => found,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        ctx.credential_header = Some(header.name());
        ctx.span.record("account", identity.account_id.as_str());
        let result = self.meter(session, ctx, &snap, &route, &identity).await;
        ctx.identity = Some(identity);
        match result {
            Ok(()) => Ok(false),
            Err(err) => self.reject(session, ctx, err).await,
        }
    }

    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GatewayError,
    ) -> pingora::Result<bool> {
        ctx.outcome = err.code();
        respond::error(session, &err, &ctx.request_id).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            snapshot: None,
            route: None,
            identity: None,
            credential_header: None,
            upstream_started: None,
            upstream_done: None,
            charge: None,
            refunded: false,
            upstream_status: None,
            max_body_bytes: None,
            body_bytes: 0,
            outcome: "forwarded",
            counted_in_flight: false,
            span: tracing::Span::none(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        ctx.span = tracing::info_span!(
            "request",
            request_id = %ctx.request_id,
            method = %session.req_header().method,
            route = tracing::field::Empty,
            account = tracing::field::Empty,
        );
        let span = ctx.span.clone();
        self.filter_request(session, ctx).instrument(span).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let (Some(limit), Some(chunk)) = (ctx.max_body_bytes, body.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > limit {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::HTTPStatus(413),
                    "request body over the tier's max_request_mb",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let route = ctx.route.as_ref().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no route")
        })?;
        ctx.upstream_started = Some(Instant::now());
        upstream::peer(&self.resolver, &route.upstream).await
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        upstream::rewrite_request(
            upstream_request,
            &route.upstream,
            ctx.credential_header,
            &ctx.request_id,
        )
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if end_of_stream {
            ctx.upstream_done = Some(Instant::now());
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        if let (Some(charge), Some(route)) = (&ctx.charge, &ctx.route) {
            let refund =
                status >= 500 && settle::should_refund(route, Some(settle::Failure::Upstream5xx));
            let charged = if refund {
                crate::money::Credits::ZERO
            } else {
                charge.cost
            };
            upstream_response.insert_header("x-credits-charged", charged.to_string())?;
            let mut low = charge.low;
            if let Some(remaining) = charge.remaining {
                let remaining = if refund {
                    remaining + charge.from_allowance + charge.from_purchased
                } else {
                    remaining
                };
                low = charge.low_threshold.is_some_and(|t| remaining < t);
                upstream_response.insert_header("x-credits-remaining", remaining.to_string())?;
            }
            if low {
                upstream_response.insert_header("x-credits-low", "true")?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if e.etype() == &pingora::ErrorType::HTTPStatus(413) {
            if let (Some(charge), Some(route)) = (&ctx.charge, &ctx.route) {
                if !ctx.refunded {
                    // Our own refusal: the caller never got the service, whatever the policy.
                    settle::refund(
                        &self.state,
                        route,
                        charge,
                        &ctx.request_id,
                        settle::Failure::Refused,
                    )
                    .await;
                    ctx.refunded = true;
                }
            }
            let limit_mb = ctx.max_body_bytes.unwrap_or(0) / gate::BYTES_PER_MB;
            let err = GatewayError::PayloadTooLarge { limit_mb };
            ctx.outcome = err.code();
            if session.response_written().is_none() {
                if let Err(write_err) =
                    respond::error_and_close(session, &err, &ctx.request_id).await
                {
                    tracing::debug!(error = %write_err, "could not send the error response");
                }
            }
            return FailToProxy {
                error_code: 413,
                can_reuse_downstream: false,
            };
        }
        let failure = if upstream::is_timeout(e) {
            Some(settle::Failure::Timeout)
        } else if upstream::is_connect_error(e) {
            Some(settle::Failure::ConnectError)
        } else {
            None
        };
        let mut refunded = false;
        if let (Some(charge), Some(route), Some(failure)) = (&ctx.charge, &ctx.route, failure) {
            if settle::should_refund(route, Some(failure)) && !ctx.refunded {
                refunded =
                    settle::refund(&self.state, route, charge, &ctx.request_id, failure).await;
                ctx.refunded = true;
            }
        }
        let err = upstream::classify(e).map(|err| match err {
            GatewayError::UpstreamTimeout { .. } => GatewayError::UpstreamTimeout { refunded },
            GatewayError::UpstreamUnavailable { .. } => {
                GatewayError::UpstreamUnavailable { refunded }
            }
            other => other,
        });
        let code = match &err {
            Some(err) if session.response_written().is_none() => {
                ctx.outcome = err.code();
                if let Err(write_err) =
                    respond::error_and_close(session, err, &ctx.request_id).await
                {
                    tracing::debug!(error = %write_err, "could not send the error response");
                }
                err.status()
            }
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        if ctx.counted_in_flight {
            self.state.metrics.in_flight.dec();
        }
        if let (Some(charge), Some(route)) = (&ctx.charge, &ctx.route) {
            let upstream_5xx = ctx.upstream_status.is_some_and(|s| s >= 500);
            if upstream_5xx
                && !ctx.refunded
                && settle::should_refund(route, Some(settle::Failure::Upstream5xx))
            {
                ctx.refunded = true;
                settle::refund(
                    &self.state,
                    route,
                    charge,
                    &ctx.request_id,
                    settle::Failure::Upstream5xx,
                )
                .instrument(ctx.span.clone())
                .await;
            }
            settle::release(&self.state, charge, &ctx.request_id)
                .instrument(ctx.span.clone())
                .await;
        }
        let route = ctx.route.as_ref().map_or("", |r| r.name.as_str());
        let total = ctx.started.elapsed();
        let upstream_wait = ctx.upstream_started.map(|started| {
            ctx.upstream_done.map_or_else(
                || started.elapsed(),
                |done| done.saturating_duration_since(started),
            )
        });
        if let Some(wait) = upstream_wait {
            self.state
                .metrics
                .upstream_seconds
                .with_label_values(&[route])
                .observe(wait.as_secs_f64());
        }
        self.state
            .metrics
            .overhead_seconds
            .with_label_values(&[route])
            .observe(
                total
                    .saturating_sub(upstream_wait.unwrap_or_default())
                    .as_secs_f64(),
            );
        let outcome = match (e, ctx.outcome) {
            (Some(_), "forwarded") => "client_error",
            (_, outcome) => outcome,
        };
        self.state
            .metrics
            .requests
            .with_label_values(&[route, outcome])
            .inc();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
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
