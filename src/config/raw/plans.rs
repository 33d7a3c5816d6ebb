//! `[tiers.*]` and `[[credit_packs]]` as serde sees them.

use super::*;

/// `monthly_credits = 20` or `monthly_credits = "unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonthlyCredits {
    Limited(Credits),
    Unlimited,
}

impl<'de> Deserialize<'de> for MonthlyCredits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Credits(Credits),
            Text(String),
        }
        // Floats arrive as their literal text (see config::load), so strings are tried as
        // "unlimited" first and then as decimals.
        let value = serde_json::Value::deserialize(d)?;
        if value.as_str() == Some("unlimited") {
            return Ok(MonthlyCredits::Unlimited);
        }
        match serde_json::from_value::<Either>(value.clone()) {
            Ok(Either::Credits(c)) => Ok(MonthlyCredits::Limited(c)),
            Ok(Either::Text(t)) => Err(serde::de::Error::custom(format!(
                "{t:?} is neither a decimal number nor \"unlimited\""
            ))),
            Err(_) => Err(serde::de::Error::custom(format!(
                "{value} is neither a decimal number nor \"unlimited\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionQuota {
    #[serde(default)]
    pub per_hour: Option<u64>,
    #[serde(default)]
    pub per_month: Option<u64>,
    /// Requests of this action in flight per account (e.g. 1 open sandbox session), apart
    /// from the tier-wide `max_concurrent`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub monthly_credits: MonthlyCredits,
    #[serde(default)]
    pub requests_per_hour: Option<u64>,
    #[serde(default)]
    pub requests_per_month: Option<u64>,
    #[serde(default)]
    pub action_quotas: BTreeMap<String, ActionQuota>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub max_request_mb: Option<u64>,
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    #[serde(default)]
    pub low_balance_credits: Option<Credits>,
    /// Tokens (in + out, as settled on token-priced routes) per billing period.
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// Seats: active API keys an account of this tier may have (team members sharing one
    /// balance).
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Caps on resources the routes count (`counts`), e.g. `{ agents = 3 }`; a resource not
    /// listed is unlimited.
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// One-time setup fee added to the first subscription checkout (needs
    /// `stripe_setup_price_id` when Stripe is configured).
    #[serde(default)]
    pub setup_fee_cents: Option<u64>,
    #[serde(default)]
    pub stripe_setup_price_id: Option<String>,
    #[serde(default)]
    pub features: Vec<String>,
    /// Monthly list price, used to name "the cheapest tier that has it" and for reports.
    #[serde(default)]
    pub price_cents_monthly: Option<u64>,
    #[serde(default)]
    pub price_cents_yearly: Option<u64>,
    #[serde(default)]
    pub stripe_price_id_monthly: Option<String>,
    #[serde(default)]
    pub stripe_price_id_yearly: Option<String>,
    /// Currency of the list prices above.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Days of journal history the usage and history API show accounts of this tier; absent:
    /// all of it. When every tier has one, journal months older than the longest are rolled
    /// up and dropped (README: "Postgres at volume").
    #[serde(default)]
    pub history_days: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPack {
    pub id: String,
    pub credits: Credits,
    #[serde(default)]
    pub bonus_credits: Credits,
    pub price_cents: u64,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub stripe_price_id: Option<String>,
}

fn default_currency() -> String {
    "usd".into()
}
