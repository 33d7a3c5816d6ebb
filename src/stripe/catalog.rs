//! The catalogue as the config defines it: tiers with their monthly/yearly prices, credit packs.
//! Webhooks map a Stripe price back to a tier and interval through it.

use serde_json::{json, Value};

use crate::config::raw::CreditPack;
use crate::config::{Config, MonthlyCredits, TierConfig};
use crate::money::Credits;

/// A subscription's billing interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Month,
    Year,
}

impl Interval {
    /// `month`/`monthly`, `year`/`yearly`.
    pub fn parse(s: &str) -> Option<Interval> {
        match s {
            "month" | "monthly" => Some(Interval::Month),
            "year" | "yearly" => Some(Interval::Year),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Month => "month",
            Interval::Year => "year",
        }
    }
}

/// A tier's price for one interval, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPrice {
    pub stripe_price_id: Option<String>,
    pub amount_cents: Option<u64>,
    pub currency: String,
}

pub fn tier_price(tier: &TierConfig, interval: Interval) -> TierPrice {
    let (stripe_price_id, amount_cents) = match interval {
        Interval::Month => (tier.stripe_price_id_monthly(), tier.price_cents_monthly()),
        Interval::Year => (tier.stripe_price_id_yearly(), tier.price_cents_yearly()),
    };
    TierPrice {
        stripe_price_id: stripe_price_id.map(str::to_string),
        amount_cents,
        currency: tier.currency().to_string(),
    }
}

/// The tier and interval a Stripe price id sells (config validation keeps it unique).
pub fn tier_for_price<'a>(config: &'a Config, price_id: &str) -> Option<(&'a str, Interval)> {
    config.tiers.values().find_map(|t| {
        if t.stripe_price_id_monthly() == Some(price_id) {
            Some((t.name.as_str(), Interval::Month))
        } else if t.stripe_price_id_yearly() == Some(price_id) {
            Some((t.name.as_str(), Interval::Year))
        } else {
            None
        }
    })
}

pub fn pack<'a>(config: &'a Config, id: &str) -> Option<&'a CreditPack> {
    config.credit_packs.iter().find(|p| p.id == id)
}

/// Credits a pack puts into `purchased`: its credits plus its bonus.
pub fn pack_total(pack: &CreditPack) -> Credits {
    pack.credits + pack.bonus_credits
}

/// The tier's monthly credits; `None` = unlimited.
pub fn monthly(tier: &TierConfig) -> Option<Credits> {
    match tier.monthly_credits() {
        MonthlyCredits::Limited(c) => Some(c),
        MonthlyCredits::Unlimited => None,
    }
}

/// `GET /v1/catalog`: tiers (with both intervals' prices) and packs.
pub fn catalog_json(config: &Config) -> Value {
    let tiers: Vec<Value> = config
        .tiers
        .values()
        .map(|t| {
            let price = |interval| {
                let p = tier_price(t, interval);
                if p.stripe_price_id.is_none() && p.amount_cents.is_none() {
                    return Value::Null;
                }
                json!({
                    "amount_cents": p.amount_cents,
                    "currency": p.currency,
                    "stripe_price_id": p.stripe_price_id,
                    "purchasable": p.stripe_price_id.is_some(),
                })
            };
            json!({
                "id": t.name,
                "monthly_credits": match monthly(t) {
                    Some(c) => json!(c),
                    None => json!("unlimited"),
                },
                "features": t.features(),
                "low_balance_credits": t.low_balance_credits(),
                "prices": {"month": price(Interval::Month), "year": price(Interval::Year)},
                "default": config.stripe.as_ref().is_some_and(|s| s.default_tier == t.name),
            })
        })
        .collect();
    let packs: Vec<Value> = config
        .credit_packs
        .iter()
        .map(|p| {
            json!({
                "id": p.id,
                "credits": p.credits,
                "bonus_credits": p.bonus_credits,
                "total_credits": pack_total(p),
                "price_cents": p.price_cents,
                "currency": p.currency,
                "stripe_price_id": p.stripe_price_id,
            })
        })
        .collect();
    json!({
        "tiers": tiers,
        "credit_packs": packs,
        "checkout_enabled": config.stripe.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse() {
        assert_eq!(Interval::parse("month"), Some(Interval::Month));
        assert_eq!(Interval::parse("yearly"), Some(Interval::Year));
        assert_eq!(Interval::parse("week"), None);
    }
}
