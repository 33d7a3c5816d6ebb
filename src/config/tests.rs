use super::*;

const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[redis]
url = "redis://127.0.0.1:6379/0"

[postgres]
url = "postgres://postgres@127.0.0.1:5432/tollgate"

[[upstreams]]
name = "agent"
url = "http://127.0.0.1:7001/base/"
set_headers = { authorization = "Bearer ${AGENT_API_KEY}" }

[[routes]]
name = "chat"
method = "POST"
path_prefix = "/v1/chat/completions"
upstream = "agent"
action = "ai_message"
cost = 0.2
feature = "chat"

[tiers.free]
monthly_credits = 20
features = ["chat"]
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "AGENT_API_KEY" => Some("sk-up".into()),
        "TOLLGATE_ADMIN_TOKEN" => Some("admin-token-0123456789".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("t.toml"), &env)
}

fn errors(text: &str) -> String {
    load(text).unwrap_err().to_string()
}

#[test]
fn loads_the_base_config_exactly() {
    let c = load(BASE).unwrap();
    assert_eq!(
        c.routes[0].price,
        Some(Price::Fixed(Credits::from_micros(200_000)))
    );
    assert_eq!(c.routes[0].action, "ai_message");
    assert_eq!(c.routes[0].method, Some(Method::POST));
    let up = &c.upstreams["agent"];
    assert_eq!(
        (up.host.as_str(), up.port, up.base_path.as_str()),
        ("127.0.0.1", 7001, "/base")
    );
    assert_eq!(up.set_headers[0].1, "Bearer sk-up");
    assert_eq!(c.redis.key_prefix, "tg");
    assert_eq!(c.redis.shards, 64);
    assert!(c.missing_secrets.is_empty());
    assert_eq!(
        c.tiers["free"].raw.monthly_credits,
        MonthlyCredits::Limited(Credits::from_micros(20_000_000))
    );
}

#[test]
fn a_bad_cost_names_the_field() {
    let text = BASE.replace("cost = 0.2", "cost = \"lots\"");
    let e = errors(&text);
    assert!(e.contains("routes[0].cost"), "{e}");
    assert!(e.contains("\"lots\" is not a decimal number"), "{e}");
}

#[test]
fn too_precise_costs_are_rejected_not_rounded() {
    let e = errors(&BASE.replace("cost = 0.2", "cost = 0.0000001"));
    assert!(
        e.contains("routes[0].cost") && e.contains("more than 6 decimal places"),
        "{e}"
    );
}

#[test]
fn floats_with_exponents_are_rejected() {
    let e = errors(&BASE.replace("cost = 0.2", "cost = 2e-1"));
    assert!(e.contains("routes[0].cost"), "{e}");
}

#[test]
fn unknown_fields_are_errors() {
    let e = errors(&BASE.replace("cost = 0.2", "cost = 0.2\ncolour = \"red\""));
    assert!(e.contains("routes[0]") && e.contains("colour"), "{e}");
}

#[test]
fn references_are_checked() {
    let text = BASE
        .replace("upstream = \"agent\"", "upstream = \"nope\"")
        .replace("feature = \"chat\"", "feature = \"voice\"");
    let e = errors(&text);
    assert!(
        e.contains("routes[0].upstream: no upstream named \"nope\""),
        "{e}"
    );
    assert!(
        e.contains("routes[0].feature: no tier lists feature \"voice\""),
        "{e}"
    );
}

#[test]
fn action_quotas_must_name_a_route_action() {
    let text = BASE.replace(
        "features = [\"chat\"]",
        "features = [\"chat\"]\naction_quotas = { nothing = { per_month = 5 } }",
    );
    assert!(errors(&text).contains("tiers.free.action_quotas.nothing"));
}

#[test]
fn missing_secrets_are_reported_not_fatal_at_load() {
    let c = Config::from_toml(BASE, Path::new("t.toml"), &|_| None).unwrap();
    assert!(c.require_secrets().is_err());
    let all = c.missing_secrets.join("\n");
    assert!(
        all.contains("AGENT_API_KEY") && all.contains("TOLLGATE_ADMIN_TOKEN"),
        "{all}"
    );
}

#[test]
fn unlimited_and_addresses() {
    let text = BASE
        .replace("monthly_credits = 20", "monthly_credits = \"unlimited\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"");
    let e = errors(&text);
    assert!(
        e.contains("server.listen: \"nowhere\" is not an address"),
        "{e}"
    );
    let ok =
        load(&BASE.replace("monthly_credits = 20", "monthly_credits = \"unlimited\"")).unwrap();
    assert_eq!(
        ok.tiers["free"].raw.monthly_credits,
        MonthlyCredits::Unlimited
    );
    let e = errors(&BASE.replace("monthly_credits = 20", "monthly_credits = \"lots\""));
    assert!(e.contains("tiers.free.monthly_credits"), "{e}");
}

#[test]
fn public_routes_cannot_be_priced_and_priced_routes_need_a_price() {
    let e = errors(&BASE.replace("feature = \"chat\"", "feature = \"chat\"\npublic = true"));
    assert!(e.contains("a public route is not metered"), "{e}");
    let e = errors(&BASE.replace("cost = 0.2", ""));
    assert!(e.contains("set cost (0 for free) or pricing"), "{e}");
}

#[test]
fn the_reference_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = Config::from_toml(&text, &path, &|_| Some("x-secret-value-long-enough".into()));
    assert!(c.is_ok(), "{}", c.unwrap_err());
}

#[test]
fn history_days_is_optional_and_sets_the_retention_when_every_tier_has_it() {
    let c = load(BASE).unwrap();
    assert_eq!(c.tiers["free"].history_days(), None);
    assert_eq!(c.journal_retention_days(), None);

    let text = BASE.replace(
        "monthly_credits = 20",
        "monthly_credits = 20\nhistory_days = 30",
    );
    let c = load(&text).unwrap();
    assert_eq!(c.tiers["free"].history_days(), Some(30));
    assert_eq!(c.journal_retention_days(), Some(30));

    // The longest of all tiers is kept...
    let two = format!("{text}\n[tiers.pro]\nmonthly_credits = 100\nhistory_days = 400\n");
    assert_eq!(load(&two).unwrap().journal_retention_days(), Some(400));
    // ...and nothing is dropped while one tier keeps everything.
    let forever = format!("{text}\n[tiers.pro]\nmonthly_credits = 100\n");
    let c = load(&forever).unwrap();
    assert_eq!(c.tiers["pro"].history_days(), None);
    assert_eq!(c.journal_retention_days(), None);
}

#[test]
fn a_bad_history_days_names_the_field() {
    for bad in ["0", "36501"] {
        let e = errors(&BASE.replace(
            "monthly_credits = 20",
            &format!("monthly_credits = 20\nhistory_days = {bad}"),
        ));
        assert!(
            e.contains("tiers.free.history_days") && e.contains("between 1 and 36500"),
            "{e}"
        );
    }
    for bad in ["-1", "\"a month\"", "30.5"] {
        let e = errors(&BASE.replace(
            "monthly_credits = 20",
            &format!("monthly_credits = 20\nhistory_days = {bad}"),
        ));
        assert!(e.contains("tiers.free.history_days"), "{bad}: {e}");
    }
}

#[test]
fn the_credit_reconciliation_interval_is_bounded() {
    assert_eq!(load(BASE).unwrap().journal.reconcile_after_seconds, 60);
    let e = errors(&format!("{BASE}\n[journal]\nreconcile_after_seconds = 0\n"));
    assert!(
        e.contains("journal.reconcile_after_seconds: must be between 1 and 86400"),
        "{e}"
    );
}

#[test]
fn the_portal_section_has_defaults_and_checks_its_origin() {
    let c = load(BASE).unwrap();
    assert_eq!(c.portal.public_url, None);
    assert_eq!(c.portal.link_ttl_seconds, 900);
    assert_eq!(c.portal.session_ttl_seconds, 3600);
    let c = load(&format!(
        "{BASE}\n[portal]\npublic_url = \"https://billing.example.com/\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.portal.public_url.as_deref(),
        Some("https://billing.example.com")
    );
    let e = errors(&format!(
        "{BASE}\n[portal]\npublic_url = \"https://x.example.com/portal\"\nlink_ttl_seconds = 5\n"
    ));
    assert!(e.contains("portal.public_url"), "{e}");
    assert!(
        e.contains("portal.link_ttl_seconds: must be between 60 and 86400"),
        "{e}"
    );
}

/// The line of `needle` in `text` (1-based), for asserting reported lines.
fn line_containing(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

#[test]
fn every_type_error_and_unknown_field_is_reported_in_one_run_with_its_line() {
    let text = BASE
        .replace("cost = 0.2", "cost = \"lots\"")
        .replace("upstream = \"agent\"", "upstream = \"agnet\"\ncots = 1")
        .replace(
            "monthly_credits = 20",
            "monthly_credits = 20\nrequests_per_huor = 5",
        )
        .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = 8081");
    let err = errors(&text);
    let expect = [
        ("routes[0].cost:", "cost = \"lots\""),
        ("routes[0].cots:", "cots = 1"),
        ("tiers.free.requests_per_huor:", "requests_per_huor"),
        ("server.admin_listen:", "admin_listen = 8081"),
    ];
    for (field, line_text) in expect {
        let line = line_containing(&text, line_text);
        let wanted = format!("(line {line})");
        assert!(
            err.lines()
                .any(|l| l.contains(field) && l.contains(&wanted)),
            "no {field} at {wanted} in:\n{err}"
        );
    }
    // The removed bad values leave required fields missing: not reported twice.
    assert!(!err.contains("missing field"), "{err}");
    // Then the references of what could be repaired: the upstream typo is not hidden.
    let upstream = line_containing(&text, "upstream = \"agnet\"");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("routes[0].upstream") && last.contains(&format!("(line {upstream})")),
        "{err}"
    );
}

#[test]
fn reference_errors_follow_type_errors_each_with_its_line() {
    let text = BASE
        .replace("upstream = \"agent\"", "upstream = \"agnet\"")
        .replace(
            "monthly_credits = 20",
            "monthly_credits = 20\nmax_keys = -1",
        );
    let err = errors(&text);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    let keys = line_containing(&text, "max_keys");
    assert!(
        lines[0].contains("tiers.free.max_keys") && lines[0].contains(&format!("(line {keys})")),
        "{err}"
    );
    let upstream = line_containing(&text, "upstream = \"agnet\"");
    assert!(
        lines[1].contains("routes[0].upstream") && lines[1].contains(&format!("(line {upstream})")),
        "{err}"
    );
}

#[test]
fn a_bad_element_of_an_array_of_tables_keeps_later_indices_right() {
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"agent\"\ncost = []\n\n[[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"agent\"\ncost = 1\ncolor = \"red\"\n"
    );
    let err = errors(&text);
    assert!(err.contains("routes[1].cost:"), "{err}");
    let color = line_containing(&text, "color");
    assert!(
        err.contains("routes[2].color: unknown field `color`")
            && err.contains(&format!("(line {color})")),
        "{err}"
    );
}

#[test]
fn a_missing_required_field_is_reported_and_the_rest_still_checked() {
    let text = BASE
        .replace("monthly_credits = 20\n", "")
        .replace("cost = 0.2", "cost = true");
    let err = errors(&text);
    assert!(
        err.contains("tiers.free: missing field `monthly_credits`"),
        "{err}"
    );
    assert!(err.contains("routes[0].cost:"), "{err}");
}

#[test]
fn an_unset_variable_in_an_upstream_url_is_named_as_such() {
    let text = BASE.replace("http://127.0.0.1:7001/base/", "${SAAS_APP_URL}");
    let err = errors(&text);
    assert!(
        err.contains(
            "upstreams[0].url: environment variable SAAS_APP_URL is not set (used in upstreams[0].url)"
        ),
        "{err}"
    );
    assert!(!err.contains("is not a URL"), "{err}");
    // Set, but without a scheme: the value is shown with where it came from.
    let env = |name: &str| match name {
        "SAAS_APP_URL" => Some("app.example.com".to_string()),
        other => env(other),
    };
    let err = Config::from_toml(&text, Path::new("t.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"app.example.com\" (from \"${SAAS_APP_URL}\") is not a URL"),
        "{err}"
    );
}

#[test]
fn route_names_starting_with_an_underscore_are_reserved_for_metrics() {
    let err = errors(&BASE.replace("name = \"chat\"", "name = \"_auth\""));
    assert!(
        err.contains("routes[0].name: \"_auth\": names starting with _ are reserved"),
        "{err}"
    );
}

#[test]
fn jwks_url_is_an_alternative_to_a_pasted_key() {
    let jwt = |lines: &str| {
        format!("{BASE}\n[auth.jwt]\naccount_claim = \"org\"\nalgorithms = [\"RS256\", \"ES256\"]\n{lines}\n")
    };
    let c = load(&jwt(
        "jwks_url = \"https://id.example.com/.well-known/jwks.json\"",
    ))
    .unwrap();
    let jwks = c.auth.jwt.unwrap().jwks.unwrap();
    assert_eq!(jwks.url, "https://id.example.com/.well-known/jwks.json");
    assert_eq!(jwks.refresh, Duration::from_secs(300));
    assert_eq!(jwks.min_refetch, Duration::from_secs(10));

    // Not together with a pasted key; only http(s); sane intervals.
    let e = errors(&jwt(
        "jwks_url = \"https://id.example.com/jwks\"\npublic_key_env = \"PEM\"",
    ));
    assert!(
        e.contains("auth.jwt.jwks_url: set either jwks_url or a public key"),
        "{e}"
    );
    let e = errors(&jwt("jwks_url = \"file:///etc/jwks.json\""));
    assert!(
        e.contains("auth.jwt.jwks_url: must be an http:// or https:// URL"),
        "{e}"
    );
    let e = errors(&jwt(
        "jwks_url = \"https://id.example.com/jwks\"\njwks_refresh_seconds = 0\njwks_min_refetch_seconds = 7200",
    ));
    assert!(
        e.contains("auth.jwt.jwks_refresh_seconds: must be 1 to 86400"),
        "{e}"
    );
    assert!(
        e.contains("auth.jwt.jwks_min_refetch_seconds: must be 1 to 3600"),
        "{e}"
    );
    // A JWKS serves RS256/ES256 keys only.
    let e = errors(&format!(
        "{BASE}\n[auth.jwt]\naccount_claim = \"org\"\nalgorithms = [\"HS256\"]\nsecret_env = \"AGENT_API_KEY\"\njwks_url = \"https://id.example.com/jwks\"\n"
    ));
    assert!(
        e.contains("auth.jwt.jwks_url: a JWKS only serves RS256/ES256 keys"),
        "{e}"
    );
}

#[test]
fn telemetry_is_off_by_default_and_validated() {
    let c = load(BASE).unwrap();
    assert!(c.telemetry.otlp_traces_url.is_none());
    assert_eq!(c.telemetry.log_format, raw::LogFormat::Text);
    assert!(!c.telemetry.access_log);
    assert_eq!(c.telemetry.sample_ratio, 1.0);

    let on = load(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"http://otel:4318\"\nsample_ratio = 0.25\nlog_format = \"json\"\naccess_log = true\n"
    ))
    .unwrap();
    assert_eq!(
        on.telemetry.otlp_traces_url.as_deref(),
        Some("http://otel:4318/v1/traces")
    );
    assert_eq!(on.telemetry.sample_ratio, 0.25);
    assert_eq!(on.telemetry.log_format, raw::LogFormat::Json);
    assert!(on.telemetry.access_log);
    // A URL with a path is the traces URL itself.
    let path = load(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"https://otel.example/custom/traces\"\nsample_ratio = 0\n"
    ))
    .unwrap();
    assert_eq!(
        path.telemetry.otlp_traces_url.as_deref(),
        Some("https://otel.example/custom/traces")
    );
    assert_eq!(path.telemetry.sample_ratio, 0.0);

    let e = errors(&format!(
        "{BASE}\n[telemetry]\notlp_endpoint = \"otel:4317\"\nsample_ratio = 1.5\nlog_format = \"xml\"\n"
    ));
    assert!(e.contains("telemetry.otlp_endpoint"), "{e}");
    assert!(
        e.contains("telemetry.sample_ratio: must be a number from 0 to 1"),
        "{e}"
    );
    assert!(e.contains("telemetry.log_format"), "{e}");
}
