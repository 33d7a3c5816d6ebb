//! `docs/openapi.yaml` against the code. The document is generated (`tollgate openapi`, from
//! the handlers' `#[utoipa::path]` annotations) and the committed copy must be that output; it
//! is OpenAPI 3.x with resolvable `$ref`s, documents every route of the admin router (the
//! annotations name their paths by hand, so the router is read to catch a route left out) and
//! every admin error code, and every path and method it documents is routed by a running
//! tollgate (answered by a handler, not by the router's fallback) with a status the document
//! lists.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::harness::{parse_body, passthrough_toml, random_id, TestEnv};
use crate::upstream::FakeUpstream;

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
/// What the admin router's fallback answers for a path it does not know.
const FALLBACK_MESSAGE: &str = "no such admin endpoint";
const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn spec() -> Value {
    let text = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("reading {SPEC}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {SPEC}: {e}"))
}

fn source(rel: &str) -> String {
    let path = format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every (path, method, operation) of the document.
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let paths = spec["paths"].as_object().expect("paths is a mapping");
    let mut out = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((path.clone(), method.to_string(), op.clone()));
            }
        }
    }
    out
}

/// Whether a path is served by the proxy listener (a path-level `servers` override).
fn on_proxy(spec: &Value, path: &str) -> bool {
    spec["paths"][path].get("servers").is_some()
}

/// The security requirements that apply to an operation.
fn needs_auth(spec: &Value, op: &Value) -> bool {
    let security = op.get("security").unwrap_or(&spec["security"]);
    security.as_array().is_some_and(|s| !s.is_empty())
}

fn enum_of(spec: &Value, pointer: &str) -> BTreeSet<String> {
    spec.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no enum at {pointer}"))
        .iter()
        .map(|v| v.as_str().expect("string enum").to_string())
        .collect()
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                if k == "$ref" {
                    out.push(x.as_str().expect("$ref is a string").to_string());
                }
                collect_refs(x, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// The `.route("/path", get(..).put(..))` calls of `admin::router`: (path, methods).
fn router_routes() -> Vec<(String, BTreeSet<String>)> {
    let text = source("src/admin/mod.rs");
    let start = text.find("pub fn router").expect("admin::router");
    let body = &text[start..];
    let body = &body[..body.find("\n}\n").expect("end of admin::router")];
    let mut routes = Vec::new();
    for chunk in body.split(".route(").skip(1) {
        let chunk = chunk.trim_start();
        let Some(rest) = chunk.strip_prefix('"') else {
            continue;
        };
        let path = rest[..rest.find('"').expect("closing quote")].to_string();
        let methods = METHODS
            .iter()
            .filter(|m| {
                chunk.match_indices(&format!("{m}(")).any(|(i, _)| {
                    i == 0 || {
                        let before = chunk.as_bytes()[i - 1];
                        !(before.is_ascii_alphanumeric() || before == b'_' || before == b':')
                    }
                })
            })
            .map(|m| m.to_string())
            .collect();
        routes.push((path, methods));
    }
    routes
}

/// The binary prints the committed document (the lib test checks the same in process).
#[test]
fn cli_prints_the_committed_document() {
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("openapi")
        .output()
        .expect("run tollgate openapi");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("reading {SPEC}: {e}"));
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "docs/openapi.yaml is stale: run `cargo run -- openapi > docs/openapi.yaml`"
    );
}

#[test]
fn document_is_openapi_3_and_resolves() {
    let spec = spec();
    let version = spec["openapi"].as_str().expect("openapi version string");
    assert!(version.starts_with("3."), "openapi: {version}");
    assert!(spec["info"]["title"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert!(spec["info"]["version"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    let paths = spec["paths"].as_object().expect("paths");
    assert!(!paths.is_empty());
    assert!(
        paths.keys().all(|p| p.starts_with('/')),
        "{:?}",
        paths.keys()
    );

    let mut refs = Vec::new();
    collect_refs(&spec, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r}: only local $refs"));
        assert!(spec.pointer(pointer).is_some(), "unresolved $ref {r}");
    }

    for (path, method, op) in operations(&spec) {
        let responses = op["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path}: no responses"
        );
    }

    let admin = &spec["components"]["securitySchemes"]["adminToken"];
    assert_eq!(admin["type"], "http");
    assert_eq!(admin["scheme"], "bearer");
    assert_eq!(spec["security"][0]["adminToken"], Value::Array(vec![]));
    for open in ["/healthz", "/readyz", "/webhooks/stripe"] {
        let op = operations(&spec)
            .into_iter()
            .find(|(p, _, _)| p == open)
            .unwrap_or_else(|| panic!("{open} is not documented"))
            .2;
        assert!(!needs_auth(&spec, &op), "{open} must need no admin token");
    }
    let webhook = &spec["paths"]["/webhooks/stripe"]["post"];
    assert!(
        webhook["parameters"].as_array().is_some_and(|ps| ps
            .iter()
            .any(|p| p["name"] == "Stripe-Signature" && p["in"] == "header")),
        "the webhook documents its Stripe-Signature header"
    );
}

#[test]
fn every_admin_route_and_error_code_is_documented() {
    let spec = spec();
    let documented: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .filter(|(p, _, _)| !on_proxy(&spec, p))
        .map(|(p, m, _)| (p, m))
        .collect();
    let routes = router_routes();
    assert!(
        routes.len() >= 10,
        "parsed only {routes:?} from admin::router"
    );
    let mut in_code = BTreeSet::new();
    for (path, methods) in routes {
        assert!(!methods.is_empty(), "no methods parsed for {path}");
        for m in methods {
            in_code.insert((path.clone(), m));
        }
    }
    let undocumented: Vec<_> = in_code.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&in_code).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routed but not documented: {undocumented:?}; documented but not routed: {unrouted:?}"
    );

    // The stable codes of AdminError::code are exactly the documented enum.
    let text = source("src/admin/error.rs");
    let start = text.find("pub fn code").expect("AdminError::code");
    let body = &text[start..];
    let body = &body[..body.find("\n    }\n").expect("end of AdminError::code")];
    let codes: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.split_once("=> \"").map(|(_, rest)| rest))
        .map(|rest| rest[..rest.find('"').expect("closing quote")].to_string())
        .collect();
    assert_eq!(
        codes,
        enum_of(&spec, "/components/schemas/AdminErrorCode/enum")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_path_is_routed() {
    let spec = spec();
    let admin_codes = enum_of(&spec, "/components/schemas/AdminErrorCode/enum");
    let proxy_codes = enum_of(
        &spec,
        "/components/schemas/ProxyError/properties/error/enum",
    );

    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;
    let account = format!("acct_{}", random_id(10));
    app.create_account(&account, "default").await;
    let (_, key) = app.create_key(&account).await;

    // One request: status and body (JSON bodies must say so in their content type).
    let call = |method: Method, url: String, token: Option<String>, body: bool| {
        let mut req = app.client().request(method, url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if body {
            req = req.header("content-type", "application/json").body("{}");
        }
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status();
            let json = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let text = resp.text().await.expect("body");
            (status, json || text.is_empty(), parse_body(&text))
        }
    };

    // What an unrouted path looks like, so the checks below can tell it apart.
    let (status, _, body) = call(
        Method::GET,
        app.admin_url("/v1/no-such-endpoint"),
        Some(app.admin_token().to_string()),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    assert_eq!(body["message"], FALLBACK_MESSAGE, "{body}");
    // A known path with a method it does not list: 405 (as the document's description says).
    let (status, _, body) = call(
        Method::PATCH,
        app.admin_url("/v1/catalog"),
        Some(app.admin_token().to_string()),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");

    let mut failures = Vec::new();
    let ops = operations(&spec);
    for (path, method, op) in &ops {
        let proxy = on_proxy(&spec, path);
        let concrete = path
            .replace("{id}", &account)
            .replace("{key_id}", "key_0000000000000000");
        assert!(
            !concrete.contains('{'),
            "no substitute for a parameter of {path}"
        );
        let url = if proxy {
            app.proxy_url(&concrete)
        } else {
            app.admin_url(&concrete)
        };
        let token = match (proxy, needs_auth(&spec, op)) {
            (_, false) => None,
            (true, true) => Some(key.clone()),
            (false, true) => Some(app.admin_token().to_string()),
        };
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let with_body = op.get("requestBody").is_some();
        let label = format!("{} {path}", method.to_uppercase());

        let (status, json, body) = call(m.clone(), url.clone(), token.clone(), with_body).await;
        let codes = if proxy { &proxy_codes } else { &admin_codes };
        let fallback = if proxy {
            body["error"] == "route_not_found"
        } else {
            status == StatusCode::NOT_FOUND && body["message"] == FALLBACK_MESSAGE
        };
        if status == StatusCode::METHOD_NOT_ALLOWED || fallback {
            failures.push(format!("{label}: not routed ({status} {body})"));
            continue;
        }
        if !json {
            failures.push(format!("{label}: {status} answer is not JSON: {body}"));
        }
        let documented = &op["responses"];
        if documented.get(status.as_str()).is_none() && documented.get("default").is_none() {
            failures.push(format!("{label}: {status} is not documented ({body})"));
        }
        if !status.is_success() {
            let code = body["error"].as_str().unwrap_or_default();
            if !codes.contains(code) || !body["message"].is_string() {
                failures.push(format!("{label}: undocumented error body {body}"));
            }
        }

        // Documented as authenticated: refused without a credential, with the documented 401.
        if token.is_some() {
            let (status, _, body) = call(m, url, None, with_body).await;
            let want = if proxy {
                "missing_credentials"
            } else {
                "unauthorized"
            };
            if status != StatusCode::UNAUTHORIZED
                || body["error"] != want
                || documented.get("401").is_none()
            {
                failures.push(format!("{label} without a credential: {status} {body}"));
            }
        }
    }
    assert!(ops.len() >= 19, "only {} operations documented", ops.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
