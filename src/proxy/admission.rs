//! Admission (`request_filter`): route, authenticate, gate and debit, or answer the request
//! here (self-service calls, the portal, refusals). The slice-or-exact choice is in [`debit`];
//! metered routes continue in [`super::reserve`].

use std::sync::Arc;
use std::time::Duration;

use pingora::proxy::Session;
use tracing::Instrument;

use super::ctx::request_id;
use super::phase::Billing;
use super::{auth, debit, gate, hold, observe, respond, selfservice, Gateway, RequestCtx};
use crate::auth::Identity;
use crate::config::{FailMode, Price, RouteConfig};
use crate::error::GatewayError;
use crate::state::Snapshot;

impl Gateway {
    /// The whole of `request_filter`: `Ok(true)` when the request was answered here.
    pub(super) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session);
        observe::start(session, ctx);
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

    /// Gates (unless `gated`: already passed for the caller's tier) and the debit for an
    /// authenticated caller; fills `ctx.billing`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn meter(
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
            } else {
                self.gate(snap, route, identity, tier, session)?;
            }
            ctx.max_body_bytes = tier
                .max_request_mb()
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
                    ctx.billing = Billing::Charged(charge);
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

    /// Phase 3, counted: a plan refusal is also a `plan_rejections` sample by its code.
    pub(super) fn gate(
        &self,
        snap: &Snapshot,
        route: &RouteConfig,
        identity: &Identity,
        tier: &crate::config::TierConfig,
        session: &Session,
    ) -> Result<(), GatewayError> {
        gate::check(&snap.config, &snap.limiters, route, identity, tier, session).inspect_err(
            |err| {
                self.state
                    .metrics
                    .plan_rejections
                    .with_label_values(&[err.code()])
                    .inc();
            },
        )
    }

    pub(super) async fn self_service(
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
    pub(super) fn pass_through(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        route: Arc<RouteConfig>,
    ) {
        ctx.route_metrics = self.state.metrics.route(&route.name);
        ctx.route = Some(route);
        // Not consumed, but a tollgate key must never reach an upstream.
        ctx.credential_header = auth::credential(session)
            .filter(|(_, token)| crate::auth::keys::looks_like_key(token))
            .map(|(header, _)| header.name());
    }

    /// Auth, gates and debit on a routed request, or the answer to a self-service call or an
    /// unrouted one (the body of `request_filter`, inside the request's span).
    pub(super) async fn filter_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snap: Arc<Snapshot>,
        route: Option<Arc<RouteConfig>>,
    ) -> pingora::Result<bool> {
        let path = session.req_header().uri.path();
        if path.starts_with(crate::web::portal::PREFIX) {
            // The customer portal: pages with their own session auth (crate::web).
            ctx.unrouted = crate::metrics::ROUTE_SELF_SERVICE;
            ctx.outcome = "self_service";
            crate::web::bridge::serve(&self.portal, session).await?;
            return Ok(true);
        }
        if path.starts_with(selfservice::PREFIX) {
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
                if let Some(charge) = ctx.billing.standing().filter(|c| c.lease) {
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

    pub(super) async fn reject(
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
