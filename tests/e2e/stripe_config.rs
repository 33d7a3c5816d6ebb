//! `[stripe]`, `[alerts]` and the tiers' Stripe prices are validated at load time, each
//! problem naming its field.

use std::time::Duration;

use crate::harness::{run_tollgate, TestEnv};

const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[redis]
url = "redis://127.0.0.1:6379/0"

[postgres]
url = "postgres://postgres@127.0.0.1:5432/tollgate"
"#;

async fn check(env: &TestEnv, text: &str) -> (bool, String) {
    let path = env.write_file("stripe.toml", format!("{BASE}\n{text}"));
    let out = run_tollgate(
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
            ("STRIPE_SECRET_KEY".to_string(), "sk_test_x".to_string()),
            ("STRIPE_WEBHOOK_SECRET".to_string(), "whsec_x".to_string()),
            ("ALERTS_SECRET".to_string(), "s".to_string()),
        ],
        Duration::from_secs(20),
    )
    .await;
    (out.success(), format!("{}{}", out.stdout, out.stderr))
}

#[tokio::test]
async fn a_complete_stripe_config_is_valid() {
    let env = TestEnv::new().await;
    let (ok, out) = check(
        &env,
        r#"
[stripe]
secret_key_env = "STRIPE_SECRET_KEY"
webhook_secret_env = "STRIPE_WEBHOOK_SECRET"
past_due_grace_days = 3
default_tier = "basic"
timeout_ms = 5000

[alerts]
webhook_url = "https://ops.example.com/hook"
secret_env = "ALERTS_SECRET"

[tiers.basic]
monthly_credits = 5

[tiers.pro]
monthly_credits = 100
currency = "eur"
stripe_price_id_monthly = "price_m"
stripe_price_id_yearly = "price_y"

[[credit_packs]]
id = "p"
credits = 10
price_cents = 100
stripe_price_id = "price_p"
"#,
    )
    .await;
    assert!(ok, "{out}");
}

#[tokio::test]
async fn bad_stripe_settings_are_named() {
    let env = TestEnv::new().await;
    let (ok, out) = check(
        &env,
        r#"
[stripe]
secret_key_env = "STRIPE_SECRET_KEY"
webhook_secret_env = "STRIPE_WEBHOOK_SECRET"
past_due_grace_days = 400
timeout_ms = 5
success_url = "not a url"

[alerts]
webhook_url = "ftp://x"
secret_env = "MISSING_ALERTS_SECRET"
max_attempts = 0

[tiers.pro]
monthly_credits = 100
currency = "EURO"
stripe_price_id_monthly = "price_same"

[[credit_packs]]
id = "p"
credits = 10
price_cents = 100
stripe_price_id = "price_same"
"#,
    )
    .await;
    assert!(!ok, "{out}");
    for needle in [
        "stripe.default_tier",
        "stripe.past_due_grace_days",
        "stripe.timeout_ms",
        "stripe.success_url",
        "alerts.webhook_url",
        "alerts.max_attempts",
        "tiers.pro.currency",
        "credit_packs[0].stripe_price_id: price \"price_same\" is already used by tiers.pro.stripe_price_id_monthly",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
}
