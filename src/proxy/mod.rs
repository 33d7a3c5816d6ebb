//! The request path, as Pingora's `ProxyHttp` phases. Each phase's work lives in its own file,
//! in request order: [`admission`] ([`route`] → [`auth`] → [`gate`] → [`debit`], the slice or
//! the exact path) → [`reserve`] (holds on metered routes) → [`forward`] ([`lb`], [`upstream`])
//! → [`response`] (credit headers, [`meter`], [`cut`]) → [`failed`] or [`end`] ([`settle`],
//! under the [`refund_policy`]). The per-request state is [`ctx::RequestCtx`]. This file only
//! delegates each phase to its file.

pub mod admission;
pub mod auth;
pub mod body;
pub mod ctx;
pub mod cut;
pub mod debit;
pub mod end;
pub mod failed;
pub mod forward;
pub mod gate;
pub mod hold;
pub mod lb;
pub mod meter;
pub mod observe;
pub mod phase;
pub mod refund_policy;
pub mod reserve;
pub mod respond;
pub mod response;
pub mod route;
pub mod selfservice;
pub mod settle;
pub mod upstream;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

pub use ctx::RequestCtx;

use crate::state::AppState;

/// The proxy. Cheap to share: everything lives in [`AppState`].
pub struct Gateway {
    pub state: Arc<AppState>,
    pub resolver: upstream::Resolver,
    /// The load-balanced upstreams (`urls`): backends, health, in-flight counts.
    pub pools: lb::Pools,
    /// The customer portal's pages (`/_tollgate/portal/`), answered here, never forwarded.
    pub portal: axum::Router,
}

impl Gateway {
    /// Also creates the route-labelled metric series at 0
    /// ([`crate::metrics::Metrics::expect_routes`]).
    pub fn new(state: Arc<AppState>) -> Self {
        state.metrics.expect_routes(&state.config());
        let pools = lb::Pools::new(&state.config(), &state.metrics);
        Gateway {
            portal: crate::web::portal::router(Arc::clone(&state)),
            state,
            resolver: upstream::Resolver::default(),
            pools,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        self.admit(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.body_chunk(session, body, end_of_stream, ctx).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        self.pick_peer(session, ctx).await
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        self.connect_failed(session, peer, ctx, e)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.rewrite_upstream_request(session, upstream_request, ctx)
            .await
    }

    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        self.upstream_body_seen(session, body, end_of_stream, ctx)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.credit_headers(session, upstream_response, ctx).await
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        self.meter_chunk(session, body, end_of_stream, ctx)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.proxy_failed(session, e, ctx).await
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        self.ended(session, e, ctx).await
    }
}
