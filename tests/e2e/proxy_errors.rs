//! Upstream failures as the client sees them: 502 upstream_unavailable when nothing listens,
//! 504 upstream_timeout when the upstream does not answer within `read_timeout_ms`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{assert_error, http_client_no_pool, TestEnv};
use crate::upstream::{closed_addr, Blackhole, FakeUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_502_and_slow_upstream_504() {
    let env = TestEnv::new().await;
    let closed = closed_addr();
    let blackhole = Blackhole::start().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "closed"
url = "http://{closed}"
connect_timeout_ms = 2000

[[upstreams]]
name = "blackhole"
url = "{blackhole}"
read_timeout_ms = 400

[[upstreams]]
name = "slow"
url = "{up}"
read_timeout_ms = 400

[[routes]]
name = "closed"
path_prefix = "/closed"
upstream = "closed"
cost = 0

[[routes]]
name = "blackhole"
path_prefix = "/blackhole"
upstream = "blackhole"
cost = 0

[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "slow"
cost = 0

[tiers.default]
monthly_credits = "unlimited"
"#,
            blackhole = blackhole.url(),
            up = up.url(),
        ))
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    // A fresh connection per request: an error answer may close its connection (see
    // `error_answers_that_close_the_connection_say_so`).
    let c = &http_client_no_pool();

    // Connection refused → 502.
    for _ in 0..2 {
        let resp = c
            .post(app.proxy_url("/closed/v1/chat"))
            .bearer_auth(&key)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(resp.headers().contains_key("x-request-id"));
        assert_error(resp, 502, "upstream_unavailable").await;
    }

    // Accepts the connection and never answers → 504 once the ~400 ms timeout has passed (not
    // earlier; the client's 15 s timeout fails the call if it never comes).
    let started = Instant::now();
    let resp = c
        .get(app.proxy_url("/blackhole/anything"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_error(resp, 504, "upstream_timeout").await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(350), "504 after {took:?}");

    // An HTTP upstream slower than read_timeout_ms → 504 as well.
    let resp = c
        .get(app.proxy_url("/slow?ms=3000"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_error(resp, 504, "upstream_timeout").await;
    // ... and one within it passes.
    let resp = c
        .get(app.proxy_url("/slow?ms=50"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow:50");
}

/// One HTTP/1.1 response read from a raw connection: (status, lower-case headers, body).
/// `None` when the connection is closed (or reset) before a full response arrives.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((status, headers, body))
}

/// A keep-alive client reuses a connection unless the answer says `Connection: close`. When
/// tollgate answers an error and then closes the connection, it must say so; otherwise the
/// client's next request on that connection fails (reset), which a pooled client hits at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_that_close_the_connection_say_so() {
    let env = TestEnv::new().await;
    let closed = closed_addr();
    let blackhole = Blackhole::start().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "closed"
url = "http://{closed}"

[[upstreams]]
name = "blackhole"
url = "{blackhole}"
read_timeout_ms = 300

[[upstreams]]
name = "ok"
url = "{up}"

[[routes]]
name = "closed"
path_prefix = "/closed"
upstream = "closed"
cost = 0

[[routes]]
name = "blackhole"
path_prefix = "/blackhole"
upstream = "blackhole"
cost = 0

[[routes]]
name = "ok"
path_prefix = "/ok"
upstream = "ok"
cost = 0

[tiers.default]
monthly_credits = "unlimited"
"#,
            blackhole = blackhole.url(),
            up = up.url(),
        ))
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    let request = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer {key}\r\n\r\n")
    };

    let mut problems = Vec::new();
    for (path, want) in [
        ("/closed/x", 502u16),
        ("/blackhole/x", 504),
        ("/nowhere", 404),
        ("/ok/x", 200),
    ] {
        let mut stream = TcpStream::connect(app.proxy_addr()).await.unwrap();
        stream.write_all(request(path).as_bytes()).await.unwrap();
        let (status, headers, _) = read_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{path}: no response"));
        assert_eq!(status, want, "{path}");
        let connection = headers
            .iter()
            .find(|(k, _)| k == "connection")
            .map(|(_, v)| v.to_ascii_lowercase());
        if connection.as_deref() == Some("close") {
            continue;
        }
        // Announced as reusable: a second request on the same connection must be answered.
        stream.write_all(request("/ok/again").as_bytes()).await.ok();
        match read_response(&mut stream).await {
            Some((200, _, _)) => {}
            Some((other, _, _)) => problems.push(format!("{path}: second request got {other}")),
            None => problems.push(format!(
                "{path}: answered {status} with Connection: {connection:?}, then closed the \
                 connection without an answer to the next request"
            )),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
