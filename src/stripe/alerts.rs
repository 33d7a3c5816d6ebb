//! Outgoing alerts: when a debit takes an account under its tier's `low_balance_credits`, or
//! past 80 % / 100 % of its monthly allowance, a signed JSON event is POSTed to
//! `[alerts] webhook_url` — never on the request path.
//!
//! Detection runs on what the journal flusher has just committed to Postgres (each entry
//! carries its bucket deltas and the balances after it, so a crossing is a pure function of one
//! entry). Crossings go into the `alert_outbox` table (unique per entry and kind, so a
//! re-delivered journal batch alerts once), and a background task delivers due rows with
//! retries and exponential backoff, several instances sharing the work (`SKIP LOCKED`).
//!
//! Each delivery carries `Tollgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (the
//! same scheme as Stripe's, keyed with `[alerts] secret_env`) and `Tollgate-Event-Id`, which a
//! receiver uses to drop the rare duplicate (a crash between the POST and its bookkeeping).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::{AlertsConfig, Config};
use crate::journal::entry::JournalEntry;
use crate::money::Credits;
use crate::state::AppState;

/// Called by the journal flusher with every batch it committed.
pub type FlushHook = crate::journal::flusher::OnFlushed;

/// Alerts waiting to be written to the outbox; beyond this the newest are dropped (logged).
const QUEUE: usize = 10_000;
const POLL: Duration = Duration::from_secs(1);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF_SECS: i64 = 3600;
const BATCH: i64 = 50;

/// One threshold crossing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub entry_id: String,
    pub kind: &'static str,
    pub account_id: String,
    pub payload: Value,
}

/// The thresholds one entry crossed, given its tier's monthly credits and low-balance level.
pub fn crossings(
    e: &JournalEntry,
    monthly: Option<Credits>,
    low: Option<Credits>,
) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (da, dp) = (i128::from(e.d_allowance), i128::from(e.d_purchased));
    if da + dp >= 0 {
        return out;
    }
    let allow_after = i128::from(e.allowance_after);
    let allow_before = allow_after - da;
    let total_after = allow_after + i128::from(e.purchased_after);
    let total_before = total_after - da - dp;
    if let (Some(low), Some(_)) = (low, monthly) {
        let low = i128::from(low.micros());
        if total_before >= low && total_after < low {
            out.push("balance.low");
        }
    }
    if let Some(m) = monthly.map(|m| i128::from(m.micros())).filter(|m| *m > 0) {
        // 80 % used ⟺ allowance ≤ 20 % of the monthly credits.
        if allow_before * 5 > m && allow_after * 5 <= m {
            out.push("allowance.80");
        }
        if allow_before > 0 && allow_after <= 0 {
            out.push("allowance.100");
        }
    }
    out
}

fn detect(config: &Config, entries: &[JournalEntry]) -> Vec<Alert> {
    let mut alerts = Vec::new();
    for e in entries {
        let Some(tier) = e.tier.as_deref().and_then(|t| config.tier(t)) else {
            continue;
        };
        let monthly = super::catalog::monthly(tier);
        for kind in crossings(e, monthly, tier.low_balance_credits()) {
            let allowance = Credits::from_micros(e.allowance_after);
            let purchased = Credits::from_micros(e.purchased_after);
            alerts.push(Alert {
                entry_id: e.entry_id.clone(),
                kind,
                account_id: e.account_id.clone(),
                payload: json!({
                    "id": format!("{kind}:{}", e.entry_id),
                    "type": kind,
                    "account_id": e.account_id,
                    "tier": tier.name,
                    "created_at": e.created_at,
                    "entry_id": e.entry_id,
                    "balance": {
                        "allowance": allowance,
                        "purchased": purchased,
                        "total": allowance + purchased,
                    },
                    "monthly_credits": monthly,
                    "low_balance_credits": tier.low_balance_credits(),
                }),
            });
        }
    }
    alerts
}

/// Starts the alerts task when `[alerts]` is configured; returns the hook for the flusher.
/// The task ends once the flusher is gone (the hook dropped) and what it queued is stored.
pub fn start(state: Arc<AppState>, tracker: &tokio_util::task::TaskTracker) -> Option<FlushHook> {
    let config = state.config();
    let alerts = config.alerts.clone()?;
    let (tx, rx) = mpsc::channel::<Alert>(QUEUE);
    let detector_state = Arc::clone(&state);
    let hook: FlushHook = Arc::new(move |entries: &[JournalEntry]| {
        for alert in detect(&detector_state.config(), entries) {
            if tx.try_send(alert).is_err() {
                tracing::warn!("alerts queue full or closed; an alert was dropped");
            }
        }
    });
    tracker.spawn(run(state, alerts, rx));
    Some(hook)
}

async fn run(state: Arc<AppState>, cfg: AlertsConfig, mut rx: mpsc::Receiver<Alert>) {
    let client = match reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "alerts: cannot build the HTTP client; alerts are off");
            return;
        }
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Some(first) => {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    store(&state, &batch).await;
                    deliver_due(&state, &cfg, &client).await;
                }
                None => return,
            },
            _ = tick.tick() => deliver_due(&state, &cfg, &client).await,
        }
    }
}

async fn store(state: &AppState, batch: &[Alert]) {
    for alert in batch {
        let stored = sqlx::query(
            "INSERT INTO alert_outbox (entry_id, kind, account_id, payload) VALUES ($1, $2, $3, $4)
             ON CONFLICT (entry_id, kind) DO NOTHING",
        )
        .bind(&alert.entry_id)
        .bind(alert.kind)
        .bind(&alert.account_id)
        .bind(&alert.payload)
        .execute(&state.pg)
        .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, account = %alert.account_id, kind = alert.kind, "alerts: cannot store an alert");
        }
    }
}

/// The wait before attempt `attempts + 1`: 1 s, 2 s, 4 s, … capped at an hour.
pub fn backoff_secs(attempts: i32) -> i64 {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 12)).unwrap_or(12);
    (1i64 << exp).min(MAX_BACKOFF_SECS)
}

async fn deliver_due(state: &AppState, cfg: &AlertsConfig, client: &reqwest::Client) {
    let due: Result<Vec<(i64, Value, i32)>, sqlx::Error> = sqlx::query_as(
        "UPDATE alert_outbox SET locked_until = now() + interval '2 minutes'
          WHERE id IN (SELECT id FROM alert_outbox
                        WHERE state IS NULL AND next_attempt_at <= now()
                          AND (locked_until IS NULL OR locked_until < now())
                        ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
          RETURNING id, payload, attempts",
    )
    .bind(BATCH)
    .fetch_all(&state.pg)
    .await;
    let due = match due {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "alerts: cannot read the outbox");
            return;
        }
    };
    let secret = cfg.secret.clone().unwrap_or_default();
    let sends = due.into_iter().map(|(id, payload, attempts)| {
        let secret = secret.clone();
        async move {
            let result = send(client, &cfg.webhook_url, secret.as_bytes(), &payload).await;
            (id, attempts + 1, result)
        }
    });
    for (id, attempts, result) in futures_util::future::join_all(sends).await {
        let update = match &result {
            Ok(()) => {
                state
                    .metrics
                    .alert_deliveries
                    .with_label_values(&["delivered"])
                    .inc();
                sqlx::query(
                "UPDATE alert_outbox SET state = 'delivered', delivered_at = now(), attempts = $2,
                     locked_until = NULL, last_error = NULL WHERE id = $1",
            )
            .bind(id)
            .bind(attempts)
            .execute(&state.pg)
            .await
            }
            Err(error) => {
                let gave_up = attempts >= i32::try_from(cfg.max_attempts).unwrap_or(i32::MAX);
                state
                    .metrics
                    .alert_deliveries
                    .with_label_values(&[if gave_up { "failed" } else { "retry" }])
                    .inc();
                if gave_up {
                    tracing::error!(alert = id, attempts, %error, "alerts: giving up on an alert");
                } else {
                    tracing::warn!(alert = id, attempts, %error, "alerts: delivery failed; will retry");
                }
                sqlx::query(
                    "UPDATE alert_outbox SET attempts = $2, last_error = $3, locked_until = NULL,
                         state = CASE WHEN $4 THEN 'failed' ELSE NULL END,
                         next_attempt_at = now() + make_interval(secs => $5)
                     WHERE id = $1",
                )
                .bind(id)
                .bind(attempts)
                .bind(error)
                .bind(gave_up)
                .bind(backoff_secs(attempts) as f64)
                .execute(&state.pg)
                .await
            }
        };
        if let Err(e) = update {
            tracing::warn!(error = %e, alert = id, "alerts: cannot record a delivery");
        }
    }
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    secret: &[u8],
    payload: &Value,
) -> Result<(), String> {
    let body = serde_json::to_vec(payload).map_err(|e| e.to_string())?;
    let signature = super::webhook::signature_header(secret, Utc::now().timestamp(), &body);
    let event_id = payload
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Tollgate-Signature", signature)
        .header("Tollgate-Event-Id", event_id)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: HTTP {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(d_allow: i64, d_purch: i64, allow: i64, purch: i64) -> JournalEntry {
        JournalEntry {
            stream_id: "1-0".into(),
            entry_id: "e1".into(),
            account_id: "a".into(),
            kind: "debit".into(),
            amount: -(d_allow + d_purch),
            d_allowance: d_allow,
            d_purchased: d_purch,
            allowance_after: allow,
            purchased_after: purch,
            request_id: None,
            route: None,
            action: None,
            tier: Some("free".into()),
            tokens_in: None,
            tokens_out: None,
            upstream_status: None,
            duration_ms: None,
            reason: None,
            period_start: None,
            period_end: None,
            created_at: Utc::now(),
        }
    }

    fn c(n: i64) -> Credits {
        Credits::from_micros(n)
    }

    #[test]
    fn allowance_thresholds_fire_once_when_crossed() {
        let m = Some(c(100));
        // 79 % → 80 % used.
        assert_eq!(
            crossings(&entry(-1, 0, 20, 0), m, None),
            vec!["allowance.80"]
        );
        // 80 % → 81 %: already past.
        assert!(crossings(&entry(-1, 0, 19, 0), m, None).is_empty());
        // The last of the allowance, then purchased.
        assert_eq!(
            crossings(&entry(-25, -5, 0, 10), m, None),
            vec!["allowance.80", "allowance.100"]
        );
        assert!(crossings(&entry(0, -5, 0, 5), m, None).is_empty());
        // Credits coming in never alert.
        assert!(crossings(&entry(100, 0, 100, 0), m, None).is_empty());
    }

    #[test]
    fn low_balance_fires_when_the_total_goes_under() {
        let m = Some(c(100));
        let low = Some(c(10));
        assert_eq!(crossings(&entry(0, -1, 0, 9), m, low), vec!["balance.low"]);
        assert!(crossings(&entry(0, -1, 0, 8), m, low).is_empty());
        assert!(crossings(&entry(0, -1, 0, 10), m, low).is_empty());
        // Unlimited tiers have no balance to run low.
        assert!(crossings(&entry(0, -1, 0, 9), None, low).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff_secs(1), 1);
        assert_eq!(backoff_secs(2), 2);
        assert_eq!(backoff_secs(5), 16);
        assert_eq!(backoff_secs(40), 3600);
    }
}
