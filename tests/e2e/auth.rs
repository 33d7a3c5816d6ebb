//! API-key authentication and the answers tollgate gives itself before forwarding:
//! 401 missing/invalid credentials, 404 route_not_found. Refused requests never reach the
//! upstream.

use crate::harness::{assert_error, random_id, TestEnv};
use crate::upstream::FakeUpstream;

fn config(up: &FakeUpstream) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{url}"

[[routes]]
name = "chat"
method = "POST"
path_prefix = "/v1/chat"
upstream = "up"
cost = 0

[[routes]]
name = "models"
path_prefix = "/v1/models"
upstream = "up"
cost = 0

[tiers.default]
monthly_credits = "unlimited"
"#,
        url = up.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_invalid_credentials_get_401_json() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up)).spawn().await;
    let (_account, key) = app.account_with_key("default").await;
    let url = app.proxy_url("/v1/models");
    let c = app.client();

    // No credential at all.
    assert_error(
        c.get(&url).send().await.unwrap(),
        401,
        "missing_credentials",
    )
    .await;
    // Empty values count as missing.
    assert_error(
        c.get(&url).header("x-api-key", "").send().await.unwrap(),
        401,
        "missing_credentials",
    )
    .await;
    assert_error(
        c.get(&url)
            .header("authorization", "Bearer ")
            .send()
            .await
            .unwrap(),
        401,
        "missing_credentials",
    )
    .await;

    // Well-formed but unknown key, in either header.
    let unknown = format!("tg_{}", random_id(32));
    assert_error(
        c.get(&url).bearer_auth(&unknown).send().await.unwrap(),
        401,
        "invalid_credentials",
    )
    .await;
    assert_error(
        c.get(&url)
            .header("x-api-key", &unknown)
            .send()
            .await
            .unwrap(),
        401,
        "invalid_credentials",
    )
    .await;
    // A real key with one character changed.
    let mut tampered = key.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_error(
        c.get(&url).bearer_auth(&tampered).send().await.unwrap(),
        401,
        "invalid_credentials",
    )
    .await;

    // Malformed keys.
    for bad in [
        "not-a-key",
        "tg_short",
        &format!("tg_{}", "!".repeat(32)),
        &format!("{key}x"),
        "a.b.c",
    ] {
        let body = assert_error(
            c.get(&url).bearer_auth(bad).send().await.unwrap(),
            401,
            "invalid_credentials",
        )
        .await;
        assert!(
            !body.to_string().contains(bad),
            "the credential is echoed: {body}"
        );
        assert_error(
            c.get(&url).header("x-api-key", bad).send().await.unwrap(),
            401,
            "invalid_credentials",
        )
        .await;
    }

    assert_eq!(
        up.request_count(),
        0,
        "refused requests must not reach the upstream"
    );

    // And the real key works.
    let resp = c.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_gets_401() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up)).spawn().await;
    let account = format!("acct_{}", random_id(8));
    app.create_account(&account, "default").await;
    let (key_id, key) = app.create_key(&account).await;
    let (_other_id, other_key) = app.create_key(&account).await;
    let url = app.proxy_url("/v1/models");

    let resp = app
        .client()
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    app.revoke_key(&key_id).await;
    // The instance that revoked it drops it from its cache at once.
    assert_error(
        app.client()
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        401,
        "invalid_credentials",
    )
    .await;
    // The account's other key is unaffected.
    let resp = app
        .client()
        .get(&url)
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_404_route_not_found() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up)).spawn().await;
    let (_account, key) = app.account_with_key("default").await;
    let c = app.client();

    for (method, path) in [
        (reqwest::Method::GET, "/nope"),
        (reqwest::Method::GET, "/"),
        (reqwest::Method::GET, "/v1/chat/completions"), // the chat route is POST only
        (reqwest::Method::POST, "/v1/chatter"),         // whole segments only
        (reqwest::Method::POST, "/v2/chat"),
    ] {
        // With and without a credential: no route → 404 either way.
        assert_error(
            c.request(method.clone(), app.proxy_url(path))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap(),
            404,
            "route_not_found",
        )
        .await;
        assert_error(
            c.request(method.clone(), app.proxy_url(path))
                .send()
                .await
                .unwrap(),
            404,
            "route_not_found",
        )
        .await;
    }
    assert_eq!(up.request_count(), 0);

    let resp = c
        .post(app.proxy_url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
