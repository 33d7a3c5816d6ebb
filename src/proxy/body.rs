//! The request body of a token-priced route: read whole (bounded) before the debit, because
//! the price depends on it (the `model`, the `max_tokens` to estimate or cap), and rewritten
//! where the route asks: `max_tokens` lowered to what the balance pays for, and
//! `stream_options.include_usage` added so that streams report their usage.

use serde_json::{Map, Value};

/// Bodies up to this size (declared by Content-Length) are read before the upstream is
/// contacted: Pingora's retry buffer, which then replays them upstream, holds 64 KiB.
pub const EARLY_READ_MAX: u64 = 64 * 1024;

/// The most a token-priced request body may be when the tier sets no `max_request_mb`.
pub const DEFAULT_MAX_BUFFERED: u64 = 32 * 1024 * 1024;

/// What the pricing needs from an AI request.
#[derive(Debug, Default)]
pub struct AiRequest {
    pub model: Option<String>,
    /// `max_completion_tokens` (OpenAI's current name) or `max_tokens`.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    json: Option<Map<String, Value>>,
}

impl AiRequest {
    /// Reads a JSON object body; anything else (not JSON, not an object) is forwarded as it is
    /// and priced at the route's own prices.
    pub fn inspect(body: &[u8]) -> AiRequest {
        let Ok(Value::Object(json)) = serde_json::from_slice::<Value>(body) else {
            return AiRequest::default();
        };
        let max_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| json.get(*k).and_then(Value::as_u64));
        AiRequest {
            model: json
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string),
            max_tokens,
            stream: json.get("stream") == Some(&Value::Bool(true)),
            json: Some(json),
        }
    }

    /// Applies the route's rewrites; `Some(body)` when the body changed.
    /// `cap`: the most output tokens the hold pays for. `include_usage`: ask a stream for usage.
    pub fn rewrite(&mut self, cap: Option<u64>, include_usage: bool) -> Option<Vec<u8>> {
        let json = self.json.as_mut()?;
        let mut changed = false;
        if let Some(cap) = cap {
            if self.max_tokens.is_none_or(|m| m > cap) {
                let field = if json.contains_key("max_completion_tokens") {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                json.insert(field.to_string(), Value::from(cap));
                self.max_tokens = Some(cap);
                changed = true;
            }
        }
        if include_usage && self.stream {
            let options = json
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                if options.get("include_usage") != Some(&Value::Bool(true)) {
                    options.insert("include_usage".to_string(), Value::Bool(true));
                    changed = true;
                }
            }
        }
        if !changed {
            return None;
        }
        serde_json::to_vec(json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_tokens_and_stream() {
        let r = AiRequest::inspect(br#"{"model":"gpt-4o","max_tokens":300,"stream":true}"#);
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.max_tokens, Some(300));
        assert!(r.stream);
        let r = AiRequest::inspect(br#"{"max_completion_tokens":7,"max_tokens":9}"#);
        assert_eq!(r.max_tokens, Some(7));
        let r = AiRequest::inspect(b"not json");
        assert_eq!(r.model, None);
        assert!(!r.stream);
    }

    #[test]
    fn caps_and_asks_for_usage() {
        let mut r = AiRequest::inspect(br#"{"model":"m","max_tokens":300,"stream":true}"#);
        let body = r.rewrite(Some(100), true).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["max_tokens"], 100);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        // Under the cap and already asking: nothing to change.
        let mut r = AiRequest::inspect(
            br#"{"max_tokens":50,"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        assert_eq!(r.rewrite(Some(100), true), None);

        // No max_tokens at all: the cap is added; the newer field name is kept when used.
        let mut r = AiRequest::inspect(br#"{"messages":[]}"#);
        let v: Value = serde_json::from_slice(&r.rewrite(Some(10), true).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 10);
        assert!(v.get("stream_options").is_none());
        let mut r = AiRequest::inspect(br#"{"max_completion_tokens":500}"#);
        let v: Value = serde_json::from_slice(&r.rewrite(Some(10), false).unwrap()).unwrap();
        assert_eq!(v["max_completion_tokens"], 10);
        assert!(v.get("max_tokens").is_none());
    }

    #[test]
    fn non_json_is_never_rewritten() {
        let mut r = AiRequest::inspect(b"\x00\x01binary");
        assert_eq!(r.rewrite(Some(1), true), None);
    }
}
