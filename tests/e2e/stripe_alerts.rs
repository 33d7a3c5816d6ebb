//! Outgoing alerts: crossing the low-balance threshold and 80 % / 100 % of the allowance POSTs
//! a signed JSON event to `[alerts] webhook_url`, once per crossing, retried with backoff when
//! the receiver fails, never slowing the requests themselves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::fake_stripe::FakeStripe;
use crate::harness::{poll_until, TestEnv};
use crate::ledger_util::get;
use crate::stripe_util::*;
use crate::upstream::FakeUpstream;

const ALERTS_SECRET: &str = "alerts-e2e-secret";

/// One POST: signature header, event id header, body, the status answered.
type Received = (String, String, Vec<u8>, u16);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Answer 500 to this many requests first.
    fail_first: Arc<Mutex<usize>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> AxumStatus {
    let status = {
        let mut fail = r.fail_first.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            AxumStatus::INTERNAL_SERVER_ERROR
        } else {
            AxumStatus::OK
        }
    };
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    r.got.lock().unwrap().push((
        header("tollgate-signature"),
        header("tollgate-event-id"),
        body.to_vec(),
        status.as_u16(),
    ));
    status
}

#[tokio::test]
async fn crossing_thresholds_posts_signed_alerts_once_with_retries() {
    let receiver = Receiver::default();
    *receiver.fail_first.lock().unwrap() = 1;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/alerts", axum::routing::post(receive))
        .with_state(receiver.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });

    let env = TestEnv::new().await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(stripe_toml(&stripe.url(), &up.url(), 7))
        .toml(format!(
            "[alerts]\nwebhook_url = \"http://{addr}/alerts\"\nsecret_env = \"TOLLGATE_ALERTS_SECRET\"\nmax_attempts = 5\n"
        ))
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("TOLLGATE_ALERTS_SECRET", ALERTS_SECRET)
        .spawn()
        .await;
    let acct = account(&app, "free").await;
    let (_, key) = app.create_key(&acct).await;
    // free: 10 credits a month, low below 3, each call costs 1.
    for _ in 0..10 {
        assert_eq!(get(&app, &key, "/x").await.status, StatusCode::OK);
    }
    get(&app, &key, "/x")
        .await
        .assert_error(402, "insufficient_credits");

    let delivered = || {
        receiver
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.3 == 200)
            .count()
    };
    let ok = poll_until(Duration::from_secs(20), || async { delivered() >= 3 }).await;
    assert!(ok, "alerts delivered: {:?}", receiver.got.lock().unwrap());
    // Nothing more comes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let got = receiver.got.lock().unwrap().clone();
    let ok: Vec<_> = got.iter().filter(|g| g.3 == 200).collect();
    assert_eq!(ok.len(), 3, "{got:?}");
    // The first attempt failed and was retried with the same event id.
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].3, 500);
    assert!(
        ok.iter().any(|g| g.1 == got[0].1),
        "the failed alert was retried"
    );

    let mut kinds = Vec::new();
    for (signature, event_id, body, _) in &ok {
        // t=<unix>,v1=<hex HMAC-SHA256("t.body")>
        let (t, v1) = signature
            .split_once(',')
            .map(|(t, v)| {
                (
                    t.trim_start_matches("t=").parse::<i64>().unwrap(),
                    v.trim_start_matches("v1=").to_string(),
                )
            })
            .unwrap_or_else(|| panic!("signature {signature:?}"));
        assert_eq!(v1, hmac_hex(ALERTS_SECRET, t, body), "bad signature");
        assert!((now() - t).abs() < 60);
        let alert: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(alert["id"], event_id.as_str());
        assert_eq!(alert["account_id"], acct.as_str());
        assert_eq!(alert["tier"], "free");
        kinds.push((
            alert["type"].as_str().unwrap().to_string(),
            alert["balance"]["total"].clone(),
        ));
    }
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        kinds,
        vec![
            ("allowance.100".to_string(), serde_json::json!(0)),
            ("allowance.80".to_string(), serde_json::json!(2)),
            ("balance.low".to_string(), serde_json::json!(2)),
        ]
    );
    let pg = env.pg().await;
    let states: Vec<(String, i32)> =
        sqlx::query_as("SELECT state, attempts FROM alert_outbox ORDER BY id")
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(|(s, _)| s == "delivered"), "{states:?}");
    assert_eq!(states.iter().map(|(_, a)| a).sum::<i32>(), 4);
    let text = app.metrics_text().await;
    for (outcome, n) in [("delivered", 3.0), ("retry", 1.0)] {
        assert_eq!(
            crate::harness::metric_value(
                &text,
                "tollgate_alert_deliveries_total",
                &[("outcome", outcome)]
            ),
            Some(n),
            "{outcome}"
        );
    }
    server.abort();
}
