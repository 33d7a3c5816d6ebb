//! Upstreams with several backends (`urls`): round robin spreads, least_conn spreads idle
//! traffic, hash_account keeps an account on one backend, a backend failing its health checks
//! gets no traffic until it passes again, a refused connection is retried on the other backend
//! and ejects the refusing one, and one of two backends killed under load costs no failed or
//! double-charged request (balance == successful requests × price, exactly).
//!
//! The backends are minimal HTTP/1.1 servers written here, so a test can kill one (listener and
//! every connection closed) and switch its health endpoint between 200 and 503.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{http_client, metric_value, poll_until, App, TestEnv};

/// A backend: answers every request 200 with `x-backend: <name>`, except `GET /health`, which
/// answers 200 or 503 as [`Backend::set_healthy`] says (and is not counted).
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let backend = Backend {
            addr,
            hits: Arc::new(AtomicUsize::new(0)),
            healthy: Arc::new(AtomicBool::new(true)),
            stop: CancellationToken::new(),
        };
        let (hits, healthy, stop) = (
            Arc::clone(&backend.hits),
            Arc::clone(&backend.healthy),
            backend.stop.clone(),
        );
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = stop.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((tcp, _)) = conn else { continue };
                let (hits, healthy, stop, name) = (
                    Arc::clone(&hits),
                    Arc::clone(&healthy),
                    stop.clone(),
                    name.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve_connection(tcp, &name, &hits, &healthy) => {}
                    }
                });
            }
        });
        backend
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `host:port`, the backend's metric label.
    fn label(&self) -> String {
        self.addr.to_string()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Stops listening and closes every connection, like a crashed process.
    fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_connection(tcp: TcpStream, name: &str, hits: &AtomicUsize, healthy: &AtomicBool) {
    let mut reader = BufReader::new(tcp);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
        let (status, text) = if path == "/health" {
            if healthy.load(Ordering::SeqCst) {
                ("200 OK", "healthy".to_string())
            } else {
                ("503 Service Unavailable", "sick".to_string())
            }
        } else {
            hits.fetch_add(1, Ordering::SeqCst);
            ("200 OK", format!("served by {name}"))
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\nx-backend: {name}\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("an address").port()
}

/// One upstream per policy over `urls`, a route per upstream at 1 credit, a tier with 10,000.
fn lb_toml(urls: &[String], upstream_extra: &str) -> String {
    let urls = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut toml = String::new();
    for lb in ["round_robin", "least_conn", "hash_account"] {
        toml.push_str(&format!(
            r#"
[[upstreams]]
name = "{lb}"
urls = [{urls}]
lb = "{lb}"
{upstream_extra}

[[routes]]
name = "{lb}"
path_prefix = "/{lb}"
upstream = "{lb}"
cost = 1
"#
        ));
    }
    toml.push_str(
        r#"
[tiers.default]
monthly_credits = 10000
"#,
    );
    toml
}

async fn balance(app: &App, account: &str) -> f64 {
    let (status, body) = app.admin_get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(status, 200, "{body}");
    body["balance"]["total"]
        .as_f64()
        .unwrap_or_else(|| panic!("a balance: {body}"))
}

/// `GET path` with the key: (status, x-backend, x-credits-charged).
async fn call(app: &App, key: &str, path: &str) -> (u16, String, String) {
    let resp = app
        .client()
        .get(app.proxy_url(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("a response");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (backend, charged) = (header("x-backend"), header("x-credits-charged"));
    (resp.status().as_u16(), backend, charged)
}

async fn metric(app: &App, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(&app.metrics_text().await, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_spread_and_hash_account_sticks() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let env = TestEnv::new().await;
    let app = env
        .config()
        .toml(lb_toml(&[a.url(), b.url()], ""))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("default").await;

    // The per-backend series exist from the start.
    for backend in [&a, &b] {
        let labels = [("upstream", "round_robin"), ("backend", &backend.label())];
        assert_eq!(
            metric(&app, "tollgate_backend_requests_total", &labels).await,
            Some(0.0)
        );
        assert_eq!(
            metric(&app, "tollgate_backend_healthy", &labels).await,
            Some(1.0)
        );
    }

    // Round robin: strictly alternating.
    for _ in 0..20 {
        let (status, _, charged) = call(&app, &key, "/round_robin/x").await;
        assert_eq!((status, charged.as_str()), (200, "1"));
    }
    assert_eq!((a.hits(), b.hits()), (10, 10));
    let labels = [("upstream", "round_robin"), ("backend", &a.label())];
    assert_eq!(
        metric(&app, "tollgate_backend_requests_total", &labels).await,
        Some(10.0)
    );

    // least_conn with one request at a time: every backend idle, ties rotate.
    let before = (a.hits(), b.hits());
    for _ in 0..10 {
        assert_eq!(call(&app, &key, "/least_conn/x").await.0, 200);
    }
    assert!(
        a.hits() > before.0 && b.hits() > before.1,
        "least_conn used one backend only: a {} b {}",
        a.hits() - before.0,
        b.hits() - before.1
    );

    // hash_account: each account stays on one backend; accounts spread over both.
    let mut per_account: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut keys = vec![(account.clone(), key.clone())];
    for _ in 0..11 {
        keys.push(app.account_with_key("default").await);
    }
    for (account, key) in &keys {
        for _ in 0..4 {
            let (status, backend, _) = call(&app, key, "/hash_account/x").await;
            assert_eq!(status, 200);
            per_account
                .entry(account.clone())
                .or_default()
                .insert(backend);
        }
    }
    for (account, backends) in &per_account {
        assert_eq!(backends.len(), 1, "{account} was served by {backends:?}");
    }
    let used: BTreeSet<&String> = per_account.values().flatten().collect();
    assert_eq!(used.len(), 2, "12 accounts all hashed to {used:?}");

    // 20 + 10 + 4 requests at 1 credit on the first account.
    assert_eq!(balance(&app, &account).await, 10000.0 - 34.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_the_other_backend_and_charged_once() {
    let live = Backend::start("live").await;
    let dead = format!("127.0.0.1:{}", dead_port().await);
    let env = TestEnv::new().await;
    let app = env
        .config()
        .toml(lb_toml(&[live.url(), format!("http://{dead}")], ""))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("default").await;

    // POSTs with a body (never retried once sent): every one served by the live backend.
    for i in 0..6 {
        let resp = app
            .client()
            .post(app.proxy_url("/round_robin/x"))
            .bearer_auth(&key)
            .body(format!("request {i}"))
            .send()
            .await
            .expect("a response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "live");
        assert_eq!(resp.headers()["x-credits-charged"], "1");
    }
    assert_eq!(live.hits(), 6);
    // The refusing backend was tried once, then ejected for eject_ms (10 s by default).
    let labels = [("upstream", "round_robin"), ("backend", dead.as_str())];
    assert_eq!(
        metric(&app, "tollgate_backend_errors_total", &labels).await,
        Some(1.0)
    );
    assert_eq!(balance(&app, &account).await, 10000.0 - 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_health_checks_gets_no_traffic_until_it_recovers() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let env = TestEnv::new().await;
    let app = env
        .config()
        .toml(lb_toml(
            &[a.url(), b.url()],
            r#"health_check = { path = "/health", interval_ms = 200, timeout_ms = 150 }"#,
        ))
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    let b_label = b.label();
    let health = [("upstream", "round_robin"), ("backend", b_label.as_str())];

    b.set_healthy(false);
    let marked = poll_until(Duration::from_secs(10), || async {
        metric(&app, "tollgate_backend_healthy", &health).await == Some(0.0)
    })
    .await;
    assert!(marked, "b was never marked unhealthy");
    let before = b.hits();
    for _ in 0..10 {
        let (status, backend, _) = call(&app, &key, "/round_robin/x").await;
        assert_eq!((status, backend.as_str()), (200, "a"));
    }
    assert_eq!(b.hits(), before, "an unhealthy backend got traffic");

    b.set_healthy(true);
    let back = poll_until(Duration::from_secs(10), || async {
        metric(&app, "tollgate_backend_healthy", &health).await == Some(1.0)
    })
    .await;
    assert!(back, "b was never marked healthy again");
    for _ in 0..10 {
        assert_eq!(call(&app, &key, "/round_robin/x").await.0, 200);
    }
    assert_eq!(
        b.hits(),
        before + 5,
        "a recovered backend is back in rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_failed_or_double_charged_request() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let env = TestEnv::new().await;
    let app = env
        .config()
        .toml(lb_toml(&[a.url(), b.url()], ""))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("default").await;

    const WORKERS: usize = 8;
    const PER_WORKER: usize = 50;
    let done = Arc::new(AtomicUsize::new(0));
    let client = http_client();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (client, url, key, done) = (
            client.clone(),
            app.proxy_url("/round_robin/x"),
            key.clone(),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..PER_WORKER {
                let resp = client.get(&url).bearer_auth(&key).send().await;
                statuses.push(resp.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
                done.fetch_add(1, Ordering::SeqCst);
            }
            statuses
        }));
    }
    // Kill b a quarter of the way through.
    let quarter = WORKERS * PER_WORKER / 4;
    assert!(
        poll_until(Duration::from_secs(60), || {
            let done = Arc::clone(&done);
            async move { done.load(Ordering::SeqCst) >= quarter }
        })
        .await
    );
    b.kill();
    let b_at_kill = b.hits();

    let mut ok = 0usize;
    let mut other = Vec::new();
    for task in tasks {
        for status in task.await.expect("a worker") {
            match status {
                Ok(200) => ok += 1,
                s => other.push(s),
            }
        }
    }
    assert!(other.is_empty(), "requests not served: {other:?}");
    assert_eq!(ok, WORKERS * PER_WORKER);
    assert!(b_at_kill > 0, "b served nothing before it was killed");
    // A GET whose pooled connection broke as b died may have reached b before its retry.
    assert!(a.hits() + b.hits() >= ok);
    assert_eq!(balance(&app, &account).await, 10000.0 - ok as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_bad_backend_settings() {
    let env = TestEnv::new().await;
    let out = env
        .config()
        .toml(
            r#"
[[upstreams]]
name = "both"
url = "http://127.0.0.1:7001"
urls = ["http://127.0.0.1:7002"]

[[upstreams]]
name = "single"
url = "http://127.0.0.1:7001"
lb = "least_conn"

[[upstreams]]
name = "mixed"
urls = ["http://127.0.0.1:7001", "https://127.0.0.1:7002", "http://127.0.0.1:7001"]
health_check = { path = "health", interval_ms = 50, timeout_ms = 100 }

[[upstreams]]
name = "sticky"
urls = ["http://127.0.0.1:7001"]
lb = "by_moon_phase"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "mixed"
public = true
"#,
        )
        .run_subcommand("check-config", Duration::from_secs(30))
        .await;
    assert!(!out.success());
    let text = out.to_string();
    for expected in [
        "upstreams[0]: set either `url` or `urls`, not both",
        "upstreams[1].lb: needs `urls`",
        "upstreams[2].urls[1]: every URL of an upstream must have the same scheme and path",
        "upstreams[2].urls[2]: backend 127.0.0.1:7001 is listed twice",
        "upstreams[2].health_check.path: must be a path starting with /",
        "upstreams[2].health_check.interval_ms: must be between 100 and 3600000",
        "upstreams[2].health_check.timeout_ms",
        "upstreams[3].lb",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}
