//! Redis loses its data (a restart without AOF, a FLUSHALL): balances come back from the
//! Postgres journal on first use, the flusher keeps writing what comes next, and balance =
//! sum of the journal still holds.

use std::time::Duration;

use serde_json::json;

use crate::harness::{delete_redis_prefix, TestEnv};
use crate::journal_util::{
    account_hash, account_stream, assert_balance_is_journal_sum, assert_caught_up, backlog,
    balance, call_ok, journal, ledger_cmd, metered_config, metric, wait_journal, xadd,
};
use crate::upstream::FakeUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_come_back_from_the_journal_after_redis_loses_its_data() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let app = cfg.spawn().await;
    let (a, key_a) = app.account_with_key("pro").await;
    let (b, key_b) = app.account_with_key("free").await;
    let pg = env.pg().await;

    // Some history on both: debits from both buckets, a grant.
    for _ in 0..3 {
        call_ok(&app, &key_a, "/v1/chat/x").await;
    }
    call_ok(&app, &key_a, "/v1/tools/x").await;
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{a}/grants"),
            json!({"credits": "10.5", "reason": "e2e", "idempotency_key": "g1"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{b}/grants"),
            json!({"credits": 3, "reason": "e2e", "idempotency_key": "g1"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // b: 2 credits of allowance, then into purchased.
    call_ok(&app, &key_b, "/v1/tools/x").await;
    call_ok(&app, &key_b, "/v1/tools/x").await;
    call_ok(&app, &key_b, "/v1/chat/x").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let before_a = balance(&app, &a).await;
    let before_b = balance(&app, &b).await;
    assert_eq!(before_a, (998_250_000, 10_500_000, 1_008_750_000));
    assert_eq!(before_b, (0, 2_750_000, 2_750_000));
    let hydrations = metric(&app, "tollgate_hydrations_total", &[]).await;

    // The loss: every key of this deployment, streams and consumer group included.
    delete_redis_prefix(env.redis_url(), env.prefix())
        .await
        .unwrap();
    assert!(env.redis_keys().await.is_empty());

    // a: the next request hydrates from the journal and is charged against the old balance.
    let remaining = call_ok(&app, &key_a, "/v1/chat/after").await;
    assert_eq!(remaining, before_a.2 - 250_000);
    assert_eq!(
        metric(&app, "tollgate_hydrations_total", &[]).await,
        hydrations + 1.0
    );
    assert_eq!(
        balance(&app, &a).await,
        (before_a.0 - 250_000, before_a.1, before_a.2 - 250_000)
    );
    // b: the admin API shows the same balance as before the loss, then debits continue.
    assert_eq!(balance(&app, &b).await, before_b);
    let remaining = call_ok(&app, &key_b, "/v1/tools/after").await;
    assert_eq!(remaining, 1_750_000);
    // A replayed grant is still recognised as applied (the Redis mark is gone, Postgres knows).
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{a}/grants"),
            json!({"credits": "10.5", "reason": "e2e", "idempotency_key": "g1"}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    assert_eq!(balance(&app, &a).await.2, before_a.2 - 250_000, "{body}");

    // What happens after the loss is journaled too.
    for _ in 0..3 {
        call_ok(&app, &key_a, "/v1/chat/more").await;
    }
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    let j = wait_journal(&pg, &a, Duration::from_secs(10), |j| j.debits == 8).await;
    assert_eq!(j.total(), before_a.2 - 4 * 250_000, "{j:?}");
    wait_journal(&pg, &b, Duration::from_secs(10), |j| j.debits == 4).await;
    assert_balance_is_journal_sum(&app, &pg, &a).await;
    assert_balance_is_journal_sum(&app, &pg, &b).await;
    // No second opening entry: the hydration after the loss is not a new account.
    let opens: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'reset' AND account_id = $1",
    )
    .bind(&a)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(opens, 1);
    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    let _ = journal(&pg, &a).await;
}

/// An account hash that disappears on its own (evicted, deleted by hand) while some of its
/// entries are still in the stream, not yet in Postgres: hydration counts those entries too,
/// so the rebuilt balance is the journal's (Postgres + unflushed), not Postgres alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_counts_entries_not_yet_flushed() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // Claims an hour away: the entry a dead instance left pending stays unflushed meanwhile.
    let cfg = metered_config(&env, &up.url(), 3600);
    let mut app = cfg.spawn().await;
    let (a, key) = app.account_with_key("pro").await;
    call_ok(&app, &key, "/v1/chat/x").await;
    call_ok(&app, &key, "/v1/chat/x").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    app.kill();

    // A debit an instance made and read for flushing, then died (bucket moved, entry pending).
    let mut conn = env.redis().await;
    let hash = account_hash(&env, &a);
    let stream = account_stream(&env, &a);
    let (allowance, purchased): (i64, i64) = redis::cmd("HMGET")
        .arg(&hash)
        .arg("allowance")
        .arg("purchased")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(allowance, 999_500_000);
    let _: () = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(&hash)
        .arg("allowance")
        .arg(-250_000)
        .ignore()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("id", format!("{a}:pending:debit")),
            ("acct", a.clone()),
            ("kind", "debit".into()),
            ("amount", "250000".into()),
            ("d_allow", "-250000".into()),
            ("d_purch", "0".into()),
            ("allow", (allowance - 250_000).to_string()),
            ("purch", purchased.to_string()),
            ("route", "chat".into()),
            ("action", "ai_message".into()),
            ("req", format!("{a}:pending")),
            ("ts", chrono::Utc::now().timestamp_millis().to_string()),
        ])
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tollgate-journal")
        .arg("dead-consumer")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Then the hash goes (eviction).
    let _: i64 = redis::cmd("DEL")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .unwrap();

    let app = cfg.spawn().await;
    let remaining = call_ok(&app, &key, "/v1/chat/after").await;
    assert_eq!(
        remaining,
        1_000_000_000 - 4 * 250_000,
        "the rebuilt balance ignores the debit still in the stream"
    );
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
    // No second opening entry either.
    let pg = env.pg().await;
    wait_journal(&pg, &a, Duration::from_secs(10), |j| j.debits == 3).await;
    let opens: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'reset' AND account_id = $1",
    )
    .bind(&a)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(opens, 1);
}

/// The same for a brand-new account whose opening entry (its first allowance) is still in the
/// stream when its hash disappears: it is not opened a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_not_opened_twice_when_its_opening_entry_is_unflushed() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 3600);
    let mut app = cfg.spawn().await;
    let a = format!("acct_{}", crate::harness::random_id(10));
    app.create_account(&a, "pro").await;
    let (_, key) = app.create_key(&a).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    app.kill();
    let pg = env.pg().await;
    // Forget the opening as if it had not been flushed yet: back into the stream, pending at
    // a dead consumer, and out of Postgres.
    let (ts, ps, pe): (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "DELETE FROM ledger_entries WHERE account_id = $1 AND kind = 'reset'
             RETURNING created_at, period_start, period_end",
    )
    .bind(&a)
    .fetch_one(&pg)
    .await
    .unwrap();
    let mut conn = env.redis().await;
    let stream = account_stream(&env, &a);
    xadd(
        &mut conn,
        &stream,
        &[
            ("id", format!("{a}:open:{}", ps.timestamp())),
            ("acct", a.clone()),
            ("kind", "reset".into()),
            ("amount", "0".into()),
            ("d_allow", "1000000000".into()),
            ("d_purch", "0".into()),
            ("allow", "1000000000".into()),
            ("purch", "0".into()),
            ("tier", "pro".into()),
            ("ts", ts.timestamp_millis().to_string()),
            ("period_start", ps.timestamp().to_string()),
            ("period_end", pe.timestamp().to_string()),
        ],
    )
    .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tollgate-journal")
        .arg("dead-consumer")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(account_hash(&env, &a))
        .query_async(&mut conn)
        .await
        .unwrap();

    let app = cfg.spawn().await;
    let remaining = call_ok(&app, &key, "/v1/chat/x").await;
    assert_eq!(remaining, 999_750_000);
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
    // Nothing but the debit reaches Postgres meanwhile (the opening waits for its claim): no
    // second opening entry.
    assert_caught_up_new_entries(&env).await;
    let opens: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'reset' AND account_id = $1",
    )
    .bind(&a)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(opens, 0, "a second opening entry was written");
}

/// Waits until every stream has nothing but entries pending at the dead consumer.
async fn assert_caught_up_new_entries(env: &TestEnv) {
    let ok = crate::harness::poll_until(Duration::from_secs(10), || async {
        let b = backlog(env).await;
        b.len == b.pending
    })
    .await;
    assert!(ok, "{:?}", backlog(env).await);
}
