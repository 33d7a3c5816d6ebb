//! JWT callers (`[auth.jwt]`): HS256 with a secret from the environment, RS256 and ES256 with
//! public keys (fixtures in tests/fixtures/jwt). A valid token naming an existing account is
//! accepted; everything else is 401 invalid_credentials.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{
    assert_error, passthrough_toml, poll_until, random_id, toml_str, App, TestEnv,
};
use crate::upstream::FakeUpstream;

const ISSUER: &str = "https://issuer.e2e.example/";
const AUDIENCE: &str = "tollgate-e2e";
const SECRET_ENV: &str = "E2E_JWT_SECRET";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(account: &str) -> Value {
    json!({
        "org": account,
        "sub": "user-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 600,
    })
}

/// `claims` with `field` replaced (or removed when `value` is null).
fn with(mut claims: Value, field: &str, value: Value) -> Value {
    let map = claims.as_object_mut().unwrap();
    if value.is_null() {
        map.remove(field);
    } else {
        map.insert(field.to_string(), value);
    }
    claims
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&fixture("rs256-private.pem")).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&fixture("es256-private.pem")).unwrap();
    encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
}

/// An unsigned token (`alg: none`).
fn alg_none(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// The token with one character in the middle of its signature changed.
fn tamper_signature(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    let mid = sig.len() / 2;
    sig[mid] = if sig[mid] == b'A' { b'B' } else { b'A' };
    format!("{rest}.{}", String::from_utf8(sig).unwrap())
}

/// The token with its payload replaced by `claims`, keeping the original signature.
fn swap_payload(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let _payload = parts.next().unwrap();
    let sig = parts.next().unwrap();
    format!(
        "{header}.{}.{sig}",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn jwt_section(lines: &str) -> String {
    format!(
        "[auth.jwt]\naccount_claim = \"org\"\nissuer = {}\naudience = {}\nleeway_seconds = 5\n{lines}\n",
        toml_str(ISSUER),
        toml_str(AUDIENCE)
    )
}

async fn call(app: &App, token: &str) -> reqwest::Response {
    app.client()
        .get(app.proxy_url("/v1/models"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn assert_accepted(app: &App, up: &FakeUpstream, token: &str) {
    let resp = call(app, token).await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 200, "a valid token was refused: {body}");
    let seen = up.last_request();
    assert!(
        !seen.any_header_contains(token),
        "the JWT reached the upstream"
    );
    assert!(seen.header("authorization").is_none());
}

async fn assert_refused(app: &App, label: &str, token: &str) {
    let resp = call(app, token).await;
    let status = resp.status();
    assert_eq!(status, 401, "{label}: expected 401, got {status}");
    let body = assert_error(resp, 401, "invalid_credentials").await;
    assert!(!body.to_string().contains(token), "{label}: token echoed");
}

async fn hs256_app(env: &TestEnv, up: &FakeUpstream, secret: &str) -> App {
    env.config()
        .toml(passthrough_toml(&up.url()))
        .toml(jwt_section(&format!(
            "algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\""
        )))
        .env(SECRET_ENV, secret)
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_valid_tokens_pass_and_bad_ones_get_401() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let secret = format!("jwt-secret-{}", random_id(24));
    let app = hs256_app(&env, &up, &secret).await;
    let account = format!("org_{}", random_id(8));
    app.create_account(&account, "default").await;
    let good = claims(&account);

    assert_accepted(&app, &up, &hs256(&secret, &good)).await;
    // Extra claims are fine; a numeric claim names the account with that number as its id.
    assert_accepted(
        &app,
        &up,
        &hs256(&secret, &with(good.clone(), "scope", json!("a b"))),
    )
    .await;
    let numeric: u64 = 1_000_000_000 + rand::random::<u32>() as u64;
    app.create_account(&numeric.to_string(), "default").await;
    assert_accepted(
        &app,
        &up,
        &hs256(&secret, &with(good.clone(), "org", json!(numeric))),
    )
    .await;
    let forwarded = up.request_count();

    let valid = hs256(&secret, &good);
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            hs256(&secret, &with(good.clone(), "exp", json!(now() - 600))),
        ),
        (
            "not yet valid (nbf)",
            hs256(&secret, &with(good.clone(), "nbf", json!(now() + 600))),
        ),
        (
            "wrong audience",
            hs256(&secret, &with(good.clone(), "aud", json!("someone-else"))),
        ),
        (
            "wrong issuer",
            hs256(
                &secret,
                &with(good.clone(), "iss", json!("https://evil.example/")),
            ),
        ),
        (
            "no exp",
            hs256(&secret, &with(good.clone(), "exp", Value::Null)),
        ),
        ("wrong secret", hs256("another-secret-entirely", &good)),
        ("tampered signature", tamper_signature(&valid)),
        (
            "payload swapped under a valid signature",
            swap_payload(&valid, &with(good.clone(), "org", json!("someone_else"))),
        ),
        ("alg none", alg_none(&good)),
        ("alg none, signature kept", {
            let (_, rest) = valid.split_once('.').unwrap();
            format!(
                "{}.{rest}",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
            )
        }),
        ("HS384 (not listed)", {
            encode(
                &Header::new(Algorithm::HS384),
                &good,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        }),
        ("RS256 when only HS256 is configured", rs256(&good)),
        (
            "unknown account",
            hs256(&secret, &with(good.clone(), "org", json!("no_such_org"))),
        ),
        (
            "no account claim",
            hs256(&secret, &with(good.clone(), "org", Value::Null)),
        ),
        (
            "account claim not an id",
            hs256(&secret, &with(good.clone(), "org", json!("bad id!"))),
        ),
        (
            "account claim an object",
            hs256(&secret, &with(good.clone(), "org", json!({"id": account}))),
        ),
        ("garbage in JWT shape", "aaaa.bbbb.cccc".to_string()),
    ];
    for (label, token) in &cases {
        assert_refused(&app, label, token).await;
    }
    assert_eq!(
        up.request_count(),
        forwarded,
        "a refused token reached the upstream"
    );

    // The valid token still works after all that.
    assert_accepted(&app, &up, &valid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_with_a_public_key_file() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // Relative to the config file's directory.
    env.write_file("jwt-public.pem", fixture("rs256-public.pem"));
    let app = env
        .config()
        .toml(passthrough_toml(&up.url()))
        .toml(jwt_section(
            "algorithms = [\"RS256\"]\npublic_key_file = \"jwt-public.pem\"",
        ))
        .spawn()
        .await;
    let account = format!("org_{}", random_id(8));
    app.create_account(&account, "default").await;
    let good = claims(&account);

    assert_accepted(&app, &up, &rs256(&good)).await;
    let public_pem = String::from_utf8(fixture("rs256-public.pem")).unwrap();
    let cases: Vec<(&str, String)> = vec![
        // Algorithm confusion: HS256 keyed with the public key.
        (
            "HS256 signed with the RSA public key",
            hs256(&public_pem, &good),
        ),
        ("HS256", hs256("whatever-secret", &good)),
        ("ES256", es256(&good)),
        ("alg none", alg_none(&good)),
        ("tampered signature", tamper_signature(&rs256(&good))),
        (
            "expired",
            rs256(&with(good.clone(), "exp", json!(now() - 600))),
        ),
        (
            "not yet valid",
            rs256(&with(good.clone(), "nbf", json!(now() + 600))),
        ),
        (
            "wrong audience",
            rs256(&with(good.clone(), "aud", json!(["x", "y"]))),
        ),
        (
            "wrong issuer",
            rs256(&with(good.clone(), "iss", json!("https://evil.example/"))),
        ),
        (
            "unknown account",
            rs256(&with(good.clone(), "org", json!("nobody_here"))),
        ),
    ];
    for (label, token) in &cases {
        assert_refused(&app, label, token).await;
    }
    // An audience list containing ours is accepted.
    assert_accepted(
        &app,
        &up,
        &rs256(&with(good.clone(), "aud", json!(["other", AUDIENCE]))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_with_a_public_key_from_the_environment() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let pem = String::from_utf8(fixture("es256-public.pem")).unwrap();
    let app = env
        .config()
        .toml(passthrough_toml(&up.url()))
        .toml(jwt_section(
            "algorithms = [\"ES256\"]\npublic_key_env = \"E2E_JWT_PUBLIC_KEY\"",
        ))
        .env("E2E_JWT_PUBLIC_KEY", pem.clone())
        .spawn()
        .await;
    let account = format!("org_{}", random_id(8));
    app.create_account(&account, "default").await;
    let good = claims(&account);

    assert_accepted(&app, &up, &es256(&good)).await;
    let cases: Vec<(&str, String)> = vec![
        ("RS256", rs256(&good)),
        ("HS256 signed with the EC public key", hs256(&pem, &good)),
        ("alg none", alg_none(&good)),
        ("tampered signature", tamper_signature(&es256(&good))),
        (
            "expired",
            es256(&with(good.clone(), "exp", json!(now() - 600))),
        ),
        (
            "wrong audience",
            es256(&with(good.clone(), "aud", json!("nope"))),
        ),
        (
            "wrong issuer",
            es256(&with(good.clone(), "iss", json!("nope"))),
        ),
        (
            "unknown account",
            es256(&with(good.clone(), "org", json!("nobody_here"))),
        ),
    ];
    for (label, token) in &cases {
        assert_refused(&app, label, token).await;
    }
}

/// With `issuer` and `audience` configured, a token that simply leaves `iss` or `aud` out must
/// not be accepted: otherwise a token minted for another service with the same key (a shared
/// HS256 secret, an identity provider's signing key) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_issuer_and_audience_are_required_claims() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let secret = format!("jwt-secret-{}", random_id(24));
    let app = hs256_app(&env, &up, &secret).await;
    let account = format!("org_{}", random_id(8));
    app.create_account(&account, "default").await;
    let good = claims(&account);
    assert_accepted(&app, &up, &hs256(&secret, &good)).await;

    let mut accepted = Vec::new();
    for (label, claim) in [("no aud claim", "aud"), ("no iss claim", "iss")] {
        let token = hs256(&secret, &with(good.clone(), claim, Value::Null));
        if call(&app, &token).await.status() != 401 {
            accepted.push(label);
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted although issuer and audience are configured: {accepted:?}"
    );
}

/// A refused JWT for an account that does not exist yet must not lock the account out once it
/// is created: misses are cached only briefly (src/auth/mod.rs: "Negative entries ... live
/// [DEGRADED_TTL = 1 s]").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_account_created_after_a_refusal_is_accepted_soon() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let secret = format!("jwt-secret-{}", random_id(24));
    let app = hs256_app(&env, &up, &secret).await;
    let account = format!("org_{}", random_id(8));
    let token = hs256(&secret, &claims(&account));

    assert_refused(&app, "account not created yet", &token).await;
    app.create_account(&account, "default").await;
    // The negative cache entry lives 1 s; waited for with a margin for a slow machine.
    let accepted = poll_until(Duration::from_secs(5), || async {
        call(&app, &token).await.status() == 200
    })
    .await;
    assert!(
        accepted,
        "the token is still refused 5 s after its account was created (negative cache entry)"
    );
}
