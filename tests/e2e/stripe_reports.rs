//! `GET /v1/reports/revenue`: MRR by tier, pack revenue, active subscribers and ARPU from what
//! the webhooks recorded.

use reqwest::StatusCode;
use serde_json::json;

use crate::stripe_util::*;

const MONTH: i64 = 30 * 86_400;

#[tokio::test]
async fn revenue_figures_come_from_the_recorded_events() {
    let w = world().await;
    let t = now();
    // pro monthly, paid.
    let a1 = account(&w.app, "free").await;
    let s1 = id("sub");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            subscription_session(&a1, "pro", "month", &s1),
            t,
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &a1,
                &s1,
                "subscription_create",
                (t + 1, t + 1 + MONTH),
                4900,
                "price_pro_month",
            ),
            t,
        ),
        "applied",
    )
    .await;
    // pro yearly, paid.
    let a2 = account(&w.app, "free").await;
    let s2 = id("sub");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            subscription_session(&a2, "pro", "year", &s2),
            t,
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &a2,
                &s2,
                "subscription_create",
                (t + 1, t + 1 + 12 * MONTH),
                49000,
                "price_pro_year",
            ),
            t,
        ),
        "applied",
    )
    .await;
    // team monthly, paid, then ended: revenue, but no longer recurring.
    let a3 = account(&w.app, "free").await;
    let s3 = id("sub");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            subscription_session(&a3, "team", "month", &s3),
            t,
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "invoice.paid",
            invoice(
                &a3,
                &s3,
                "subscription_create",
                (t + 1, t + 1 + MONTH),
                19900,
                "price_team_month",
            ),
            t,
        ),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event(
            "customer.subscription.deleted",
            subscription(&a3, &s3, "price_team_month", "month", "canceled", false),
            t + 5,
        ),
        "applied",
    )
    .await;
    // Two packs, one a quarter refunded.
    let a4 = account(&w.app, "free").await;
    let pi = id("pi");
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            pack_session(&a4, "pack_100", &id("cs_test"), &pi),
            t,
        ),
        "applied",
    )
    .await;
    let mut small = pack_session(&a4, "pack_small", &id("cs_test"), &id("pi"));
    small["amount_total"] = json!(100);
    deliver_ok(
        &w.app,
        &event("checkout.session.completed", small, t),
        "applied",
    )
    .await;
    deliver_ok(
        &w.app,
        &event("charge.refunded", charge(&id("ch"), &pi, 1000, 250), t),
        "applied",
    )
    .await;

    let from = chrono::DateTime::from_timestamp(t - 3600, 0)
        .unwrap()
        .to_rfc3339();
    let to = chrono::DateTime::from_timestamp(t + 3600, 0)
        .unwrap()
        .to_rfc3339();
    let (status, body) = w
        .app
        .admin(
            reqwest::Method::GET,
            &format!(
                "/v1/reports/revenue?from={}&to={}",
                urlencode(&from),
                urlencode(&to)
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active_subscribers"], json!(2), "{body}");
    // The chart's series: 12 monthly points ending at `to`; the rows were created just now,
    // so only the last point (`to`) sees them, the canceled one excluded.
    let series = body["subscribers_over_time"]
        .as_array()
        .unwrap_or_else(|| panic!("no subscribers_over_time in {body}"));
    assert_eq!(series.len(), 12, "{body}");
    assert_eq!(series[11]["subscribers"], json!(2), "{body}");
    assert_eq!(series[0]["subscribers"], json!(0), "{body}");
    let usd = body["currencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["currency"] == "usd")
        .unwrap_or_else(|| panic!("no usd in {body}"));
    // 4900 + 49000 / 12 (4083.33 → 4083).
    assert_eq!(usd["mrr_cents"], json!(8983), "{usd}");
    assert_eq!(usd["mrr_by_tier"], json!({"pro": 8983}), "{usd}");
    assert_eq!(usd["subscribers_by_tier"], json!({"pro": 2}), "{usd}");
    assert_eq!(
        usd["subscription_revenue_cents"],
        json!(4900 + 49000 + 19900)
    );
    assert_eq!(
        usd["pack_revenue_cents"],
        json!({"gross": 1100, "refunded": 250, "net": 850})
    );
    assert_eq!(usd["packs_sold"], json!(2));
    assert_eq!(usd["paying_accounts"], json!(4));
    // (73800 + 850) / 4 = 18662.5 → 18663.
    assert_eq!(usd["arpu_cents"], json!(18663), "{usd}");

    // A window before all of it: nothing.
    let (status, body) = w
        .app
        .admin_get("/v1/reports/revenue?from=2020-01-01&to=2020-02-01")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active_subscribers"], json!(0));
    assert_eq!(body["currencies"], json!([]));

    let (status, body) = w.app.admin_get("/v1/reports/revenue?from=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
    let (status, _) = w
        .app
        .admin_get("/v1/reports/revenue?from=2021-01-01&to=2020-01-01")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
