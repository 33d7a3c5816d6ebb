//! The customer portal in a real (headless) Chromium against the real binary, Redis, Postgres
//! and the fake Stripe: links, the exact and live balance, usage and activity after real
//! proxy requests, buying a pack through Checkout and a signed webhook, keys within the seat
//! limit, and the refusals (used or unknown links, other accounts' data, forged forms).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::browser::Browser;
use crate::harness::{http_client, poll_until, toml_str, TestEnv};
use crate::stripe_util::{deliver_ok, event, id, now, pack_session, subscription_session, world};
use crate::upstream::FakeUpstream;

const OVERVIEW: &str = "/_tollgate/portal/";

async fn portal_link(app: &crate::harness::App, account: &str) -> (String, Value) {
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{account}/portal-sessions"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "portal session: {body}");
    (body["url"].as_str().expect("url").to_string(), body)
}

/// A reqwest client that keeps cookies by hand and never follows redirects.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap()
}

fn session_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
}

/// Signs in to the portal with an API key; the session cookie (`name=value`).
async fn key_session(raw: &reqwest::Client, app: &crate::harness::App, key: &str) -> String {
    let resp = raw
        .post(app.proxy_url("/_tollgate/portal/signin"))
        .form(&[("api_key", key)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    session_cookie(&resp, "tg_portal").expect("session cookie")
}

/// The CSRF token of a page's first form.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

#[tokio::test]
async fn portal_link_shows_the_exact_balance_and_live_usage_and_activity() {
    let w = world().await;
    let app = &w.app;
    let (account, key) = app.account_with_key("free").await;
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{account}/grants"),
            json!({"credits": "2.5", "reason": "welcome", "idempotency_key": id("g")}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let (url, body) = portal_link(app, &account).await;
    assert!(
        url.starts_with(&app.proxy_url("/_tollgate/portal/enter?token=")),
        "{url}"
    );
    let expires = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap())
        .expect("expires_at is RFC 3339");
    let in_secs = expires.timestamp() - now();
    assert!((880..=900).contains(&in_secs), "expires in {in_secs} s");
    // Stored hashed, with the link's lifetime.
    let token = url.split("token=").nth(1).unwrap().to_string();
    let keys = w.env.redis_keys().await;
    let link_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains(":web:portal:link:"))
        .collect();
    assert_eq!(link_keys.len(), 1, "{keys:?}");
    assert!(!link_keys[0].contains(&token));
    let mut redis = w.env.redis().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(link_keys[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((880..=900).contains(&ttl), "ttl {ttl}");

    let b = Browser::start(1100).await;
    b.goto(&url).await;
    b.wait_url(&app.proxy_url(OVERVIEW)).await;
    assert_eq!(b.text("#balance-total").await, "12.5");
    assert_eq!(b.text("#balance-allowance").await, "10");
    assert_eq!(b.text("#balance-purchased").await, "2.5");
    assert_eq!(b.text("#tier").await, "free");
    assert_eq!(b.text("#status").await, "active");
    let cookie = b
        .cookies()
        .await
        .into_iter()
        .find(|c| c["name"] == "tg_portal")
        .expect("session cookie");
    assert_eq!(cookie["httpOnly"], json!(true), "{cookie}");
    assert_eq!(cookie["sameSite"], json!("Lax"), "{cookie}");
    assert_eq!(cookie["secure"], json!(false), "plain HTTP: {cookie}");

    // Three real requests through the proxy; the open overview follows without a reload.
    let client = http_client();
    let mut request_ids = Vec::new();
    for i in 0..3 {
        let resp = client
            .post(app.proxy_url("/v1/chat"))
            .bearer_auth(&key)
            .body(format!("hello {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        request_ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    assert!(
        b.wait_text("#balance-total", "9.5", Duration::from_secs(10))
            .await,
        "the overview did not update live: {}",
        b.text("#balance-total").await
    );
    assert_eq!(b.text("#balance-allowance").await, "7");
    b.screenshot("portal-overview").await;

    // Activity: the three charges with their request ids (once the journal reached Postgres).
    let activity = app.proxy_url("/_tollgate/portal/activity");
    let listed = poll_until(Duration::from_secs(20), || async {
        b.goto(&activity).await;
        let html = b.source().await;
        request_ids.iter().all(|id| html.contains(id.as_str()))
    })
    .await;
    assert!(listed, "activity lacks the requests: {}", b.source().await);
    let kinds: Vec<String> = {
        let mut out = Vec::new();
        for e in b.find_all("#activity tr.entry .kind").await {
            out.push(e.text().await);
        }
        out
    };
    assert_eq!(
        kinds.iter().filter(|k| *k == "debit").count(),
        3,
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "grant"), "{kinds:?}");
    b.screenshot("portal-activity").await;

    // Usage: the same three requests, the chart drawn server-side.
    b.goto(&app.proxy_url("/_tollgate/portal/usage")).await;
    assert_eq!(b.text("#usage-requests").await, "3");
    assert_eq!(b.text("#usage-credits").await, "3");
    assert_eq!(b.find_all("svg.chart rect").await.len(), 1);
    b.screenshot("portal-usage").await;

    // The link worked once.
    b.goto(&url).await;
    assert_eq!(b.text("#error-code").await, "forbidden");
    let raw = raw_client();
    let resp = raw.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = raw
        .get(app.proxy_url("/_tollgate/portal/enter?token=not-a-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-tollgate-error"], "forbidden");
    // An expired link is a deleted Redis key: the same refusal.
    let (url2, _) = portal_link(app, &account).await;
    let keys = w.env.redis_keys().await;
    for k in keys.iter().filter(|k| k.contains(":web:portal:link:")) {
        let () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let resp = raw.get(&url2).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Pages carry a strict CSP and no inline script.
    let resp = raw.get(app.proxy_url(OVERVIEW)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "no session → sign-in");
    let resp = raw
        .get(app.proxy_url("/_tollgate/portal/signin"))
        .send()
        .await
        .unwrap();
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(resp.headers()["referrer-policy"], "same-origin");
    let html = resp.text().await.unwrap();
    assert!(!html.contains("<script>"), "inline script: {html}");
}

#[tokio::test]
async fn portal_buys_a_pack_through_stripe_checkout_and_the_webhook_shows_live() {
    let w = world().await;
    let app = &w.app;
    let account = crate::stripe_util::account(app, "free").await;
    let (url, _) = portal_link(app, &account).await;
    let b = Browser::start(1100).await;
    b.goto(&url).await;
    assert_eq!(b.text("#balance-total").await, "10");
    b.goto(&app.proxy_url("/_tollgate/portal/buy")).await;
    b.screenshot("portal-buy").await;
    b.find("#buy-pack_100").await.click().await;

    let sent = poll_until(Duration::from_secs(10), || async {
        !w.stripe.calls("POST", "/v1/checkout/sessions").is_empty()
    })
    .await;
    assert!(sent, "no checkout session reached Stripe");
    let sessions = w.stripe.calls("POST", "/v1/checkout/sessions");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.field("mode"), Some("payment"));
    assert_eq!(s.field("line_items[0][price]"), Some("price_pack_100"));
    assert_eq!(s.field("metadata[account_id]"), Some(account.as_str()));
    assert_eq!(s.field("metadata[pack_id]"), Some("pack_100"));
    let success = app.proxy_url("/_tollgate/portal/buy/success");
    assert_eq!(s.field("success_url"), Some(success.as_str()));
    assert_eq!(
        s.field("cancel_url"),
        Some(app.proxy_url("/_tollgate/portal/buy/cancel").as_str())
    );
    // The browser was sent to Stripe's Checkout (unreachable from this test machine).
    let went = poll_until(Duration::from_secs(10), || async {
        b.url().await.contains("checkout.stripe.com")
    })
    .await;
    assert!(went, "browser at {}", b.url().await);

    // Stripe sends the customer back; the payment is confirmed by the signed webhook, and the
    // open overview shows the new balance without a reload.
    b.goto(&success).await;
    assert_eq!(b.text("#balance-total").await, "10");
    b.goto(&app.proxy_url(OVERVIEW)).await;
    assert_eq!(b.text("#balance-total").await, "10");
    let completed = event(
        "checkout.session.completed",
        pack_session(&account, "pack_100", &id("cs"), &id("pi")),
        now(),
    );
    deliver_ok(app, &completed, "applied").await;
    assert!(
        b.wait_text("#balance-total", "120", Duration::from_secs(10))
            .await,
        "balance after the purchase: {}",
        b.text("#balance-total").await
    );
    assert_eq!(b.text("#balance-purchased").await, "110");

    // Subscribing goes through Checkout too, with the tier's monthly price.
    b.goto(&app.proxy_url("/_tollgate/portal/buy")).await;
    b.find("#subscribe-pro").await.click().await;
    let sent = poll_until(Duration::from_secs(10), || async {
        w.stripe.calls("POST", "/v1/checkout/sessions").len() == 2
    })
    .await;
    assert!(sent, "no subscription checkout reached Stripe");
    let s = &w.stripe.calls("POST", "/v1/checkout/sessions")[1];
    assert_eq!(s.field("mode"), Some("subscription"));
    assert_eq!(s.field("line_items[0][price]"), Some("price_pro_month"));
    assert_eq!(s.field("metadata[account_id]"), Some(account.as_str()));
    assert_eq!(s.field("success_url"), Some(success.as_str()));
}

/// A config without Stripe: one metered route, a tier with two seats.
fn seats_config(env: &TestEnv, up: &FakeUpstream) -> crate::harness::ConfigBuilder {
    env.config().toml(format!(
        r#"
[[upstreams]]
name = "up"
url = {}

[[routes]]
name = "chat"
path_prefix = "/v1/"
upstream = "up"
cost = 1

[tiers.team]
monthly_credits = 50
max_keys = 2
"#,
        toml_str(&up.url())
    ))
}

#[tokio::test]
async fn portal_keys_within_the_seat_limit_sign_in_and_scoping() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = seats_config(&env, &up).spawn().await;
    let (account, key) = app.account_with_key("team").await;
    let (other, other_key) = app.account_with_key("team").await;
    let client = http_client();
    let call = |key: String| {
        let client = client.clone();
        let url = app.proxy_url("/v1/chat");
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .body("hi")
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Sign in with an API key, in a phone-sized window.
    let b = Browser::start(375).await;
    b.goto(&app.proxy_url(OVERVIEW)).await;
    b.wait_url(&app.proxy_url("/_tollgate/portal/signin")).await;
    b.find("#api_key")
        .await
        .type_text("tg_not_a_real_key")
        .await;
    b.find("#signin").await.click().await;
    assert!(b.text("#signin-error").await.contains("not valid"));
    b.find("#api_key").await.type_text(&key).await;
    b.find("#signin").await.click().await;
    b.wait_url(&app.proxy_url(OVERVIEW)).await;
    assert_eq!(b.text("#balance-total").await, "50");
    b.screenshot("portal-overview-375").await;

    // Create a key: shown once, works at once.
    b.goto(&app.proxy_url("/_tollgate/portal/keys")).await;
    assert_eq!(b.find_all("#keys tr.key").await.len(), 1);
    b.find("#key-name").await.type_text("laptop").await;
    b.find("#create-key").await.click().await;
    let new_key = b.find("#new-key").await.value().await;
    assert!(new_key.starts_with("tg_"), "{new_key}");
    assert_eq!(call(new_key.clone()).await, StatusCode::OK);
    b.screenshot("portal-keys-375").await;
    b.goto(&app.proxy_url("/_tollgate/portal/keys")).await;
    assert!(
        !b.source().await.contains(&new_key),
        "a key is shown only once"
    );
    assert_eq!(b.find_all("#keys tr.key").await.len(), 2);

    // Both seats taken: a third key is refused with the seat-limit message.
    b.find("#key-name").await.type_text("one too many").await;
    b.find("#create-key").await.click().await;
    let error = b.text("#key-error").await;
    assert!(error.contains("2 seats"), "{error}");
    assert_eq!(b.find_all("#keys tr.key").await.len(), 2);

    // Revoke the laptop key; it stops working.
    // The newest key is listed first: its Revoke button is the first one.
    let first = b.find("#keys tr.key").await;
    assert!(first.text().await.contains("laptop"));
    b.find("#keys tr.key button").await.click().await;
    b.wait_count("#keys tr.key", 1).await;
    let refused = poll_until(Duration::from_secs(5), || async {
        call(new_key.clone()).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused, "the revoked key still works");
    assert_eq!(
        call(key.clone()).await,
        StatusCode::OK,
        "the first key is untouched"
    );

    // Scoping and forged forms, with a plain HTTP client signed in as `account`.
    let raw = raw_client();
    let cookie = key_session(&raw, &app, &key).await;
    let page = raw
        .get(app.proxy_url("/_tollgate/portal/keys"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains(&other), "another account's data on the page");
    let csrf = csrf_of(&page);
    let other_key_id: String = sqlx::query_scalar("SELECT id FROM api_keys WHERE account_id = $1")
        .bind(&other)
        .fetch_one(&env.pg().await)
        .await
        .unwrap();
    let resp = raw
        .post(app.proxy_url(&format!("/_tollgate/portal/keys/{other_key_id}/revoke")))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(call(other_key.clone()).await, StatusCode::OK);
    // A form without this session's CSRF token, or from another site, changes nothing.
    let resp = raw
        .post(app.proxy_url("/_tollgate/portal/keys"))
        .header("cookie", &cookie)
        .form(&[("csrf", "forged"), ("name", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-tollgate-error"], "csrf_failed");
    let resp = raw
        .post(app.proxy_url("/_tollgate/portal/signin"))
        .header("origin", "https://evil.example")
        .form(&[("api_key", key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let live: Value = raw
        .get(app.proxy_url("/_tollgate/portal/live.json"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live["account_id"], json!(account));

    // The console is not on the proxy listener.
    let resp = raw.get(app.proxy_url("/console/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(!resp.text().await.unwrap().contains("Operator console"));

    // Sign-out ends the session for good.
    b.goto(&app.proxy_url(OVERVIEW)).await;
    b.find("#signout").await.click().await;
    b.wait_url(&app.proxy_url("/_tollgate/portal/signin")).await;
    b.goto(&app.proxy_url(OVERVIEW)).await;
    b.wait_url(&app.proxy_url("/_tollgate/portal/signin")).await;

    // Guessing keys through the form is limited: 10 attempts a minute per client.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let resp = raw
            .post(app.proxy_url("/_tollgate/portal/signin"))
            .form(&[("api_key", "tg_guess")])
            .send()
            .await
            .unwrap();
        statuses.push(resp.status());
    }
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::UNAUTHORIZED), "{statuses:?}");
}

/// The "Last used" cell of the key row `key_id` on the portal's keys page.
fn last_used_of(html: &str, key_id: &str) -> String {
    let at = html
        .find(&format!("data-key-id=\"{key_id}\""))
        .expect("the key's row");
    let row = &html[at..at + html[at..].find("</tr>").unwrap()];
    let open = "<td class=\"last-used\">";
    let cell = row.find(open).expect("a last-used cell") + open.len();
    row[cell..cell + row[cell..].find("</td>").unwrap()].to_string()
}

#[tokio::test]
async fn portal_keys_show_when_each_key_was_last_used_flushed_to_redis() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = seats_config(&env, &up)
        .toml("[portal]\nkey_used_flush_seconds = 1\n")
        .spawn()
        .await;
    let account = crate::stripe_util::account(&app, "team").await;
    let (used_id, used_key) = app.create_key(&account).await;
    let (idle_id, _) = app.create_key(&account).await;

    // Signing in to the portal with a key is not a use of the API.
    let raw = raw_client();
    let cookie = key_session(&raw, &app, &used_key).await;
    let keys_page = || async {
        raw.get(app.proxy_url("/_tollgate/portal/keys"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let page = keys_page().await;
    assert_eq!(last_used_of(&page, &used_id), "never");
    assert_eq!(last_used_of(&page, &idle_id), "never");

    let before = now();
    let status = http_client()
        .post(app.proxy_url("/v1/chat"))
        .bearer_auth(&used_key)
        .body("hi")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);

    // The use reaches Redis by the background flush (the request itself writes nothing).
    let hash = format!(":keyused:{account}");
    let mut conn = env.redis().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut flushed: Option<i64> = None;
    while flushed.is_none() && std::time::Instant::now() < deadline {
        if let Some(name) = env
            .redis_keys()
            .await
            .into_iter()
            .find(|k| k.ends_with(&hash))
        {
            flushed = redis::cmd("HGET")
                .arg(&name)
                .arg(&used_id)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(flushed.is_some(), "no last-use time flushed to redis");
    let at = flushed.unwrap();
    assert!(at >= before && at <= now() + 1, "{at} vs {before}");

    let page = keys_page().await;
    let shown = last_used_of(&page, &used_id);
    let expected = chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string();
    assert_eq!(shown, expected);
    assert_eq!(last_used_of(&page, &idle_id), "never");
}

#[tokio::test]
async fn portal_links_into_the_stripe_billing_portal_when_configured() {
    let env = TestEnv::new().await;
    let stripe = crate::fake_stripe::FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let toml = crate::stripe_util::stripe_toml(&stripe.url(), &up.url(), 7).replace(
        "timeout_ms = 1500\n",
        "timeout_ms = 1500\nbilling_portal = true\n",
    );
    assert!(toml.contains("billing_portal = true"));
    let app = env
        .config()
        .toml(toml)
        .env("STRIPE_SECRET_KEY", crate::stripe_util::SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", crate::stripe_util::WEBHOOK_SECRET)
        .spawn()
        .await;
    let account = crate::stripe_util::account(&app, "free").await;
    let (url, _) = portal_link(&app, &account).await;
    let b = Browser::start(1100).await;
    b.goto(&url).await;
    b.goto(&app.proxy_url("/_tollgate/portal/buy")).await;
    b.find("#billing-portal").await.click().await;

    // The browser ends on the URL Stripe returned (a page the fake serves).
    let arrived = poll_until(Duration::from_secs(10), || async {
        b.url().await.contains("/billing_portal/p/bps_fake")
    })
    .await;
    assert!(arrived, "browser at {}", b.url().await);
    assert_eq!(
        b.text("#fake-billing-portal").await,
        "Fake Stripe billing portal"
    );

    // Stripe got the account's customer and the overview to return to.
    let calls = stripe.calls("POST", "/v1/billing_portal/sessions");
    assert_eq!(calls.len(), 1);
    let customer: String =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = $1")
            .bind(&account)
            .fetch_one(&env.pg().await)
            .await
            .unwrap();
    assert_eq!(calls[0].field("customer"), Some(customer.as_str()));
    assert_eq!(
        calls[0].field("return_url"),
        Some(app.proxy_url(OVERVIEW).as_str())
    );

    // Without the session's CSRF token nothing reaches Stripe.
    let raw = raw_client();
    let resp = raw
        .post(app.proxy_url("/_tollgate/portal/billing"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_ne!(resp.status(), StatusCode::OK);
    assert_eq!(stripe.calls("POST", "/v1/billing_portal/sessions").len(), 1);
}

/// `cents` (positive) as the portal shows dollars.
fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[tokio::test]
async fn portal_tier_change_shows_stripes_proration_and_confirms_it_at_the_same_date() {
    let w = world().await;
    let app = &w.app;
    let account = crate::stripe_util::account(app, "free").await;
    let sub = id("sub");
    deliver_ok(
        app,
        &event(
            "checkout.session.completed",
            subscription_session(&account, "pro", "month", &sub),
            now(),
        ),
        "applied",
    )
    .await;
    w.stripe.add_subscription(&sub, "price_pro_month", &account);
    let (start, end) = (now() - 10 * 86_400, now() + 20 * 86_400);
    w.stripe.set_period(&sub, start, end);
    let updates = || w.stripe.calls("POST", &format!("/v1/subscriptions/{sub}"));

    let (url, _) = portal_link(app, &account).await;
    let b = Browser::start(1100).await;
    b.goto(&url).await;
    let buy = app.proxy_url("/_tollgate/portal/buy");

    // Choosing another tier shows Stripe's preview first; Cancel changes nothing.
    b.goto(&buy).await;
    b.find("#switch-team").await.click().await;
    b.find("#change-confirm").await;
    assert_eq!(b.text("#change-tier").await, "team");
    b.find("#change-cancel").await.click().await;
    b.wait_url(&buy).await;
    assert!(updates().is_empty(), "a canceled change reached Stripe");

    b.goto(&buy).await;
    b.find("#switch-team").await.click().await;
    b.find("#change-confirm").await;
    let previews = w.stripe.calls("POST", "/v1/invoices/create_preview");
    assert_eq!(previews.len(), 2);
    let preview = previews.last().unwrap();
    assert_eq!(preview.field("subscription"), Some(sub.as_str()));
    assert_eq!(
        preview.field("subscription_details[items][0][price]"),
        Some("price_team_month")
    );
    let at: i64 = preview
        .field("subscription_details[proration_date]")
        .expect("a proration date")
        .parse()
        .unwrap();
    let (credit, charge) = crate::fake_stripe::proration(4900, 19900, start, end, at);
    assert!(credit + charge > 0, "an upgrade is charged");
    assert_eq!(
        b.text("#change-proration").await,
        format!(
            "you will be charged {} for the rest of this period (proration)",
            dollars(credit + charge)
        )
    );
    assert_eq!(
        b.text("#change-next-invoice").await,
        dollars(credit + charge + 19900)
    );
    b.screenshot("portal-change-confirm").await;

    // Confirm: Stripe gets the subscription update with the previewed proration_date.
    b.find("#change-confirm").await.click().await;
    assert!(
        b.wait_text(
            "#message",
            "Your plan change to team was sent to Stripe, prorated as shown; it applies as soon as Stripe confirms it.",
            Duration::from_secs(10)
        )
        .await,
        "{}",
        b.text("#message").await
    );
    let sent = updates();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].field("items[0][price]"), Some("price_team_month"));
    assert_eq!(
        sent[0].field("proration_date"),
        Some(at.to_string().as_str())
    );

    // The confirm form is a form like the others: without the CSRF token nothing reaches Stripe.
    let resp = raw_client()
        .post(app.proxy_url("/_tollgate/portal/buy/subscription"))
        .form(&[
            ("csrf", "forged"),
            ("action", "confirm_change"),
            ("tier", "team"),
            ("proration_date", &at.to_string()),
        ])
        .send()
        .await
        .unwrap();
    assert_ne!(resp.status(), StatusCode::OK);
    assert_eq!(updates().len(), 1);
}
