//! `tollgate check-config`: the reference config passes; a bad one exits non-zero and stderr
//! names the field and the reason.

use std::path::Path;
use std::time::Duration;

use crate::harness::{run_tollgate, ProcessOutput};

const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "tg"

[postgres]
url = "postgres://postgres@127.0.0.1:5432/tollgate"

[[upstreams]]
name = "agent"
url = "http://127.0.0.1:7001"
set_headers = { authorization = "Bearer ${AGENT_API_KEY}" }

[[routes]]
name = "chat"
method = "POST"
path_prefix = "/v1/chat/completions"
upstream = "agent"
action = "ai_message"
cost = 0.2
feature = "chat"

[tiers.free]
monthly_credits = 20
features = ["chat"]
"#;

async fn check(path: &Path) -> ProcessOutput {
    run_tollgate(
        &[
            "check-config".to_string(),
            "--config".into(),
            path.display().to_string(),
        ],
        &[
            (
                "TOLLGATE_ADMIN_TOKEN".to_string(),
                "admin-token-0123456789".to_string(),
            ),
            ("AGENT_API_KEY".to_string(), "sk-test".to_string()),
        ],
        Duration::from_secs(20),
    )
    .await
}

async fn check_text(text: &str) -> ProcessOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = check(&path).await;
    // The file is named in every error.
    if !out.success() {
        assert!(out.stderr.contains("bad.toml"), "file not named:\n{out}");
    }
    out
}

/// Asserts failure with every `needle` on stderr.
async fn assert_rejected(text: &str, needles: &[&str]) {
    let out = check_text(text).await;
    assert!(!out.success(), "expected a non-zero exit:\n{out}");
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{out}"
        );
    }
}

fn replace(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_config_and_the_base_pass() {
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
    let out = check(&reference).await;
    assert!(out.success(), "the reference config is rejected:\n{out}");
    assert!(out.stdout.contains("ok"), "{out}");

    let out = check_text(BASE).await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("1 upstreams, 1 routes, 1 tiers"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_exit_non_zero_naming_the_field() {
    // A price that is not a decimal.
    assert_rejected(
        &replace("cost = 0.2", "cost = \"lots\""),
        &["routes[0].cost", "\"lots\" is not a decimal number"],
    )
    .await;
    // A price that does not convert exactly.
    assert_rejected(
        &replace("cost = 0.2", "cost = 0.0000001"),
        &["routes[0].cost"],
    )
    .await;
    // Unknown fields, at the top level and nested.
    assert_rejected(
        &replace("[redis]", "[redis]\nurll = \"redis://x\""),
        &["unknown field", "urll"],
    )
    .await;
    assert_rejected(
        &replace("cost = 0.2", "cost = 0.2\ncolour = \"red\""),
        &["unknown field", "colour"],
    )
    .await;
    assert_rejected(
        &format!("{BASE}\n[telemetry]\nx = 1\n"),
        &["unknown field", "telemetry"],
    )
    .await;
    // A route naming an upstream that does not exist.
    assert_rejected(
        &replace("upstream = \"agent\"", "upstream = \"nope\""),
        &["routes[0].upstream", "no upstream named \"nope\""],
    )
    .await;
    // A route feature no tier lists.
    assert_rejected(
        &replace("feature = \"chat\"", "feature = \"gold\""),
        &["routes[0].feature", "\"gold\""],
    )
    .await;
    // A bad listen address.
    assert_rejected(
        &replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
        &["server.listen"],
    )
    .await;
    // A metered route without a price.
    assert_rejected(&replace("cost = 0.2\n", ""), &["routes[0]", "cost"]).await;
    // Not TOML at all.
    assert_rejected(&format!("{BASE}\n[[routes]\n"), &[]).await;
    // Several problems are all reported.
    let text = replace("upstream = \"agent\"", "upstream = \"nope\"")
        .replace("feature = \"chat\"\n", "feature = \"gold\"\n");
    assert_rejected(&text, &["routes[0].upstream", "routes[0].feature"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_an_error() {
    let out = check(Path::new("/nonexistent/tollgate-e2e.toml")).await;
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("/nonexistent/tollgate-e2e.toml"),
        "{out}"
    );
}

/// The first-hour report: `cost = "lots"` plus an upstream typo showed only the cost. Now type
/// errors, unknown fields and references come in one run, each with its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_problem_is_reported_in_one_run_with_its_line() {
    let text = replace("cost = 0.2", "cost = \"lots\"\ncolour = \"red\"")
        .replace("upstream = \"agent\"", "upstream = \"agnet\"")
        .replace(
            "monthly_credits = 20",
            "monthly_credits = 20\nmax_keys = \"two\"",
        );
    let line = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let out = check_text(&text).await;
    assert!(!out.success(), "{out}");
    for (field, needle) in [
        ("routes[0].cost", "cost = \"lots\""),
        ("routes[0].colour", "colour"),
        ("tiers.free.max_keys", "max_keys"),
        ("routes[0].upstream", "upstream = \"agnet\""),
    ] {
        let at = format!("(line {})", line(needle));
        assert!(
            out.stderr
                .lines()
                .any(|l| l.contains(field) && l.contains(&at)),
            "no {field} {at}:\n{out}"
        );
    }
}

/// An example config run without its variable says the variable is unset, not that
/// `"${SAAS_APP_URL}"` is a bad URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_upstream_variable_is_named() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/saas-tiers.toml");
    let out = check(&example).await;
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr
            .contains("environment variable SAAS_APP_URL is not set (used in upstreams[0].url)"),
        "{out}"
    );
    assert!(!out.stderr.contains("is not a URL"), "{out}");
}
