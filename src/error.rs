//! The error policy, in one place: every error tollgate answers on the proxy listener is a
//! variant here, with one HTTP status and one stable `error` code. Bodies are JSON
//! `{"error": CODE, "message": TEXT, ...details}`; clients branch on `error`, humans read
//! `message`. Nothing here carries a credential.

use serde_json::{json, Map, Value};

use crate::money::Credits;

/// `1 credit`, `0.5 credits`, `2 credits`: the message is read by people.
fn credits_amount(c: Credits) -> String {
    if c.micros() == crate::money::MICROS_PER_CREDIT {
        "1 credit".into()
    } else {
        format!("{c} credits")
    }
}

/// `Retry-After` of a 503 `auth_keys_unavailable` (the JWKS is retried about this often).
const AUTH_KEYS_RETRY_AFTER_SECS: u64 = 5;

/// Every [`GatewayError::code`], once each: the OpenAPI document's enum and the request
/// outcome labels are built from it.
pub const CODES: [&str; 17] = [
    "route_not_found",
    "missing_credentials",
    "invalid_credentials",
    "account_inactive",
    "feature_not_in_tier",
    "insufficient_credits",
    "rate_limited",
    "quota_exceeded",
    "payload_too_large",
    "metering_unavailable",
    "auth_keys_unavailable",
    "model_not_priced",
    "invalid_request",
    "limit_reached",
    "upstream_unavailable",
    "upstream_timeout",
    "internal_error",
];

/// Errors the proxy answers itself instead of forwarding.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {path}")]
    RouteNotFound { method: String, path: String },

    #[error("send an API key as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY', or a JWT")]
    MissingCredentials,

    #[error("the credentials are not valid")]
    InvalidCredentials,

    #[error("this account is {status}")]
    AccountInactive { status: String },

    #[error("the {tier} tier does not include {feature:?}")]
    FeatureNotInTier {
        feature: String,
        tier: String,
        required_tier: Option<String>,
    },

    #[error(
        "this request costs {} and the balance is {remaining}",
        credits_amount(*.required)
    )]
    InsufficientCredits {
        remaining: Credits,
        required: Credits,
        tier: String,
    },

    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited {
        retry_after_secs: u64,
        limit: u64,
        window_secs: u64,
    },

    #[error("the {quota} quota of {limit} requests is used up; it resets in {retry_after_secs} s")]
    QuotaExceeded {
        quota: String,
        limit: u64,
        window_secs: u64,
        retry_after_secs: u64,
    },

    #[error("too many requests in flight for this account (limit {limit})")]
    ConcurrencyLimited { limit: u32 },

    #[error("the request body is larger than the {limit_mb} MB this tier allows")]
    PayloadTooLarge { limit_mb: u64 },

    #[error("metering is unavailable; the request was not forwarded")]
    MeteringUnavailable,

    /// A JWT's signing keys come from a JWKS that has not been loaded since the start (the
    /// identity provider is unreachable): the token cannot be judged either way, so it is not
    /// called invalid; the client retries.
    #[error("the keys to verify this token are not available yet; retry shortly")]
    AuthKeysUnavailable,

    #[error("{}", model_note(.model.as_deref()))]
    ModelNotPriced { model: Option<String> },

    #[error("{reason}")]
    BadRequest { reason: String },

    #[error("the {tier} tier allows {limit} {resource}; remove one or upgrade")]
    LimitReached {
        resource: String,
        limit: u64,
        tier: String,
        required_tier: Option<String>,
    },

    #[error("the upstream could not be reached{}", refund_note(*.refunded))]
    UpstreamUnavailable { refunded: bool },

    #[error("the upstream did not answer in time{}", refund_note(*.refunded))]
    UpstreamTimeout { refunded: bool },

    #[error("internal error")]
    Internal,
}

fn model_note(model: Option<&str>) -> String {
    match model {
        Some(m) => format!("model {m:?} has no price on this route"),
        None => "this route prices by model: name one in the JSON body's \"model\"".to_string(),
    }
}

fn refund_note(refunded: bool) -> &'static str {
    if refunded {
        "; the charge was refunded"
    } else {
        ""
    }
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::RouteNotFound { .. } => 404,
            GatewayError::MissingCredentials | GatewayError::InvalidCredentials => 401,
            GatewayError::AccountInactive { .. }
            | GatewayError::FeatureNotInTier { .. }
            | GatewayError::LimitReached { .. } => 403,
            GatewayError::InsufficientCredits { .. } => 402,
            GatewayError::RateLimited { .. }
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::ConcurrencyLimited { .. } => 429,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::MeteringUnavailable | GatewayError::AuthKeysUnavailable => 503,
            GatewayError::ModelNotPriced { .. } | GatewayError::BadRequest { .. } => 400,
            GatewayError::UpstreamUnavailable { .. } => 502,
            GatewayError::UpstreamTimeout { .. } => 504,
            GatewayError::Internal => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::RouteNotFound { .. } => "route_not_found",
            GatewayError::MissingCredentials => "missing_credentials",
            GatewayError::InvalidCredentials => "invalid_credentials",
            GatewayError::AccountInactive { .. } => "account_inactive",
            GatewayError::FeatureNotInTier { .. } => "feature_not_in_tier",
            GatewayError::InsufficientCredits { .. } => "insufficient_credits",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::QuotaExceeded { .. } => "quota_exceeded",
            GatewayError::ConcurrencyLimited { .. } => "rate_limited",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::MeteringUnavailable => "metering_unavailable",
            GatewayError::AuthKeysUnavailable => "auth_keys_unavailable",
            GatewayError::ModelNotPriced { .. } => "model_not_priced",
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::LimitReached { .. } => "limit_reached",
            GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::Internal => "internal_error",
        }
    }

    /// The JSON body: `error`, `message`, and the variant's details.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("error".into(), json!(self.code()));
        body.insert("message".into(), json!(self.to_string()));
        match self {
            GatewayError::FeatureNotInTier {
                feature,
                tier,
                required_tier,
            } => {
                body.insert("feature".into(), json!(feature));
                body.insert("tier".into(), json!(tier));
                body.insert("required_tier".into(), json!(required_tier));
            }
            GatewayError::InsufficientCredits {
                remaining,
                required,
                tier,
            } => {
                body.insert("credits_remaining".into(), json!(remaining));
                body.insert("credits_required".into(), json!(required));
                body.insert("tier".into(), json!(tier));
                body.insert(
                    "top_up".into(),
                    json!("buy a credit pack or upgrade the tier: POST /v1/checkout/credit-packs or /v1/checkout/subscriptions on the billing API"),
                );
            }
            GatewayError::RateLimited {
                retry_after_secs, ..
            }
            | GatewayError::QuotaExceeded {
                retry_after_secs, ..
            } => {
                body.insert("retry_after".into(), json!(retry_after_secs));
                if let GatewayError::QuotaExceeded { quota, limit, .. } = self {
                    body.insert("quota".into(), json!(quota));
                    body.insert("limit".into(), json!(limit));
                }
            }
            GatewayError::ConcurrencyLimited { limit } => {
                body.insert("limit".into(), json!(limit));
                body.insert("retry_after".into(), json!(1));
            }
            GatewayError::AuthKeysUnavailable => {
                body.insert("retry_after".into(), json!(AUTH_KEYS_RETRY_AFTER_SECS));
            }
            GatewayError::UpstreamUnavailable { refunded }
            | GatewayError::UpstreamTimeout { refunded } => {
                body.insert("refunded".into(), json!(refunded));
            }
            GatewayError::PayloadTooLarge { limit_mb } => {
                body.insert("limit_mb".into(), json!(limit_mb));
            }
            GatewayError::AccountInactive { status } => {
                body.insert("status".into(), json!(status));
            }
            GatewayError::ModelNotPriced { model } => {
                body.insert("model".into(), json!(model));
            }
            GatewayError::LimitReached {
                resource,
                limit,
                tier,
                required_tier,
            } => {
                body.insert("resource".into(), json!(resource));
                body.insert("limit".into(), json!(limit));
                body.insert("tier".into(), json!(tier));
                body.insert("required_tier".into(), json!(required_tier));
            }
            _ => {}
        }
        Value::Object(body)
    }

    /// Extra response headers: `Retry-After` and the IETF draft `RateLimit` fields on 429.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            GatewayError::RateLimited {
                retry_after_secs,
                limit,
                window_secs,
            }
            | GatewayError::QuotaExceeded {
                retry_after_secs,
                limit,
                window_secs,
                ..
            } => vec![
                ("retry-after", retry_after_secs.to_string()),
                ("ratelimit-policy", format!("{limit};w={window_secs}")),
                (
                    "ratelimit",
                    format!("limit={limit}, remaining=0, reset={retry_after_secs}"),
                ),
            ],
            GatewayError::ConcurrencyLimited { .. } => vec![("retry-after", "1".into())],
            GatewayError::AuthKeysUnavailable => {
                vec![("retry-after", AUTH_KEYS_RETRY_AFTER_SECS.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_stable_code_and_status() {
        let e = GatewayError::InsufficientCredits {
            remaining: Credits::parse("0.3").unwrap(),
            required: Credits::parse("1").unwrap(),
            tier: "free".into(),
        };
        assert_eq!(e.status(), 402);
        let body = e.body();
        assert_eq!(body["error"], "insufficient_credits");
        assert_eq!(body["credits_remaining"].to_string(), "0.3");
        assert_eq!(body["credits_required"].to_string(), "1");
        assert_eq!(body["tier"], "free");
        assert_eq!(
            body["message"],
            "this request costs 1 credit and the balance is 0.3"
        );
        let two = GatewayError::InsufficientCredits {
            remaining: Credits::parse("1.5").unwrap(),
            required: Credits::parse("2").unwrap(),
            tier: "free".into(),
        };
        assert_eq!(
            two.to_string(),
            "this request costs 2 credits and the balance is 1.5"
        );
    }

    #[test]
    fn rate_limits_carry_retry_after() {
        let e = GatewayError::QuotaExceeded {
            quota: "requests_per_hour".into(),
            limit: 10,
            window_secs: 3600,
            retry_after_secs: 42,
        };
        assert_eq!(e.status(), 429);
        let h = e.headers();
        assert!(h.contains(&("retry-after", "42".into())));
        assert!(h.contains(&("ratelimit-policy", "10;w=3600".into())));
    }
}
