//! HTTPS on the proxy listener (`[server] tls`): a certificate made for the test (openssl CLI,
//! a CA and a leaf for 127.0.0.1), an HTTP/1.1 client and an HTTP/2 client (ALPN h2) that
//! trust the CA both get metered 200s with the charge headers; a plain-HTTP client gets no
//! answer; `check-config` names a missing certificate file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{toml_str, TestEnv};
use crate::upstream::FakeUpstream;

fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(ok.success(), "openssl {args:?} failed");
}

/// Writes ca.pem, and server.pem / server.key signed by it for 127.0.0.1 and localhost.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n",
    )
    .expect("write san.ext");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tollgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
        dir,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_h2_clients_get_metered_answers() {
    let up = FakeUpstream::start().await;
    let env = TestEnv::new().await;
    make_certificates(env.dir());
    let cert = env.dir().join("server.pem");
    let key = env.dir().join("server.key");
    let app = env
        .config()
        .server(format!(
            "tls = {{ cert = {}, key = {} }}",
            toml_str(&cert.to_string_lossy()),
            toml_str(&key.to_string_lossy())
        ))
        .toml(format!(
            r#"
[[upstreams]]
name = "up"
url = "{}"

[[routes]]
name = "chat"
path_prefix = "/v1"
upstream = "up"
cost = 0.25

[tiers.default]
monthly_credits = 100
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (_account, api_key) = app.account_with_key("default").await;
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(env.dir().join("ca.pem")).expect("ca.pem"))
            .expect("a CA certificate");
    let port = app.proxy_addr().port();
    let url = format!("https://127.0.0.1:{port}/v1/echo");

    let h1 = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .http1_only()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("an HTTP/1.1 client");
    let h2 = reqwest::Client::builder()
        .add_root_certificate(ca)
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("an HTTP/2 client");

    let mut remaining = vec![];
    for (client, version) in [
        (&h1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        for _ in 0..2 {
            let resp = client
                .post(&url)
                .bearer_auth(&api_key)
                .body("hello over tls")
                .send()
                .await
                .expect("a response over TLS");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), version);
            assert_eq!(resp.headers()["x-credits-charged"], "0.25");
            remaining.push(
                resp.headers()["x-credits-remaining"]
                    .to_str()
                    .expect("ascii")
                    .to_string(),
            );
            assert_eq!(resp.text().await.expect("a body"), "hello over tls");
        }
    }
    assert_eq!(remaining, ["99.75", "99.5", "99.25", "99"]);
    // The upstream got plain requests without the client's credential.
    let last = up.last_request();
    assert!(last.header("authorization").is_none());

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a client");
    assert!(plain
        .get(format!("http://127.0.0.1:{port}/v1/echo"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_a_missing_certificate() {
    let env = TestEnv::new().await;
    let out = env
        .config()
        .server(r#"tls = { cert = "nowhere.pem", key = "nowhere.key" }"#)
        .toml(
            r#"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
public = true
"#,
        )
        .run_subcommand("check-config", Duration::from_secs(30))
        .await;
    assert!(!out.success());
    let text = out.to_string();
    assert!(
        text.contains("server.tls") && text.contains("nowhere.pem"),
        "{text}"
    );
}

/// An https upstream signed by a private CA: verified (certificate, SNI and host name) against
/// the upstream's `ca`, refused without it. Addressed as `localhost` (resolving to 127.0.0.1,
/// where s_server listens): Pingora checks the name as a DNS name, which an IP SAN never matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_verifies_an_https_upstream() {
    let env = TestEnv::new().await;
    make_certificates(env.dir());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", "server.pem", "-key", "server.key"])
        .current_dir(env.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting openssl s_server");
    let up = crate::harness::poll_until(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "openssl s_server did not start");
    let ca = env.dir().join("ca.pem");
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "private"
url = "https://localhost:{port}"
ca = {ca}

[[upstreams]]
name = "system_roots"
url = "https://localhost:{port}"

[[routes]]
name = "untrusted"
path_prefix = "/untrusted"
upstream = "system_roots"
public = true

[[routes]]
name = "private"
path_prefix = "/"
upstream = "private"
public = true
"#,
            ca = toml_str(&ca.to_string_lossy())
        ))
        .spawn()
        .await;
    let client = crate::harness::http_client_no_pool();
    let resp = client
        .get(app.proxy_url("/untrusted"))
        .send()
        .await
        .expect("a response");
    crate::harness::assert_error(resp, 502, "upstream_unavailable").await;
    let resp = client
        .get(app.proxy_url("/hello"))
        .send()
        .await
        .expect("a response");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("a body");
    assert!(body.contains("TLSv1"), "s_server page: {body}");
    let _ = server.kill();
    let _ = server.wait();
}
