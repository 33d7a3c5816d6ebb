//! Checks every field and every reference of a parsed config, collecting all problems.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::raw;
use super::*;

/// The longest `history_days` a tier may set (a century; keeps date arithmetic in range).
const MAX_HISTORY_DAYS: u32 = 36_500;

/// Collects problems as `field: reason` lines.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: impl std::fmt::Display, reason: impl std::fmt::Display) {
        self.0.push(format!("{field}: {reason}"));
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Replaces `${VAR}` from the environment; a missing variable is reported once per use.
fn substitute(
    value: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    problems: &mut Problems,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    problems.add(
                        field,
                        format!("${{{name}}} is not a valid variable reference"),
                    );
                } else {
                    match env(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            missing.push(format!("{field}: environment variable {name} is not set"))
                        }
                    }
                }
                rest = &after[end + 1..];
            }
            None => {
                problems.add(field, "unterminated ${ in value");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `${VAR}` names in `value` that the environment does not set.
fn unset_vars(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if !name.is_empty() && env(name).is_none() && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        rest = &after[end + 1..];
    }
    names
}

fn secret(
    env_name: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) -> Option<String> {
    match env(env_name) {
        Some(v) if !v.is_empty() => Some(v),
        _ => {
            missing.push(format!(
                "{field}: environment variable {env_name} is not set"
            ));
            None
        }
    }
}

fn addr(field: &str, value: &str, p: &mut Problems) -> SocketAddr {
    match value.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            p.add(field, format!("{value:?} is not an address (ip:port)"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    }
}

pub(super) fn validate(
    raw: raw::Config,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<String>> {
    let mut p = Problems(Vec::new());
    let mut missing = Vec::new();

    // [server]
    let server = ServerConfig {
        listen: addr("server.listen", &raw.server.listen, &mut p),
        admin_listen: addr("server.admin_listen", &raw.server.admin_listen, &mut p),
        metrics_listen: addr("server.metrics_listen", &raw.server.metrics_listen, &mut p),
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_seconds),
        threads: raw.server.threads,
    };
    if raw.server.threads > 1024 {
        p.add("server.threads", "must be at most 1024");
    }

    // [redis]
    let mut redis = raw.redis.clone();
    redis.url = substitute(&redis.url, "redis.url", env, &mut missing, &mut p);
    // One server (redis://, rediss://, unix) or a cluster (redis+cluster://host:port,…).
    if !raw.redis.url.contains("${") {
        match url::Url::parse(&redis.url) {
            Ok(u)
                if !matches!(
                    u.scheme(),
                    "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" | "rediss+cluster"
                ) =>
            {
                p.add(
                    "redis.url",
                    format!(
                        "scheme {:?} is not redis://, rediss:// or redis+cluster://",
                        u.scheme()
                    ),
                )
            }
            _ => {
                if let Err(e) = crate::redis_conn::RedisTarget::parse(&redis.url) {
                    p.add("redis.url", format!("{:?}: {e}", raw.redis.url));
                }
            }
        }
    }
    if !is_name(&redis.key_prefix) {
        p.add(
            "redis.key_prefix",
            format!(
                "{:?} must be 1-64 characters of letters, digits, '_', '-', '.'",
                redis.key_prefix
            ),
        );
    }
    if !(1..=16384).contains(&redis.shards) {
        p.add("redis.shards", "must be between 1 and 16384");
    }
    if !(1..=86_400).contains(&redis.lease_ttl_seconds) {
        p.add("redis.lease_ttl_seconds", "must be between 1 and 86400");
    }
    if redis.timeout_ms == 0 {
        p.add("redis.timeout_ms", "must be greater than 0");
    }

    // [postgres]
    let pg_url = match (&raw.postgres.url, &raw.postgres.url_env) {
        (Some(u), None) => substitute(u, "postgres.url", env, &mut missing, &mut p),
        (None, Some(name)) => {
            secret(name, "postgres.url_env", env, &mut missing).unwrap_or_default()
        }
        (Some(_), Some(_)) => {
            p.add("postgres", "set either url or url_env, not both");
            String::new()
        }
        (None, None) => {
            p.add("postgres.url", "missing (or set url_env)");
            String::new()
        }
    };
    if !pg_url.is_empty() {
        match url::Url::parse(&pg_url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            _ => p.add("postgres.url", "is not a postgres:// URL"),
        }
    }
    if raw.postgres.max_connections == 0 {
        p.add("postgres.max_connections", "must be greater than 0");
    }

    // [admin]
    let admin_token = secret(&raw.admin.token_env, "admin.token_env", env, &mut missing);
    if let Some(t) = &admin_token {
        if t.len() < 16 {
            p.add(
                "admin.token_env",
                format!(
                    "the token in {} must be at least 16 characters",
                    raw.admin.token_env
                ),
            );
        }
    }

    if !(1..=3600).contains(&raw.journal.claim_idle_seconds) {
        p.add("journal.claim_idle_seconds", "must be between 1 and 3600");
    }
    if !(1..=86_400).contains(&raw.journal.reconcile_after_seconds) {
        p.add(
            "journal.reconcile_after_seconds",
            "must be between 1 and 86400",
        );
    }

    // [auth]
    if !(1..=3600).contains(&raw.auth.key_cache_ttl_seconds) {
        p.add("auth.key_cache_ttl_seconds", "must be between 1 and 3600");
    }
    let jwt = raw
        .auth
        .jwt
        .as_ref()
        .map(|j| validate_jwt(j, path, env, &mut missing, &mut p));

    // [stripe]
    let stripe = raw.stripe.as_ref().map(|s| {
        if url::Url::parse(&s.api_base).is_err() {
            p.add("stripe.api_base", format!("{:?} is not a URL", s.api_base));
        }
        StripeConfig {
            secret_key: secret(
                &s.secret_key_env,
                "stripe.secret_key_env",
                env,
                &mut missing,
            ),
            webhook_secret: secret(
                &s.webhook_secret_env,
                "stripe.webhook_secret_env",
                env,
                &mut missing,
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
        }
    });
    if let (Some(s), Some(config)) = (&raw.stripe, &stripe) {
        validate_stripe(&raw, s, config, &mut p);
    }

    // [alerts]
    let alerts = raw.alerts.as_ref().map(|a| {
        match url::Url::parse(&a.webhook_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => p.add(
                "alerts.webhook_url",
                format!("{:?} must be an http:// or https:// URL", a.webhook_url),
            ),
        }
        if !(1..=50).contains(&a.max_attempts) {
            p.add("alerts.max_attempts", "must be between 1 and 50");
        }
        AlertsConfig {
            webhook_url: a.webhook_url.clone(),
            secret: secret(&a.secret_env, "alerts.secret_env", env, &mut missing),
            max_attempts: a.max_attempts,
        }
    });

    // [[upstreams]]
    let mut upstreams = BTreeMap::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let f = format!("upstreams[{i}]");
        if !is_name(&u.name) {
            p.add(
                format!("{f}.name"),
                format!("{:?} is not a valid name", u.name),
            );
        }
        if upstreams.contains_key(&u.name) {
            p.add(
                format!("{f}.name"),
                format!("duplicate upstream {:?}", u.name),
            );
        }
        let field = format!("{f}.url");
        let before = missing.len();
        let url_text = substitute(&u.url, &field, env, &mut missing, &mut p);
        // The URL decides where requests go: an unset variable in it is an error, not a warning,
        // and it is said as such rather than as an unparsable "${VAR}".
        let unset: Vec<String> = missing.drain(before..).collect();
        for name in unset_vars(&u.url, env) {
            p.add(
                &field,
                format!("environment variable {name} is not set (used in {field})"),
            );
        }
        let shown = if url_text == u.url {
            format!("{:?}", u.url)
        } else {
            format!("{url_text:?} (from {:?})", u.url)
        };
        let parsed = match url::Url::parse(&url_text) {
            _ if !unset.is_empty() => None,
            Ok(parsed)
                if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() =>
            {
                Some(parsed)
            }
            Ok(_) => {
                p.add(
                    &field,
                    format!("{shown} must be an http:// or https:// URL with a host"),
                );
                None
            }
            Err(e) => {
                p.add(&field, format!("{shown} is not a URL: {e}"));
                None
            }
        };
        if let Some(parsed) = &parsed {
            if parsed.query().is_some() || parsed.fragment().is_some() {
                p.add(format!("{f}.url"), "must not carry a query or fragment");
            }
        }
        let mut set_headers = Vec::new();
        for (name, value) in &u.set_headers {
            let field = format!("{f}.set_headers.{name}");
            let value = substitute(value, &field, env, &mut missing, &mut p);
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                (Ok(n), Ok(v)) => set_headers.push((n, v)),
                (Err(_), _) => p.add(&field, "is not a valid header name"),
                (_, Err(_)) => p.add(&field, "is not a valid header value"),
            }
        }
        for (field, ms) in [
            ("connect_timeout_ms", u.connect_timeout_ms),
            ("read_timeout_ms", u.read_timeout_ms),
            ("write_timeout_ms", u.write_timeout_ms),
        ] {
            if ms == 0 {
                p.add(format!("{f}.{field}"), "must be greater than 0");
            }
        }
        let (tls, host, port, base_path) = match &parsed {
            Some(parsed) => (
                parsed.scheme() == "https",
                parsed
                    .host_str()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string(),
                parsed.port_or_known_default().unwrap_or(80),
                parsed.path().trim_end_matches('/').to_string(),
            ),
            None => (false, String::new(), 0, String::new()),
        };
        let authority = match &parsed {
            Some(parsed) => match parsed.port() {
                Some(port) => format!("{}:{port}", parsed.host_str().unwrap_or_default()),
                None => parsed.host_str().unwrap_or_default().to_string(),
            },
            None => String::new(),
        };
        upstreams.insert(
            u.name.clone(),
            Arc::new(UpstreamConfig {
                name: u.name.clone(),
                tls,
                host,
                port,
                base_path,
                authority,
                set_headers,
                connect_timeout: Duration::from_millis(u.connect_timeout_ms),
                read_timeout: Duration::from_millis(u.read_timeout_ms),
                write_timeout: Duration::from_millis(u.write_timeout_ms),
                preserve_host: u.preserve_host,
                tls_verify: u.tls_verify,
            }),
        );
    }

    // [tiers.*]
    let all_features: BTreeSet<&str> = raw
        .tiers
        .values()
        .flat_map(|t| t.features.iter().map(String::as_str))
        .collect();
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

    // [[routes]]
    let mut routes = Vec::new();
    let mut names = BTreeSet::new();
    let mut matchers = BTreeSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let f = format!("routes[{i}]");
        if !is_name(&r.name) {
            p.add(
                format!("{f}.name"),
                format!("{:?} is not a valid name", r.name),
            );
        }
        if r.name.starts_with('_') {
            // `_auth`, `_self_service`, `_unmatched` label requests without a route in metrics.
            p.add(
                format!("{f}.name"),
                format!("{:?}: names starting with _ are reserved", r.name),
            );
        }
        if !names.insert(r.name.clone()) {
            p.add(format!("{f}.name"), format!("duplicate route {:?}", r.name));
        }
        let method = match &r.method {
            None => None,
            Some(m) => match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    p.add(
                        format!("{f}.method"),
                        format!("{m:?} is not an HTTP method"),
                    );
                    None
                }
            },
        };
        if !r.path_prefix.starts_with('/') {
            p.add(
                format!("{f}.path_prefix"),
                format!("{:?} must start with '/'", r.path_prefix),
            );
        }
        if r.path_prefix.starts_with("/_tollgate") {
            p.add(
                format!("{f}.path_prefix"),
                "/_tollgate is reserved for self-service calls",
            );
        }
        if !matchers.insert((
            method.as_ref().map(|m| m.to_string()),
            r.path_prefix.clone(),
        )) {
            p.add(
                format!("{f}.path_prefix"),
                "another route already matches the same method and path prefix",
            );
        }
        let upstream = match upstreams.get(&r.upstream) {
            Some(u) => Arc::clone(u),
            None => {
                p.add(
                    format!("{f}.upstream"),
                    format!("no upstream named {:?}", r.upstream),
                );
                Arc::new(placeholder_upstream())
            }
        };
        let price = match (&r.cost, &r.pricing) {
            (Some(_), Some(_)) => {
                p.add(&f, "set either cost or pricing, not both");
                None
            }
            (Some(c), None) => {
                if c.is_negative() {
                    p.add(format!("{f}.cost"), "must not be negative");
                }
                Some(Price::Fixed(*c))
            }
            (None, Some(pr)) => {
                validate_pricing(pr, &format!("{f}.pricing"), &mut p);
                Some(Price::Metered(pr.clone()))
            }
            (None, None) => None,
        };
        if r.counts.len() > 1 {
            p.add(format!("{f}.counts"), "a route counts at most one resource");
        }
        for (resource, delta) in &r.counts {
            if !is_name(resource) {
                p.add(
                    format!("{f}.counts.{resource}"),
                    "resource names must be letters, digits, '_', '-', '.'",
                );
            }
            if *delta == 0 || delta.unsigned_abs() > 1_000_000 {
                p.add(
                    format!("{f}.counts.{resource}"),
                    "must be a non-zero whole number (1 to add one, -1 to remove one)",
                );
            }
        }
        if r.public && !r.counts.is_empty() {
            p.add(
                format!("{f}.counts"),
                "a public route is not metered: it cannot count",
            );
        }
        if r.cap_max_tokens {
            let output_priced = r.pricing.as_ref().is_some_and(|pr| {
                pr.output_per_1k_tokens.is_some()
                    || (!pr.models.is_empty()
                        && pr.models.values().all(|m| m.output_per_1k_tokens.is_some()))
            });
            if !output_priced {
                p.add(
                    format!("{f}.cap_max_tokens"),
                    "needs pricing.output_per_1k_tokens (on the route or on every model)",
                );
            }
        }
        if r.public {
            if price.is_some() || r.feature.is_some() {
                p.add(
                    &f,
                    "a public route is not metered: remove cost, pricing and feature",
                );
            }
        } else if price.is_none() {
            p.add(
                &f,
                "set cost (0 for free) or pricing, or mark the route public = true",
            );
        }
        if let Some(feature) = &r.feature {
            if !all_features.contains(feature.as_str()) {
                p.add(
                    format!("{f}.feature"),
                    format!("no tier lists feature {feature:?}, so nobody could call this route"),
                );
            }
        }
        let action = r.action.clone().unwrap_or_else(|| r.name.clone());
        if !is_name(&action) {
            p.add(
                format!("{f}.action"),
                format!("{action:?} is not a valid name"),
            );
        }
        routes.push(Arc::new(RouteConfig {
            index: i,
            name: r.name.clone(),
            method,
            path_prefix: r.path_prefix.clone(),
            upstream,
            action,
            price,
            feature: r.feature.clone(),
            refund_on: r.refund_on.clone(),
            public: r.public,
            fail_mode: r.fail_mode,
            cap_max_tokens: r.cap_max_tokens,
            counts: r.counts.iter().next().map(|(k, v)| (k.clone(), *v)),
        }));
    }

    // [[credit_packs]]
    let mut pack_ids = BTreeSet::new();
    for (i, pack) in raw.credit_packs.iter().enumerate() {
        let f = format!("credit_packs[{i}]");
        if !is_name(&pack.id) {
            p.add(
                format!("{f}.id"),
                format!("{:?} is not a valid id", pack.id),
            );
        }
        if !pack_ids.insert(pack.id.clone()) {
            p.add(format!("{f}.id"), format!("duplicate pack {:?}", pack.id));
        }
        if pack.credits.micros() <= 0 {
            p.add(format!("{f}.credits"), "must be greater than 0");
        }
        if pack.bonus_credits.is_negative() {
            p.add(format!("{f}.bonus_credits"), "must not be negative");
        }
        if !is_currency(&pack.currency) {
            p.add(
                format!("{f}.currency"),
                "must be a lowercase ISO 4217 code such as \"usd\"",
            );
        }
    }

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        source: path.to_path_buf(),
        server,
        redis,
        postgres: PostgresConfig {
            url: pg_url,
            max_connections: raw.postgres.max_connections,
        },
        admin_token,
        admin_token_env: raw.admin.token_env.clone(),
        journal: raw.journal.clone(),
        auth: AuthConfig {
            key_cache_ttl: Duration::from_secs(raw.auth.key_cache_ttl_seconds),
            jwt,
        },
        stripe,
        alerts,
        upstreams,
        routes,
        tiers,
        credit_packs: raw.credit_packs.clone(),
        missing_secrets: missing,
    })
}

fn is_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase())
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

fn placeholder_upstream() -> UpstreamConfig {
    UpstreamConfig {
        name: String::new(),
        tls: false,
        host: String::new(),
        port: 0,
        base_path: String::new(),
        authority: String::new(),
        set_headers: Vec::new(),
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        preserve_host: false,
        tls_verify: true,
    }
}

fn validate_pricing(pr: &raw::Pricing, f: &str, p: &mut Problems) {
    let fields = [
        ("per_request", pr.per_request),
        ("input_per_1k_tokens", pr.input_per_1k_tokens),
        ("output_per_1k_tokens", pr.output_per_1k_tokens),
        ("per_mb_request_body", pr.per_mb_request_body),
        ("per_minute", pr.per_minute),
        ("reserve", pr.reserve),
    ];
    for (name, v) in fields {
        if v.is_some_and(Credits::is_negative) {
            p.add(format!("{f}.{name}"), "must not be negative");
        }
    }
    if fields[..5].iter().all(|(_, v)| v.is_none()) && pr.models.is_empty() {
        p.add(
            f,
            "set at least one price (per_request, input_per_1k_tokens, ...)",
        );
    }
    for (name, m) in &pr.models {
        let mf = format!("{f}.models.{name:?}");
        let star = name.find('*');
        if name.is_empty() || star.is_some_and(|i| i + 1 != name.len()) {
            p.add(&mf, "a model name is exact, or a prefix ending in one `*`");
        }
        let own = [
            ("per_request", m.per_request),
            ("input_per_1k_tokens", m.input_per_1k_tokens),
            ("output_per_1k_tokens", m.output_per_1k_tokens),
            ("reserve", m.reserve),
        ];
        for (field, v) in own {
            if v.is_some_and(Credits::is_negative) {
                p.add(format!("{mf}.{field}"), "must not be negative");
            }
        }
        if own.iter().all(|(_, v)| v.is_none()) {
            p.add(&mf, "set at least one price for this model");
        }
        if pr.reserve.is_none() && m.reserve.is_none() {
            p.add(
                format!("{mf}.reserve"),
                "set reserve (here or on the route): the credits held until the response reports its tokens",
            );
        }
    }
    let by_tokens = pr.input_per_1k_tokens.is_some() || pr.output_per_1k_tokens.is_some();
    if by_tokens && pr.reserve.is_none() {
        p.add(
            format!("{f}.reserve"),
            "set reserve: the credits held until the response reports its tokens",
        );
    }
    if pr.reserve == Some(Credits::ZERO) && (by_tokens || !pr.models.is_empty()) {
        p.add(
            format!("{f}.reserve"),
            "must be more than 0 on a token-priced route (a stream would start with nothing held)",
        );
    }
    if pr.reserve_from_max_tokens && pr.output_per_1k_tokens.is_none() && pr.models.is_empty() {
        p.add(
            format!("{f}.reserve_from_max_tokens"),
            "needs an output_per_1k_tokens price to estimate from",
        );
    }
    match pr.tick_seconds {
        Some(t) if pr.per_minute.is_none() => {
            let _ = t;
            p.add(format!("{f}.tick_seconds"), "only applies with per_minute");
        }
        Some(t) if !(1..=3600).contains(&t) => {
            p.add(format!("{f}.tick_seconds"), "must be 1 to 3600 seconds");
        }
        _ => {}
    }
}

fn validate_jwt(
    j: &raw::Jwt,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> JwtConfig {
    use jsonwebtoken::Algorithm;
    let mut algorithms = Vec::new();
    for (i, a) in j.algorithms.iter().enumerate() {
        match a.as_str() {
            "HS256" => algorithms.push(Algorithm::HS256),
            "RS256" => algorithms.push(Algorithm::RS256),
            "ES256" => algorithms.push(Algorithm::ES256),
            other => p.add(
                format!("auth.jwt.algorithms[{i}]"),
                format!("{other:?} is not supported (HS256, RS256, ES256)"),
            ),
        }
    }
    if j.algorithms.is_empty() {
        p.add("auth.jwt.algorithms", "list at least one algorithm");
    }
    let wants_hmac = algorithms.contains(&Algorithm::HS256);
    let wants_public = algorithms
        .iter()
        .any(|a| matches!(a, Algorithm::RS256 | Algorithm::ES256));
    let hmac_secret = match (&j.secret_env, wants_hmac) {
        (Some(name), true) => {
            secret(name, "auth.jwt.secret_env", env, missing).map(String::into_bytes)
        }
        (None, true) => {
            p.add("auth.jwt.secret_env", "HS256 needs a secret");
            None
        }
        (Some(_), false) => {
            p.add("auth.jwt.secret_env", "only used with HS256");
            None
        }
        (None, false) => None,
    };
    let public_key_pem = match (&j.public_key_file, &j.public_key_env, wants_public) {
        (Some(file), None, true) => {
            let file_path = path.parent().unwrap_or(Path::new(".")).join(file);
            match std::fs::read(&file_path) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    p.add(
                        "auth.jwt.public_key_file",
                        format!("cannot read {}: {e}", file_path.display()),
                    );
                    None
                }
            }
        }
        (None, Some(name), true) => {
            secret(name, "auth.jwt.public_key_env", env, missing).map(String::into_bytes)
        }
        (Some(_), Some(_), _) => {
            p.add(
                "auth.jwt",
                "set either public_key_file or public_key_env, not both",
            );
            None
        }
        (None, None, true) => {
            p.add(
                "auth.jwt.public_key_file",
                "RS256/ES256 need a public key (file or env)",
            );
            None
        }
        (_, _, false) => {
            if j.public_key_file.is_some() || j.public_key_env.is_some() {
                p.add("auth.jwt", "a public key is only used with RS256/ES256");
            }
            None
        }
    };
    if let Some(pem) = &public_key_pem {
        for alg in &algorithms {
            let ok = match alg {
                Algorithm::RS256 => jsonwebtoken::DecodingKey::from_rsa_pem(pem).is_ok(),
                Algorithm::ES256 => jsonwebtoken::DecodingKey::from_ec_pem(pem).is_ok(),
                _ => true,
            };
            if !ok {
                p.add(
                    "auth.jwt",
                    format!("the public key is not a valid PEM key for {alg:?}"),
                );
            }
        }
    }
    if j.account_claim.is_empty() {
        p.add("auth.jwt.account_claim", "must not be empty");
    }
    JwtConfig {
        algorithms,
        secret: hmac_secret,
        public_key_pem,
        account_claim: j.account_claim.clone(),
        issuer: j.issuer.clone(),
        audience: j.audience.clone(),
        leeway_seconds: j.leeway_seconds,
    }
}
