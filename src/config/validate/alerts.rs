//! `[alerts]`: the alert webhook and its delivery attempts.

use super::*;

/// `[alerts]`: an http(s) webhook URL, a secret from the environment, attempts.
pub(super) fn alerts(
    raw: &raw::Config,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> Option<AlertsConfig> {
    // [alerts]
    let alerts = raw.alerts.as_ref().map(|a| {
        match url::Url::parse(&a.webhook_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => p.add(
                "alerts.webhook_url",
                format!("{:?} must be an http:// or https:// URL", a.webhook_url),
            ),
        }
        if !(1..=50).contains(&a.max_attempts) {
            p.add("alerts.max_attempts", "must be between 1 and 50");
        }
        AlertsConfig {
            webhook_url: a.webhook_url.clone(),
            secret: secret(&a.secret_env, "alerts.secret_env", env, missing),
            max_attempts: a.max_attempts,
        }
    });

    alerts
}
