//! `tollgate ledger audit` and `ledger rebuild`: a healthy deployment audits clean; a balance
//! changed behind the journal's back is reported (exit non-zero, `DRIFT <account>`), rebuilt
//! from the journal, and then audits clean again.

use std::time::Duration;

use crate::harness::TestEnv;
use crate::journal_util::{
    account_hash, assert_balance_is_journal_sum, assert_caught_up, balance, call_ok, journal,
    ledger_cmd, metered_config, wait_journal,
};
use crate::upstream::FakeUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_an_injected_drift_and_rebuild_repairs_it() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let app = cfg.spawn().await;
    let (a, key_a) = app.account_with_key("pro").await;
    let (b, key_b) = app.account_with_key("free").await;
    // An account without traffic.
    let c = format!("{a}_idle");
    app.create_account(&c, "pro").await;
    let pg = env.pg().await;
    for _ in 0..3 {
        call_ok(&app, &key_a, "/v1/chat/x").await;
    }
    call_ok(&app, &key_b, "/v1/tools/x").await;
    wait_journal(&pg, &a, Duration::from_secs(10), |j| j.debits == 3).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;

    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains("DRIFT"), "{out}");

    // 5 µc appear in a's purchased bucket, with no journal entry.
    let mut conn = env.redis().await;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(account_hash(&env, &a))
        .arg("purchased")
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    let drifted = balance(&app, &a).await;
    assert_eq!(drifted.1, 5);

    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(!out.success(), "the audit passed despite the drift: {out}");
    let drift_lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains("DRIFT")).collect();
    assert_eq!(drift_lines.len(), 1, "{out}");
    assert!(drift_lines[0].contains(&a), "{out}");
    assert!(
        drift_lines[0].contains("0.000005"),
        "the difference is named: {out}"
    );
    // Only that account.
    let out = ledger_cmd(&env, &cfg, "audit", &["--account", &a]).await;
    assert!(!out.success(), "{out}");
    assert!(out.stdout.contains(&format!("DRIFT {a}")), "{out}");
    let out = ledger_cmd(&env, &cfg, "audit", &["--account", &b]).await;
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains("DRIFT"), "{out}");

    // Rebuild one account: the journal's view comes back.
    let out = ledger_cmd(&env, &cfg, "rebuild", &["--account", &a]).await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(&a),
        "the rebuilt account is named: {out}"
    );
    let j = journal(&pg, &a).await;
    assert_eq!(
        balance(&app, &a).await,
        (j.sum_allowance, j.sum_purchased, j.total())
    );
    assert_eq!(balance(&app, &a).await.2, drifted.2 - 5);
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");

    // Rebuild of everything, with drifts on both loaded accounts (one in each bucket).
    let _: i64 = redis::cmd("HINCRBY")
        .arg(account_hash(&env, &a))
        .arg("allowance")
        .arg(-7)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("HINCRBY")
        .arg(account_hash(&env, &b))
        .arg("purchased")
        .arg(1_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(!out.success(), "{out}");
    assert_eq!(out.stdout.matches("DRIFT").count(), 2, "{out}");
    let out = ledger_cmd(&env, &cfg, "rebuild", &[]).await;
    assert!(out.success(), "{out}");
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains(&c), "{out}");
    assert_balance_is_journal_sum(&app, &pg, &a).await;
    assert_balance_is_journal_sum(&app, &pg, &b).await;

    // The repaired accounts keep working, and stay consistent.
    call_ok(&app, &key_a, "/v1/chat/after").await;
    call_ok(&app, &key_b, "/v1/chat/after").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
    assert_balance_is_journal_sum(&app, &pg, &a).await;
}

/// The audit counts entries still in the stream (not yet flushed): with no flusher running and
/// a debit waiting in Redis (bucket already moved, entry not yet in Postgres), a healthy
/// account does not drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_counts_unflushed_entries() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let mut app = cfg.spawn().await;
    let (a, key_a) = app.account_with_key("pro").await;
    for _ in 0..3 {
        call_ok(&app, &key_a, "/v1/chat/x").await;
    }
    // No flusher from here on (the audit reads Redis and Postgres itself).
    app.kill();
    let mut conn = env.redis().await;
    let stream = crate::journal_util::account_stream(&env, &a);
    let before = balance_from_redis(&mut conn, &env, &a).await;
    // Simulate one more debit as the script writes it: bucket and stream entry together.
    let ts = chrono::Utc::now().timestamp_millis();
    let (allowance, purchased) = (before.0 - 250_000, before.1);
    let _: () = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(account_hash(&env, &a))
        .arg("allowance")
        .arg(-250_000)
        .ignore()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("id", format!("{a}:manual:debit")),
            ("acct", a.clone()),
            ("kind", "debit".into()),
            ("amount", "250000".into()),
            ("d_allow", "-250000".into()),
            ("d_purch", "0".into()),
            ("allow", allowance.to_string()),
            ("purch", purchased.to_string()),
            ("route", "chat".into()),
            ("action", "ai_message".into()),
            ("req", format!("{a}:manual")),
            ("ts", ts.to_string()),
        ])
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = ledger_cmd(&env, &cfg, "audit", &["--account", &a]).await;
    assert!(out.success(), "{out}");
    // Once flushed (by a new instance), it is the same.
    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    let pg = env.pg().await;
    let j = journal(&pg, &a).await;
    assert_eq!(j.debits, 4, "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &a).await;
    let out = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(out.success(), "{out}");
}

async fn balance_from_redis(
    conn: &mut redis::aio::MultiplexedConnection,
    env: &TestEnv,
    account: &str,
) -> (i64, i64) {
    let (a, p): (i64, i64) = redis::cmd("HMGET")
        .arg(account_hash(env, account))
        .arg("allowance")
        .arg("purchased")
        .query_async(conn)
        .await
        .unwrap();
    (a, p)
}

/// `--account` naming an account that exists neither in Postgres nor in Redis is an error
/// (exit 2, named), not a clean audit of "1 not loaded in Redis"; an account that exists
/// still audits and rebuilds cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_rebuild_of_an_unknown_account_fail() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let app = cfg.spawn().await;
    let idle = format!("acct_{}", crate::harness::random_id(8));
    app.create_account(&idle, "pro").await;
    let nobody = format!("nobody_{}", crate::harness::random_id(8));
    for what in ["audit", "rebuild"] {
        let out = ledger_cmd(&env, &cfg, what, &["--account", &nobody]).await;
        assert_eq!(out.status.code(), Some(2), "{what}: {out}");
        assert!(
            out.stderr
                .contains(&format!("error: no account \"{nobody}\"")),
            "{what}: {out}"
        );
        let out = ledger_cmd(&env, &cfg, what, &["--account", &idle]).await;
        assert!(out.success(), "{what}: {out}");
        assert!(
            out.stdout.contains(&format!("{what}: 1 accounts")),
            "{what}: {out}"
        );
    }
}
