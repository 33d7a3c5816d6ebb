//! The request and the response pass through unchanged, except for the credential header (gone),
//! the upstream's `set_headers` (applied) and `X-Request-Id` (added or kept).

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use crate::harness::{random_id, TestEnv};
use crate::upstream::FakeUpstream;

const UPSTREAM_SECRET: &str = "sk-upstream-secret-0123456789";

/// Upstream `agent` (base path `/base`, set_headers with `${AGENT_API_KEY}`), upstream `plain`
/// (no set_headers), a public route, and tier `default`.
fn config(up: &FakeUpstream) -> String {
    format!(
        r#"
[[upstreams]]
name = "agent"
url = "{url}/base"
set_headers = {{ authorization = "Bearer ${{AGENT_API_KEY}}", x-static = "static-value", x-mixed = "pre-${{AGENT_API_KEY}}-post" }}

[[upstreams]]
name = "plain"
url = "{url}/"

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "plain"
cost = 0

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "plain"
public = true

[[routes]]
name = "agent"
path_prefix = "/"
upstream = "agent"
cost = 0

[tiers.default]
monthly_credits = "unlimited"
"#,
        url = up.url()
    )
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// A body with every byte value, some invalid UTF-8 sequences and a few hundred KB of noise.
fn binary_body(len: usize) -> Vec<u8> {
    let mut body: Vec<u8> = (0..=255u8).collect();
    body.extend_from_slice(&[0xff, 0xfe, 0x00, 0x00, 0xc3, 0x28, 0x0d, 0x0a, 0x0d, 0x0a]);
    let mut x: u32 = 0x1234_5678;
    while body.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.push((x & 0xff) as u8);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_query_and_binary_bodies_pass_through_byte_exact() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up))
        .env("AGENT_API_KEY", UPSTREAM_SECRET)
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;

    let query = "a=1&b=two%20words&empty=&utf=%C3%A9&plus=a+b&dup=1&dup=2&slash=%2F";
    let path = format!("/v1/things/echo?{query}");
    let body = binary_body(300_000);
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ] {
        up.clear();
        let with_body = method != Method::GET;
        let mut req = app
            .client()
            .request(method.clone(), app.proxy_url(&path))
            .bearer_auth(&key)
            .header("x-client-header", "kept as is")
            .header("accept", "application/octet-stream");
        if with_body {
            req = req
                .header(CONTENT_TYPE, "application/x-e2e-binary")
                .body(body.clone());
        }
        let resp = req.send().await.expect("request through the proxy");
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        let headers = resp.headers().clone();
        let got = resp.bytes().await.expect("body");

        // What the upstream saw.
        let seen = up.last_request();
        assert_eq!(seen.method, method.as_str());
        assert_eq!(
            seen.uri,
            format!("/base{path}"),
            "base path + path + query, unchanged"
        );
        if with_body {
            assert_eq!(seen.body.len(), body.len(), "{method}: request body length");
            assert!(seen.body == body, "{method}: request body differs");
            assert_eq!(
                seen.header("content-type").as_deref(),
                Some("application/x-e2e-binary")
            );
        } else {
            assert!(seen.body.is_empty());
        }
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {UPSTREAM_SECRET}")),
            "set_headers replaces the client's credential, with ${{VAR}} from tollgate's env"
        );
        assert_eq!(seen.header("x-static").as_deref(), Some("static-value"));
        assert_eq!(
            seen.header("x-mixed"),
            Some(format!("pre-{UPSTREAM_SECRET}-post"))
        );
        assert_eq!(
            seen.header("x-client-header").as_deref(),
            Some("kept as is")
        );
        assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
        assert!(
            !seen.any_header_contains(&key),
            "the client's tollgate key reached the upstream: {:?}",
            seen.headers
        );
        assert_eq!(
            seen.header("host"),
            Some(up.addr.to_string()),
            "the upstream's own Host"
        );

        // What the client got back.
        if with_body {
            assert!(got == body, "{method}: response body differs");
            assert_eq!(
                header(&headers, "content-type").as_deref(),
                Some("application/x-e2e-binary")
            );
        } else {
            assert!(got.is_empty());
        }
        assert_eq!(
            header(&headers, "x-echo-method").as_deref(),
            Some(method.as_str())
        );
        assert_eq!(header(&headers, "x-echo-query").as_deref(), Some(query));
        assert_eq!(header(&headers, "x-upstream").as_deref(), Some("fake"));
        let multi: Vec<_> = headers
            .get_all("x-multi")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(multi, ["a", "b"], "repeated response headers are all kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_header_and_authorization_are_removed() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up))
        .env("AGENT_API_KEY", UPSTREAM_SECRET)
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;

    // X-Api-Key on an upstream without set_headers: the header is gone, nothing replaces it.
    let resp = app
        .client()
        .post(app.proxy_url("/plain/echo"))
        .header("x-api-key", &key)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello");
    let seen = up.last_request();
    assert_eq!(
        seen.uri, "/plain/echo",
        "trailing slash of the upstream url is not doubled"
    );
    assert!(seen.header("x-api-key").is_none(), "{:?}", seen.headers);
    assert!(seen.header("authorization").is_none(), "{:?}", seen.headers);
    assert!(!seen.any_header_contains(&key));

    // Authorization: Bearer on the same upstream: removed too.
    let resp = app
        .client()
        .get(app.proxy_url("/plain/echo?x=1"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last_request();
    assert_eq!(seen.uri, "/plain/echo?x=1");
    assert!(seen.header("authorization").is_none(), "{:?}", seen.headers);
    assert!(!seen.any_header_contains(&key));

    // X-Api-Key on the upstream with set_headers: authorization is the upstream's.
    let resp = app
        .client()
        .get(app.proxy_url("/v1/echo"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last_request();
    assert!(seen.header("x-api-key").is_none());
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {UPSTREAM_SECRET}"))
    );
    assert!(!seen.any_header_contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_response_and_status_codes_pass_through() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up))
        .env("AGENT_API_KEY", UPSTREAM_SECRET)
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;

    let resp = app
        .client()
        .get(app.proxy_url("/v1/binary"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(resp.headers(), "content-type").as_deref(),
        Some("application/octet-stream")
    );
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.to_vec(), (0..=255u8).collect::<Vec<_>>());
    assert_eq!(up.last_request().uri, "/base/v1/binary");

    // The upstream's own statuses and bodies, not tollgate errors.
    for code in [201u16, 400, 404, 418, 429, 500, 502, 503] {
        let resp = app
            .client()
            .get(app.proxy_url(&format!("/v1/status/{code}")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"upstream_status": code}));
    }
    let resp = app
        .client()
        .delete(app.proxy_url("/v1/status/204"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());

    // Echo with a chosen status and a text body.
    let resp = app
        .client()
        .post(app.proxy_url("/v1/echo?echo_status=202"))
        .bearer_auth(&key)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body("ünïcödé ✓")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        header(resp.headers(), "content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(resp.text().await.unwrap(), "ünïcödé ✓");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_added_or_kept_on_both_sides() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up))
        .env("AGENT_API_KEY", UPSTREAM_SECRET)
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;

    // None sent: one is made up, the same on the upstream request and on the response.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = app
            .client()
            .get(app.proxy_url("/v1/echo"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = header(resp.headers(), "x-request-id").expect("x-request-id on the response");
        assert!(!id.is_empty());
        assert_eq!(
            up.last_request().header("x-request-id").as_deref(),
            Some(id.as_str())
        );
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "request ids are unique");

    // Sent by the client: kept.
    let mine = format!("client-req-{}", random_id(12));
    let resp = app
        .client()
        .get(app.proxy_url("/v1/echo"))
        .bearer_auth(&key)
        .header("x-request-id", &mine)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(resp.headers(), "x-request-id").as_deref(),
        Some(mine.as_str())
    );
    let seen = up.last_request();
    assert_eq!(seen.header("x-request-id").as_deref(), Some(mine.as_str()));
    assert_eq!(seen.headers.get_all("x-request-id").iter().count(), 1);

    // Too long to be a request id: replaced by a fresh one, on both sides.
    let long = "x".repeat(300);
    let resp = app
        .client()
        .get(app.proxy_url("/v1/echo"))
        .bearer_auth(&key)
        .header("x-request-id", &long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = header(resp.headers(), "x-request-id").unwrap();
    assert_ne!(id, long);
    assert_eq!(up.last_request().header("x-request-id"), Some(id));

    // Tollgate's own answers carry it too.
    let resp = app
        .client()
        .get(app.proxy_url("/v1/echo"))
        .header("x-request-id", &mine)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        header(resp.headers(), "x-request-id").as_deref(),
        Some(mine.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_need_no_credentials_and_keep_client_headers() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up))
        .env("AGENT_API_KEY", UPSTREAM_SECRET)
        .spawn()
        .await;

    let resp = app
        .client()
        .get(app.proxy_url("/public/health?deep=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last_request();
    assert_eq!(seen.uri, "/public/health?deep=1");
    assert!(seen.header("x-request-id").is_some());

    // A path that only shares a prefix string with a route does not match it.
    let resp = app
        .client()
        .get(app.proxy_url("/publicity"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "/publicity falls to the catch-all authenticated route"
    );
}
