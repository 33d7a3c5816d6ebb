//! A validated tier: its settings through accessors, so code outside `config` does not depend
//! on the shape of the TOML (`raw::Tier`).

use std::collections::BTreeMap;

use super::raw;
use super::MonthlyCredits;
use crate::money::Credits;

#[derive(Debug, Clone)]
pub struct TierConfig {
    pub name: String,
    /// The tier as parsed (checked by validation); outside `config`, read through the
    /// accessors below.
    pub(super) raw: raw::Tier,
}

impl TierConfig {
    /// Days of history the usage and history API show this tier's accounts (`None`: all).
    pub fn history_days(&self) -> Option<u32> {
        self.raw.history_days
    }

    /// Whether the tier lists `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.raw.features.iter().any(|f| f == feature)
    }

    /// Credits granted each billing period, or unlimited.
    pub fn monthly_credits(&self) -> MonthlyCredits {
        self.raw.monthly_credits
    }

    pub fn requests_per_hour(&self) -> Option<u64> {
        self.raw.requests_per_hour
    }

    pub fn requests_per_month(&self) -> Option<u64> {
        self.raw.requests_per_month
    }

    /// Quotas per route action.
    pub fn action_quotas(&self) -> &BTreeMap<String, raw::ActionQuota> {
        &self.raw.action_quotas
    }

    pub fn max_concurrent(&self) -> Option<u32> {
        self.raw.max_concurrent
    }

    pub fn max_request_mb(&self) -> Option<u64> {
        self.raw.max_request_mb
    }

    pub fn rate_per_second(&self) -> Option<u32> {
        self.raw.rate_per_second
    }

    /// Below this balance the account is warned (alerts, portal).
    pub fn low_balance_credits(&self) -> Option<Credits> {
        self.raw.low_balance_credits
    }

    pub fn tokens_per_month(&self) -> Option<u64> {
        self.raw.tokens_per_month
    }

    /// Seats: active API keys an account may have.
    pub fn max_keys(&self) -> Option<u32> {
        self.raw.max_keys
    }

    /// Caps on counted resources; a resource not listed is unlimited.
    pub fn limits(&self) -> &BTreeMap<String, u64> {
        &self.raw.limits
    }

    pub fn setup_fee_cents(&self) -> Option<u64> {
        self.raw.setup_fee_cents
    }

    pub fn stripe_setup_price_id(&self) -> Option<&str> {
        self.raw.stripe_setup_price_id.as_deref()
    }

    pub fn features(&self) -> &[String] {
        &self.raw.features
    }

    pub fn price_cents_monthly(&self) -> Option<u64> {
        self.raw.price_cents_monthly
    }

    pub fn price_cents_yearly(&self) -> Option<u64> {
        self.raw.price_cents_yearly
    }

    pub fn stripe_price_id_monthly(&self) -> Option<&str> {
        self.raw.stripe_price_id_monthly.as_deref()
    }

    pub fn stripe_price_id_yearly(&self) -> Option<&str> {
        self.raw.stripe_price_id_yearly.as_deref()
    }

    /// Currency of the list prices (lowercase ISO 4217).
    pub fn currency(&self) -> &str {
        &self.raw.currency
    }
}
