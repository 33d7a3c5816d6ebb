//! Postgres unreachable under load: a known caller keeps being served (Postgres is not on the
//! hot path), the journal backlog waits in Redis, and once Postgres is back the flusher writes
//! all of it: balance = sum of the journal, nothing lost, nothing twice.

use std::time::{Duration, Instant};

use crate::harness::poll_until;
use crate::harness::TestEnv;
use crate::journal_util::{
    assert_balance_is_journal_sum, assert_caught_up, backlog, call_ok, journal, ledger_cmd,
    metered_config, metric, wait_journal, PgGate,
};
use crate::upstream::FakeUpstream;

const DURING_OUTAGE: i64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_serves_known_callers_and_the_journal_catches_up() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    let cfg = metered_config(&env, &up.url(), 2).postgres_url(gate.url(env.db_url()));
    let app = cfg.spawn().await;
    drop(cfg);
    let (account, key) = app.account_with_key("pro").await;
    let pg = env.pg().await; // direct, not through the gate

    // One request: the key is cached and the account is in Redis.
    let mut expected = call_ok(&app, &key, "/v1/chat/warm").await;
    assert_eq!(expected, 999_750_000);
    wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let rows_before = journal(&pg, &account).await.rows;

    gate.cut();
    let cut_at = Instant::now();
    let mut backlog_seen = Vec::new();
    for i in 0..DURING_OUTAGE {
        let path = if i % 4 == 0 {
            "/v1/tools/x"
        } else {
            "/v1/chat/x"
        };
        let remaining = call_ok(&app, &key, path).await;
        expected -= if i % 4 == 0 { 1_000_000 } else { 250_000 };
        assert_eq!(remaining, expected, "request {i} during the outage");
        if i % 10 == 9 {
            backlog_seen.push(backlog(&env).await.len);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Nothing reached Postgres; everything waits in Redis.
    assert_eq!(journal(&pg, &account).await.rows, rows_before);
    let waiting = backlog(&env).await;
    assert!(
        waiting.len >= DURING_OUTAGE as u64,
        "backlog {waiting:?} (samples {backlog_seen:?})"
    );
    // The exported backlog follows (sampled every 2 s), and the failed writes are counted.
    let exported = poll_until(Duration::from_secs(5), || async {
        metric(&app, "tollgate_journal_backlog", &[]).await >= DURING_OUTAGE as f64
    })
    .await;
    assert!(
        exported,
        "tollgate_journal_backlog is {}",
        metric(&app, "tollgate_journal_backlog", &[]).await
    );
    let errors = metric(
        &app,
        "tollgate_journal_flush_errors_total",
        &[("cause", "postgres")],
    )
    .await;
    assert!(errors >= 1.0, "flush errors {errors}");
    eprintln!(
        "outage: {:?}, backlog samples {backlog_seen:?}, at the end {waiting:?}, \
         flush errors {errors}",
        cut_at.elapsed()
    );

    gate.restore();
    let restored_at = Instant::now();
    assert_caught_up(&env, Some(&app), Duration::from_secs(20)).await;
    let j = wait_journal(&pg, &account, Duration::from_secs(5), |j| {
        j.debits == 1 + DURING_OUTAGE
    })
    .await;
    eprintln!(
        "caught up {:?} after Postgres came back",
        restored_at.elapsed()
    );
    assert_eq!(j.rows, rows_before + DURING_OUTAGE, "{j:?}");
    assert_eq!(j.total(), expected, "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    let exported = poll_until(Duration::from_secs(5), || async {
        metric(&app, "tollgate_journal_backlog", &[]).await == 0.0
    })
    .await;
    assert!(exported, "tollgate_journal_backlog stays above 0");

    // The audit, on a direct connection to Postgres.
    let direct = metered_config(&env, &up.url(), 2);
    let audit = ledger_cmd(&env, &direct, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
}
