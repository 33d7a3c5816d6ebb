//! A headless Chromium driven over WebDriver (`chromedriver`, Debian's `chromium-driver`),
//! for the portal and console tests. A small client over the W3C WebDriver HTTP protocol with
//! the reqwest the tests already use, instead of a WebDriver crate: the few commands the
//! tests need are plain JSON calls, and the build stays as it is.
//!
//! Each [`Browser`] is its own chromedriver process and browser profile, so tests run in
//! parallel. The browser resolves only 127.0.0.1 (`--host-resolver-rules`): a page that
//! redirects to Stripe's real Checkout never leaves the machine.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn chromedriver() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
}

pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium `width` px wide. Panics with how to install
    /// them when they are missing (`scripts/setup` installs both).
    pub async fn start(width: u32) -> Browser {
        let binary = chromium().expect("chromium is not installed: run scripts/setup");
        let driver_bin = chromedriver().expect("chromedriver is not installed: run scripts/setup");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let ready = crate::harness::poll_until(Duration::from_secs(20), || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move {
                match http.get(&url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == json!(true)),
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(ready, "chromedriver did not become ready on {base}");
        let mut caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    format!("--window-size={width},900"),
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                ],
            },
        }}});
        // Headless windows are at least 500 px wide; narrower means a phone's viewport.
        if width < 500 {
            caps["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["mobileEmulation"] =
                json!({"deviceMetrics": {"width": width, "height": 800, "pixelRatio": 1.0}});
        }
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("new session json");
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_string();
        Browser {
            driver,
            base: format!("{base}/session/{session}"),
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp: Value = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        if resp["value"].get("error").is_some() {
            panic!("WebDriver {method} {path}: {}", resp["value"]);
        }
        resp["value"].clone()
    }

    async fn try_call(&self, method: reqwest::Method, path: &str, body: Value) -> Option<Value> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await;
        let resp: Value = match resp {
            Ok(r) => {
                let t = r.text().await.ok()?;
                match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("WebDriver {path}: {e}: {t}");
                        return None;
                    }
                }
            }
            Err(e) => {
                eprintln!("WebDriver {path}: {e}");
                return None;
            }
        };
        if resp["value"].get("error").is_some() {
            None
        } else {
            Some(resp["value"].clone())
        }
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element, waiting up to 5 s for it (a page may still be loading after a click).
    pub async fn find(&self, css: &str) -> Element<'_> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = self.find_opt(css).await;
        while found.is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            found = self.find_opt(css).await;
        }
        match found {
            Some(e) => e,
            None => panic!(
                "no element {css:?} on {}:\n{}",
                self.url().await,
                self.source().await
            ),
        }
    }

    pub async fn find_opt(&self, css: &str) -> Option<Element<'_>> {
        let v = self
            .try_call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        let Some(id) = v[ELEMENT].as_str() else {
            eprintln!("WebDriver element: {v}");
            return None;
        };
        Some(Element {
            browser: self,
            id: id.to_string(),
        })
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str())
                    .map(|id| Element {
                        browser: self,
                        id: id.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await
    }

    /// Waits (up to `timeout`) until the element's text is `want`, without reloading.
    pub async fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> bool {
        crate::harness::poll_until(timeout, || async move {
            // The page may be replaced between finding the element and reading it (a
            // navigation or a live update): a stale element is simply read again.
            match self.find_opt(css).await {
                Some(e) => e.try_text().await.as_deref() == Some(want),
                None => false,
            }
        })
        .await
    }

    /// Waits (up to 10 s) until the browser is at `want`, after a click that navigates
    /// (WebDriver's click may return before the new page is there).
    pub async fn wait_url(&self, want: &str) {
        let there = crate::harness::poll_until(Duration::from_secs(10), || async move {
            self.url().await == want
        })
        .await;
        assert!(there, "expected to be at {want}, at {}", self.url().await);
    }

    /// Waits (up to 10 s) until `css` matches exactly `n` elements.
    pub async fn wait_count(&self, css: &str, n: usize) {
        let ok = crate::harness::poll_until(Duration::from_secs(10), || async move {
            self.find_all(css).await.len() == n
        })
        .await;
        assert!(ok, "expected {n} × {css}:\n{}", self.source().await);
    }

    /// Saves a PNG screenshot under `target/screenshots/`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn set_width(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// The browser's cookies for the current page.
    pub async fn cookies(&self) -> Vec<Value> {
        self.call(reqwest::Method::GET, "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends Chromium (a killed chromedriver could leave it running);
        // a blocking request, since Drop cannot await. chromedriver is killed on drop.
        if let Some((addr, path)) = self
            .base
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
        let _ = self.driver.start_kill();
    }
}

impl Element<'_> {
    /// The text, or `None` when the element went stale (its page was replaced).
    pub async fn try_text(&self) -> Option<String> {
        let resp = self
            .browser
            .http
            .get(format!("{}/element/{}/text", self.browser.base, self.id))
            .send()
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        v["value"].as_str().map(str::to_string)
    }

    pub async fn text(&self) -> String {
        self.browser
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/text", self.id),
                None,
            )
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn value(&self) -> String {
        self.browser
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/property/value", self.id),
                None,
            )
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn click(&self) {
        self.browser
            .call(
                reqwest::Method::POST,
                &format!("/element/{}/click", self.id),
                Some(json!({})),
            )
            .await;
    }

    pub async fn type_text(&self, text: &str) {
        self.browser
            .call(
                reqwest::Method::POST,
                &format!("/element/{}/value", self.id),
                Some(json!({"text": text})),
            )
            .await;
    }

    pub async fn clear(&self) {
        self.browser
            .call(
                reqwest::Method::POST,
                &format!("/element/{}/clear", self.id),
                Some(json!({})),
            )
            .await;
    }
}
