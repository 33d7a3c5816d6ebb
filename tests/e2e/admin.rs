//! The admin API: health, the admin token, accounts and keys, and JSON errors for bad input.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{parse_body, passthrough_toml, random_id, App, TestEnv};
use crate::upstream::FakeUpstream;

async fn raw(
    app: &App,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let mut req = app.client().request(method, app.admin_url(path));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    if let Some((content_type, body)) = body {
        req = req
            .header("content-type", content_type)
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let is_json = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let text = resp.text().await.unwrap();
    if !text.is_empty() {
        assert!(is_json, "{status} answer is not JSON: {text}");
    }
    (status, parse_body(&text))
}

fn assert_json_error(status: StatusCode, body: &Value, want: u16, code: &str) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_token_and_errors() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;

    // Health and readiness need no token.
    let (status, body) = raw(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "ok", "redis": true, "postgres": true})
    );

    // No token, a wrong one, another scheme: 401 JSON.
    let token = app.admin_token().to_string();
    let wrong = format!("Bearer {token}x");
    let short = format!("Bearer {}", &token[..token.len() - 1]);
    let basic = format!("Basic {token}");
    for auth in [
        None,
        Some(wrong.as_str()),
        Some(short.as_str()),
        Some(basic.as_str()),
        Some("Bearer "),
    ] {
        let (status, body) = raw(&app, Method::GET, "/v1/accounts/whoever", auth, None).await;
        assert_json_error(status, &body, 401, "unauthorized");
        let (status, body) = raw(
            &app,
            Method::POST,
            "/v1/accounts",
            auth,
            Some(("application/json", r#"{"id":"sneaky","tier":"default"}"#)),
        )
        .await;
        assert_json_error(status, &body, 401, "unauthorized");
    }
    // Nothing was created by the refused calls.
    let (status, _) = app.admin_get("/v1/accounts/sneaky").await;
    assert_eq!(status, 404);

    let bearer = format!("Bearer {token}");
    let auth = Some(bearer.as_str());
    // Malformed JSON, wrong shape, missing field, unknown field, wrong content type: 400 JSON.
    for (content_type, body) in [
        ("application/json", "{not json"),
        ("application/json", ""),
        ("application/json", "[1,2]"),
        ("application/json", r#"{"id":"x"}"#),
        (
            "application/json",
            r#"{"id":"x","tier":"default","extra":1}"#,
        ),
        ("application/json", r#"{"id":5,"tier":"default"}"#),
        ("text/plain", r#"{"id":"x","tier":"default"}"#),
    ] {
        let (status, answer) = raw(
            &app,
            Method::POST,
            "/v1/accounts",
            auth,
            Some((content_type, body)),
        )
        .await;
        assert_json_error(status, &answer, 400, "invalid_request");
    }
    // An id outside the allowed alphabet.
    let (status, body) = app
        .admin_post(
            "/v1/accounts",
            json!({"id": "bad id/../x", "tier": "default"}),
        )
        .await;
    assert_json_error(status, &body, 400, "invalid_request");
    // Unknown tier.
    let (status, body) = app
        .admin_post("/v1/accounts", json!({"id": "acct_t", "tier": "platinum"}))
        .await;
    assert_json_error(status, &body, 400, "unknown_tier");

    // Unknown endpoint.
    let (status, body) = raw(&app, Method::GET, "/v1/nothing-here", auth, None).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_keys() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;

    let id = format!("acct.{}@example-{}", random_id(6), random_id(4));
    let created = app.create_account(&id, "default").await;
    assert_eq!(created["id"], id.as_str());
    assert_eq!(created["tier"], "default");
    assert_eq!(created["status"], "active");
    assert!(created["period_end"].is_string(), "{created}");

    let (status, got) = app.admin_get(&format!("/v1/accounts/{id}")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["tier"], "default");
    assert_eq!(got["status"], "active");
    assert_eq!(got["period_end"], created["period_end"]);

    // Duplicate → 409, and the original is untouched.
    let (status, body) = app
        .admin_post("/v1/accounts", json!({"id": id, "tier": "default"}))
        .await;
    assert_json_error(status, &body, 409, "conflict");

    // Unknown account → 404.
    let (status, body) = app.admin_get("/v1/accounts/no_such_account").await;
    assert_json_error(status, &body, 404, "not_found");

    // Keys: shown once, in the documented shape.
    let (status, key) = app
        .admin_post(&format!("/v1/accounts/{id}/keys"), json!({"name": "ci"}))
        .await;
    assert_eq!(status, 201, "{key}");
    let plaintext = key["key"].as_str().unwrap();
    let prefix = key["prefix"].as_str().unwrap();
    assert!(
        plaintext.starts_with("tg_") && plaintext.len() == 35,
        "{key}"
    );
    assert!(
        plaintext.starts_with(prefix) && prefix.len() < plaintext.len(),
        "{key}"
    );
    assert!(key["id"].as_str().is_some_and(|k| !k.is_empty()), "{key}");
    // The key works through the proxy.
    let resp = app
        .client()
        .get(app.proxy_url("/v1/models"))
        .bearer_auth(plaintext)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A name is optional; an unknown account gets 404.
    let (status, body) = app
        .admin_post(&format!("/v1/accounts/{id}/keys"), json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .admin_post("/v1/accounts/no_such_account/keys", json!({"name": "x"}))
        .await;
    assert_json_error(status, &body, 404, "not_found");

    // Revoking an unknown key → 404; a real one → 204 with no body.
    let (status, body) = app.admin_delete("/v1/keys/key_doesnotexist").await;
    assert_json_error(status, &body, 404, "not_found");
    let key_id = key["id"].as_str().unwrap();
    let (status, body) = app.admin_delete(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(status, 204);
    assert_eq!(body, Value::Null);

    // Nothing about keys is stored in plaintext.
    let pool = env.pg().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE name = $1 OR prefix = $1 OR encode(key_hash, 'escape') = $1",
    )
    .bind(plaintext)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    pool.close().await;
}
