//! The request path, as Pingora's `ProxyHttp` phases. Each phase's work lives in its own file,
//! in request order: [`route`] → [`auth`] → gate → debit → [`upstream`] → meter → settle.
//! This file only wires the phases together and keeps the per-request context.

pub mod auth;
pub mod body;
pub mod cut;
pub mod debit;
pub mod gate;
pub mod hold;
pub mod meter;
pub mod respond;
pub mod route;
pub mod selfservice;
pub mod settle;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use tracing::Instrument;

use crate::auth::Identity;
use crate::config::raw::Pricing;
use crate::config::{FailMode, Price, RouteConfig};
use crate::error::GatewayError;
use crate::pricing::Rates;
use crate::state::{AppState, Snapshot};

/// The proxy. Cheap to share: everything lives in [`AppState`].
pub struct Gateway {
    pub state: Arc<AppState>,
    pub resolver: upstream::Resolver,
}

impl Gateway {
    /// Also creates the route-labelled metric series at 0
    /// ([`crate::metrics::Metrics::expect_routes`]).
    pub fn new(state: Arc<AppState>) -> Self {
        state.metrics.expect_routes(&state.config());
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
    /// The `route` metric label while `route` is `None`: a request always has a non-empty one
    /// ([`crate::metrics::ROUTE_AUTH`] until the request is known to be something else).
    pub unrouted: &'static str,
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
    /// Metering state on `pricing` routes (holds, usage, cuts).
    pub metered: Option<meter::Metered>,
    /// Renews a fixed-price request's concurrency lease while it runs.
    pub lease_keeper: Option<hold::LeaseKeeper>,
    /// The request's tracing span: every log line of the request carries its id and route.
    /// On a `public` route it is a debug span (see `request_filter`).
    pub span: tracing::Span,
    /// The route's metric handles (none before routing, or for a route added by a reload).
    pub route_metrics: Option<Arc<crate::metrics::RouteMetrics>>,
}

/// The request's declared body size.
fn content_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
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
    /// Gates (unless `gated`: already passed for the caller's tier) and the debit for an
    /// authenticated caller; fills `ctx.charge`.
    #[allow(clippy::too_many_arguments)]
    async fn meter(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
        route: &RouteConfig,
        identity: &Identity,
        ask: debit::Ask,
        gated: bool,
    ) -> Result<(), GatewayError> {
        let mut tier_name = identity.tier.clone();
        let mut skip_gates = gated;
        for _ in 0..2 {
            let Some(tier) = snap.config.tier(&tier_name) else {
                return Err(GatewayError::AccountInactive {
                    status: format!("on tier {tier_name:?}, which no longer exists"),
                });
            };
            if std::mem::take(&mut skip_gates) {
                // Passed in request_filter for this tier.
            } else if let Err(err) =
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
                ask,
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
        // A refused credential counts under `_auth`, like every auth failure without a route.
        let identity = match auth::authenticate(&self.state, snap, session).await {
            Ok((identity, _)) => identity,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        ctx.unrouted = crate::metrics::ROUTE_SELF_SERVICE;
        match selfservice::answer(&self.state, snap, session, &identity).await {
            Ok((status, body)) => {
                ctx.outcome = "self_service";
                respond::json(session, status, &body, &ctx.request_id, &[]).await?;
                Ok(true)
            }
            Err(err) => self.reject(session, ctx, err).await,
        }
    }

    /// A `public` route: routing and proxying only.
    fn pass_through(&self, session: &Session, ctx: &mut RequestCtx, route: Arc<RouteConfig>) {
        ctx.route_metrics = self.state.metrics.route(&route.name);
        ctx.route = Some(route);
        // Not consumed, but a tollgate key must never reach an upstream.
        ctx.credential_header = auth::credential(session)
            .filter(|(_, token)| crate::auth::keys::looks_like_key(token))
            .map(|(header, _)| header.name());
    }

    /// Auth, gates and debit on a routed request, or the answer to a self-service call or an
    /// unrouted one (the body of `request_filter`, inside the request's span).
    async fn filter_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: Arc<Snapshot>,
        route: Option<Arc<RouteConfig>>,
    ) -> pingora::Result<bool> {
        if session
            .req_header()
            .uri
            .path()
            .starts_with(selfservice::PREFIX)
        {
            return self.self_service(session, ctx, &snap).await;
        }
        let Some(route) = route else {
            let req = session.req_header();
            ctx.unrouted = crate::metrics::ROUTE_UNMATCHED;
            let err = GatewayError::RouteNotFound {
                method: req.method.to_string(),
                path: req.uri.path().to_string(),
            };
            return self.reject(session, ctx, err).await;
        };
        ctx.route_metrics = self.state.metrics.route(&route.name);
        ctx.route = Some(Arc::clone(&route));
        ctx.span.record("route", route.name.as_str());

        let (identity, header) = match auth::authenticate(&self.state, &snap, session).await {
            Ok(found) => found,
            Err(err) => return self.reject(session, ctx, err).await,
        };
        ctx.credential_header = Some(header.name());
        ctx.span.record("account", identity.account_id.as_str());
        let result = match &route.price {
            Some(Price::Fixed(cost)) => {
                let ask = debit::Ask {
                    cost: *cost,
                    hold: None,
                };
                let charged = self
                    .meter(session, ctx, &snap, &route, &identity, ask, false)
                    .await;
                if let Some(charge) = ctx.charge.as_ref().filter(|c| c.lease) {
                    ctx.lease_keeper = Some(hold::LeaseKeeper::start(
                        Arc::clone(&self.state),
                        charge,
                        snap.config.redis.lease_ttl_seconds * 1000,
                    ));
                }
                charged
            }
            Some(Price::Metered(pricing)) => {
                self.start_metered(session, ctx, &snap, &route, &identity, pricing)
                    .await
            }
            None => Err(GatewayError::Internal),
        };
        ctx.identity = Some(identity);
        let result = match result {
            Ok(()) => self.reserve_early(session, ctx).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => Ok(false),
            Err(err) => self.reject(session, ctx, err).await,
        }
    }

    /// A token-priced request with a small declared body is read whole here, before anything
    /// goes upstream: the hold is taken (a refusal never reaches the upstream) and the body
    /// is forwarded with its exact Content-Length, through Pingora's retry buffer, which holds
    /// up to [`body::EARLY_READ_MAX`]. Larger or chunked bodies are priced as they arrive
    /// (`request_body_filter`) and forwarded chunked.
    async fn reserve_early(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let Some(m) = ctx.metered.as_mut() else {
            return Ok(());
        };
        let small = content_length(session).is_some_and(|len| len <= body::EARLY_READ_MAX);
        if !m.deferred || m.debited || !small {
            return Ok(());
        }
        session.enable_retry_buffering();
        let mut read = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    read.extend_from_slice(&chunk);
                    if read.len() as u64 > body::EARLY_READ_MAX {
                        // More than declared: let the framing error surface upstream-side.
                        return Err(GatewayError::PayloadTooLarge {
                            limit_mb: m.body_limit / gate::BYTES_PER_MB,
                        });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "the client's body could not be read");
                    return Err(GatewayError::BadRequest {
                        reason: "the request body could not be read".into(),
                    });
                }
            }
        }
        // ctx.body_bytes counts it when Pingora replays it upstream (request_body_filter).
        m.body = read;
        m.early = true;
        let forwarded = self.reserve_with_body(session, ctx).await?;
        if let Some(m) = ctx.metered.as_mut() {
            m.final_body = Some(forwarded);
        }
        Ok(())
    }

    /// A `pricing` route. Token-priced: gates now, the hold once the body is in (its price
    /// depends on the body). Otherwise: the hold now, from what is known up front.
    async fn start_metered(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        snap: &Snapshot,
        route: &RouteConfig,
        identity: &Identity,
        pricing: &Pricing,
    ) -> Result<(), GatewayError> {
        let by_tokens = pricing.input_per_1k_tokens.is_some()
            || pricing.output_per_1k_tokens.is_some()
            || !pricing.models.is_empty();
        let declared = content_length(session);
        if by_tokens {
            let Some(tier) = snap.config.tier(&identity.tier) else {
                return Err(GatewayError::AccountInactive {
                    status: format!("on tier {:?}, which no longer exists", identity.tier),
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
            let limit = tier
                .raw
                .max_request_mb
                .map_or(body::DEFAULT_MAX_BUFFERED, |mb| {
                    mb.saturating_mul(gate::BYTES_PER_MB)
                });
            if declared.is_some_and(|len| len > limit) {
                return Err(GatewayError::PayloadTooLarge {
                    limit_mb: limit / gate::BYTES_PER_MB,
                });
            }
            ctx.max_body_bytes = Some(limit);
            ctx.metered = Some(meter::Metered {
                deferred: true,
                body_limit: limit,
                ..meter::Metered::default()
            });
            return Ok(());
        }
        let rates = Rates::resolve(pricing, None).map_err(|_| GatewayError::Internal)?;
        let minimum = rates
            .minimum_hold(declared.unwrap_or(0))
            .map_err(|_| GatewayError::Internal)?;
        ctx.metered = Some(meter::Metered {
            rates: Some(rates),
            debited: true,
            ..meter::Metered::default()
        });
        let ask = debit::Ask {
            cost: minimum,
            hold: Some(debit::HoldSpec {
                ttl_ms: snap.config.redis.lease_ttl_seconds * 1000,
                wanted: Some(minimum),
            }),
        };
        self.meter(session, ctx, snap, route, identity, ask, false)
            .await?;
        self.begin_hold(ctx, snap, rates);
        Ok(())
    }

    /// Turns the debit just made into a running hold (keeper started).
    fn begin_hold(&self, ctx: &mut RequestCtx, snap: &Snapshot, rates: Rates) {
        let (Some(charge), Some(m)) = (&ctx.charge, ctx.metered.as_mut()) else {
            return;
        };
        if !charge.hold {
            return;
        }
        let hold = hold::Hold::new(
            &charge.account_id,
            &charge.charge_id,
            &charge.action,
            rates,
            charge.cost,
            charge.remaining,
            snap.config.redis.lease_ttl_seconds * 1000,
        );
        hold.start_keeper(Arc::clone(&self.state));
        m.hold = Some(hold);
    }

    /// The body of a token-priced request is in: price it (model, max_tokens), take the hold,
    /// rewrite it where the route asks. Returns the body to forward.
    async fn reserve_with_body(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<bytes::Bytes, GatewayError> {
        let (Some(snap), Some(route), Some(identity)) = (
            ctx.snapshot.clone(),
            ctx.route.clone(),
            ctx.identity.clone(),
        ) else {
            return Err(GatewayError::Internal);
        };
        let Some(Price::Metered(pricing)) = &route.price else {
            return Err(GatewayError::Internal);
        };
        let m = ctx.metered.as_mut().ok_or(GatewayError::Internal)?;
        m.debited = true;
        let body = std::mem::take(&mut m.body);
        let mut request = body::AiRequest::inspect(&body);
        let rates = Rates::resolve(pricing, request.model.as_deref()).map_err(|_| {
            GatewayError::ModelNotPriced {
                model: request.model.clone(),
            }
        })?;
        m.rates = Some(rates);
        let len = body.len() as u64;
        let overflow = |_| GatewayError::Internal;
        let minimum = rates.minimum_hold(len).map_err(overflow)?;
        let estimate = request
            .max_tokens
            .map(|t| rates.estimate(len, t))
            .transpose()
            .map_err(overflow)?;
        let (cost, wanted) = if route.cap_max_tokens {
            // Admit on the reserve; hold up to the estimate (all of the balance when the
            // request sets no max_tokens), then cap max_tokens to what is held.
            (minimum, estimate.map(|e| e.max(minimum)))
        } else if pricing.reserve_from_max_tokens {
            let c = estimate.map_or(minimum, |e| e.max(minimum));
            (c, Some(c))
        } else {
            (minimum, Some(minimum))
        };
        let ask = debit::Ask {
            cost,
            hold: Some(debit::HoldSpec {
                ttl_ms: snap.config.redis.lease_ttl_seconds * 1000,
                wanted,
            }),
        };
        self.meter(session, ctx, &snap, &route, &identity, ask, true)
            .await?;
        self.begin_hold(ctx, &snap, rates);
        let m = ctx.metered.as_mut().ok_or(GatewayError::Internal)?;
        let cap = match &m.hold {
            Some(hold) if route.cap_max_tokens && hold.balance().is_some() => {
                rates.affordable_output_tokens(hold.held(), len)
            }
            _ => None,
        };
        if cap == Some(0) {
            // The balance covers the reserve but not one output token at this model's price.
            let remaining = m.hold.as_ref().and_then(|h| h.balance());
            m.refund = Some(settle::Failure::Refused);
            settle::finish_hold(&self.state, m, len, None, &ctx.request_id).await;
            return Err(GatewayError::InsufficientCredits {
                remaining: remaining.unwrap_or_default()
                    + ctx.charge.as_ref().map_or(Default::default(), |c| c.cost),
                required: rates.estimate(len, 1).map_err(overflow)?,
                tier: identity.tier.clone(),
            });
        }
        let forwarded = request
            .rewrite(cap, pricing.include_usage)
            .map_or_else(|| bytes::Bytes::from(body), bytes::Bytes::from);
        Ok(forwarded)
    }

    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GatewayError,
    ) -> pingora::Result<bool> {
        ctx.outcome = err.code();
        respond::error(session, &err, &ctx.request_id).await?;
        if matches!(err, GatewayError::PayloadTooLarge { .. }) {
            // The client may still be sending the body it declared. Closing with it unread makes
            // the kernel answer with a reset that can destroy the 413 before the client reads it
            // (a lingering close, as nginx does): read and discard for a bounded time first.
            session.set_total_drain_timeout(Some(REFUSED_BODY_DRAIN));
            if let Err(e) = session.drain_request_body().await {
                tracing::debug!(error = %e, "refused body not drained");
            }
        }
        Ok(true)
    }
}

/// How long a body refused as too large is read and discarded before the connection closes.
const REFUSED_BODY_DRAIN: Duration = Duration::from_secs(2);

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
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
            charge: None,
            refunded: false,
            upstream_status: None,
            max_body_bytes: None,
            body_bytes: 0,
            outcome: "forwarded",
            counted_in_flight: false,
            metered: None,
            lease_keeper: None,
            span: tracing::Span::none(),
            route_metrics: None,
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
        let route = if req.uri.path().starts_with(selfservice::PREFIX) {
            None
        } else {
            snap.router.find(&req.method, req.uri.path()).cloned()
        };
        if let Some(route) = route.as_ref().filter(|r| r.public) {
            // The pass-through logs nothing above debug, so its span is a debug span: at the
            // default level it is never built, which saved formatting its fields, registering
            // and entering it on every request (a measurable share of the route's CPU).
            ctx.span = tracing::debug_span!(
                "request",
                request_id = %ctx.request_id,
                method = %req.method,
                route = route.name.as_str(),
                account = tracing::field::Empty,
            );
            self.pass_through(session, ctx, Arc::clone(route));
            return Ok(false);
        }
        ctx.span = tracing::info_span!(
            "request",
            request_id = %ctx.request_id,
            method = %req.method,
            route = tracing::field::Empty,
            account = tracing::field::Empty,
        );
        let span = ctx.span.clone();
        self.filter_request(session, ctx, snap, route)
            .instrument(span)
            .await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(chunk) = body.as_ref() {
            ctx.body_bytes += chunk.len() as u64;
            if ctx
                .max_body_bytes
                .is_some_and(|limit| ctx.body_bytes > limit)
            {
                // A plan refusal like the one on a declared length (counted in `gate`).
                self.state
                    .metrics
                    .plan_rejections
                    .with_label_values(&[GatewayError::PayloadTooLarge { limit_mb: 0 }.code()])
                    .inc();
                return Err(pingora::Error::explain(
                    pingora::ErrorType::HTTPStatus(413),
                    "request body over the tier's max_request_mb",
                ));
            }
        }
        let Some(m) = ctx.metered.as_mut() else {
            return Ok(());
        };
        if m.cut_sent {
            // The session was closed for lack of credits; this is the client's last word.
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "session ended: insufficient credits",
            ));
        }
        if !m.deferred {
            return Ok(());
        }
        if m.debited {
            // A retried upstream attempt: send what the first attempt sent.
            *body = if end_of_stream {
                m.final_body.clone()
            } else {
                Some(bytes::Bytes::new())
            };
            return Ok(());
        }
        if let Some(chunk) = body.take() {
            m.body.extend_from_slice(&chunk);
        }
        if !end_of_stream {
            // Held back until the whole body is in: nothing goes upstream yet.
            *body = Some(bytes::Bytes::new());
            return Ok(());
        }
        let span = ctx.span.clone();
        match self.reserve_with_body(session, ctx).instrument(span).await {
            Ok(forwarded) => {
                if let Some(m) = ctx.metered.as_mut() {
                    m.final_body = Some(forwarded.clone());
                }
                *body = Some(forwarded);
                Ok(())
            }
            Err(err) => {
                let status = err.status();
                if let Some(m) = ctx.metered.as_mut() {
                    m.rejection = Some(err);
                }
                Err(pingora::Error::explain(
                    pingora::ErrorType::HTTPStatus(status),
                    "refused once the request body was read",
                ))
            }
        }
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
        if let Some(m) = ctx.metered.as_ref().filter(|m| m.deferred) {
            match (&m.final_body, m.early) {
                // Read and priced already: the (maybe rewritten) body's own length.
                (Some(body), true) => {
                    upstream_request
                        .insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
                }
                // Priced as it arrives and maybe rewritten: its length is not known yet, so
                // it goes chunked (Pingora frames it when Content-Length is absent).
                _ => {
                    upstream_request.remove_header(&http::header::CONTENT_LENGTH);
                }
            }
        }
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
        let (Some(charge), Some(route)) = (&ctx.charge, &ctx.route) else {
            return Ok(());
        };
        let refund =
            status >= 500 && settle::should_refund(route, Some(settle::Failure::Upstream5xx));
        if let Some(m) = ctx.metered.as_mut() {
            if refund {
                m.refund = Some(settle::Failure::Upstream5xx);
            }
            let content_type = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            m.response = Some(meter::UsageMeter::for_content_type(content_type));
            if status == 101 {
                m.ws = Some(cut::WsFrames::default());
            }
        }
        // On a hold: what is held now (the reserve); the final charge is in the journal and
        // the usage API once the response has ended.
        let hold = ctx.metered.as_ref().and_then(|m| m.hold.as_ref());
        let (charged, remaining) = match hold {
            Some(h) => (h.held(), h.balance()),
            None => (charge.cost, charge.remaining),
        };
        let (charged, remaining) = if refund {
            (crate::money::Credits::ZERO, remaining.map(|r| r + charged))
        } else {
            (charged, remaining)
        };
        upstream_response.insert_header("x-credits-charged", charged.to_string())?;
        let mut low = charge.low;
        if let Some(remaining) = remaining {
            low = charge.low_threshold.is_some_and(|t| remaining < t);
            upstream_response.insert_header("x-credits-remaining", remaining.to_string())?;
        }
        if low {
            upstream_response.insert_header("x-credits-low", "true")?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        let body_bytes = ctx.body_bytes;
        let Some(m) = ctx.metered.as_mut() else {
            return Ok(None);
        };
        if m.cut_sent {
            // The cut went out with the previous chunk: end the connection (and the upstream
            // work) here.
            *body = None;
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "stream ended: insufficient credits",
            ));
        }
        let Some(meter_state) = m.response.as_mut() else {
            return Ok(None);
        };
        let mut boundary = None;
        if let Some(chunk) = body.as_ref() {
            meter_state.feed(chunk);
            if let Some(ws) = m.ws.as_mut() {
                boundary = ws.feed(chunk);
            }
        }
        if end_of_stream {
            m.complete = true;
            return Ok(None);
        }
        let Some(hold) = m.hold.clone() else {
            return Ok(None);
        };
        let mut out_of_credits = hold.must_cut();
        let streaming = m
            .response
            .as_ref()
            .is_some_and(meter::UsageMeter::is_stream);
        if !out_of_credits && streaming && hold.rates.by_tokens {
            if let Some(running) = m.running_cost(body_bytes) {
                let held = hold.held();
                if running > held {
                    if hold.is_short() {
                        out_of_credits = true;
                    } else {
                        let step = (running - held).max(hold.rates.reserve);
                        hold.top_up(&self.state, step);
                    }
                }
            }
        }
        if !out_of_credits {
            return Ok(None);
        }
        let kind = if m.ws.is_some() {
            let frame =
                cut::ws_close_frame(cut::WS_CLOSE_INSUFFICIENT_CREDITS, "insufficient_credits");
            let Some(at) = boundary else {
                // Mid-frame: the close goes after the frame in flight.
                return Ok(None);
            };
            let mut out = body.as_ref().map(|b| b[..at].to_vec()).unwrap_or_default();
            out.extend_from_slice(&frame);
            *body = Some(bytes::Bytes::from(out));
            "websocket"
        } else if streaming {
            *body = Some(bytes::Bytes::from(cut::sse_error_event(hold.held())));
            "sse"
        } else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "response ended: insufficient credits",
            ));
        };
        m.cut_sent = true;
        // The client has a moment to answer the close (or read the error event); a client
        // that stays silent is disconnected then, so an idle session cannot outlive its
        // credits.
        session.set_read_timeout(Some(cut::CLOSE_GRACE));
        self.state
            .metrics
            .streams_cut
            .with_label_values(&[kind])
            .inc();
        let _in_span = ctx.span.enter();
        tracing::info!(kind, "ended a stream: the balance ran out");
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let Some(err) = ctx.metered.as_mut().and_then(|m| m.rejection.take()) {
            // Refused once the body was read (402, 400 model_not_priced, 429, ...).
            ctx.outcome = err.code();
            if session.response_written().is_none() {
                if let Err(write_err) =
                    respond::error_and_close(session, &err, &ctx.request_id).await
                {
                    tracing::debug!(error = %write_err, "could not send the error response");
                }
            }
            return FailToProxy {
                error_code: err.status(),
                can_reuse_downstream: false,
            };
        }
        if e.etype() == &pingora::ErrorType::HTTPStatus(413) {
            if let Some(m) = ctx.metered.as_mut() {
                // Our own refusal: the caller never got the service, whatever the policy.
                m.refund = Some(settle::Failure::Refused);
                settle::finish_hold(&self.state, m, ctx.body_bytes, None, &ctx.request_id).await;
                ctx.refunded = true;
            }
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
        // Nothing charged yet (a token-priced route holds only once its body is read, which
        // never happened): the caller keeps every credit, which the body says as `refunded`.
        let mut refunded = ctx.charge.is_none() && ctx.metered.is_some();
        if let (Some(charge), Some(route), Some(failure)) = (&ctx.charge, &ctx.route, failure) {
            if settle::should_refund(route, Some(failure)) && !ctx.refunded {
                if let Some(m) = ctx.metered.as_mut().filter(|m| m.hold.is_some()) {
                    m.refund = Some(failure);
                    settle::finish_hold(&self.state, m, ctx.body_bytes, None, &ctx.request_id)
                        .await;
                    refunded = true;
                } else {
                    refunded =
                        settle::refund(&self.state, route, charge, &ctx.request_id, failure).await;
                }
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
        if let Some(charge) = ctx.charge.as_ref().filter(|c| c.counted.is_some()) {
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
        } else if let (Some(charge), Some(route)) = (&ctx.charge, &ctx.route) {
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
