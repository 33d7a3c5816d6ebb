//! The two buckets: a debit takes from `allowance` first, then from `purchased`; a refund puts
//! the credits back where they came from; at a period boundary the allowance is reset to the
//! tier's monthly credits (unused allowance does not roll over) and purchased is untouched.

use crate::harness::TestEnv;
use crate::ledger_util::{
    balance, end_period, get, get_ok, grant, hget, hset, unix_now, wait_total,
};
use crate::upstream::FakeUpstream;

fn config(upstream: &str, monthly: &str, cost: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = {cost}

[tiers.basic]
monthly_credits = {monthly}
"#
    )
}

fn b(allowance: &str, purchased: &str, total: &str) -> (String, String, String) {
    (allowance.into(), purchased.into(), total.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowance_first_then_purchased_and_refunds_return_to_their_bucket() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), "2", "0.75"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let (status, body) = grant(&app, &account, serde_json::json!(5), "fill-purchased").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(balance(&app, &account).await, b("2", "5", "7"));

    let a = get_ok(&app, &key, "/v1/one").await;
    assert_eq!(a.remaining().as_deref(), Some("6.25"));
    assert_eq!(balance(&app, &account).await, b("1.25", "5", "6.25"));

    get_ok(&app, &key, "/v1/two").await;
    assert_eq!(balance(&app, &account).await, b("0.5", "5", "5.5"));

    // This one crosses the boundary (0.5 from allowance, 0.25 from purchased) and the upstream
    // fails: the refund restores both buckets as they were.
    let a = get(&app, &key, "/v1/status/500").await;
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.charged().as_deref(), Some("0"));
    assert_eq!(a.remaining().as_deref(), Some("5.5"));
    wait_total(&app, &account, "5.5").await;
    assert_eq!(balance(&app, &account).await, b("0.5", "5", "5.5"));

    // The same crossing, served.
    let a = get_ok(&app, &key, "/v1/three").await;
    assert_eq!(a.charged().as_deref(), Some("0.75"));
    assert_eq!(a.remaining().as_deref(), Some("4.75"));
    assert_eq!(balance(&app, &account).await, b("0", "4.75", "4.75"));

    // Only purchased now.
    get_ok(&app, &key, "/v1/four").await;
    assert_eq!(balance(&app, &account).await, b("0", "4", "4"));
    assert_eq!(up.request_count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn period_roll_resets_the_allowance_without_roll_over() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), "10", "1"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    let (status, body) = grant(&app, &account, serde_json::json!("3"), "g").await;
    assert_eq!(status, 201, "{body}");
    for _ in 0..4 {
        get_ok(&app, &key, "/v1/x").await;
    }
    assert_eq!(balance(&app, &account).await, b("6", "3", "9"));
    let first_end: i64 = hget(&env, &account, "period_end")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(first_end > unix_now(), "a new account's period ends later");

    // The period is over: the next request starts a new one. 6 unused credits are gone, the
    // allowance is 10 - 1, purchased is untouched.
    let old_end = unix_now() - 60;
    hset(&env, &account, &[("period_end", old_end.to_string())]).await;
    let a = get_ok(&app, &key, "/v1/x").await;
    assert_eq!(a.remaining().as_deref(), Some("12"));
    assert_eq!(balance(&app, &account).await, b("9", "3", "12"));
    let new_end: i64 = hget(&env, &account, "period_end")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let new_start: i64 = hget(&env, &account, "period_start")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        new_start, old_end,
        "the new period starts where the old one ended"
    );
    assert!(
        new_end > unix_now() && new_end <= old_end + 31 * 86_400,
        "period_end {new_end} is not one month after {old_end}"
    );
    let shown = crate::ledger_util::account(&app, &account).await;
    let shown_end = chrono::DateTime::parse_from_rfc3339(shown["period_end"].as_str().unwrap())
        .expect("period_end is RFC 3339");
    assert_eq!(shown_end.timestamp(), new_end, "{shown}");

    // Within the period, nothing more is reset.
    get_ok(&app, &key, "/v1/x").await;
    assert_eq!(balance(&app, &account).await, b("8", "3", "11"));

    // Several periods missed (75 days idle): one reset, and the period end lands within the
    // coming month, not in the past.
    end_period(&env, &account, 75 * 86_400).await;
    get_ok(&app, &key, "/v1/x").await;
    assert_eq!(balance(&app, &account).await, b("9", "3", "12"));
    let end: i64 = hget(&env, &account, "period_end")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        end > unix_now() && end <= unix_now() + 32 * 86_400,
        "period_end {end} after a long idle time"
    );

    // Allowance used up and into purchased; a new period brings back the allowance first.
    for _ in 0..10 {
        get_ok(&app, &key, "/v1/x").await;
    }
    assert_eq!(balance(&app, &account).await, b("0", "2", "2"));
    end_period(&env, &account, 1).await;
    get_ok(&app, &key, "/v1/x").await;
    assert_eq!(balance(&app, &account).await, b("9", "2", "11"));
}

/// One billing period after `ts`: the next month, on the anchor day where that month has it.
fn add_month(ts: i64, anchor_day: u32) -> i64 {
    use chrono::{Datelike, NaiveDate};
    let at = chrono::DateTime::from_timestamp(ts, 0).unwrap();
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    let first_of_next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .unwrap();
    let days_in_month = first_of_next
        .signed_duration_since(NaiveDate::from_ymd_opt(year, month, 1).unwrap())
        .num_days() as u32;
    NaiveDate::from_ymd_opt(year, month, anchor_day.min(days_in_month))
        .unwrap()
        .and_time(at.time())
        .and_utc()
        .timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periods_keep_their_anchor_day_through_short_months() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(config(&up.url(), "10", "1"))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    // Sanity of the reference: Jan 31 2024 → Feb 29 → Mar 31 → Apr 30.
    let jan31 = chrono::DateTime::parse_from_rfc3339("2024-01-31T10:00:00Z")
        .unwrap()
        .timestamp();
    let feb29 = add_month(jan31, 31);
    assert_eq!(
        chrono::DateTime::from_timestamp(feb29, 0)
            .unwrap()
            .to_rfc3339(),
        "2024-02-29T10:00:00+00:00"
    );
    assert_eq!(
        chrono::DateTime::from_timestamp(add_month(feb29, 31), 0)
            .unwrap()
            .to_rfc3339(),
        "2024-03-31T10:00:00+00:00"
    );

    // A period anchored on the 31st that ended on Jan 31 2024; the account was idle since.
    hset(
        &env,
        &account,
        &[
            ("anchor_day", "31".to_string()),
            ("period_end", jan31.to_string()),
        ],
    )
    .await;
    get_ok(&app, &key, "/v1/x").await;
    let (mut start, mut end) = (jan31, add_month(jan31, 31));
    while end <= unix_now() {
        (start, end) = (end, add_month(end, 31));
    }
    let got_start: i64 = hget(&env, &account, "period_start")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let got_end: i64 = hget(&env, &account, "period_end")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let show = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
    assert_eq!(
        (show(got_start), show(got_end)),
        (show(start), show(end)),
        "the current period"
    );
    assert_eq!(balance(&app, &account).await, b("9", "0", "9"));
}
