//! One run of the real load generator, `tollgate loadtest … --json`, as a subprocess (its own
//! process and runtime: it never shares a scheduler with the stub or tollgate).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// The request every target gets: a small OpenAI-style chat completion.
pub const REQUEST_BODY: &str =
    r#"{"model":"bench-1","messages":[{"role":"user","content":"How much does this cost?"}]}"#;

/// What to run.
pub struct Spec<'a> {
    pub url: String,
    pub key: Option<&'a str>,
    /// Open loop at this rate; `None`: closed loop (saturation).
    pub rate: Option<f64>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Runs `tollgate loadtest` and returns its JSON report; stops loudly when it fails.
pub fn run(bin: &Path, spec: &Spec<'_>) -> Value {
    let mut cmd = Command::new(bin);
    cmd.arg("loadtest")
        .arg(&spec.url)
        .arg("--json")
        .arg("--threads")
        .arg("1")
        .arg("--connections")
        .arg(spec.connections.to_string())
        .arg("--duration")
        .arg(ms(spec.duration))
        .arg("--warmup")
        .arg(ms(spec.warmup))
        .arg("--timeout")
        .arg("5s")
        .arg("-X")
        .arg("POST")
        .arg("--body")
        .arg(REQUEST_BODY)
        .arg("-H")
        .arg("content-type: application/json");
    if let Some(key) = spec.key {
        cmd.arg("--key").arg(key);
    }
    if let Some(rate) = spec.rate {
        cmd.arg("--rate").arg(format!("{rate:.0}"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} loadtest: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "tollgate loadtest {} failed ({}):\n{}\n{}",
            spec.url,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("tollgate loadtest printed no JSON report ({e}):\n{stdout}"))
}

/// Requests of a report that did not get a 200: other statuses and errors.
pub fn failed(report: &Value) -> u64 {
    let errors = report["errors"]["total"].as_u64().unwrap_or(0);
    let other: u64 = report["status"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(code, _)| code.as_str() != "200")
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    errors + other
}
