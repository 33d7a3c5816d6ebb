//! `[stripe]`: secrets, URLs, timings, and price ids against the tiers and packs.

use super::*;

/// `[stripe]`: its settings with defaults, then [`validate_stripe`].
pub(super) fn stripe(
    raw: &raw::Config,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> Option<StripeConfig> {
    // [stripe]
    let stripe = raw.stripe.as_ref().map(|s| {
        if url::Url::parse(&s.api_base).is_err() {
            p.add("stripe.api_base", format!("{:?} is not a URL", s.api_base));
        }
        StripeConfig {
            secret_key: secret(&s.secret_key_env, "stripe.secret_key_env", env, missing),
            webhook_secret: secret(
                &s.webhook_secret_env,
                "stripe.webhook_secret_env",
                env,
                missing,
            ),
            api_base: s.api_base.trim_end_matches('/').to_string(),
            success_url: s
                .success_url
                .clone()
                .unwrap_or_else(|| "https://example.com/billing/success".into()),
            cancel_url: s
                .cancel_url
                .clone()
                .unwrap_or_else(|| "https://example.com/billing/cancel".into()),
            past_due_grace: Duration::from_secs(u64::from(s.past_due_grace_days) * 86_400),
            default_tier: s.default_tier.clone().unwrap_or_else(|| "free".into()),
            timeout: Duration::from_millis(s.timeout_ms),
            billing_portal: s.billing_portal,
        }
    });
    if let (Some(s), Some(config)) = (&raw.stripe, &stripe) {
        validate_stripe(raw, s, config, p);
    }
    stripe
}

/// `[stripe]` against the tiers and packs: the default tier exists, every Stripe price id is
/// well formed and names one tier/interval or one pack (a webhook maps a price back to a tier).
fn validate_stripe(raw: &raw::Config, s: &raw::Stripe, config: &StripeConfig, p: &mut Problems) {
    if !raw.tiers.contains_key(&config.default_tier) {
        match &s.default_tier {
            Some(t) => p.add("stripe.default_tier", format!("no tier named {t:?}")),
            None => p.add(
                "stripe.default_tier",
                "set the tier accounts return to when their subscription ends (there is no tier named \"free\")",
            ),
        }
    }
    if s.past_due_grace_days > 365 {
        p.add("stripe.past_due_grace_days", "must be at most 365");
    }
    if !(100..=120_000).contains(&s.timeout_ms) {
        p.add("stripe.timeout_ms", "must be between 100 and 120000");
    }
    for (field, value) in [
        ("success_url", &s.success_url),
        ("cancel_url", &s.cancel_url),
    ] {
        if let Some(v) = value {
            if url::Url::parse(v).is_err() {
                p.add(format!("stripe.{field}"), format!("{v:?} is not a URL"));
            }
        }
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut price = |field: String, id: &Option<String>, p: &mut Problems| {
        let Some(id) = id else { return };
        if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            p.add(&field, format!("{id:?} is not a Stripe price id"));
        } else if let Some(other) = seen.get(id.as_str()) {
            p.add(&field, format!("price {id:?} is already used by {other}"));
        } else {
            seen.insert(id.clone(), field);
        }
    };
    for (name, t) in &raw.tiers {
        price(
            format!("tiers.{name}.stripe_price_id_monthly"),
            &t.stripe_price_id_monthly,
            p,
        );
        price(
            format!("tiers.{name}.stripe_price_id_yearly"),
            &t.stripe_price_id_yearly,
            p,
        );
    }
    for (i, pack) in raw.credit_packs.iter().enumerate() {
        price(
            format!("credit_packs[{i}].stripe_price_id"),
            &pack.stripe_price_id,
            p,
        );
    }
}
