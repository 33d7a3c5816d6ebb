//! Subscriptions: checkout sets the tier, invoices renew (allowance reset, period aligned) or
//! put the account past due (served during the grace period, then the allowance is frozen while
//! purchased credits stay usable), plan changes and the end of a subscription move the tier,
//! and older events arriving late change nothing. Plus the admin calls that go through Stripe.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::ledger_util::{get, hset};
use crate::stripe_util::*;

const MONTH: i64 = 30 * 86_400;

/// Starts a `pro` monthly subscription through a completed Checkout Session.
async fn subscribe(w: &World, acct: &str, created: i64) -> String {
    let sub = id("sub");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            subscription_session(acct, "pro", "month", &sub),
            created,
        ),
        "applied",
    )
    .await;
    sub
}

async fn subscription_json(w: &World, acct: &str) -> Value {
    let (status, body) = w
        .app
        .admin_get(&format!("/v1/accounts/{acct}/subscription"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_subscription_checkout_moves_the_account_to_its_tier() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (_, key) = w.app.create_key(&acct).await;
    // The key is cached with tier free.
    assert_eq!(
        get(&w.app, &key, "/x").await.remaining().as_deref(),
        Some("9")
    );

    let sub = subscribe(&w, &acct, now()).await;
    let (allowance, purchased, tier, status) = state(&w.app, &acct).await;
    assert_eq!((allowance, purchased), (100 * C, 0));
    assert_eq!((tier.as_str(), status.as_str()), ("pro", "active"));
    // The proxy follows at once.
    assert_eq!(
        get(&w.app, &key, "/x").await.remaining().as_deref(),
        Some("99")
    );

    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["subscription_id"], sub.as_str());
    assert_eq!(s["tier"], "pro");
    assert_eq!(s["interval"], "month");
    assert_eq!(s["status"], "active");
    assert_eq!(s["cancel_at_period_end"], json!(false));
    assert_eq!(s["customer_id"], format!("cus_{acct}"));
    assert!(s["grace_until"].is_null());
    let entries = journal_of(&w, &acct, "subscription").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1, 91 * C, "free's 9 left → pro's 100");

    // A second subscription is refused: change this one instead.
    let (status, body) = w
        .app
        .admin_post(
            "/v1/checkout/subscriptions",
            json!({"account_id": acct, "tier": "team"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

#[tokio::test]
async fn a_paid_renewal_resets_the_allowance_and_aligns_the_period_once() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (_, key) = w.app.create_key(&acct).await;
    let t0 = now();
    let sub = subscribe(&w, &acct, t0).await;

    // The first invoice (subscription_create) aligns the period (Stripe's starts when the
    // subscription did, after the account's own), without a second allowance.
    let first = (t0 + 1, t0 + 1 + MONTH);
    for _ in 0..30 {
        assert_eq!(get(&w.app, &key, "/x").await.status, StatusCode::OK);
    }
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &acct,
                &sub,
                "subscription_create",
                first,
                4900,
                "price_pro_month",
            ),
            t0 + 1,
        ),
        "applied",
    )
    .await;
    let (status, body) = w.app.admin_get(&format!("/v1/accounts/{acct}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["period_start"], rfc3339(first.0), "{body}");
    assert_eq!(state(&w.app, &acct).await.0, 70 * C);

    // The renewal: allowance back to the tier's 100, period from the invoice.
    let renewal_period = (t0 + 2, t0 + 2 + MONTH);
    let renewal = invoice(
        &acct,
        &sub,
        "subscription_cycle",
        renewal_period,
        4900,
        "price_pro_month",
    );
    let invoice_id = renewal["id"].as_str().unwrap().to_string();
    deliver_ok(
        &w.app,
        &event("invoice.paid", renewal.clone(), t0 + 2),
        "applied",
    )
    .await;
    let (allowance, _, tier, status) = state(&w.app, &acct).await;
    assert_eq!(
        (allowance, tier.as_str(), status.as_str()),
        (100 * C, "pro", "active")
    );
    let (_, body) = w.app.admin_get(&format!("/v1/accounts/{acct}")).await;
    assert_eq!(body["period_start"], rfc3339(renewal_period.0), "{body}");
    assert_eq!(body["period_end"], rfc3339(renewal_period.1), "{body}");

    // invoice.payment_succeeded for the same invoice: nothing more.
    for _ in 0..5 {
        get(&w.app, &key, "/x").await;
    }
    deliver_ok(
        &w.app,
        &event("invoice.payment_succeeded", renewal.clone(), t0 + 2),
        "already_applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.0, 95 * C);

    let resets: Vec<_> = journal_of(&w, &acct, "reset")
        .await
        .into_iter()
        .filter(|(id, _, _)| id.starts_with("renew:"))
        .collect();
    assert_eq!(resets, vec![(format!("renew:{invoice_id}"), 30 * C, 0)]);
    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["current_period_start"], rfc3339(renewal_period.0));
    let pg = w.env.pg().await;
    let (start, end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT period_start, period_end FROM accounts WHERE id = $1")
            .bind(&acct)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!((start.timestamp(), end.timestamp()), renewal_period);

    // A journal entry of an older period flushed late (like the account's opening entry: a
    // calendar month of 31 days that ends after the aligned 30-day period) does not move
    // Postgres' period back: periods only move forward by their start.
    let mut conn = w.env.redis().await;
    let (allowance, purchased, _, _) = state(&w.app, &acct).await;
    crate::journal_util::xadd(
        &mut conn,
        &crate::journal_util::account_stream(&w.env, &acct),
        &[
            ("id", format!("{acct}:open:late")),
            ("acct", acct.clone()),
            ("kind", "reset".into()),
            ("amount", "0".into()),
            ("d_allow", "0".into()),
            ("d_purch", "0".into()),
            ("allow", allowance.to_string()),
            ("purch", purchased.to_string()),
            ("tier", "free".into()),
            ("ts", (t0 * 1000).to_string()),
            ("period_start", (t0 - 5).to_string()),
            ("period_end", (t0 - 5 + 31 * 86_400).to_string()),
        ],
    )
    .await;
    let late = journal_of(&w, &acct, "reset").await;
    assert!(
        late.iter().any(|(id, _, _)| id.ends_with(":open:late")),
        "{late:?}"
    );
    let (start, end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT period_start, period_end FROM accounts WHERE id = $1")
            .bind(&acct)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!((start.timestamp(), end.timestamp()), renewal_period);

    // An older invoice paid late (a previous period) does not move anything back.
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &acct,
                &sub,
                "subscription_cycle",
                first,
                4900,
                "price_pro_month",
            ),
            t0 - 100,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.0, 95 * C);
}

#[tokio::test]
async fn a_failed_invoice_means_past_due_then_frozen_allowance_then_paid() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (_, key) = w.app.create_key(&acct).await;
    let t0 = now();
    let sub = subscribe(&w, &acct, t0).await;
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            pack_session(&acct, "pack_small", &id("cs_test"), &id("pi")),
            t0,
        ),
        "applied",
    )
    .await;

    let period = (t0 + 5, t0 + 5 + MONTH);
    let unpaid = invoice(
        &acct,
        &sub,
        "subscription_cycle",
        period,
        4900,
        "price_pro_month",
    );
    deliver_ok(
        &w.app,
        &event("invoice.payment_failed", failed(unpaid.clone()), t0 + 1),
        "applied",
    )
    .await;
    let (allowance, purchased, _, status) = state(&w.app, &acct).await;
    assert_eq!(status, "past_due");
    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["status"], "past_due");
    assert_eq!(s["grace_until"], rfc3339(t0 + 1 + 7 * 86_400), "{s}");
    // In the grace period: served as usual, from the allowance.
    let a = get(&w.app, &key, "/x").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(state(&w.app, &acct).await.0, allowance - C);
    // A retry of the same failing invoice does not extend the grace.
    deliver_ok(
        &w.app,
        &event("invoice.payment_failed", failed(unpaid.clone()), t0 + 3600),
        "already_applied",
    )
    .await;

    // Redis lost the account: hydration brings back past_due with the same deadline.
    let mut redis = w.env.redis().await;
    let _: i64 = redis::cmd("DEL")
        .arg(crate::ledger_util::account_key(&w.env, &acct))
        .query_async(&mut redis)
        .await
        .unwrap();
    crate::journal_util::assert_caught_up(&w.env, Some(&w.app), std::time::Duration::from_secs(10))
        .await;
    let (_, _, _, status) = state(&w.app, &acct).await;
    assert_eq!(status, "past_due");
    assert_eq!(
        crate::ledger_util::hget(&w.env, &acct, "grace_until").await,
        Some((t0 + 1 + 7 * 86_400).to_string())
    );

    // The grace period is over: the allowance is frozen, purchased credits still pay.
    hset(&w.env, &acct, &[("grace_until", (now() - 1).to_string())]).await;
    let allowance_before = state(&w.app, &acct).await.0;
    assert_eq!(purchased, 5 * C);
    for left in (0..5).rev() {
        let a = get(&w.app, &key, "/x").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.remaining().unwrap(), left.to_string());
    }
    let a = get(&w.app, &key, "/x").await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(a.body["credits_remaining"], json!(0), "{}", a.body);
    let (allowance, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!(
        (allowance, purchased),
        (allowance_before, 0),
        "allowance untouched"
    );

    // A proration invoice paid meanwhile does not settle the failed one.
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &acct,
                &sub,
                "subscription_update",
                period,
                1200,
                "price_pro_month",
            ),
            t0 + 3000,
        ),
        "applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.3, "past_due");

    // Paid after all: active again, the allowance reset and usable.
    deliver_ok(
        &w.app,
        &event("invoice.paid", unpaid.clone(), t0 + 7200),
        "applied",
    )
    .await;
    let (allowance, _, _, status) = state(&w.app, &acct).await;
    assert_eq!((allowance, status.as_str()), (100 * C, "active"));
    let a = get(&w.app, &key, "/x").await;
    assert_eq!(a.status, StatusCode::OK);
    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["status"], "active");
    assert!(s["grace_until"].is_null(), "{s}");

    // A failure older than that payment, arriving late, changes nothing.
    let older = invoice(
        &acct,
        &sub,
        "subscription_cycle",
        period,
        4900,
        "price_pro_month",
    );
    deliver_ok(
        &w.app,
        &event("invoice.payment_failed", failed(older), t0 + 10),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.3, "active");
    // And a failure of the invoice that was paid is stale too.
    deliver_ok(
        &w.app,
        &event("invoice.payment_failed", failed(unpaid), t0 + 9000),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.3, "active");
}

#[tokio::test]
async fn with_no_grace_the_allowance_freezes_at_once() {
    let env = crate::harness::TestEnv::new().await;
    let stripe = crate::fake_stripe::FakeStripe::start().await;
    let up = crate::upstream::FakeUpstream::start().await;
    let app = env
        .config()
        .toml(stripe_toml(&stripe.url(), &up.url(), 0))
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .spawn()
        .await;
    let acct = account(&app, "free").await;
    let (_, key) = app.create_key(&acct).await;
    let sub = id("sub");
    deliver_ok(
        &app,
        &event(
            "checkout.session.completed",
            subscription_session(&acct, "pro", "month", &sub),
            now(),
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &app,
        &event(
            "invoice.payment_failed",
            failed(invoice(
                &acct,
                &sub,
                "subscription_cycle",
                (now() - 60, now() + MONTH),
                4900,
                "price_pro_month",
            )),
            now(),
        ),
        "applied",
    )
    .await;
    let a = get(&app, &key, "/x").await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(a.body["credits_remaining"], json!(0), "{}", a.body);
}

#[tokio::test]
async fn plan_changes_cancellation_and_the_end_of_a_subscription_move_the_tier() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let t0 = now();
    let sub = subscribe(&w, &acct, t0).await;

    // Upgrade to team.
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct, &sub, "price_team_month", "month", "active", false),
            t0 + 10,
        ),
        "applied",
    )
    .await;
    let (allowance, _, tier, _) = state(&w.app, &acct).await;
    assert_eq!((tier.as_str(), allowance), ("team", 1000 * C));
    // An older update (back to pro) arriving late is ignored.
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct, &sub, "price_pro_month", "month", "active", false),
            t0 + 5,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "team");

    // Cancel at period end: recorded, the tier stays until the end.
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct, &sub, "price_team_month", "month", "active", true),
            t0 + 20,
        ),
        "applied",
    )
    .await;
    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["cancel_at_period_end"], json!(true));
    assert_eq!(s["tier"], "team");
    assert_eq!(state(&w.app, &acct).await.2, "team");

    // The end: back to the default tier.
    let ended = subscription(&acct, &sub, "price_team_month", "month", "canceled", true);
    deliver_ok(
        &w.app,
        &event("customer.subscription.deleted", ended.clone(), t0 + 30),
        "applied",
    )
    .await;
    let (allowance, _, tier, status) = state(&w.app, &acct).await;
    assert_eq!(
        (tier.as_str(), allowance, status.as_str()),
        ("free", 10 * C, "active")
    );
    let s = subscription_json(&w, &acct).await;
    assert_eq!(s["status"], "canceled");
    assert!(!s["canceled_at"].is_null());
    // The same end again, and an update arriving after the end: nothing.
    deliver_ok(
        &w.app,
        &event("customer.subscription.deleted", ended, t0 + 31),
        "already_applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct, &sub, "price_team_month", "month", "active", false),
            t0 + 40,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "free");
    // A renewal invoice of the ended subscription does not revive it.
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &acct,
                &sub,
                "subscription_cycle",
                (t0, t0 + MONTH),
                19900,
                "price_team_month",
            ),
            t0 + 50,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "free");
}

#[tokio::test]
async fn subscription_events_out_of_order_end_in_the_newest_state() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let t0 = now();
    let sub = id("sub");
    // The update (team) was created after the checkout, but arrives first.
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct, &sub, "price_team_month", "month", "active", false),
            t0 + 10,
        ),
        "applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "team");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            subscription_session(&acct, "pro", "month", &sub),
            t0,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "team");

    // The deletion arrives before an update created earlier.
    let other = id("sub");
    let acct2 = account(&w.app, "free").await;
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.deleted",
            subscription(
                &acct2,
                &other,
                "price_pro_month",
                "month",
                "canceled",
                false,
            ),
            t0 + 20,
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.updated",
            subscription(&acct2, &other, "price_team_month", "month", "active", false),
            t0 + 10,
        ),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct2).await.2, "free");
}

#[tokio::test]
async fn admin_subscription_calls_go_through_stripe() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (status, body) = w
        .app
        .admin_get(&format!("/v1/accounts/{acct}/subscription"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = w
        .app
        .admin_put(
            &format!("/v1/accounts/{acct}/subscription"),
            json!({"tier": "team"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let sub = subscribe(&w, &acct, now()).await;
    w.stripe.add_subscription(&sub, "price_pro_month", &acct);

    // Change the tier: Stripe is asked (with proration); the tier follows with the webhook.
    let (status, body) = w
        .app
        .admin_put(
            &format!("/v1/accounts/{acct}/subscription"),
            json!({"tier": "team"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], json!(true));
    assert_eq!(body["price_id"], "price_team_month");
    assert_eq!(
        w.stripe
            .calls("GET", &format!("/v1/subscriptions/{sub}"))
            .len(),
        1
    );
    let updates = w.stripe.calls("POST", &format!("/v1/subscriptions/{sub}"));
    assert_eq!(updates.len(), 1);
    let u = &updates[0];
    assert_eq!(u.field("items[0][id]"), Some(format!("si_{sub}").as_str()));
    assert_eq!(u.field("items[0][price]"), Some("price_team_month"));
    assert_eq!(u.field("proration_behavior"), Some("create_prorations"));
    assert_eq!(u.field("metadata[account_id]"), Some(acct.as_str()));
    assert_eq!(u.field("metadata[tier]"), Some("team"));
    assert!(u.idempotency_key().is_some());
    assert_eq!(
        state(&w.app, &acct).await.2,
        "pro",
        "not before the webhook"
    );
    let updated = w.stripe.subscription(&sub).unwrap();
    deliver_ok(
        &w.app,
        &event("customer.subscription.updated", updated, now() + 1),
        "applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.2, "team");

    // A yearly price the tier does not have.
    let (status, body) = w
        .app
        .admin_put(
            &format!("/v1/accounts/{acct}/subscription"),
            json!({"tier": "team", "interval": "year"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Cancel at period end (the default), then at once.
    let (status, body) = w
        .app
        .admin_post(
            &format!("/v1/accounts/{acct}/subscription/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancel_at_period_end"], json!(true));
    let updates = w.stripe.calls("POST", &format!("/v1/subscriptions/{sub}"));
    assert_eq!(
        updates.last().unwrap().field("cancel_at_period_end"),
        Some("true")
    );
    assert!(updates.last().unwrap().idempotency_key().is_some());
    let (status, body) = w
        .app
        .admin_post(
            &format!("/v1/accounts/{acct}/subscription/cancel"),
            json!({"at_period_end": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    let deletes = w
        .stripe
        .calls("DELETE", &format!("/v1/subscriptions/{sub}"));
    assert_eq!(deletes.len(), 1);
    assert!(deletes[0].idempotency_key().is_some());

    // Stripe failing the change: a clear 502, nothing changed.
    w.stripe.set_mode(crate::fake_stripe::Mode::Fail {
        status: 402,
        kind: "card_error".into(),
        code: Some("card_declined".into()),
        message: "Your card was declined.".into(),
    });
    let (status, body) = w
        .app
        .admin_put(
            &format!("/v1/accounts/{acct}/subscription"),
            json!({"tier": "pro"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
    assert!(
        body["message"].as_str().unwrap().contains("declined"),
        "{body}"
    );
    assert_eq!(state(&w.app, &acct).await.2, "team");
}

#[tokio::test]
async fn admin_subscription_preview_shows_stripes_proration_and_the_change_reuses_its_date() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let preview_path = |tier: &str| format!("/v1/accounts/{acct}/subscription/preview?tier={tier}");

    // No subscription yet: the same 404 as the neighbouring subscription calls.
    let (status, body) = w.app.admin_get(&preview_path("team")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");
    let (status, body) = w
        .app
        .admin_get("/v1/accounts/acct_nobody/subscription/preview?tier=team")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let sub = subscribe(&w, &acct, now()).await;
    w.stripe.add_subscription(&sub, "price_pro_month", &acct);
    let (start, end) = (now() - 10 * 86_400, now() + 20 * 86_400);
    w.stripe.set_period(&sub, start, end);

    let before = now();
    let (status, body) = w.app.admin_get(&preview_path("team")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let at = body["proration_date"].as_i64().expect("proration_date");
    assert!((before..=now()).contains(&at), "{at} not now");
    let (credit, charge) = crate::fake_stripe::proration(4900, 19900, start, end, at);
    assert_eq!(
        body,
        json!({
            "tier": "team",
            "currency": "usd",
            "proration_minor": credit + charge,
            "amount_due_minor": credit + charge + 19900,
            "proration_date": at,
        })
    );
    // What reached Stripe: the subscription's item moved to the tier's price, prorated at `at`.
    let previews = w.stripe.calls("POST", "/v1/invoices/create_preview");
    assert_eq!(previews.len(), 1);
    let p = &previews[0];
    let customer = w.stripe.subscription(&sub).unwrap()["customer"].clone();
    assert_eq!(p.field("customer"), customer.as_str());
    assert_eq!(p.field("subscription"), Some(sub.as_str()));
    assert_eq!(
        p.field("subscription_details[items][0][id]"),
        Some(format!("si_{sub}").as_str())
    );
    assert_eq!(
        p.field("subscription_details[items][0][price]"),
        Some("price_team_month")
    );
    assert_eq!(
        p.field("subscription_details[proration_behavior]"),
        Some("create_prorations")
    );
    assert_eq!(
        p.field("subscription_details[proration_date]"),
        Some(at.to_string().as_str())
    );

    // Refusals with the neighbours' codes: unknown tier, no tier, the tier it is already on.
    let (status, body) = w.app.admin_get(&preview_path("nope")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "unknown_tier");
    let (status, body) = w
        .app
        .admin_get(&format!("/v1/accounts/{acct}/subscription/preview"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
    let (status, body) = w.app.admin_get(&preview_path("pro")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "conflict");
    assert_eq!(
        w.stripe.calls("POST", "/v1/invoices/create_preview").len(),
        1
    );

    // A change with a stale or future proration_date is refused before Stripe is asked.
    for stale in [now() - 7200, now() + 3600] {
        let (status, body) = w
            .app
            .admin_put(
                &format!("/v1/accounts/{acct}/subscription"),
                json!({"tier": "team", "proration_date": stale}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "invalid_request");
    }
    assert!(w
        .stripe
        .calls("POST", &format!("/v1/subscriptions/{sub}"))
        .is_empty());

    // The change passes the previewed instant, so Stripe prorates as shown.
    let (status, body) = w
        .app
        .admin_put(
            &format!("/v1/accounts/{acct}/subscription"),
            json!({"tier": "team", "proration_date": at}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let updates = w.stripe.calls("POST", &format!("/v1/subscriptions/{sub}"));
    assert_eq!(updates.len(), 1);
    assert_eq!(
        updates[0].field("proration_date"),
        Some(at.to_string().as_str())
    );
    assert_eq!(
        updates[0].field("proration_behavior"),
        Some("create_prorations")
    );

    // Stripe failing the preview: a clear 502.
    w.stripe.set_mode(crate::fake_stripe::Mode::Fail {
        status: 400,
        kind: "invalid_request_error".into(),
        code: None,
        message: "The proration date is outside the period.".into(),
    });
    let (status, body) = w.app.admin_get(&preview_path("team")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "stripe_error");
}
