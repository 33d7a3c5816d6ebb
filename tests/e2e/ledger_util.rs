//! Helpers shared by the `ledger_*` tests: proxied calls with their credit headers, balances as
//! the admin API shows them, direct access to an account's Redis hash (to simulate the clock
//! moving on), and [`RedisGate`], a TCP relay in front of the real Redis that a test can switch
//! off to simulate an outage.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::harness::{json_response, metric_value, poll_until, App, TestEnv};

/// The shard count tollgate uses when `[redis] shards` is not set.
pub const DEFAULT_SHARDS: u32 = 64;

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Hourly quotas are clock hours: a test that counts calls in one hour does not start in the
/// last `margin_secs` of one (it waits for the next hour to begin then).
pub async fn clear_of_the_hour_end(margin_secs: i64) {
    let left = 3600 - unix_now() % 3600;
    if left <= margin_secs {
        eprintln!("waiting {left} s for the next clock hour (an hourly quota is counted)");
        tokio::time::sleep(std::time::Duration::from_secs(left as u64 + 1)).await;
    }
}

/// One answer of the proxy: status, headers, JSON body (or the text as a JSON string).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn charged(&self) -> Option<String> {
        self.header("x-credits-charged")
    }

    pub fn remaining(&self) -> Option<String> {
        self.header("x-credits-remaining")
    }

    /// Asserts a tollgate error: status, JSON content type, `error` code and a message.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status} {code}, got {}: {}",
            self.status,
            self.body
        );
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "content-type {content_type:?} for {}",
            self.body
        );
        assert_eq!(self.body["error"], code, "{}", self.body);
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message in {}",
            self.body
        );
    }
}

/// `method path` through the proxy of `app` with `key` as a bearer token.
pub async fn call_with(
    client: &reqwest::Client,
    app: &App,
    key: &str,
    method: Method,
    path: &str,
) -> Answer {
    let resp = client
        .request(method, app.proxy_url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request {path}: {e}"));
    let (status, headers, body) = json_response(resp).await;
    Answer {
        status,
        headers,
        body,
    }
}

/// `GET path` through the proxy with `key`, on the app's shared client.
pub async fn get(app: &App, key: &str, path: &str) -> Answer {
    call_with(app.client(), app, key, Method::GET, path).await
}

/// Asserts a 200 from the upstream and returns the answer.
pub async fn get_ok(app: &App, key: &str, path: &str) -> Answer {
    let a = get(app, key, path).await;
    assert_eq!(a.status, StatusCode::OK, "GET {path}: {}", a.body);
    a
}

/// The account as `GET /v1/accounts/{id}` shows it (asserts 200).
pub async fn account(app: &App, id: &str) -> Value {
    let (status, body) = app.admin_get(&format!("/v1/accounts/{id}")).await;
    assert_eq!(status, StatusCode::OK, "GET account {id}: {body}");
    body
}

/// `(allowance, purchased, total)` of an account, as the decimal texts the admin API prints.
pub async fn balance(app: &App, id: &str) -> (String, String, String) {
    let body = account(app, id).await;
    let b = &body["balance"];
    assert!(b.is_object(), "no balance in {body}");
    (
        b["allowance"].to_string(),
        b["purchased"].to_string(),
        b["total"].to_string(),
    )
}

/// The total balance as text.
pub async fn total(app: &App, id: &str) -> String {
    balance(app, id).await.2
}

/// Polls until the account's total balance is `want` (refunds are applied just after the
/// response); asserts it gets there within 5 s.
pub async fn wait_total(app: &App, id: &str, want: &str) {
    let ok = poll_until(Duration::from_secs(5), || async {
        total(app, id).await == want
    })
    .await;
    assert!(
        ok,
        "balance of {id} is {}, expected {want}",
        total(app, id).await
    );
}

/// `POST /v1/accounts/{id}/grants` (any status).
pub async fn grant(app: &App, id: &str, credits: Value, key: &str) -> (StatusCode, Value) {
    app.admin_post(
        &format!("/v1/accounts/{id}/grants"),
        serde_json::json!({"credits": credits, "reason": "e2e test grant", "idempotency_key": key}),
    )
    .await
}

/// A metric sample, 0 when absent.
pub async fn metric(app: &App, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&app.metrics_text().await, name, labels).unwrap_or(0.0)
}

/// Polls until a metric reaches at least `want` (counters are updated when a request is
/// logged, just after its response).
pub async fn wait_metric_at_least(app: &App, name: &str, labels: &[(&str, &str)], want: f64) {
    let ok = poll_until(Duration::from_secs(5), || async {
        metric(app, name, labels).await >= want
    })
    .await;
    assert!(
        ok,
        "{name}{labels:?} is {}, expected at least {want}",
        metric(app, name, labels).await
    );
}

// ---------------------------------------------------------------------------------------------
// The account's Redis hash

/// FNV-1a 64 of the account id modulo `shards`: the documented key layout.
pub fn shard_of(account_id: &str, shards: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in account_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % u64::from(shards)
}

/// `{<prefix>:s<N>}:acct:<id>` with the default shard count.
pub fn account_key(env: &TestEnv, account_id: &str) -> String {
    format!(
        "{{{}:s{}}}:acct:{account_id}",
        env.prefix(),
        shard_of(account_id, DEFAULT_SHARDS)
    )
}

/// `{<prefix>:s<N>}:leases:<id>`.
pub fn leases_key(env: &TestEnv, account_id: &str) -> String {
    format!(
        "{{{}:s{}}}:leases:{account_id}",
        env.prefix(),
        shard_of(account_id, DEFAULT_SHARDS)
    )
}

/// Sets fields of the account's hash in Redis; asserts the hash exists first (so a wrong key
/// layout fails loudly instead of creating a stray key).
pub async fn hset(env: &TestEnv, account_id: &str, fields: &[(&str, String)]) {
    let key = account_key(env, account_id);
    let mut conn = env.redis().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1, "the account hash {key} is not in Redis");
    let mut cmd = redis::cmd("HSET");
    cmd.arg(&key);
    for (field, value) in fields {
        cmd.arg(*field).arg(value);
    }
    let _: i64 = cmd.query_async(&mut conn).await.unwrap();
}

/// One field of the account's hash.
pub async fn hget(env: &TestEnv, account_id: &str, field: &str) -> Option<String> {
    let mut conn = env.redis().await;
    redis::cmd("HGET")
        .arg(account_key(env, account_id))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Moves the account's billing period end into the past, as if the period were over.
pub async fn end_period(env: &TestEnv, account_id: &str, seconds_ago: i64) {
    hset(
        env,
        account_id,
        &[("period_end", (unix_now() - seconds_ago).to_string())],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// RedisGate: a switchable TCP relay in front of Redis

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Bytes flow both ways.
    Up,
    /// Every connection is closed, new ones are closed at once (Redis "gone").
    Down,
    /// Connections stay open but nothing flows (Redis "hung"); bytes received meanwhile are
    /// discarded: when the mode changes, frozen connections are closed.
    Freeze,
    /// Commands reach Redis and run, their replies are dropped (a reply lost on the way back);
    /// when the mode changes, muted connections are closed.
    MuteReplies,
}

/// A TCP relay 127.0.0.1:PORT ↔ the real Redis that the test can switch off.
pub struct RedisGate {
    pub addr: SocketAddr,
    target_url: url::Url,
    mode: watch::Sender<GateMode>,
    task: JoinHandle<()>,
}

impl RedisGate {
    /// A relay to the Redis of `redis_url`, starting [`GateMode::Up`].
    pub async fn start(redis_url: &str) -> RedisGate {
        let target_url = url::Url::parse(redis_url).expect("the Redis URL");
        let host = target_url.host_str().unwrap_or("127.0.0.1").to_string();
        let port = target_url.port().unwrap_or(6379);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the Redis relay");
        let addr = listener.local_addr().expect("local addr");
        let (mode, rx) = watch::channel(GateMode::Up);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *rx.borrow() == GateMode::Down {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, host.clone(), port, rx.clone()));
            }
        });
        RedisGate {
            addr,
            target_url,
            mode,
            task,
        }
    }

    /// The Redis URL to give tollgate: the real one with the relay's host and port.
    pub fn url(&self) -> String {
        let mut url = self.target_url.clone();
        url.set_host(Some("127.0.0.1")).expect("setting the host");
        url.set_port(Some(self.addr.port()))
            .expect("setting the port");
        url.to_string()
    }

    pub fn set(&self, mode: GateMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for RedisGate {
    fn drop(&mut self) {
        self.task.abort();
        // Relays end when they see the mode channel close.
    }
}

async fn relay(client: TcpStream, host: String, port: u16, mut rx: watch::Receiver<GateMode>) {
    let Ok(server) = TcpStream::connect((host.as_str(), port)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    loop {
        let mode = *rx.borrow_and_update();
        match mode {
            GateMode::Down => return,
            GateMode::Freeze => {
                // Hold the sockets without reading; close them when the mode changes.
                let _ = rx.changed().await;
                return;
            }
            GateMode::Up | GateMode::MuteReplies => {}
        }
        let muted = mode == GateMode::MuteReplies;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() || muted {
                    return;
                }
            }
            n = cr.read(&mut up_buf) => {
                let Ok(n) = n else { return };
                if n == 0 || sw.write_all(&up_buf[..n]).await.is_err() {
                    return;
                }
            }
            n = sr.read(&mut down_buf) => {
                let Ok(n) = n else { return };
                if muted && n > 0 {
                    continue;
                }
                if n == 0 || cw.write_all(&down_buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A port on 127.0.0.1 where nothing listens, kept that way while this value lives: the socket
/// is bound but never listens, so connections are refused and no other test can take the port
/// (unlike a port that was bound and released).
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("binding a port");
        let addr = socket.local_addr().expect("local addr");
        ClosedPort {
            addr,
            _socket: socket,
        }
    }
}
