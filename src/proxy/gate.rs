//! Phase 3 — may this caller make this request at all, before any credit moves: account
//! status, the tier's features (403 naming the cheapest tier that has the feature), the per-key
//! burst rate (governor, per instance) and the body size (413).

use pingora::proxy::Session;

pub use crate::routing::limits::RateLimiters;

use crate::auth::Identity;
use crate::config::{Config, MonthlyCredits, RouteConfig, TierConfig};
use crate::error::GatewayError;

/// The cheapest tier (by monthly list price, then monthly credits; tiers without a list price
/// last) listing `feature`.
pub fn cheapest_tier_with(config: &Config, feature: &str) -> Option<String> {
    cheapest_tier(config, |t| t.has_feature(feature))
}

/// The cheapest tier passing `fits`, as an upgrade suggestion: by monthly list price (tiers
/// without one — custom enterprise deals — after priced ones), then monthly credits, then name.
pub fn cheapest_tier(config: &Config, fits: impl Fn(&TierConfig) -> bool) -> Option<String> {
    config
        .tiers
        .values()
        .filter(|t| fits(t))
        .min_by_key(|t| {
            let credits = match t.monthly_credits() {
                MonthlyCredits::Limited(c) => c.micros(),
                MonthlyCredits::Unlimited => i64::MAX,
            };
            (
                t.price_cents_monthly().is_none(),
                t.price_cents_monthly().unwrap_or(0),
                credits,
                t.name.clone(),
            )
        })
        .map(|t| t.name.clone())
}

/// "MB" in limits means MiB, as in prices.
pub use crate::pricing::BYTES_PER_MB;

/// Runs every gate; the first that refuses answers.
pub fn check(
    config: &Config,
    limiters: &RateLimiters,
    route: &RouteConfig,
    identity: &Identity,
    tier: &TierConfig,
    session: &Session,
) -> Result<(), GatewayError> {
    if identity.status != "active" {
        return Err(GatewayError::AccountInactive {
            status: identity.status.clone(),
        });
    }
    if let Some(feature) = &route.feature {
        if !tier.has_feature(feature) {
            return Err(GatewayError::FeatureNotInTier {
                feature: feature.clone(),
                tier: tier.name.clone(),
                required_tier: cheapest_tier_with(config, feature),
            });
        }
    }
    let rate_key = identity.key_id.as_deref().unwrap_or(&identity.account_id);
    limiters.check(&tier.name, rate_key).map_err(|e| match e {
        GatewayError::RateLimited {
            retry_after_secs,
            window_secs,
            ..
        } => GatewayError::RateLimited {
            retry_after_secs,
            limit: u64::from(tier.rate_per_second().unwrap_or(0)),
            window_secs,
        },
        other => other,
    })?;
    if let Some(limit_mb) = tier.max_request_mb() {
        if let Some(len) = content_length(session) {
            if len > limit_mb.saturating_mul(BYTES_PER_MB) {
                return Err(GatewayError::PayloadTooLarge { limit_mb });
            }
        }
    }
    Ok(())
}

pub fn content_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tiers: &str) -> Config {
        crate::config::for_tests(&format!(
            "[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\ncost = 1\n{tiers}\n"
        ))
    }

    #[test]
    fn a_reload_keeps_the_limiter_of_a_tier_whose_rate_did_not_change() {
        let tiers = "[tiers.a]\nmonthly_credits = 5\nrate_per_second = 1\n[tiers.b]\nmonthly_credits = 5\nrate_per_second = 1\n";
        let old = RateLimiters::new(&config(tiers));
        // Both tiers spend their one request of this second.
        assert!(old.check("a", "k").is_ok() && old.check("b", "k").is_ok());
        assert!(old.check("a", "k").is_err() && old.check("b", "k").is_err());
        let reloaded = config(&tiers.replace(
            "[tiers.b]\nmonthly_credits = 5\nrate_per_second = 1",
            "[tiers.b]\nmonthly_credits = 5\nrate_per_second = 2",
        ));
        let new = RateLimiters::carried_over(Some(&old), &reloaded);
        // `a` kept its rate and its limiter: still spent. `b` changed: a fresh limiter.
        assert!(new.check("a", "k").is_err());
        assert!(new.check("b", "k").is_ok());
    }

    #[test]
    fn the_upgrade_suggestion_is_the_cheapest_tier_with_the_feature() {
        let c = config(
            r#"
[tiers.free]
monthly_credits = 5
features = ["chat"]
[tiers.team]
monthly_credits = 500
price_cents_monthly = 9900
features = ["chat", "images"]
[tiers.pro]
monthly_credits = 100
price_cents_monthly = 2900
features = ["chat", "images"]
[tiers.enterprise]
monthly_credits = "unlimited"
features = ["chat", "images", "audit"]
[tiers.starter]
monthly_credits = 50
price_cents_monthly = 2900
features = ["images"]
"#,
        );
        // By list price, then monthly credits: starter and pro cost the same, starter has fewer.
        assert_eq!(cheapest_tier_with(&c, "images").as_deref(), Some("starter"));
        // Tiers without a list price (custom deals) come after every priced one.
        assert_eq!(cheapest_tier_with(&c, "chat").as_deref(), Some("pro"));
        assert_eq!(
            cheapest_tier_with(&c, "audit").as_deref(),
            Some("enterprise")
        );
        assert_eq!(cheapest_tier_with(&c, "video"), None);
    }
}
