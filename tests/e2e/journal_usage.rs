//! Usage statistics and history over the journal: `GET /v1/accounts/{id}/usage` (totals,
//! group_by route/action/day, from/to), `GET /v1/accounts/{id}/ledger` (newest first, cursor
//! pagination) and the caller's own `GET /_tollgate/v1/usage`.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{json_response, TestEnv};
use crate::journal_util::{assert_caught_up, call, call_ok, metered_config, micros, wait_journal};
use crate::upstream::FakeUpstream;

/// `(requests, credits µc, tokens_in, tokens_out)` of a usage answer or group.
fn totals(v: &Value) -> (i64, i64, i64, i64) {
    (
        v["requests"]
            .as_i64()
            .unwrap_or_else(|| panic!("no requests in {v}")),
        micros(&v["credits"]),
        v["tokens_in"]
            .as_i64()
            .unwrap_or_else(|| panic!("no tokens_in in {v}")),
        v["tokens_out"]
            .as_i64()
            .unwrap_or_else(|| panic!("no tokens_out in {v}")),
    )
}

/// The groups of a grouped usage answer as (key, totals), in the order given.
fn groups(v: &Value) -> Vec<(String, (i64, i64, i64, i64))> {
    v["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups in {v}"))
        .iter()
        .map(|g| (g["key"].as_str().unwrap().to_string(), totals(g)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_groups_ranges_and_paginated_history() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let (other, other_key) = app.account_with_key("pro").await;
    let pg = env.pg().await;

    // Before: three chat calls.
    for _ in 0..3 {
        call_ok(&app, &key, "/v1/chat/x").await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let middle = Utc::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // After: two tool calls and a chat call the upstream fails (refunded).
    call_ok(&app, &key, "/v1/tools/x").await;
    call_ok(&app, &key, "/v1/tools/y").await;
    let (status, _, body) = call(&app, &key, "/v1/chat/status/500").await;
    assert_eq!(status, 500, "{body}");
    // Another account's traffic never shows up in this one's numbers.
    call_ok(&app, &other_key, "/v1/tools/z").await;
    wait_journal(&pg, &account, Duration::from_secs(10), |j| {
        j.debits == 6 && j.refunds == 1
    })
    .await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;

    let usage = |query: String| {
        let app = &app;
        let account = account.clone();
        async move {
            let (status, body) = app
                .admin_get(&format!("/v1/accounts/{account}/usage{query}"))
                .await;
            assert_eq!(status, StatusCode::OK, "usage{query}: {body}");
            body
        }
    };

    // Totals: 6 requests (the refunded one still counts as a request), 4 × 0.25 + 2 × 1 - 0.25.
    let all = usage(String::new()).await;
    assert_eq!(totals(&all), (6, 2_750_000, 0, 0), "{all}");
    // The credits are an exact decimal in the JSON text itself.
    let raw = app
        .client()
        .get(app.admin_url(&format!("/v1/accounts/{account}/usage")))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.contains("\"credits\":2.75"), "{raw}");
    assert!(all["from"].is_string() && all["to"].is_string(), "{all}");

    let by_route = usage("?group_by=route".into()).await;
    assert_eq!(
        groups(&by_route),
        vec![
            ("chat".to_string(), (4, 750_000, 0, 0)),
            ("tools".to_string(), (2, 2_000_000, 0, 0)),
        ],
        "{by_route}"
    );
    let by_action = usage("?group_by=action".into()).await;
    assert_eq!(
        groups(&by_action),
        vec![
            ("ai_message".to_string(), (4, 750_000, 0, 0)),
            ("tool_call".to_string(), (2, 2_000_000, 0, 0)),
        ],
        "{by_action}"
    );
    let by_day = usage("?group_by=day".into()).await;
    let days = groups(&by_day);
    let today = Utc::now().format("%Y-%m-%d").to_string();
    assert!(!days.is_empty() && days.len() <= 2, "{by_day}"); // 2 only across midnight UTC
    for (day, _) in &days {
        assert!(
            chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").is_ok(),
            "day key {day:?}"
        );
    }
    assert!(days.iter().any(|(d, _)| *d == today), "{by_day}");
    let sum = days
        .iter()
        .fold((0, 0), |acc, (_, t)| (acc.0 + t.0, acc.1 + t.1));
    assert_eq!(sum, (6, 2_750_000), "{by_day}");

    // Ranges: [from, to), RFC 3339 or a date.
    let m = middle.to_rfc3339_opts(SecondsFormat::Micros, true);
    let after = usage(format!("?from={m}")).await;
    assert_eq!(totals(&after), (3, 2_000_000, 0, 0), "{after}");
    let before = usage(format!("?to={m}")).await;
    assert_eq!(totals(&before), (3, 750_000, 0, 0), "{before}");
    let grouped_after = usage(format!("?from={m}&group_by=route")).await;
    assert_eq!(
        groups(&grouped_after),
        vec![
            ("chat".to_string(), (1, 0, 0, 0)),
            ("tools".to_string(), (2, 2_000_000, 0, 0)),
        ],
        "{grouped_after}"
    );
    let tomorrow = (Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d");
    let empty = usage(format!("?from={tomorrow}&to={tomorrow}")).await;
    assert_eq!(totals(&empty), (0, 0, 0, 0), "{empty}");
    let empty = usage("?from=2001-01-01&to=2001-02-01&group_by=route".into()).await;
    assert_eq!(groups(&empty), vec![], "{empty}");
    let wide = usage(format!("?from=2001-01-01&to={tomorrow}")).await;
    assert_eq!(totals(&wide), (6, 2_750_000, 0, 0), "{wide}");

    // Bad parameters: 400 with a stable code, naming the parameter.
    for (query, names) in [
        ("?from=yesterday", "from"),
        ("?to=2026-13-45", "to"),
        ("?group_by=week", "group_by"),
        ("?from=2026-02-01&to=2026-01-01", "from"),
    ] {
        let (status, body) = app
            .admin_get(&format!("/v1/accounts/{account}/usage{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request", "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(names),
            "{query}: {body}"
        );
    }
    let (status, body) = app.admin_get("/v1/accounts/nobody_here/usage").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // History: every entry once, newest first, in pages of 3.
    let stored: BTreeSet<String> =
        sqlx::query_scalar("SELECT entry_id FROM ledger_entries WHERE account_id = $1")
            .bind(&account)
            .fetch_all(&pg)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(stored.len(), 8, "opening + 6 debits + 1 refund: {stored:?}");
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => format!("/v1/accounts/{account}/ledger?limit=3"),
            Some(c) => format!("/v1/accounts/{account}/ledger?limit=3&cursor={c}"),
        };
        let (status, body) = app.admin_get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let entries = body["entries"].as_array().unwrap().clone();
        assert!(entries.len() <= 3, "{body}");
        pages += 1;
        seen.extend(entries);
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                break;
            }
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let ids: Vec<String> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "an entry on two pages: {ids:?}");
    assert_eq!(unique, stored);
    let times: Vec<String> = seen
        .iter()
        .map(|e| e["created_at"].as_str().unwrap().to_string())
        .collect();
    let parsed: Vec<chrono::DateTime<Utc>> = times
        .iter()
        .map(|t| t.parse().unwrap_or_else(|_| panic!("created_at {t:?}")))
        .collect();
    assert!(
        parsed.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {times:?}"
    );
    // The newest is the refund, with its amounts; the oldest is the opening allowance.
    let newest = &seen[0];
    assert_eq!(newest["kind"], "refund", "{newest}");
    assert_eq!(micros(&newest["allowance_delta"]), 250_000, "{newest}");
    assert_eq!(micros(&newest["amount"]), -250_000, "{newest}");
    assert_eq!(newest["route"], "chat", "{newest}");
    let oldest = seen.last().unwrap();
    assert_eq!(oldest["kind"], "reset", "{oldest}");
    assert_eq!(
        micros(&oldest["allowance_delta"]),
        1_000_000_000,
        "{oldest}"
    );
    let debit = seen.iter().find(|e| e["kind"] == "debit").unwrap();
    assert_eq!(
        micros(&debit["allowance_delta"]),
        -micros(&debit["amount"]),
        "{debit}"
    );
    // Each entry's balance_after is the running sum of the deltas (oldest → newest).
    let mut running = 0;
    for e in seen.iter().rev() {
        running += micros(&e["allowance_delta"]) + micros(&e["purchased_delta"]);
        assert_eq!(micros(&e["balance_after"]["total"]), running, "{e}");
    }
    // A larger page holds everything; bad limits and cursors are 400.
    let (status, body) = app
        .admin_get(&format!("/v1/accounts/{account}/ledger?limit=500"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["entries"].as_array().unwrap().len(), 8, "{body}");
    assert!(body["next_cursor"].is_null(), "{body}");
    for query in ["limit=0", "limit=501", "limit=x", "cursor=%21%21"] {
        let (status, body) = app
            .admin_get(&format!("/v1/accounts/{account}/ledger?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request", "{query}: {body}");
    }

    // Self-service: the caller's own usage with its own key, same numbers as the admin API.
    let own = |query: &'static str| {
        let app = &app;
        let key = key.clone();
        async move {
            let resp = app
                .client()
                .get(app.proxy_url(&format!("/_tollgate/v1/usage{query}")))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            let (status, _, body) = json_response(resp).await;
            (status, body)
        }
    };
    let (status, mine) = own("").await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(totals(&mine), (6, 2_750_000, 0, 0), "{mine}");
    let (status, mine) = own("?group_by=route").await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(groups(&mine), groups(&by_route));
    let (status, body) = own("?from=nonsense").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    // The other account sees only its own.
    let resp = app
        .client()
        .get(app.proxy_url("/_tollgate/v1/usage"))
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap();
    let (status, _, theirs) = json_response(resp).await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    assert_eq!(totals(&theirs), (1, 1_000_000, 0, 0), "{theirs}");
    // Without a key: 401; self-service calls are not metered.
    let resp = app
        .client()
        .get(app.proxy_url("/_tollgate/v1/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let (status, body) = app
        .admin_get(&format!("/v1/accounts/{account}/usage"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(totals(&body).0, 6, "{body}");
    let _ = other;
}

/// Entries with the same timestamp (one millisecond, several entries) are paged through once
/// each: the cursor orders by (created_at, entry id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_entries_sharing_a_timestamp() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let (account, _key) = app.account_with_key("pro").await;
    let stream = crate::journal_util::account_stream(&env, &account);
    let mut conn = env.redis().await;
    let ts = Utc::now().timestamp_millis().to_string();
    for i in 0..7 {
        crate::journal_util::xadd(
            &mut conn,
            &stream,
            &[
                ("id", format!("{account}:same:{i}")),
                ("acct", account.clone()),
                ("kind", "adjustment".into()),
                ("amount", "0".into()),
                ("d_allow", "0".into()),
                ("d_purch", "0".into()),
                ("allow", "1000000000".into()),
                ("purch", "0".into()),
                ("ts", ts.clone()),
            ],
        )
        .await;
    }
    let pg = env.pg().await;
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.rows == 8).await;
    let mut ids = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let (status, body) = app
            .admin_get(&format!(
                "/v1/accounts/{account}/ledger?limit=2&cursor={cursor}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for e in body["entries"].as_array().unwrap() {
            ids.push(e["id"].as_str().unwrap().to_string());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (8, 8), "{ids:?}");
}
