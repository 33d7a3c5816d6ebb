//! The request path, as Pingora's `ProxyHttp` phases. Each phase's work lives in its own file,
//! in request order: [`route`] → [`auth`] → gate → debit → [`upstream`] → meter → settle.
//! This file only wires the phases together and keeps the per-request context.

pub mod auth;
pub mod respond;
pub mod route;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::auth::Identity;
use crate::config::RouteConfig;
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
    /// Stable outcome label for metrics: `forwarded` or an error code.
    pub outcome: &'static str,
    pub counted_in_flight: bool,
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
            outcome: "forwarded",
            counted_in_flight: false,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        let snap = self.state.snapshot.load_full();
        ctx.snapshot = Some(Arc::clone(&snap));
        self.state.metrics.in_flight.inc();
        ctx.counted_in_flight = true;

        let req = session.req_header();
        let Some(route) = snap.router.find(&req.method, req.uri.path()).cloned() else {
            let err = GatewayError::RouteNotFound {
                method: req.method.to_string(),
                path: req.uri.path().to_string(),
            };
            return self.reject(session, ctx, err).await;
        };
        ctx.route = Some(Arc::clone(&route));
        if route.public {
            return Ok(false);
        }

        match auth::authenticate(&self.state, &snap, session).await {
            Ok((identity, header)) => {
                ctx.credential_header = Some(header.name());
                ctx.identity = Some(identity);
            }
            Err(err) => return self.reject(session, ctx, err).await,
        }
        Ok(false)
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

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let err = upstream::classify(e);
        let code = match &err {
            Some(err) if session.response_written().is_none() => {
                ctx.outcome = err.code();
                if let Err(write_err) = respond::error(session, err, &ctx.request_id).await {
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
        let route = ctx.route.as_ref().map_or("", |r| r.name.as_str());
        if let Some(started) = ctx.upstream_started {
            self.state
                .metrics
                .upstream_seconds
                .with_label_values(&[route])
                .observe(started.elapsed().as_secs_f64());
        }
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
