//! An https upstream: tollgate connects with TLS, verifies the certificate by default (a
//! self-signed one is refused with 502), and proxies once verification is turned off for it.
//! The upstream is `openssl s_server -www` with a certificate made for the test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{assert_error, http_client_no_pool, poll_until, TestEnv};

struct TlsServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tls_server() -> TlsServer {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running openssl req");
    assert!(made.success(), "openssl req failed");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting openssl s_server");
    let up = poll_until(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "openssl s_server did not start");
    TlsServer {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_and_proxied() {
    let server = tls_server().await;
    let env = TestEnv::new().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "verified"
url = "https://127.0.0.1:{port}"

[[upstreams]]
name = "trusted"
url = "https://127.0.0.1:{port}/"
tls_verify = false

[[routes]]
name = "verified"
path_prefix = "/verified"
upstream = "verified"
public = true

[[routes]]
name = "trusted"
path_prefix = "/"
upstream = "trusted"
public = true
"#,
            port = server.port
        ))
        .spawn()
        .await;
    let client = http_client_no_pool();

    // A self-signed certificate fails verification: the upstream cannot be reached.
    let resp = client
        .get(app.proxy_url("/verified"))
        .send()
        .await
        .expect("a response");
    assert_error(resp, 502, "upstream_unavailable").await;

    // With verification off for that upstream, the request goes through TLS to s_server,
    // whose -www page describes the TLS session it served.
    let resp = client
        .get(app.proxy_url("/hello?x=1"))
        .send()
        .await
        .expect("a response");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("a body");
    assert!(
        body.contains("s_server") && body.contains("TLSv1"),
        "s_server page: {body}"
    );
}
