//! `[[routes]]`: matchers, upstream, price (fixed or metered), counts, features.

use super::upstreams::placeholder_upstream;
use super::*;

/// `[[routes]]`: each route, in file order, against the upstreams and the tiers' features.
pub(super) fn routes(
    raw: &raw::Config,
    upstreams: &BTreeMap<String, Arc<UpstreamConfig>>,
    p: &mut Problems,
) -> Vec<Arc<RouteConfig>> {
    let all_features: BTreeSet<&str> = raw
        .tiers
        .values()
        .flat_map(|t| t.features.iter().map(String::as_str))
        .collect();

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
                validate_pricing(pr, &format!("{f}.pricing"), p);
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
    routes
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
