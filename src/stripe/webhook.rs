//! What arrives at `POST /webhooks/stripe`, before anything is trusted: the `Stripe-Signature`
//! check on the raw body, and a lenient parse of the event (only the fields tollgate uses, so
//! a new Stripe API version with new or renamed fields elsewhere cannot break it).
//!
//! Stripe signs `"{t}.{raw body}"` with HMAC-SHA256 under the endpoint's secret and sends
//! `Stripe-Signature: t=1700000000,v1=<hex>[,v1=<hex>…][,v0=…]` (several `v1` while a secret is
//! being rolled). Any `v1` may match; comparisons are constant-time; `t` must be within the
//! tolerance of our clock, so a captured delivery cannot be replayed later.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Stripe's own default: signatures older (or newer) than this are refused.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    #[error("no v1 signature matches the payload")]
    NoMatch,
    #[error("signature timestamp is {0} s away from now (tolerance {TOLERANCE_SECS} s)")]
    Stale(i64),
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The hex HMAC-SHA256 of `"{timestamp}.{body}"`: Stripe's `v1` scheme (also used for the
/// alerts tollgate sends).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
}

/// A complete signature header: `t=…,v1=…`.
pub fn signature_header(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", sign(secret, timestamp, body))
}

/// Verifies a `Stripe-Signature` header against the raw body; returns the signed timestamp.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: i64,
) -> Result<i64, SignatureError> {
    let header = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(SignatureError::Malformed("expected key=value pairs"));
        };
        match key.trim() {
            "t" if timestamp.is_none() => {
                timestamp = Some(
                    value
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed("t is not a unix timestamp"))?,
                );
            }
            "t" => return Err(SignatureError::Malformed("more than one t")),
            "v1" => candidates.push(value.trim()),
            // v0 (test mode's legacy scheme) and future schemes are ignored.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no t"))?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    let expected = mac(secret, timestamp, body).finalize().into_bytes();
    // Every candidate is compared (no early exit), each in constant time.
    let mut matched = subtle::Choice::from(0u8);
    for candidate in candidates {
        if let Ok(bytes) = hex::decode(candidate) {
            if bytes.len() == expected.len() {
                matched |= bytes.as_slice().ct_eq(&expected[..]);
            }
        }
    }
    if !bool::from(matched) {
        return Err(SignatureError::NoMatch);
    }
    let age = now - timestamp;
    if age.abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale(age));
    }
    Ok(timestamp)
}

/// An event as tollgate reads it: the envelope and the object, everything else ignored.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub kind: String,
    /// Stripe's `created` (unix s): orders events about one object.
    pub created: i64,
    pub livemode: bool,
    pub object: Value,
}

/// Parses an event envelope leniently: `id`, `type`, `created` and `data.object` are required,
/// nothing else.
pub fn parse_event(body: &[u8]) -> Result<Event, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let id = str_at(&value, &["id"])
        .filter(|id| !id.is_empty() && id.len() <= 255)
        .ok_or("the event has no id")?
        .to_string();
    let kind = str_at(&value, &["type"])
        .filter(|t| !t.is_empty())
        .ok_or("the event has no type")?
        .to_string();
    let created = i64_at(&value, &["created"]).ok_or("the event has no created time")?;
    let object = value
        .get("data")
        .and_then(|d| d.get("object"))
        .filter(|o| o.is_object())
        .cloned()
        .ok_or("the event has no data.object")?;
    Ok(Event {
        id,
        kind,
        created,
        livemode: bool_at(&value, &["livemode"]).unwrap_or(false),
        object,
    })
}

/// The value at a path of object keys.
pub fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

pub fn i64_at(v: &Value, path: &[&str]) -> Option<i64> {
    at(v, path).and_then(Value::as_i64)
}

pub fn bool_at(v: &Value, path: &[&str]) -> Option<bool> {
    at(v, path).and_then(Value::as_bool)
}

/// An expandable reference: Stripe sends either the id or the expanded object with its `id`.
pub fn id_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let field = at(v, path)?;
    field
        .as_str()
        .or_else(|| field.get("id").and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret";

    #[test]
    fn a_signed_payload_verifies() {
        let body = br#"{"id":"evt_1"}"#;
        let header = signature_header(SECRET, 1_700_000_000, body);
        assert_eq!(
            verify(Some(&header), body, SECRET, 1_700_000_100),
            Ok(1_700_000_000)
        );
    }

    #[test]
    fn matches_an_independent_hmac() {
        // printf '1.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign(b"secret", 1, b"{}"),
            "1122767b193110cfec322b6f199b599edbf608ed087f2d27afb0b97d99523908"
        );
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let body = b"payload";
        let good = sign(SECRET, 100, body);
        let header = format!("t=100,v1={},v0=abc,v1={good}", "00".repeat(32));
        assert_eq!(verify(Some(&header), body, SECRET, 100), Ok(100));
    }

    #[test]
    fn forged_stale_and_malformed_headers_fail() {
        let body = b"payload";
        let good = signature_header(SECRET, 100, body);
        assert_eq!(
            verify(Some(&good), b"payload2", SECRET, 100),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(Some(&good), body, b"other", 100),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(Some(&good), body, SECRET, 100 + 301),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            verify(Some(&good), body, SECRET, 100 - 301),
            Err(SignatureError::Stale(-301))
        );
        assert_eq!(verify(Some(&good), body, SECRET, 400), Ok(100));
        assert_eq!(
            verify(None, body, SECRET, 100),
            Err(SignatureError::Missing)
        );
        assert!(matches!(
            verify(Some("garbage"), body, SECRET, 100),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(Some("t=abc,v1=00"), body, SECRET, 100),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(Some("t=100"), body, SECRET, 100),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            verify(Some("t=100,v1=zz"), body, SECRET, 100),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn events_parse_leniently() {
        let body = br#"{"id":"evt_1","type":"x.y","created":5,"data":{"object":{"id":"o","new_field":[1,2]}},"api_version":"2099-01-01.future","extra":{"deep":true}}"#;
        let e = parse_event(body).unwrap();
        assert_eq!(
            (e.id.as_str(), e.kind.as_str(), e.created),
            ("evt_1", "x.y", 5)
        );
        assert_eq!(str_at(&e.object, &["id"]), Some("o"));
        assert!(parse_event(b"not json").is_err());
        assert!(parse_event(br#"{"id":"evt_1","type":"x","created":1}"#).is_err());
        assert!(parse_event(br#"{"type":"x","created":1,"data":{"object":{}}}"#).is_err());
        assert!(parse_event(br#"[1,2]"#).is_err());
    }

    #[test]
    fn expandable_ids_are_read_either_way() {
        let v: Value = serde_json::json!({"a": "cus_1", "b": {"id": "cus_2"}, "c": null});
        assert_eq!(id_at(&v, &["a"]), Some("cus_1"));
        assert_eq!(id_at(&v, &["b"]), Some("cus_2"));
        assert_eq!(id_at(&v, &["c"]), None);
        assert_eq!(id_at(&v, &["d"]), None);
    }
}
