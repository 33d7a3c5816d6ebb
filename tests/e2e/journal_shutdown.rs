//! Graceful shutdown and the journal: SIGTERM drains the in-flight requests, then the flusher
//! writes every entry before the process exits; with Postgres away, the exit is still prompt
//! and the entries wait in Redis for the next start.

use std::time::{Duration, Instant};

use crate::harness::TestEnv;
use crate::journal_util::{
    assert_balance_is_journal_sum, assert_caught_up, backlog, call_ok, journal, ledger_cmd,
    metered_config, PgGate,
};
use crate::upstream::FakeUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_every_debit_before_exit() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1).server("shutdown_grace_seconds = 10");
    let mut app = cfg.spawn().await;
    let (account, key) = app.account_with_key("pro").await;

    // Three slow requests in flight at the signal...
    let mut slow = Vec::new();
    for _ in 0..3 {
        let client = app.client().clone();
        let url = app.proxy_url("/v1/chat/slow?ms=700");
        let key = key.clone();
        slow.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    // ...and a burst of fast ones just before it.
    let mut fast = Vec::new();
    for t in 0..4 {
        let client = app.client().clone();
        let url = app.proxy_url(&format!("/v1/tools/t{t}"));
        let key = key.clone();
        fast.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..5 {
                let r = client.get(&url).bearer_auth(&key).send().await.unwrap();
                assert_eq!(r.status(), 200);
                ok += 1;
            }
            ok
        }));
    }
    let mut fast_ok = 0;
    for f in fast {
        fast_ok += f.await.unwrap();
    }
    up.wait_for_requests(23, Duration::from_secs(5)).await;
    app.terminate();
    let signalled = Instant::now();
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap(), 200);
    }
    let exit = app
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exited");
    assert!(exit.success(), "{exit}\n{}", app.logs());
    let took = signalled.elapsed();

    // Straight from Postgres, no restart: every debit is there, nothing waits in Redis.
    let pg = env.pg().await;
    let j = journal(&pg, &account).await;
    assert_eq!(fast_ok, 20);
    assert_eq!((j.debits, j.distinct_debit_ids), (23, 23), "{j:?}");
    assert_eq!(
        j.total(),
        1_000_000_000 - 20 * 1_000_000 - 3 * 250_000,
        "{j:?}"
    );
    let left = backlog(&env).await;
    assert_eq!((left.len, left.pending), (0, 0), "{left:?}");
    eprintln!("SIGTERM → exit in {took:?}, journal {j:?}");
    // The balance in Redis is the journal's.
    let out = ledger_cmd(&env, &cfg, "audit", &["--account", &account]).await;
    assert!(out.success(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_postgres_is_away_exits_and_loses_nothing() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    let direct = metered_config(&env, &up.url(), 1);
    let gated = direct.clone().postgres_url(gate.url(env.db_url()));
    let mut app = gated.spawn().await;
    let (account, key) = app.account_with_key("pro").await;
    call_ok(&app, &key, "/v1/chat/warm").await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;

    gate.cut();
    for _ in 0..10 {
        call_ok(&app, &key, "/v1/chat/x").await;
    }
    app.terminate();
    let signalled = Instant::now();
    // It does not wait for Postgres: still running 25 s after SIGTERM fails the test.
    let exit = app.wait_exit(Duration::from_secs(25)).await;
    let took = signalled.elapsed();
    let exit = exit.unwrap_or_else(|| panic!("still running 25 s after SIGTERM\n{}", app.logs()));
    assert!(exit.success(), "{exit}\n{}", app.logs());
    let waiting = backlog(&env).await;
    assert_eq!(waiting.len, 10, "{waiting:?}");
    let pg = env.pg().await;
    assert_eq!(journal(&pg, &account).await.debits, 1);

    // The next start (Postgres reachable) writes what was left, once.
    let app = direct.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    let j = journal(&pg, &account).await;
    assert_eq!((j.debits, j.distinct_debit_ids), (11, 11), "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    eprintln!("SIGTERM with Postgres away → exit in {took:?}; left {waiting:?}");
    drop(gate);
}
