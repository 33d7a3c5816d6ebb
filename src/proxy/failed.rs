//! A request that could not be proxied (`fail_to_proxy`): a refusal decided once the body was
//! read, a body over the tier's limit, a connect error or a timeout — what the caller is told
//! and whether the charge goes back (the route's refund policy, [`super::refund_policy`]).

use pingora::proxy::{FailToProxy, Session};

use super::{gate, refund_policy, respond, settle, upstream, Gateway, RequestCtx};
use crate::error::GatewayError;

impl Gateway {
    pub(super) async fn proxy_failed(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let Some(err) = ctx.metered.as_mut().and_then(|m| m.rejection.take()) {
            // Refused once the body was read (402, 400 model_not_priced, 429, ...).
            ctx.outcome = err.code();
            if session.response_written().is_none() {
                answer(session, &err, &ctx.request_id).await;
            }
            return FailToProxy {
                error_code: err.status(),
                can_reuse_downstream: false,
            };
        }
        if e.etype() == &pingora::ErrorType::HTTPStatus(413) {
            if let Some(m) = ctx.metered.as_mut() {
                // Our own refusal: the caller never got the service, whatever the policy.
                m.refund = Some(refund_policy::Failure::Refused);
                settle::finish_hold(&self.state, m, ctx.body_bytes, None, &ctx.request_id).await;
                ctx.billing.mark_refunded();
            }
            if let Some(route) = &ctx.route {
                if ctx.billing.mark_refunded() {
                    if let Some(charge) = ctx.billing.charge() {
                        // Our own refusal: the caller never got the service, whatever the policy.
                        settle::refund(
                            &self.state,
                            route,
                            charge,
                            &ctx.request_id,
                            refund_policy::Failure::Refused,
                        )
                        .await;
                    }
                }
            }
            let limit_mb = ctx.max_body_bytes.unwrap_or(0) / gate::BYTES_PER_MB;
            let err = GatewayError::PayloadTooLarge { limit_mb };
            ctx.outcome = err.code();
            if session.response_written().is_none() {
                answer(session, &err, &ctx.request_id).await;
            }
            return FailToProxy {
                error_code: 413,
                can_reuse_downstream: false,
            };
        }
        let failure = if upstream::is_timeout(e) {
            Some(refund_policy::Failure::Timeout)
        } else if upstream::is_connect_error(e) {
            Some(refund_policy::Failure::ConnectError)
        } else {
            None
        };
        // Nothing charged yet (a token-priced route holds only once its body is read, which
        // never happened): the caller keeps every credit, which the body says as `refunded`.
        let mut refunded = ctx.billing.is_free() && ctx.metered.is_some();
        if let (Some(route), Some(failure)) = (&ctx.route, failure) {
            if ctx.billing.standing().is_some()
                && refund_policy::should_refund(route, Some(failure))
            {
                ctx.billing.mark_refunded();
                if let Some(m) = ctx.metered.as_mut().filter(|m| m.hold.is_some()) {
                    m.refund = Some(failure);
                    settle::finish_hold(&self.state, m, ctx.body_bytes, None, &ctx.request_id)
                        .await;
                    refunded = true;
                } else if let Some(charge) = ctx.billing.charge() {
                    refunded =
                        settle::refund(&self.state, route, charge, &ctx.request_id, failure).await;
                }
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
                answer(session, err, &ctx.request_id).await;
                err.status()
            }
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// Writes tollgate's own error answer and closes the connection; a client already gone is
/// only logged.
async fn answer(session: &mut Session, err: &GatewayError, request_id: &str) {
    if let Err(write_err) = respond::error_and_close(session, err, request_id).await {
        tracing::debug!(error = %write_err, "could not send the error response");
    }
}
