//! `[[upstreams]]`: URLs (one or several backends), load balancing, health checks, headers.

use super::*;

/// `[[upstreams]]`: each upstream with its backends, by name.
pub(super) fn upstreams(
    raw: &raw::Config,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> BTreeMap<String, Arc<UpstreamConfig>> {
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
        let url_fields: Vec<(String, &String)> = match (&u.url, &u.urls) {
            (Some(url), None) => vec![(format!("{f}.url"), url)],
            (None, Some(urls)) => {
                if urls.is_empty() {
                    p.add(format!("{f}.urls"), "must list at least one URL");
                }
                if urls.len() > MAX_BACKENDS {
                    p.add(
                        format!("{f}.urls"),
                        format!("at most {MAX_BACKENDS} backends"),
                    );
                }
                urls.iter()
                    .enumerate()
                    .map(|(j, url)| (format!("{f}.urls[{j}]"), url))
                    .collect()
            }
            (Some(_), Some(_)) => {
                p.add(f.as_str(), "set either `url` or `urls`, not both");
                Vec::new()
            }
            (None, None) => {
                p.add(f.as_str(), "one of `url` or `urls` is required");
                Vec::new()
            }
        };
        let mut targets = Vec::new();
        for (field, url) in &url_fields {
            if let Some(target) = upstream_url(field, url, env, missing, p) {
                targets.push(target);
            }
        }
        if let Some(first) = targets.first() {
            for (target, (field, _)) in targets.iter().zip(&url_fields).skip(1) {
                if target.tls != first.tls || target.base_path != first.base_path {
                    p.add(
                        field,
                        "every URL of an upstream must have the same scheme and path",
                    );
                }
            }
            for (j, target) in targets.iter().enumerate() {
                if targets[..j]
                    .iter()
                    .any(|t| t.host == target.host && t.port == target.port)
                {
                    p.add(
                        &url_fields[j].0,
                        format!("backend {} is listed twice", target.authority),
                    );
                }
            }
        }
        let several = u.urls.is_some();
        if !several && u.lb.is_some() {
            p.add(format!("{f}.lb"), "needs `urls` (several backends)");
        }
        if !several && u.health_check.is_some() {
            p.add(
                format!("{f}.health_check"),
                "needs `urls` (several backends)",
            );
        }
        let health_check = u.health_check.as_ref().and_then(|hc| {
            let hf = format!("{f}.health_check");
            let before = p.0.len();
            if !hc.path.starts_with('/') || hc.path.parse::<http::Uri>().is_err() {
                p.add(format!("{hf}.path"), "must be a path starting with /");
            }
            if !(100..=3_600_000).contains(&hc.interval_ms) {
                p.add(
                    format!("{hf}.interval_ms"),
                    "must be between 100 and 3600000",
                );
            }
            if hc.timeout_ms == 0 || hc.timeout_ms > hc.interval_ms {
                p.add(
                    format!("{hf}.timeout_ms"),
                    "must be greater than 0 and at most interval_ms",
                );
            }
            (p.0.len() == before).then(|| HealthCheckConfig {
                path: hc.path.clone(),
                interval: Duration::from_millis(hc.interval_ms),
                timeout: Duration::from_millis(hc.timeout_ms),
            })
        });
        if u.eject_ms > 3_600_000 {
            p.add(format!("{f}.eject_ms"), "must be at most 3600000");
        }
        let ca = u.ca.as_ref().and_then(|ca| {
            if targets.first().is_some_and(|t| !t.tls) {
                p.add(format!("{f}.ca"), "is for https upstreams");
                return None;
            }
            let file = path.parent().unwrap_or(Path::new(".")).join(ca);
            match crate::tls::load_certificates(&file) {
                Ok(certs) => Some(Arc::new(certs.into_boxed_slice())),
                Err(e) => {
                    p.add(format!("{f}.ca"), e);
                    None
                }
            }
        });
        let mut set_headers = Vec::new();
        for (name, value) in &u.set_headers {
            let field = format!("{f}.set_headers.{name}");
            let value = substitute(value, &field, env, missing, p);
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
        let first = targets.first().cloned().unwrap_or_else(|| UpstreamTarget {
            tls: false,
            host: String::new(),
            port: 0,
            base_path: String::new(),
            authority: String::new(),
        });
        let backends = if several {
            targets
                .iter()
                .map(|t| BackendAddr {
                    host: t.host.clone(),
                    port: t.port,
                    authority: t.authority.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let UpstreamTarget {
            tls,
            host,
            port,
            base_path,
            authority,
        } = first;
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
                backends,
                lb: u.lb.unwrap_or_default(),
                health_check,
                eject: (u.eject_ms > 0).then(|| Duration::from_millis(u.eject_ms)),
                ca,
            }),
        );
    }
    upstreams
}

pub(super) fn placeholder_upstream() -> UpstreamConfig {
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
        backends: Vec::new(),
        lb: raw::LbPolicy::RoundRobin,
        health_check: None,
        eject: None,
        ca: None,
    }
}

/// Most backends one upstream may list.
const MAX_BACKENDS: usize = 64;

/// Where one upstream URL points.
#[derive(Clone)]
struct UpstreamTarget {
    tls: bool,
    host: String,
    port: u16,
    base_path: String,
    authority: String,
}

/// Parses one upstream URL (`${VAR}` substituted): `None` after adding the problem.
fn upstream_url(
    field: &str,
    raw_url: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> Option<UpstreamTarget> {
    let before = missing.len();
    let url_text = substitute(raw_url, field, env, missing, p);
    // The URL decides where requests go: an unset variable in it is an error, not a warning,
    // and it is said as such rather than as an unparsable "${VAR}".
    let unset: Vec<String> = missing.drain(before..).collect();
    for name in unset_vars(raw_url, env) {
        p.add(
            field,
            format!("environment variable {name} is not set (used in {field})"),
        );
    }
    if !unset.is_empty() {
        return None;
    }
    let shown = if url_text == raw_url {
        format!("{raw_url:?}")
    } else {
        format!("{url_text:?} (from {raw_url:?})")
    };
    let parsed = match url::Url::parse(&url_text) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() =>
        {
            parsed
        }
        Ok(_) => {
            p.add(
                field,
                format!("{shown} must be an http:// or https:// URL with a host"),
            );
            return None;
        }
        Err(e) => {
            p.add(field, format!("{shown} is not a URL: {e}"));
            return None;
        }
    };
    if parsed.query().is_some() || parsed.fragment().is_some() {
        p.add(field, "must not carry a query or fragment");
    }
    let host_str = parsed.host_str().unwrap_or_default();
    Some(UpstreamTarget {
        tls: parsed.scheme() == "https",
        host: host_str.trim_matches(['[', ']']).to_string(),
        port: parsed.port_or_known_default().unwrap_or(80),
        base_path: parsed.path().trim_end_matches('/').to_string(),
        authority: match parsed.port() {
            Some(port) => format!("{host_str}:{port}"),
            None => host_str.to_string(),
        },
    })
}
