//! `[tiers.*]`: limits, quotas, currency, features, and references to routes' actions and counts.

use super::*;

/// The longest `history_days` a tier may set (a century; keeps date arithmetic in range).
const MAX_HISTORY_DAYS: u32 = 36_500;

/// `[tiers.*]`: each tier, by name.
pub(super) fn tiers(raw: &raw::Config, p: &mut Problems) -> BTreeMap<String, Arc<TierConfig>> {
    // [tiers.*]
    let all_actions: BTreeSet<String> = raw
        .routes
        .iter()
        .map(|r| r.action.clone().unwrap_or_else(|| r.name.clone()))
        .collect();
    let all_counted: BTreeSet<&str> = raw
        .routes
        .iter()
        .flat_map(|r| r.counts.keys().map(String::as_str))
        .collect();
    let mut tiers = BTreeMap::new();
    for (name, t) in &raw.tiers {
        let f = format!("tiers.{name}");
        if !is_name(name) {
            p.add(&f, "tier names must be letters, digits, '_', '-', '.'");
        }
        if let MonthlyCredits::Limited(c) = t.monthly_credits {
            if c.is_negative() {
                p.add(format!("{f}.monthly_credits"), "must not be negative");
            }
        }
        for (field, v) in [
            ("requests_per_hour", t.requests_per_hour),
            ("requests_per_month", t.requests_per_month),
            ("max_request_mb", t.max_request_mb),
            ("max_concurrent", t.max_concurrent.map(u64::from)),
            ("rate_per_second", t.rate_per_second.map(u64::from)),
            ("tokens_per_month", t.tokens_per_month),
            ("max_keys", t.max_keys.map(u64::from)),
        ] {
            if v == Some(0) {
                p.add(
                    format!("{f}.{field}"),
                    "must be at least 1 (omit it for no limit)",
                );
            }
        }
        if let Some(days) = t.history_days {
            if !(1..=MAX_HISTORY_DAYS).contains(&days) {
                p.add(
                    format!("{f}.history_days"),
                    format!("must be between 1 and {MAX_HISTORY_DAYS} days (omit it to keep all history)"),
                );
            }
        }
        if let Some(low) = t.low_balance_credits {
            if low.is_negative() {
                p.add(format!("{f}.low_balance_credits"), "must not be negative");
            }
        }
        if !is_currency(&t.currency) {
            p.add(
                format!("{f}.currency"),
                "must be a lowercase ISO 4217 code such as \"usd\"",
            );
        }
        for (action, q) in &t.action_quotas {
            if !all_actions.contains(action) {
                p.add(
                    format!("{f}.action_quotas.{action}"),
                    format!("no route has action {action:?}"),
                );
            }
            if q.max_concurrent == Some(0) {
                p.add(
                    format!("{f}.action_quotas.{action}.max_concurrent"),
                    "must be at least 1 (omit it for no limit)",
                );
            }
        }
        for resource in t.limits.keys() {
            if !is_name(resource) {
                p.add(
                    format!("{f}.limits.{resource}"),
                    "resource names must be letters, digits, '_', '-', '.'",
                );
            } else if !all_counted.contains(resource.as_str()) {
                p.add(
                    format!("{f}.limits.{resource}"),
                    format!("no route counts {resource:?} (set counts = {{ {resource} = 1 }} on the route that creates one)"),
                );
            }
        }
        if t.setup_fee_cents.is_some() && raw.stripe.is_some() && t.stripe_setup_price_id.is_none()
        {
            p.add(
                format!("{f}.stripe_setup_price_id"),
                "a setup fee needs the Stripe price that charges it (a one-time price)",
            );
        }
        for (i, feature) in t.features.iter().enumerate() {
            if !is_name(feature) {
                p.add(
                    format!("{f}.features[{i}]"),
                    format!("{feature:?} is not a valid feature name"),
                );
            }
        }
        tiers.insert(
            name.clone(),
            Arc::new(TierConfig {
                name: name.clone(),
                raw: t.clone(),
            }),
        );
    }
    tiers
}
