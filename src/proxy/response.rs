//! The response on its way back: the credit headers (`X-Credits-*`), the usage meter fed
//! chunk by chunk, and the cut of a stream whose balance ran out.

use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::{cut, meter, refund_policy, Gateway, RequestCtx};

impl Gateway {
    pub(super) async fn credit_headers(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        let (Some(charge), Some(route)) = (ctx.billing.standing(), &ctx.route) else {
            return Ok(());
        };
        let refund = status >= 500
            && refund_policy::should_refund(route, Some(refund_policy::Failure::Upstream5xx));
        if let Some(m) = ctx.metered.as_mut() {
            if refund {
                m.refund = Some(refund_policy::Failure::Upstream5xx);
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

    pub(super) fn meter_chunk(
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
}
