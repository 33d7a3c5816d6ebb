//! What the flusher does with odd stream entries: a re-delivered (duplicate) entry is stored
//! once and never counts twice in the audit; a malformed one is parked in `<stream>:dead`
//! without blocking the entries behind it.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::harness::TestEnv;
use crate::journal_util::{
    account_stream, assert_balance_is_journal_sum, assert_caught_up, backlog, call_ok, journal,
    ledger_cmd, metered_config, metric, redis_to_json, rows_with_id, wait_journal, xadd,
};
use crate::upstream::FakeUpstream;

type StoredEntry = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);

/// The stream fields of a stored journal row, exactly as the debit script wrote them.
async fn stream_fields_of(pg: &sqlx::PgPool, entry_id: &str) -> Vec<(&'static str, String)> {
    let r: StoredEntry = sqlx::query_as(
        "SELECT entry_id, account_id, kind, amount, d_allowance, d_purchased, allowance_after,
                purchased_after, route, action, request_id, tier, created_at
           FROM ledger_entries WHERE entry_id = $1",
    )
    .bind(entry_id)
    .fetch_one(pg)
    .await
    .unwrap();
    vec![
        ("id", r.0),
        ("acct", r.1),
        ("kind", r.2),
        ("amount", r.3.to_string()),
        ("d_allow", r.4.to_string()),
        ("d_purch", r.5.to_string()),
        ("allow", r.6.to_string()),
        ("purch", r.7.to_string()),
        ("route", r.8.unwrap_or_default()),
        ("action", r.9.unwrap_or_default()),
        ("req", r.10.unwrap_or_default()),
        ("tier", r.11.unwrap_or_default()),
        ("ts", r.12.timestamp_millis().to_string()),
    ]
}

async fn first_debit_id(pg: &sqlx::PgPool, account: &str) -> String {
    sqlx::query_scalar(
        "SELECT entry_id FROM ledger_entries WHERE account_id = $1 AND kind = 'debit'
          ORDER BY created_at LIMIT 1",
    )
    .bind(account)
    .fetch_one(pg)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_stream_entry_is_stored_once_and_audited_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let mut app = cfg.spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await;
    for _ in 0..3 {
        call_ok(&app, &key, "/v1/chat/x").await;
    }
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 3).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let entry_id = first_debit_id(&pg, &account).await;
    let fields = stream_fields_of(&pg, &entry_id).await;
    let stream = account_stream(&env, &account);
    let mut conn = env.redis().await;

    // 1. While running: the copy is flushed, and stored once.
    let flushed_before = metric(&app, "tollgate_journal_entries_flushed_total", &[]).await;
    xadd(&mut conn, &stream, &fields).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_eq!(rows_with_id(&pg, &entry_id).await, 1);
    let flushed_after = metric(&app, "tollgate_journal_entries_flushed_total", &[]).await;
    assert_eq!(
        flushed_after,
        flushed_before + 1.0,
        "the copy went through the flusher"
    );
    let j = journal(&pg, &account).await;
    assert_eq!((j.rows, j.debits), (4, 3), "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;

    // 2. Stopped: the copy waits in the stream. The audit sees it is already in Postgres and
    //    does not count it a second time.
    app.terminate();
    assert!(app.wait_exit(Duration::from_secs(15)).await.is_some());
    xadd(&mut conn, &stream, &fields).await;
    assert_eq!(backlog(&env).await.len, 1);
    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    assert!(!audit.stdout.contains("DRIFT"), "{audit}");
    let audit = ledger_cmd(&env, &cfg, "audit", &["--account", &account]).await;
    assert!(audit.success(), "{audit}");

    // 3. The next start flushes the copy: still one row.
    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_eq!(rows_with_id(&pg, &entry_id).await, 1);
    assert_eq!(journal(&pg, &account).await, j);
    assert_balance_is_journal_sum(&app, &pg, &account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_goes_to_the_dead_letter_stream_and_blocks_nothing() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await;
    call_ok(&app, &key, "/v1/chat/x").await;
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;

    let stream = account_stream(&env, &account);
    let dead = format!("{stream}:dead");
    let mut conn = env.redis().await;
    // No entry id, no account.
    xadd(
        &mut conn,
        &stream,
        &[("kind", "debit".into()), ("amount", "250000".into())],
    )
    .await;
    // An amount that is not a number.
    xadd(
        &mut conn,
        &stream,
        &[
            ("id", format!("{account}:bogus:debit")),
            ("acct", account.clone()),
            ("kind", "debit".into()),
            ("amount", "lots".into()),
            ("ts", chrono::Utc::now().timestamp_millis().to_string()),
        ],
    )
    .await;
    // Valid entries behind them.
    for _ in 0..2 {
        call_ok(&app, &key, "/v1/chat/y").await;
    }
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let j = wait_journal(&pg, &account, Duration::from_secs(5), |j| j.debits == 3).await;
    assert_eq!(j.rows, 4, "{j:?}");
    assert_eq!(
        rows_with_id(&pg, &format!("{account}:bogus:debit")).await,
        0
    );
    assert_balance_is_journal_sum(&app, &pg, &account).await;

    // Both are parked, with their content, for an operator to look at.
    let parked: redis::Value = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let parked = redis_to_json(parked);
    let parked = parked.as_array().unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    let text = serde_json::to_string(parked).unwrap();
    assert!(text.contains("bogus") && text.contains("lots"), "{text}");
    let bad = metric(
        &app,
        "tollgate_journal_flush_errors_total",
        &[("cause", "bad_entry")],
    )
    .await;
    assert_eq!(bad, 2.0);
    // The bad entries do not make the audit fail (they never touched a balance).
    let audit = ledger_cmd(&env, &metered_config(&env, &up.url(), 1), "audit", &[]).await;
    assert!(audit.success(), "{audit}");
}
