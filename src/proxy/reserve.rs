//! Metered (`pricing`) routes: the hold — taken up front from what is known, or once the
//! request body is in when the price depends on it (tokens) — and its keeper.

use std::sync::Arc;

use pingora::proxy::Session;
use tracing::Instrument;

use super::ctx::content_length;
use super::phase::{Forwarded, HoldPhase};
use super::{body, debit, gate, hold, meter, refund_policy, settle, Gateway, RequestCtx};
use crate::auth::Identity;
use crate::config::raw::Pricing;
use crate::config::{Price, RouteConfig};
use crate::error::GatewayError;
use crate::pricing::Rates;
use crate::state::Snapshot;

impl Gateway {
    /// A token-priced request with a small declared body is read whole here, before anything
    /// goes upstream: the hold is taken (a refusal never reaches the upstream) and the body
    /// is forwarded with its exact Content-Length, through Pingora's retry buffer, which holds
    /// up to [`body::EARLY_READ_MAX`]. Larger or chunked bodies are priced as they arrive
    /// (`request_body_filter`) and forwarded chunked.
    pub(super) async fn reserve_early(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let Some(m) = ctx.metered.as_mut() else {
            return Ok(());
        };
        let small = content_length(session).is_some_and(|len| len <= body::EARLY_READ_MAX);
        let HoldPhase::AwaitingBody { limit, .. } = m.phase else {
            return Ok(());
        };
        if !small {
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
                            limit_mb: limit / gate::BYTES_PER_MB,
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
        self.reserve_with_body(session, ctx, read, true).await?;
        Ok(())
    }

    /// A `pricing` route. Token-priced: gates now, the hold once the body is in (its price
    /// depends on the body). Otherwise: the hold now, from what is known up front.
    pub(super) async fn start_metered(
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
            self.gate(snap, route, identity, tier, session)?;
            let limit = tier
                .max_request_mb()
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
                phase: HoldPhase::AwaitingBody {
                    body: Vec::new(),
                    limit,
                },
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
            phase: HoldPhase::Held { forwarded: None },
            ..meter::Metered::default()
        });
        let ask = debit::Ask {
            cost: minimum,
            hold: Some(debit::HoldSpec {
                ttl_ms: snap.config.redis.lease_ttl_seconds * 1000,
                wanted: Some(minimum),
                ticking: rates.per_tick != crate::money::Credits::ZERO,
            }),
        };
        self.meter(session, ctx, snap, route, identity, ask, false)
            .await?;
        self.begin_hold(ctx, snap, rates);
        Ok(())
    }

    /// Turns the debit just made into a running hold (keeper started; a hold from a credit
    /// slice has no Redis record to keep alive and no steps, so no keeper).
    pub(super) fn begin_hold(&self, ctx: &mut RequestCtx, snap: &Snapshot, rates: Rates) {
        let (Some(charge), Some(m)) = (ctx.billing.standing(), ctx.metered.as_mut()) else {
            return;
        };
        if !charge.hold {
            return;
        }
        let sliced = charge.slice.then(|| hold::Sliced {
            route: ctx
                .route
                .as_ref()
                .map_or_else(String::new, |r| r.name.clone()),
            request_id: ctx.request_id.clone(),
        });
        let hold = hold::Hold::new(
            &charge.account_id,
            &charge.charge_id,
            &charge.action,
            rates,
            charge.cost,
            charge.remaining,
            snap.config.redis.lease_ttl_seconds * 1000,
            sliced,
        );
        if hold.sliced.is_none() {
            hold.start_keeper(Arc::clone(&self.state));
        }
        m.hold = Some(hold);
    }

    /// The body of a token-priced request is in: price it (model, max_tokens), take the hold,
    /// rewrite it where the route asks. Returns the body to forward (kept in the hold's phase
    /// for a retried upstream attempt; `early`: read whole in `request_filter`).
    pub(super) async fn reserve_with_body(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        body: Vec<u8>,
        early: bool,
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
        // Being priced: whatever happens next, the body is not buffered again.
        m.phase = HoldPhase::Held { forwarded: None };
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
                ticking: rates.per_tick != crate::money::Credits::ZERO,
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
            m.refund = Some(refund_policy::Failure::Refused);
            settle::finish_hold(&self.state, m, len, None, &ctx.request_id).await;
            return Err(GatewayError::InsufficientCredits {
                remaining: remaining.unwrap_or_default()
                    + ctx
                        .billing
                        .standing()
                        .map_or(Default::default(), |c| c.cost),
                required: rates.estimate(len, 1).map_err(overflow)?,
                tier: identity.tier.clone(),
            });
        }
        let forwarded = request
            .rewrite(cap, pricing.include_usage)
            .map_or_else(|| bytes::Bytes::from(body), bytes::Bytes::from);
        m.phase = HoldPhase::Held {
            forwarded: Some(Forwarded {
                body: forwarded.clone(),
                early,
            }),
        };
        Ok(forwarded)
    }

    /// The whole of `request_body_filter`: enforces the body limit as it streams, holds back a
    /// token-priced body until it is whole, then prices it and takes the hold.
    pub(super) async fn body_chunk(
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
        let buffered = match &mut m.phase {
            // Held up front (or settled): the body streams through untouched.
            HoldPhase::Held { forwarded: None } | HoldPhase::Settled { .. } => return Ok(()),
            HoldPhase::Held {
                forwarded: Some(sent),
            } => {
                // A retried upstream attempt: send what the first attempt sent.
                *body = if end_of_stream {
                    Some(sent.body.clone())
                } else {
                    Some(bytes::Bytes::new())
                };
                return Ok(());
            }
            HoldPhase::AwaitingBody { body: buffered, .. } => {
                if let Some(chunk) = body.take() {
                    buffered.extend_from_slice(&chunk);
                }
                if !end_of_stream {
                    // Held back until the whole body is in: nothing goes upstream yet.
                    *body = Some(bytes::Bytes::new());
                    return Ok(());
                }
                std::mem::take(buffered)
            }
        };
        let span = ctx.span.clone();
        match self
            .reserve_with_body(session, ctx, buffered, false)
            .instrument(span)
            .await
        {
            Ok(forwarded) => {
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
}
