//! Helpers shared by the `stripe_*` tests: a config with `[stripe]` pointing at the fake Stripe
//! API, webhook events built from Stripe's fixtures (ids, metadata, amounts changed), signed
//! exactly as Stripe signs them and delivered to `POST /webhooks/stripe`, and balances.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fake_stripe::{fixture, FakeStripe};
use crate::harness::{parse_body, random_id, App, ConfigBuilder, TestEnv};
use crate::upstream::FakeUpstream;

pub const SECRET_KEY: &str = "sk_test_e2e_secret_key";
pub const WEBHOOK_SECRET: &str = "whsec_e2e_webhook_secret";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Tiers `free` (10 credits, the default), `pro` (100, monthly and yearly prices) and `team`
/// (1000, monthly), packs `pack_100` (100 + 10 bonus, $10) and `pack_small` (5, $1), and a
/// catch-all route costing 1 credit.
pub fn stripe_toml(stripe_url: &str, upstream_url: &str, grace_days: u32) -> String {
    format!(
        r#"
[stripe]
secret_key_env = "STRIPE_SECRET_KEY"
webhook_secret_env = "STRIPE_WEBHOOK_SECRET"
api_base = "{stripe_url}"
timeout_ms = 1500
past_due_grace_days = {grace_days}
default_tier = "free"
success_url = "https://app.example.com/ok"
cancel_url = "https://app.example.com/cancel"

[[upstreams]]
name = "up"
url = "{upstream_url}"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
cost = 1

[tiers.free]
monthly_credits = 10
low_balance_credits = 3

[tiers.pro]
monthly_credits = 100
price_cents_monthly = 4900
price_cents_yearly = 49000
stripe_price_id_monthly = "price_pro_month"
stripe_price_id_yearly = "price_pro_year"

[tiers.team]
monthly_credits = 1000
price_cents_monthly = 19900
stripe_price_id_monthly = "price_team_month"

[[credit_packs]]
id = "pack_100"
credits = 100
bonus_credits = 10
price_cents = 1000
currency = "usd"
stripe_price_id = "price_pack_100"

[[credit_packs]]
id = "pack_small"
credits = 5
price_cents = 100
stripe_price_id = "price_pack_small"

[[credit_packs]]
id = "pack_unsold"
credits = 1
price_cents = 10
"#
    )
}

/// The config with the Stripe secrets in the environment.
pub fn stripe_config(env: &TestEnv, stripe: &FakeStripe, up: &FakeUpstream) -> ConfigBuilder {
    env.config()
        .toml(stripe_toml(&stripe.url(), &up.url(), 7))
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
}

/// A test's world: its database and prefix, the fake Stripe, an upstream, tollgate.
pub struct World {
    pub env: TestEnv,
    pub stripe: FakeStripe,
    pub up: FakeUpstream,
    pub app: App,
}

pub async fn world() -> World {
    let env = TestEnv::new().await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let app = stripe_config(&env, &stripe, &up).spawn().await;
    World {
        env,
        stripe,
        up,
        app,
    }
}

/// `acct_<random>` on `tier`.
pub async fn account(app: &App, tier: &str) -> String {
    let id = format!("acct_{}", random_id(10));
    app.create_account(&id, tier).await;
    id
}

pub fn id(prefix: &str) -> String {
    format!("{prefix}_{}", random_id(14))
}

// ---------------------------------------------------------------------------------------------
// Events

/// An event envelope (from the fixture) around `object`.
pub fn event(kind: &str, object: Value, created: i64) -> Value {
    let mut e = fixture("event");
    e["id"] = json!(id("evt"));
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["api_version"] = json!("2025-09-30.clover");
    e["data"] = json!({"object": object});
    e
}

/// A Checkout Session for `pack` paid by `account` (payment mode).
pub fn pack_session(account: &str, pack: &str, session_id: &str, payment_intent: &str) -> Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!(session_id);
    s["mode"] = json!("payment");
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["client_reference_id"] = json!(account);
    s["customer"] = json!(format!("cus_{account}"));
    s["metadata"] = json!({"account_id": account, "pack_id": pack, "kind": "credit_pack"});
    s["payment_intent"] = json!(payment_intent);
    s["amount_total"] = json!(1000);
    s["amount_subtotal"] = json!(1000);
    s["currency"] = json!("usd");
    s["url"] = Value::Null;
    s
}

/// A completed subscription-mode Checkout Session.
pub fn subscription_session(account: &str, tier: &str, interval: &str, sub: &str) -> Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!(id("cs_test"));
    s["mode"] = json!("subscription");
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["client_reference_id"] = json!(account);
    s["customer"] = json!(format!("cus_{account}"));
    s["metadata"] =
        json!({"account_id": account, "tier": tier, "interval": interval, "kind": "subscription"});
    s["subscription"] = json!(sub);
    s["payment_intent"] = Value::Null;
    s["amount_total"] = json!(4900);
    s["currency"] = json!("usd");
    s["url"] = Value::Null;
    s
}

/// A subscription invoice (current API shape: `parent.subscription_details`).
pub fn invoice(
    account: &str,
    sub: &str,
    reason: &str,
    period: (i64, i64),
    amount: i64,
    price: &str,
) -> Value {
    let mut i = fixture("invoice");
    let invoice_id = id("in");
    i["id"] = json!(invoice_id);
    i["billing_reason"] = json!(reason);
    i["status"] = json!("paid");
    i["amount_due"] = json!(amount);
    i["amount_paid"] = json!(amount);
    i["amount_remaining"] = json!(0);
    i["currency"] = json!("usd");
    i["customer"] = json!(format!("cus_{account}"));
    i["subscription"] = Value::Null;
    i["parent"] = json!({
        "quote_details": null,
        "subscription_details": {"metadata": {"account_id": account}, "subscription": sub},
        "type": "subscription_details",
    });
    let line = &mut i["lines"]["data"][0];
    line["invoice"] = json!(invoice_id);
    line["amount"] = json!(amount);
    line["period"] = json!({"start": period.0, "end": period.1});
    line["pricing"] = json!({"type": "price_details", "price_details": {"price": price, "product": "prod_x"}, "unit_amount_decimal": null});
    line["parent"]["type"] = json!("subscription_item_details");
    line["parent"]["subscription_item_details"]["subscription"] = json!(sub);
    line["parent"]["subscription_item_details"]["proration"] = json!(false);
    i
}

/// The same invoice failing.
pub fn failed(mut invoice: Value) -> Value {
    invoice["status"] = json!("open");
    invoice["amount_paid"] = json!(0);
    invoice["attempt_count"] = json!(1);
    invoice
}

/// A subscription object (current API: periods on the item).
pub fn subscription(
    account: &str,
    sub: &str,
    price: &str,
    interval: &str,
    status: &str,
    cancel_at_period_end: bool,
) -> Value {
    let mut s = fixture("subscription");
    s["id"] = json!(sub);
    s["customer"] = json!(format!("cus_{account}"));
    s["status"] = json!(status);
    s["cancel_at_period_end"] = json!(cancel_at_period_end);
    s["metadata"] = json!({"account_id": account});
    s["canceled_at"] = if status == "canceled" {
        json!(now())
    } else {
        Value::Null
    };
    s["ended_at"] = s["canceled_at"].clone();
    s["cancel_at"] = Value::Null;
    let item = &mut s["items"]["data"][0];
    item["subscription"] = json!(sub);
    item["price"]["id"] = json!(price);
    item["price"]["recurring"]["interval"] = json!(interval);
    item["price"]["unit_amount"] = json!(if interval == "year" { 49000 } else { 4900 });
    item["current_period_start"] = json!(now() - 86_400);
    item["current_period_end"] = json!(now() + 29 * 86_400);
    s
}

/// A charge of `amount` cents for `payment_intent`, `refunded` of it refunded so far.
pub fn charge(charge_id: &str, payment_intent: &str, amount: i64, refunded: i64) -> Value {
    let mut c = fixture("charge");
    c["id"] = json!(charge_id);
    c["payment_intent"] = json!(payment_intent);
    c["amount"] = json!(amount);
    c["amount_captured"] = json!(amount);
    c["amount_refunded"] = json!(refunded);
    c["refunded"] = json!(refunded >= amount);
    c["captured"] = json!(true);
    c
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// HMAC-SHA256 of `"{t}.{body}"`, hex: Stripe's `v1` scheme (computed here independently of
/// tollgate's own code).
pub fn hmac_hex(secret: &str, t: i64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// `Stripe-Signature` for `body` at time `t`, as Stripe computes it.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hmac_hex(secret, t, body))
}

/// POSTs raw bytes to the webhook endpoint with the given `Stripe-Signature` (if any).
pub async fn post_webhook(
    app: &App,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut req = app
        .client()
        .post(app.admin_url("/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let resp = req.send().await.expect("webhook request");
    let status = resp.status();
    let text = resp.text().await.expect("webhook response");
    (status, parse_body(&text))
}

/// Delivers an event signed now with the right secret.
pub async fn deliver(app: &App, event: &Value) -> (StatusCode, Value) {
    let body = serde_json::to_vec(event).unwrap();
    let sig = signature(WEBHOOK_SECRET, now(), &body);
    post_webhook(app, body, Some(sig)).await
}

/// Delivers an event and asserts 200 with `outcome`.
pub async fn deliver_ok(app: &App, event: &Value, outcome: &str) -> Value {
    let (status, body) = deliver(app, event).await;
    assert_eq!(status, StatusCode::OK, "{} → {body}", event["type"]);
    assert_eq!(body["outcome"], outcome, "{} → {body}", event["type"]);
    body
}

// ---------------------------------------------------------------------------------------------
// State

/// `(allowance, purchased)` in micro-credits, and the tier and status, from the admin API.
pub async fn state(app: &App, account: &str) -> (i64, i64, String, String) {
    let (status, body) = app.admin_get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK, "GET account: {body}");
    (
        crate::journal_util::micros(&body["balance"]["allowance"]),
        crate::journal_util::micros(&body["balance"]["purchased"]),
        body["tier"].as_str().unwrap_or_default().to_string(),
        body["status"].as_str().unwrap_or_default().to_string(),
    )
}

pub const C: i64 = 1_000_000;

/// Waits for the journal to reach Postgres, then checks the invariant (balance = sum of the
/// journal) and returns the account's entries of `kind` as `(entry_id, d_allowance, d_purchased)`.
pub async fn journal_of(world: &World, account: &str, kind: &str) -> Vec<(String, i64, i64)> {
    crate::journal_util::assert_caught_up(&world.env, Some(&world.app), Duration::from_secs(10))
        .await;
    let pg = world.env.pg().await;
    crate::journal_util::assert_balance_is_journal_sum(&world.app, &pg, account).await;
    sqlx::query_as(
        "SELECT entry_id, d_allowance, d_purchased FROM ledger_entries
          WHERE account_id = $1 AND kind = $2 ORDER BY created_at, entry_id",
    )
    .bind(account)
    .bind(kind)
    .fetch_all(&pg)
    .await
    .unwrap()
}

/// A scalar from the test's database.
pub async fn scalar_i64(env: &TestEnv, sql: &str, bind: &str) -> i64 {
    let pg = env.pg().await;
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&pg)
        .await
        .unwrap()
}
