//! Phase 6 — metering the response as it passes: token usage read on the side from an
//! OpenAI-style JSON body (`usage.prompt_tokens` / `completion_tokens`), an Anthropic-style one
//! (`usage.input_tokens` / `output_tokens`), or an SSE stream chunk by chunk (the final events
//! carry the usage). The client's bytes are never held back: the meter only copies what it
//! needs, with a bound, and `response_body_filter` stays synchronous.

use std::sync::Arc;

use crate::error::GatewayError;
use crate::pricing::{estimate_input_tokens, started_ticks, Measured, Rates};
use crate::proxy::cut::WsFrames;
use crate::proxy::hold::Hold;
use crate::proxy::phase::HoldPhase;
use crate::proxy::refund_policy::Failure;

/// The metering state of a request on a `pricing` route, through all its phases.
#[derive(Debug, Default)]
pub struct Metered {
    /// Where the hold is: waiting for the body that prices it, held, or settled.
    pub phase: HoldPhase,
    pub rates: Option<Rates>,
    pub hold: Option<Arc<Hold>>,
    pub response: Option<UsageMeter>,
    /// The response body reached its end (the upstream finished it).
    pub complete: bool,
    pub ws: Option<WsFrames>,
    /// The cut (SSE error event / close frame) went out; the connection ends next.
    pub cut_sent: bool,
    /// A refusal decided after the request left `request_filter` (answered by fail_to_proxy).
    pub rejection: Option<GatewayError>,
    /// The refund policy applies (the whole hold goes back).
    pub refund: Option<Failure>,
}

impl Metered {
    /// What the request cost once settled (the access log and the trace report it).
    pub fn final_cost(&self) -> Option<crate::money::Credits> {
        match self.phase {
            HoldPhase::Settled { cost } => Some(cost),
            _ => None,
        }
    }

    /// The cost so far, from what the stream has shown: the input tokens reported (or
    /// estimated from the request's size), the output tokens reported or one per streamed
    /// event (OpenAI and Anthropic send about one token per event), the duration so far.
    pub fn running_cost(&self, body_bytes: u64) -> Option<crate::money::Credits> {
        let rates = self.rates?;
        let meter = self.response.as_ref()?;
        let usage = meter.so_far().unwrap_or_default();
        let input = if usage.input_tokens > 0 {
            usage.input_tokens
        } else {
            estimate_input_tokens(body_bytes)
        };
        let ticks = self.hold.as_ref().map_or(0, |h| {
            started_ticks(h.started.elapsed().as_millis() as u64, rates.tick_ms)
        });
        rates
            .cost(&Measured {
                input_tokens: input,
                output_tokens: usage.output_tokens.max(meter.events),
                request_body_bytes: body_bytes,
                ticks: if rates.per_tick == crate::money::Credits::ZERO {
                    0
                } else {
                    ticks.max(1)
                },
            })
            .ok()
    }
}

/// Token counts found in a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The largest JSON body copied for usage parsing; past it the body is still forwarded, and the
/// request is settled by the no-usage rule.
const MAX_JSON_COPY: usize = 8 * 1024 * 1024;
/// The longest SSE line kept while waiting for its end.
const MAX_SSE_LINE: usize = 1024 * 1024;

/// How the response body is read.
#[derive(Debug)]
enum Mode {
    Json { copy: Vec<u8>, overflow: bool },
    Sse { line: Vec<u8>, overflow: bool },
    Ignore,
}

/// Feeds on response body chunks; `finish` gives the usage when the body has ended.
#[derive(Debug)]
pub struct UsageMeter {
    mode: Mode,
    usage: Option<Usage>,
    /// SSE: `data:` events seen (a proxy for the amount streamed when no usage arrives).
    pub events: u64,
    pub bytes: u64,
}

impl UsageMeter {
    /// Chooses the parser from the response's content type.
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let mode = if ct.starts_with("text/event-stream") {
            Mode::Sse {
                line: Vec::new(),
                overflow: false,
            }
        } else if ct.contains("json") {
            Mode::Json {
                copy: Vec::new(),
                overflow: false,
            }
        } else {
            Mode::Ignore
        };
        UsageMeter {
            mode,
            usage: None,
            events: 0,
            bytes: 0,
        }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. })
    }

    /// The usage seen so far on a stream (Anthropic reports input tokens at the start).
    pub fn so_far(&self) -> Option<Usage> {
        self.usage
    }

    /// One chunk of the response body, as it goes to the client.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        match &mut self.mode {
            Mode::Json { copy, overflow } => {
                if !*overflow {
                    if copy.len() + chunk.len() > MAX_JSON_COPY {
                        *overflow = true;
                        copy.clear();
                    } else {
                        copy.extend_from_slice(chunk);
                    }
                }
            }
            Mode::Sse { line, overflow } => {
                let mut rest = chunk;
                while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
                    if !*overflow {
                        line.extend_from_slice(&rest[..pos]);
                        let complete = std::mem::take(line);
                        if let Some(u) = sse_line(&complete, &mut self.events) {
                            self.usage = Some(merge(self.usage, u));
                        }
                    }
                    *overflow = false;
                    line.clear();
                    rest = &rest[pos + 1..];
                }
                if !*overflow {
                    if line.len() + rest.len() > MAX_SSE_LINE {
                        *overflow = true;
                        line.clear();
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
            Mode::Ignore => {}
        }
    }

    /// The usage, once the body has ended (`None`: the response carried none).
    pub fn finish(&mut self) -> Option<Usage> {
        match &mut self.mode {
            Mode::Json { copy, overflow } if !*overflow => {
                let body = std::mem::take(copy);
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| usage_of(&v))
            }
            Mode::Sse { line, overflow } => {
                if !*overflow && !line.is_empty() {
                    let last = std::mem::take(line);
                    if let Some(u) = sse_line(&last, &mut self.events) {
                        self.usage = Some(merge(self.usage, u));
                    }
                }
                self.usage
            }
            _ => None,
        }
    }
}

/// Later events refine earlier ones: Anthropic sends input tokens in `message_start` and output
/// tokens in `message_delta`; OpenAI sends both in the last chunk.
fn merge(prev: Option<Usage>, next: Usage) -> Usage {
    match prev {
        None => next,
        Some(p) => Usage {
            input_tokens: next.input_tokens.max(p.input_tokens),
            output_tokens: next.output_tokens.max(p.output_tokens),
        },
    }
}

fn sse_line(line: &[u8], events: &mut u64) -> Option<Usage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let data = data.strip_prefix(b" ").unwrap_or(data);
    *events += 1;
    if data == b"[DONE]" || !contains(data, b"\"usage\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    usage_of(&v)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `usage` at the top level, or inside `message` (Anthropic's `message_start`).
fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let u = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.get("message").and_then(|m| m.get("usage")))?;
    let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
    let input = n("prompt_tokens").or_else(|| n("input_tokens"));
    let output = n("completion_tokens").or_else(|| n("output_tokens"));
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(Usage {
        input_tokens: input.unwrap_or(0),
        output_tokens: output.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_json() {
        let mut m = UsageMeter::for_content_type(Some("application/json; charset=utf-8"));
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        m.feed(&body[..20]);
        m.feed(&body[20..]);
        assert_eq!(
            m.finish(),
            Some(Usage {
                input_tokens: 12,
                output_tokens: 34
            })
        );
    }

    #[test]
    fn anthropic_json() {
        let mut m = UsageMeter::for_content_type(Some("application/json"));
        m.feed(br#"{"type":"message","usage":{"input_tokens":7,"output_tokens":9}}"#);
        assert_eq!(
            m.finish(),
            Some(Usage {
                input_tokens: 7,
                output_tokens: 9
            })
        );
    }

    #[test]
    fn openai_sse_split_anywhere() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n\
                      data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut m = UsageMeter::for_content_type(Some("text/event-stream"));
            m.feed(&stream.as_bytes()[..split]);
            m.feed(&stream.as_bytes()[split..]);
            assert_eq!(
                m.finish(),
                Some(Usage {
                    input_tokens: 5,
                    output_tokens: 2
                }),
                "split at {split}"
            );
            assert_eq!(m.events, 3);
        }
    }

    #[test]
    fn anthropic_sse_merges_start_and_delta() {
        let stream = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
                      event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"x\"}}\r\n\r\n\
                      event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        let mut m = UsageMeter::for_content_type(Some("text/event-stream"));
        m.feed(stream.as_bytes());
        assert_eq!(
            m.finish(),
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15
            })
        );
    }

    #[test]
    fn no_usage_and_junk() {
        let mut m = UsageMeter::for_content_type(Some("text/event-stream"));
        m.feed(b"data: {\"choices\":[]}\n\ndata: not json with \"usage\"\n\n");
        assert_eq!(m.finish(), None);
        let mut m = UsageMeter::for_content_type(Some("application/json"));
        m.feed(b"{\"usage\": 3}");
        assert_eq!(m.finish(), None);
        let mut m = UsageMeter::for_content_type(Some("text/plain"));
        m.feed(b"usage");
        assert_eq!(m.finish(), None);
    }
}
