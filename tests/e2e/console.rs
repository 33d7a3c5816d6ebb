//! The operator console in a real (headless) Chromium: admin-token sign-in, finding an
//! account, granting credits and seeing the journal entry, and a portal link made from the
//! account page that opens the customer's portal.

use std::time::Duration;

use reqwest::StatusCode;

use crate::browser::Browser;
use crate::harness::poll_until;
use crate::stripe_util::{account, world};

/// A client that does not follow redirects (the console answers forms with 303s).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Signs in with the admin token; the session cookie (`name=value`).
async fn sign_in(raw: &reqwest::Client, app: &crate::harness::App) -> String {
    let resp = raw
        .post(app.admin_url("/console/signin"))
        .form(&[("token", app.admin_token())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tg_console="))
        .map(|c| c.split(';').next().unwrap().to_string())
        .expect("console session cookie")
}

/// A fresh client and its signed-in session cookie.
async fn signed_in(app: &crate::harness::App) -> (reqwest::Client, String) {
    let raw = no_redirects();
    let cookie = sign_in(&raw, app).await;
    (raw, cookie)
}

#[tokio::test]
async fn console_signs_in_finds_an_account_grants_and_shows_the_journal() {
    let w = world().await;
    let app = &w.app;
    let acct = account(app, "free").await;
    let _decoy = account(app, "pro").await;

    let raw = no_redirects();
    let resp = raw.get(app.admin_url("/console/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "no session → sign-in");
    assert_eq!(resp.headers()["location"], "/console/signin");
    // A grant without a session (or a forged one) changes nothing.
    let resp = raw
        .post(app.admin_url(&format!("/console/accounts/{acct}/grant")))
        .form(&[
            ("csrf", "x"),
            ("credits", "5"),
            ("reason", "r"),
            ("idempotency_key", "k"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);

    // Signed in, a form without the session's CSRF token is refused (on a console-styled page).
    let cookie = sign_in(&raw, app).await;
    let resp = raw
        .post(app.admin_url(&format!("/console/accounts/{acct}/grant")))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", "forged"),
            ("credits", "5"),
            ("reason", "r"),
            ("idempotency_key", "k"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-tollgate-error"], "csrf_failed");
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("/console/assets/app.css"));

    let b = Browser::start(1200).await;
    b.goto(&app.admin_url("/console/")).await;
    b.wait_url(&app.admin_url("/console/signin")).await;
    b.find("#token").await.type_text("wrong").await;
    b.find("#signin").await.click().await;
    assert!(b
        .text("#signin-error")
        .await
        .contains("not the admin token"));
    b.find("#token").await.type_text(app.admin_token()).await;
    b.find("#signin").await.click().await;
    b.wait_url(&app.admin_url("/console/")).await;

    // Find the account.
    b.find("#q").await.type_text(&acct).await;
    b.find("#search").await.click().await;
    b.wait_count("#accounts tbody tr", 1).await;
    let rows = b.find_all("#accounts tbody tr").await;
    assert!(rows[0].text().await.contains(&acct));
    b.find(&format!("a[href='/console/accounts/{acct}']"))
        .await
        .click()
        .await;
    assert_eq!(b.text("#account-id").await, acct);
    assert_eq!(b.text("#balance-total").await, "10");

    // Grant credits through the form.
    b.find("#grant-credits").await.type_text("7.25").await;
    b.find("#grant-reason").await.type_text("goodwill").await;
    b.find("#grant").await.click().await;
    assert!(
        b.wait_text("#notice", "Granted 7.25 credits.", Duration::from_secs(10))
            .await
    );
    assert_eq!(b.text("#balance-total").await, "17.25");
    assert_eq!(b.text("#balance-purchased").await, "7.25");

    // The journal entry, once the flusher wrote it.
    let page = app.admin_url(&format!("/console/accounts/{acct}"));
    let shown = poll_until(Duration::from_secs(20), || async {
        b.goto(&page).await;
        let mut found = false;
        for row in b.find_all("#journal tr.entry").await {
            let text = row.text().await;
            found |= text.contains("grant") && text.contains("7.25") && text.contains("goodwill");
        }
        found
    })
    .await;
    assert!(shown, "no grant in the journal: {}", b.source().await);
    b.screenshot("console-account").await;

    // Tier change, suspension and reactivation through the account page's forms.
    b.find("#new-tier option[value='pro']").await.click().await;
    b.find("#change-tier").await.click().await;
    assert!(
        b.wait_text("#notice", "Moved to the pro tier.", Duration::from_secs(10))
            .await
    );
    assert_eq!(b.text("#tier").await, "pro");
    assert_eq!(b.text("#balance-total").await, "107.25");
    b.find("#suspend").await.click().await;
    assert!(
        b.wait_text(
            "#notice",
            "Status set to suspended.",
            Duration::from_secs(10)
        )
        .await
    );
    assert_eq!(b.text("#status").await, "suspended");
    b.find("#reactivate").await.click().await;
    assert!(
        b.wait_text("#notice", "Status set to active.", Duration::from_secs(10))
            .await
    );
    assert_eq!(b.text("#status").await, "active");
    let (_, body) = app.admin_get(&format!("/v1/accounts/{acct}")).await;
    assert_eq!(body["tier"], "pro");
    assert_eq!(body["status"], "active");

    // A portal link from the account page opens the customer's portal.
    b.find("#make-link").await.click().await;
    let link = b.find("#portal-link").await.value().await;
    assert!(
        link.starts_with(&app.proxy_url("/_tollgate/portal/enter?token=")),
        "{link}"
    );
    b.goto(&link).await;
    b.wait_url(&app.proxy_url("/_tollgate/portal/")).await;
    assert_eq!(b.text("#balance-total").await, "107.25");

    // Revenue and traffic pages render.
    b.goto(&app.admin_url("/console/revenue")).await;
    assert!(b.text("h1").await.starts_with("Revenue"));
    b.find("#subscribers-chart").await;
    assert_eq!(b.text("#subscribers-now").await, "0");
    b.screenshot("console-revenue").await;
    b.goto(&app.admin_url("/console/traffic")).await;
    assert!(b.text("h1").await.starts_with("Live traffic"));
    b.goto(&app.admin_url("/console/")).await;
    b.screenshot("console-accounts").await;
}

/// The cells of the traffic page's rate row for `route` (requests/s, 402/s, 429/s), if any.
fn rate_row(html: &str, route: &str) -> Option<(f64, f64, f64)> {
    let start = html.find(&format!("<tr data-route=\"{route}\">"))?;
    let row = &html[start..start + html[start..].find("</tr>")?];
    let cell = |class: &str| -> Option<f64> {
        let open = format!("<td class=\"{class}\">");
        let at = row.find(&open)? + open.len();
        row[at..at + row[at..].find("</td>")?].parse().ok()
    };
    Some((cell("rps")?, cell("rps-402")?, cell("rps-429")?))
}

#[tokio::test]
async fn console_traffic_shows_request_and_402_rates_since_the_previous_look() {
    let w = world().await;
    let app = &w.app;
    let acct = account(app, "free").await; // 10 credits, 1 per request
    let (_, key) = app.create_key(&acct).await;

    let (raw, cookie) = signed_in(app).await;
    let page = || async {
        let resp = raw
            .get(app.admin_url("/console/traffic"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    };

    // A first look takes the baseline; nothing has gone through the route yet.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(rate_row(&page().await, "all"), None);

    // 10 forwarded, then 3 refused with 402.
    let mut statuses = Vec::new();
    for _ in 0..13 {
        let resp = app
            .client()
            .get(app.proxy_url("/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 402).count(),
        3,
        "{statuses:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let html = page().await;
    let (rps, rps_402, rps_429) = rate_row(&html, "all").expect("a rate row for the route");
    assert!(rps > 0.0, "{html}");
    assert!(rps_402 > 0.0 && rps_402 < rps, "{html}");
    assert_eq!(rps_429, 0.0);
    // 13 and 3 requests over the same interval.
    assert!((rps / rps_402 - 13.0 / 3.0).abs() < 0.1, "{rps} {rps_402}");

    // The next interval (past the minimum) has no traffic: the rate goes back to none.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(rate_row(&page().await, "all"), None);
}

/// The "Last used" cell of the key row `key_id` on the console's account page.
fn console_last_used(html: &str, key_id: &str) -> String {
    let at = html
        .find(&format!("data-key-id=\"{key_id}\""))
        .unwrap_or_else(|| panic!("no row for key {key_id}: {html}"));
    let row = &html[at..at + html[at..].find("</tr>").unwrap()];
    let open = "<td class=\"last-used\">";
    let cell = row.find(open).expect("a last-used cell") + open.len();
    row[cell..cell + row[cell..].find("</td>").unwrap()].to_string()
}

#[tokio::test]
async fn console_account_page_shows_when_each_key_was_last_used() {
    let w = world().await;
    let app = &w.app;
    let acct = account(app, "free").await;
    let (used_id, used_key) = app.create_key(&acct).await;
    let (idle_id, _) = app.create_key(&acct).await;

    let (raw, cookie) = signed_in(app).await;
    let page = || async {
        let resp = raw
            .get(app.admin_url(&format!("/console/accounts/{acct}")))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    };
    let html = page().await;
    assert!(html.contains("<th>Last used</th>"), "{html}");
    assert_eq!(console_last_used(&html, &used_id), "never");
    assert_eq!(console_last_used(&html, &idle_id), "never");

    let before = chrono::Utc::now().timestamp() / 60 * 60;
    let status = app
        .client()
        .get(app.proxy_url("/v1/x"))
        .bearer_auth(&used_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    let after = chrono::Utc::now().timestamp();

    // The same source as the portal's keys page: shown at once (this instance's unflushed use).
    let seen = poll_until(Duration::from_secs(10), || async {
        console_last_used(&page().await, &used_id) != "never"
    })
    .await;
    assert!(seen, "the use never showed on the console");
    let shown = console_last_used(&page().await, &used_id);
    let at = chrono::NaiveDateTime::parse_from_str(&shown, "%Y-%m-%d %H:%M UTC")
        .unwrap_or_else(|e| panic!("{shown:?}: {e}"))
        .and_utc()
        .timestamp();
    assert!(
        (before..=after).contains(&at),
        "{shown} not between {before} and {after}"
    );
    assert_eq!(console_last_used(&page().await, &idle_id), "never");
}
