//! Forwarding: which backend gets the request, what a failed connection means, and the
//! request as it goes upstream.

use std::time::Instant;

use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;

use super::phase::HoldPhase;
use super::{observe, upstream, Gateway, RequestCtx};

impl Gateway {
    pub(super) async fn pick_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let route = ctx.route.as_ref().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no route")
        })?;
        ctx.upstream_started = Some(Instant::now());
        observe::upstream_attempt(ctx.trace.as_deref_mut(), route);
        match self.pools.get(&route.upstream, &self.state.metrics) {
            Some(pool) => {
                let account = ctx.identity.as_ref().map(|i| i.account_id.as_str());
                pool.peer(account, &mut ctx.lb).await.map_err(|mut e| {
                    e.esource = pingora::ErrorSource::Upstream;
                    e
                })
            }
            None => upstream::peer(&self.resolver, &route.upstream).await,
        }
    }

    /// A connection that failed before anything was sent: on a load-balanced upstream the
    /// backend is ejected and the request retried on another one. Safe for money: the debit
    /// ran once in `request_filter`, and the refund in `fail_to_proxy` only runs when the last
    /// attempt failed too.
    pub(super) fn connect_failed(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        let pool = ctx
            .route
            .as_ref()
            .and_then(|r| self.pools.get(&r.upstream, &self.state.metrics));
        if let Some(pool) = pool {
            if ctx.lb.current.is_some() && pool.connect_failed(&mut ctx.lb) {
                e.set_retry(true);
            }
        }
        e
    }

    pub(super) async fn rewrite_upstream_request(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        if let Some(m) = ctx.metered.as_ref() {
            match &m.phase {
                // Read and priced already: the (maybe rewritten) body's own length.
                HoldPhase::Held {
                    forwarded: Some(sent),
                } if sent.early => {
                    upstream_request
                        .insert_header(http::header::CONTENT_LENGTH, sent.body.len().to_string())?;
                }
                // Priced as it arrives and maybe rewritten: its length is not known yet, so
                // it goes chunked (Pingora frames it when Content-Length is absent).
                HoldPhase::AwaitingBody { .. } | HoldPhase::Held { forwarded: Some(_) } => {
                    upstream_request.remove_header(&http::header::CONTENT_LENGTH);
                }
                HoldPhase::Held { forwarded: None } | HoldPhase::Settled { .. } => {}
            }
        }
        upstream::rewrite_request(
            upstream_request,
            &route.upstream,
            ctx.credential_header,
            &ctx.request_id,
        )?;
        if let Some(picked) = ctx.lb.current.as_ref() {
            if !route.upstream.preserve_host {
                // The backend's own host, not the first of `urls`.
                upstream_request.insert_header(http::header::HOST, picked.authority())?;
            }
        }
        observe::propagate(ctx, upstream_request)
    }

    pub(super) fn upstream_body_seen(
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
}
