//! JWT keys from a JWKS URL (`[auth.jwt] jwks_url`), against a JWKS server in the test: keys
//! picked by `kid`, rotated without a restart, a flood of forged `kid`s rate-limited (counted
//! in the server's hits), unknown keys refused 401, an unreachable JWKS answered 503
//! `auth_keys_unavailable` until it loads, and cached keys kept while it is down.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{
    assert_error, http_client_no_pool, passthrough_toml, poll_until, random_id, toml_str, App,
    TestEnv,
};
use crate::upstream::FakeUpstream;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A signing key of the test and the public JWK the JWKS server publishes for it.
struct SigningKey {
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    fn rsa(file: &str) -> SigningKey {
        SigningKey {
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(&fixture(file)).unwrap(),
        }
    }

    fn ec(file: &str) -> SigningKey {
        SigningKey {
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(&fixture(file)).unwrap(),
        }
    }

    /// The public JWK (the private parts are never in it) with `kid`.
    fn jwk(&self, kid: &str) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        let value = serde_json::to_value(&jwk).unwrap();
        assert!(value.get("d").is_none(), "a private key in the JWKS");
        value
    }

    fn token(&self, kid: &str, account: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.to_string());
        let claims = json!({"org": account, "sub": "user-1", "iat": now, "exp": now + 600});
        encode(&header, &claims, &self.key).unwrap()
    }
}

/// The identity provider's JWKS endpoint: serves `doc` (or 503 while `down`), counts hits.
#[derive(Clone, Default)]
struct JwksServer {
    doc: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    addr: Arc<Mutex<Option<std::net::SocketAddr>>>,
}

async fn serve_jwks(State(s): State<JwksServer>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let doc = s.doc.lock().unwrap().clone();
    Json(doc).into_response()
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let server = JwksServer::default();
        server.publish(keys);
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", axum::routing::get(serve_jwks))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *server.addr.lock().unwrap() = Some(listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    fn url(&self) -> String {
        let addr = self.addr.lock().unwrap().unwrap();
        format!("http://{addr}/.well-known/jwks.json")
    }

    fn publish(&self, keys: Vec<Value>) {
        *self.doc.lock().unwrap() = json!({ "keys": keys });
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

async fn spawn(
    env: &TestEnv,
    up: &FakeUpstream,
    jwks: &JwksServer,
    refresh_seconds: u64,
    min_refetch_seconds: u64,
) -> App {
    env.config()
        .toml(passthrough_toml(&up.url()))
        .toml(format!(
            "[auth.jwt]\nalgorithms = [\"RS256\", \"ES256\"]\naccount_claim = \"org\"\njwks_url = {}\njwks_refresh_seconds = {refresh_seconds}\njwks_min_refetch_seconds = {min_refetch_seconds}\n",
            toml_str(&jwks.url())
        ))
        .spawn()
        .await
}

async fn status_of(app: &App, token: &str) -> u16 {
    app.client()
        .get(app.proxy_url("/v1/models"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn account(app: &App) -> String {
    let account = format!("org_{}", random_id(8));
    app.create_account(&account, "default").await;
    account
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let (old, new, ec) = (
        SigningKey::rsa("rs256-private.pem"),
        SigningKey::rsa("rs256-b-private.pem"),
        SigningKey::ec("es256-private.pem"),
    );
    let jwks = JwksServer::start(vec![old.jwk("old"), ec.jwk("ec-1")]).await;
    let app = spawn(&env, &up, &jwks, 3600, 1).await;
    let org = account(&app).await;

    // RS256 and ES256 keys from the JWKS, picked by kid.
    assert_eq!(status_of(&app, &old.token("old", &org)).await, 200);
    assert_eq!(status_of(&app, &ec.token("ec-1", &org)).await, 200);
    // A key the JWKS does not have, under a kid it does: the signature does not verify.
    assert_error(
        app.client()
            .get(app.proxy_url("/v1/models"))
            .bearer_auth(new.token("old", &org))
            .send()
            .await
            .unwrap(),
        401,
        "invalid_credentials",
    )
    .await;

    // The provider rotates: the new key is published, the old one removed.
    jwks.publish(vec![new.jwk("new"), ec.jwk("ec-1")]);
    let hits_before = jwks.hits();
    let token = new.token("new", &org);
    let accepted = poll_until(Duration::from_secs(10), || async {
        status_of(&app, &token).await == 200
    })
    .await;
    assert!(
        accepted,
        "the rotated key was never accepted:\n{}",
        app.logs()
    );
    assert!(jwks.hits() > hits_before, "no refetch on the unknown kid");
    // The refetch dropped the old key: its tokens are refused now, by the same process.
    assert_eq!(status_of(&app, &old.token("old", &org)).await, 401);
    assert_eq!(status_of(&app, &ec.token("ec-1", &org)).await, 200);
    assert!(app.logs().matches("listening proxy=").count() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_kids_fetches_at_most_once_per_interval() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let key = SigningKey::rsa("rs256-private.pem");
    let jwks = JwksServer::start(vec![key.jwk("k1")]).await;
    // Periodic refresh and the unknown-kid interval far longer than the test.
    let app = spawn(&env, &up, &jwks, 3600, 600).await;
    let org = account(&app).await;
    assert_eq!(status_of(&app, &key.token("k1", &org)).await, 200);
    let loaded = poll_until(Duration::from_secs(5), || async { jwks.hits() >= 1 }).await;
    assert!(loaded);
    let hits_before = jwks.hits();

    let client = http_client_no_pool();
    let forged: Vec<String> = (0..200)
        .map(|i| key.token(&format!("forged-{i}-{}", random_id(6)), &org))
        .collect();
    let statuses = join_all(forged.iter().map(|t| {
        let client = &client;
        let url = app.proxy_url("/v1/models");
        async move {
            client
                .get(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    }))
    .await;
    assert!(
        statuses.iter().all(|s| *s == 401),
        "forged kids not all refused: {statuses:?}"
    );
    // At most one fetch for the whole flood (the interval since start-up may allow one).
    let fetched = jwks.hits() - hits_before;
    assert!(fetched <= 1, "{fetched} JWKS fetches for 200 forged kids");
    // The real key still works from the cache.
    assert_eq!(status_of(&app, &key.token("k1", &org)).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_jwks_is_503_until_loaded_and_cached_keys_survive_an_outage() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let key = SigningKey::rsa("rs256-private.pem");
    let jwks = JwksServer::start(vec![key.jwk("k1")]).await;
    jwks.set_down(true);
    // The proxy starts although the JWKS does not answer.
    let app = spawn(&env, &up, &jwks, 1, 1).await;
    let org = account(&app).await;
    let token = key.token("k1", &org);
    let resp = app
        .client()
        .get(app.proxy_url("/v1/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "5");
    assert_error(resp, 503, "auth_keys_unavailable").await;

    // The provider comes back: the keys load (background retry or the next token's fetch).
    jwks.set_down(false);
    let accepted = poll_until(Duration::from_secs(15), || async {
        status_of(&app, &token).await == 200
    })
    .await;
    assert!(accepted, "keys never loaded:\n{}", app.logs());

    // Down again: the periodic refresh (every second) fails, the cached key keeps working.
    jwks.set_down(true);
    let hits = jwks.hits();
    let retried = poll_until(Duration::from_secs(15), || async {
        jwks.hits() >= hits + 2
    })
    .await;
    assert!(retried, "no refresh attempts while down");
    assert_eq!(status_of(&app, &token).await, 200);
    assert!(
        app.logs().contains("cached keys stay in use"),
        "{}",
        app.logs()
    );
}
