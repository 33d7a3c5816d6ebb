//! Checkout through the Stripe API (the fake one): the catalogue, Checkout Sessions for packs
//! and subscriptions with the account in `client_reference_id` and in metadata, one Stripe
//! customer per account, idempotency keys on every create, and Stripe failures and timeouts
//! answered as `502 stripe_error`.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::fake_stripe::{FakeStripe, Mode};
use crate::harness::TestEnv;
use crate::stripe_util::{account, world, SECRET_KEY};
use crate::upstream::FakeUpstream;

#[tokio::test]
async fn the_catalog_lists_tiers_and_packs_with_prices() {
    let w = world().await;
    let (status, body) = w.app.admin_get("/v1/catalog").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tiers = body["tiers"].as_array().unwrap();
    let pro = tiers.iter().find(|t| t["id"] == "pro").unwrap();
    assert_eq!(pro["monthly_credits"], json!(100));
    assert_eq!(pro["prices"]["month"]["amount_cents"], json!(4900));
    assert_eq!(pro["prices"]["month"]["stripe_price_id"], "price_pro_month");
    assert_eq!(pro["prices"]["year"]["amount_cents"], json!(49000));
    assert_eq!(pro["prices"]["year"]["currency"], "usd");
    let free = tiers.iter().find(|t| t["id"] == "free").unwrap();
    assert_eq!(free["default"], json!(true));
    assert!(free["prices"]["month"].is_null());
    let packs = body["credit_packs"].as_array().unwrap();
    let pack = packs.iter().find(|p| p["id"] == "pack_100").unwrap();
    assert_eq!(pack["credits"], json!(100));
    assert_eq!(pack["bonus_credits"], json!(10));
    assert_eq!(pack["total_credits"], json!(110));
    assert_eq!(pack["price_cents"], json!(1000));
    assert_eq!(pack["currency"], "usd");
    assert_eq!(pack["stripe_price_id"], "price_pack_100");
    assert_eq!(body["checkout_enabled"], json!(true));
    // Admin only.
    let resp = w
        .app
        .client()
        .get(w.app.admin_url("/v1/catalog"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_pack_checkout_creates_a_payment_session_for_the_account() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let session_id = body["session_id"].as_str().unwrap();
    assert!(session_id.starts_with("cs_test_"), "{body}");
    assert_eq!(
        body["url"].as_str().unwrap(),
        format!("https://checkout.stripe.com/c/pay/{session_id}")
    );

    // The customer first, with the account in its metadata and an idempotency key.
    let customers = w.stripe.calls("POST", "/v1/customers");
    assert_eq!(customers.len(), 1);
    assert_eq!(
        customers[0].field("metadata[account_id]"),
        Some(acct.as_str())
    );
    assert!(customers[0]
        .idempotency_key()
        .is_some_and(|k| k.contains(&acct)));
    assert_eq!(
        customers[0].headers["authorization"],
        format!("Bearer {SECRET_KEY}").as_str()
    );
    let customer_id = body["customer_id"].as_str().unwrap();

    let sessions = w.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.field("mode"), Some("payment"));
    assert_eq!(s.field("client_reference_id"), Some(acct.as_str()));
    assert_eq!(s.field("customer"), Some(customer_id));
    assert_eq!(s.field("line_items[0][price]"), Some("price_pack_100"));
    assert_eq!(s.field("line_items[0][quantity]"), Some("1"));
    assert_eq!(s.field("metadata[account_id]"), Some(acct.as_str()));
    assert_eq!(s.field("metadata[pack_id]"), Some("pack_100"));
    assert_eq!(
        s.field("payment_intent_data[metadata][account_id]"),
        Some(acct.as_str())
    );
    assert_eq!(
        s.field("payment_intent_data[metadata][pack_id]"),
        Some("pack_100")
    );
    assert_eq!(s.field("success_url"), Some("https://app.example.com/ok"));
    assert_eq!(
        s.field("cancel_url"),
        Some("https://app.example.com/cancel")
    );
    assert!(s.idempotency_key().is_some(), "no idempotency key");

    // A second checkout reuses the remembered customer; its own key differs.
    let (status, body2) = w
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_small",
                   "success_url": "https://shop.example.com/done"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body2}");
    assert_eq!(body2["customer_id"], customer_id);
    assert_eq!(w.stripe.calls("POST", "/v1/customers").len(), 1);
    let sessions = w.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 2);
    assert_ne!(sessions[0].idempotency_key(), sessions[1].idempotency_key());
    assert_eq!(
        sessions[1].field("success_url"),
        Some("https://shop.example.com/done")
    );

    // A caller's idempotency key makes a retried checkout the same session.
    let req = json!({"account_id": acct, "pack_id": "pack_100", "idempotency_key": "order-42"});
    let (_, a) = w
        .app
        .admin_post("/v1/checkout/credit-packs", req.clone())
        .await;
    let (_, b) = w.app.admin_post("/v1/checkout/credit-packs", req).await;
    assert_eq!(a["session_id"], b["session_id"], "{a} vs {b}");
    let keys: Vec<_> = w
        .stripe
        .calls("POST", "/v1/checkout/sessions")
        .iter()
        .filter_map(|r| r.idempotency_key())
        .filter(|k| k.contains("order-42"))
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn concurrent_first_checkouts_create_one_customer() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let calls = (0..5).map(|_| {
        w.app.admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
    });
    let answers = futures_util::future::join_all(calls).await;
    let customers: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["customer_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(customers.len(), 1, "{customers:?}");
    // Every create carried the same key, so Stripe made one customer.
    let keys: std::collections::BTreeSet<_> = w
        .stripe
        .calls("POST", "/v1/customers")
        .iter()
        .map(|r| r.idempotency_key().unwrap())
        .collect();
    assert_eq!(keys.len(), 1);
}

#[tokio::test]
async fn a_subscription_checkout_creates_a_subscription_session() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "pro", "interval": "year"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["session_id"].as_str().unwrap().starts_with("cs_test_"));
    assert!(body["url"].as_str().unwrap().starts_with("https://"));
    assert_eq!(body["interval"], "year");
    let s = &w.stripe.calls("POST", "/v1/checkout/sessions")[0];
    assert_eq!(s.field("mode"), Some("subscription"));
    assert_eq!(s.field("client_reference_id"), Some(acct.as_str()));
    assert_eq!(s.field("line_items[0][price]"), Some("price_pro_year"));
    assert_eq!(s.field("metadata[account_id]"), Some(acct.as_str()));
    assert_eq!(s.field("metadata[tier]"), Some("pro"));
    assert_eq!(
        s.field("subscription_data[metadata][account_id]"),
        Some(acct.as_str())
    );
    assert_eq!(s.field("subscription_data[metadata][tier]"), Some("pro"));
    assert_eq!(
        s.field("subscription_data[metadata][interval]"),
        Some("year")
    );
    assert!(s.idempotency_key().is_some());

    // The interval defaults to month.
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "team"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let s = &w.stripe.calls("POST", "/v1/checkout/sessions")[1];
    assert_eq!(s.field("line_items[0][price]"), Some("price_team_month"));
}

#[tokio::test]
async fn bad_checkout_requests_are_refused_before_stripe() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let cases = [
        (
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "nope"}),
            404,
            "not_found",
        ),
        (
            "/v1/checkout/credit-packs",
            json!({"account_id": "ghost", "pack_id": "pack_100"}),
            404,
            "not_found",
        ),
        (
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_unsold"}),
            400,
            "invalid_request",
        ),
        (
            "/v1/checkout/credit-packs",
            json!({"account_id": acct}),
            400,
            "invalid_request",
        ),
        (
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "gold"}),
            400,
            "unknown_tier",
        ),
        (
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "team", "interval": "year"}),
            400,
            "invalid_request",
        ),
        (
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "pro", "interval": "weekly"}),
            400,
            "invalid_request",
        ),
        (
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "free"}),
            400,
            "invalid_request",
        ),
    ];
    for (path, req, status, code) in cases {
        let (got, body) = w.app.admin_post(path, req.clone()).await;
        assert_eq!(got.as_u16(), status, "{req} → {body}");
        assert_eq!(body["error"], code, "{req} → {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(w.stripe.requests().is_empty(), "{:?}", w.stripe.requests());
}

#[tokio::test]
async fn stripe_errors_at_checkout_are_clear_502s() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    w.stripe.set_mode(Mode::Fail {
        status: 400,
        kind: "invalid_request_error".into(),
        code: Some("resource_missing".into()),
        message: "No such price: 'price_pack_100'".into(),
    });
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("No such price"), "{message}");
    assert!(message.contains("resource_missing"), "{message}");

    w.stripe.set_mode(Mode::Fail {
        status: 500,
        kind: "api_error".into(),
        code: None,
        message: "Something went wrong on Stripe's end.".into(),
    });
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "pro"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
    assert!(
        body["message"].as_str().unwrap().contains("went wrong"),
        "{body}"
    );
}

#[tokio::test]
async fn a_stripe_that_does_not_answer_is_a_502_after_the_timeout() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    w.stripe.set_mode(Mode::Hang);
    let started = Instant::now();
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
    assert!(
        body["message"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );
    // timeout_ms = 1500 in the test config: the answer came from tollgate's timeout, not
    // earlier (how much later is not checked; the admin client's timeout bounds it).
    assert!(took >= Duration::from_millis(1400), "{took:?}");

    // Stripe back: the checkout works (the customer call is retried with the same key).
    w.stripe.set_mode(Mode::Normal);
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_stripe_that_is_unreachable_is_a_502() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let closed = crate::ledger_util::ClosedPort::new();
    let app = env
        .config()
        .toml(crate::stripe_util::stripe_toml(
            &format!("http://{}", closed.addr),
            &up.url(),
            7,
        ))
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", "whsec_x")
        .spawn()
        .await;
    let acct = account(&app, "free").await;
    let (status, body) = app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": acct, "pack_id": "pack_100"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach Stripe"),
        "{body}"
    );
}

#[tokio::test]
async fn without_a_stripe_section_checkout_and_webhooks_say_so() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(crate::harness::passthrough_toml(&up.url()))
        .spawn()
        .await;
    app.create_account("a1", "default").await;
    let (status, body) = app
        .admin_post(
            "/v1/checkout/credit-packs",
            json!({"account_id": "a1", "pack_id": "p"}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "stripe_not_configured");
    let (status, body) =
        crate::stripe_util::post_webhook(&app, b"{}".to_vec(), Some("t=1,v1=00".into())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = app.admin_get("/v1/catalog").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["checkout_enabled"], json!(false));
}

/// The fake really is Stripe-shaped: async-stripe parsed its fixture answers (a wrong shape
/// would have been a 502 above). This checks the fake itself rejects unknown paths the way
/// Stripe does, so a typo in tollgate's calls cannot pass unnoticed.
#[tokio::test]
async fn the_fake_stripe_refuses_unknown_endpoints() {
    let stripe = FakeStripe::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/nope", stripe.url()))
        .bearer_auth("sk")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}
