//! Packed stream entries (issue #14 item 3): a credit slice's batch report writes many journal
//! rows as ONE stream entry (field `rows`, see src/journal/entry.rs). These tests XADD such an
//! entry, as the report script does, and check that every row reaches `ledger_entries` exactly
//! once — also when a flusher committed the rows and died before acknowledging — that the
//! audit counts rows still waiting in the stream, and that one bad row parks the whole entry.

use std::time::Duration;

use tollgate::journal::entry::{pack_rows, JournalEntry, RowFields};

use crate::harness::TestEnv;
use crate::journal_util::{
    account_hash, account_stream, assert_balance_is_journal_sum, assert_caught_up, backlog,
    balance, call_ok, journal, ledger_cmd, metered_config, metric, redis_to_json, rows_with_id,
    wait_journal, xadd,
};
use crate::upstream::FakeUpstream;

const ROWS: usize = 40;
/// The chat route's price (0.25 credits).
const PRICE: i64 = 250_000;

/// The rows of one batch report: `ROWS` debits of `PRICE` from the allowance, starting at
/// `allowance`; request ids contain '|' (a client may choose any request id).
fn report_rows(account: &str, allowance: i64, purchased: i64, ts_ms: i64) -> String {
    let ids: Vec<(String, String)> = (0..ROWS)
        .map(|i| (format!("{account}:lease{i}:debit"), format!("req|{i}|x")))
        .collect();
    let rows: Vec<RowFields<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, (entry_id, req))| RowFields {
            entry_id,
            account_id: account,
            kind: "debit",
            amount: PRICE,
            d_allowance: -PRICE,
            d_purchased: 0,
            allowance_after: allowance - PRICE * (i as i64 + 1),
            purchased_after: purchased,
            route: Some("chat"),
            action: Some("ai_message"),
            tier: Some("pro"),
            ts_ms: ts_ms + i as i64,
            request_id: Some(req),
        })
        .collect();
    pack_rows(&rows).expect("packing valid rows")
}

/// Takes the report's amount from the account hash and XADDs its packed entry in one MULTI,
/// as the batch report script does atomically; returns the stream id.
async fn report(env: &TestEnv, account: &str, rows: &str) -> String {
    let mut conn = env.redis().await;
    let (_, id): (i64, String) = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(account_hash(env, account))
        .arg("allowance")
        .arg(-PRICE * ROWS as i64)
        .cmd("XADD")
        .arg(account_stream(env, account))
        .arg("*")
        .arg("rows")
        .arg(rows)
        .query_async(&mut conn)
        .await
        .expect("MULTI HINCRBY + XADD");
    id
}

async fn assert_rows_once(pg: &sqlx::PgPool, account: &str) {
    for i in 0..ROWS {
        assert_eq!(
            rows_with_id(pg, &format!("{account}:lease{i}:debit")).await,
            1,
            "row {i}"
        );
    }
    // A charge is still traced to its request id, '|' and all.
    let req: Option<String> =
        sqlx::query_scalar("SELECT request_id FROM ledger_entries WHERE entry_id = $1")
            .bind(format!("{account}:lease7:debit"))
            .fetch_one(pg)
            .await
            .expect("reading a row");
    assert_eq!(req.as_deref(), Some("req|7|x"));
}

/// A flusher writes the rows of a packed entry and dies before XACK: the entry stays pending
/// under the dead consumer; the next instance claims it and writes it again, and every row is
/// still stored once. Meanwhile the audit counts the rows still in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_entry_lands_once_even_if_the_flusher_died_before_acknowledging() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let app = cfg.spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await;
    call_ok(&app, &key, "/v1/chat/x").await;
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let (allowance, purchased, _) = balance(&app, &account).await;
    // Stop the instance: nothing reads the streams until the restart.
    app.terminate();
    let mut app = app;
    assert!(app.wait_exit(Duration::from_secs(15)).await.is_some());

    let now_ms = chrono::Utc::now().timestamp_millis();
    let rows = report_rows(&account, allowance, purchased, now_ms);
    let stream_id = report(&env, &account, &rows).await;

    // The audit reads the packed rows still in the stream: no drift although Postgres has
    // none of them yet.
    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    assert!(!audit.stdout.contains("DRIFT"), "{audit}");

    // A flusher reads the entry, commits its rows with the flusher's own write, and dies
    // before acknowledging it.
    let stream = account_stream(&env, &account);
    let mut conn = env.redis().await;
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tollgate-journal")
        .arg("dead-consumer")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let item = match &reply {
        redis::Value::Array(streams) => match streams.first() {
            Some(redis::Value::Array(parts)) => match parts.get(1) {
                Some(redis::Value::Array(items)) if items.len() == 1 => items[0].clone(),
                other => panic!("one entry expected: {other:?}"),
            },
            other => panic!("XREADGROUP reply: {other:?}"),
        },
        other => panic!("XREADGROUP reply: {other:?}"),
    };
    let entries = JournalEntry::from_stream(&item).expect("a valid packed entry");
    assert_eq!(entries.len(), ROWS);
    assert!(entries.iter().all(|e| e.stream_id == stream_id));
    let inserted = tollgate::journal::write::insert_batch(&pg, &entries)
        .await
        .expect("writing the rows");
    assert_eq!(inserted, ROWS as u64);
    assert_eq!(backlog(&env).await.pending, 1, "one stream entry pending");

    // The restart claims the dead consumer's entry and writes it again: no duplicates.
    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(20)).await;
    assert_rows_once(&pg, &account).await;
    let j = journal(&pg, &account).await;
    assert_eq!(j.debits, 1 + ROWS as i64, "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    assert!(!audit.stdout.contains("DRIFT"), "{audit}");
}

/// A running flusher writes a packed entry's rows once and acknowledges its one stream id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_entry_is_flushed_with_its_neighbours() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await;
    call_ok(&app, &key, "/v1/chat/x").await;
    let before = wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;
    let (allowance, purchased, _) = balance(&app, &account).await;
    let rows = report_rows(
        &account,
        allowance,
        purchased,
        chrono::Utc::now().timestamp_millis(),
    );
    report(&env, &account, &rows).await;
    // Single-row entries before and after it.
    call_ok(&app, &key, "/v1/chat/y").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let j = wait_journal(&pg, &account, Duration::from_secs(10), |j| {
        j.debits == 2 + ROWS as i64
    })
    .await;
    assert_eq!(j.rows, before.rows + 1 + ROWS as i64, "{j:?}");
    assert_rows_once(&pg, &account).await;
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    let flushed = metric(&app, "tollgate_journal_entries_flushed_total", &[]).await;
    assert!(flushed >= (2 + ROWS) as f64, "flushed rows: {flushed}");
}

/// One bad row parks the whole packed entry in the dead-letter stream: none of its rows is
/// written, the stream is not blocked, the entry is acknowledged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_entry_with_one_bad_row_is_parked_whole() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await;
    call_ok(&app, &key, "/v1/chat/x").await;
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;

    let stream = account_stream(&env, &account);
    let mut conn = env.redis().await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let good = format!(
        "{account}:p1:debit|{account}|debit|250000|-250000|0|0|0|chat|ai_message|pro|{now_ms}|p1"
    );
    let bad = format!(
        "{account}:p2:debit|{account}|debit|lots|-250000|0|0|0|chat|ai_message|pro|{now_ms}|p2"
    );
    xadd(&mut conn, &stream, &[("rows", format!("{good}\n{bad}"))]).await;
    call_ok(&app, &key, "/v1/chat/y").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    wait_journal(&pg, &account, Duration::from_secs(5), |j| j.debits == 2).await;
    assert_eq!(rows_with_id(&pg, &format!("{account}:p1:debit")).await, 0);
    assert_eq!(rows_with_id(&pg, &format!("{account}:p2:debit")).await, 0);

    let parked: redis::Value = redis::cmd("XRANGE")
        .arg(format!("{stream}:dead"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE dead");
    let parked = redis_to_json(parked);
    let parked = parked.as_array().expect("an array");
    assert_eq!(parked.len(), 1, "{parked:?}");
    let text = serde_json::to_string(parked).expect("json");
    assert!(text.contains("p1:debit") && text.contains("lots"), "{text}");
    let bad_entries = metric(
        &app,
        "tollgate_journal_flush_errors_total",
        &[("cause", "bad_entry")],
    )
    .await;
    assert_eq!(bad_entries, 1.0);
}
