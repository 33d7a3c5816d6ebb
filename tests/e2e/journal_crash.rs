//! Exactly once across a crash: `tollgate serve` killed with SIGKILL in the middle of a load;
//! after a restart the journal holds every debit once, and balance = sum of the journal.
//! Also: entries a dead consumer left pending are claimed (XAUTOCLAIM) by a live instance.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{poll_until, random_id, TestEnv};
use crate::journal_util::{
    account_stream, assert_balance_is_journal_sum, assert_caught_up, backlog, journal, ledger_cmd,
    metered_config, rows_with_id, xadd,
};
use crate::upstream::FakeUpstream;

const TASKS: usize = 6;
const REQUESTS: usize = 200;
/// SIGKILL once this many requests were answered.
const KILL_AFTER: usize = 90;
/// Pause between two requests of one task.
const PAUSE_MS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_then_restart_every_debit_journaled_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 1);
    let mut app = cfg.spawn().await;
    let (account, key) = app.account_with_key("pro").await;

    let sent = Arc::new(AtomicUsize::new(0));
    let answered_ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        // One client per task: several connections, like several callers.
        let client = crate::harness::http_client();
        let url = app.proxy_url(&format!("/v1/chat/t{t}"));
        let key = key.clone();
        let (sent, ok, failed, stop) = (
            Arc::clone(&sent),
            Arc::clone(&answered_ok),
            Arc::clone(&failed),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if sent.fetch_add(1, Ordering::SeqCst) >= REQUESTS {
                    sent.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                let r = client
                    .get(&url)
                    .bearer_auth(&key)
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().is_success() => {
                        assert!(
                            resp.headers().contains_key("x-credits-charged"),
                            "a 2xx without X-Credits-Charged"
                        );
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // About 200 requests over a few seconds.
                tokio::time::sleep(Duration::from_millis(PAUSE_MS)).await;
            }
        }));
    }

    let reached = poll_until(Duration::from_secs(20), || async {
        answered_ok.load(Ordering::SeqCst) >= KILL_AFTER
    })
    .await;
    assert!(
        reached,
        "only {} requests answered",
        answered_ok.load(Ordering::SeqCst)
    );
    // One request surely in flight at the kill: debited, forwarded, its answer 30 s away.
    let in_flight = {
        let client = crate::harness::http_client();
        let url = app.proxy_url("/v1/chat/in-flight/slow?ms=30000");
        let key = key.clone();
        tokio::spawn(async move { client.get(url).bearer_auth(key).send().await })
    };
    assert!(
        poll_until(Duration::from_secs(10), || async {
            up.requests().iter().any(|r| r.path.contains("/in-flight/"))
        })
        .await,
        "the in-flight request did not reach the upstream"
    );
    app.kill();
    let killed_at = Instant::now();
    let cut = in_flight.await.unwrap();
    assert!(
        cut.is_err(),
        "the request in flight at the kill was answered: {cut:?}"
    );
    // What the dead process left in Redis (for the report in a failure message).
    let left = backlog(&env).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    // The tasks' requests, and the one in flight at the kill.
    let sent = sent.load(Ordering::SeqCst) as i64 + 1;
    let ok = answered_ok.load(Ordering::SeqCst) as i64;
    let failed = failed.load(Ordering::SeqCst) as i64;
    // Requests tollgate had forwarded before dying may still be arriving: let them land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upstream_got = up.request_count() as i64;

    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(20)).await;
    let pg = env.pg().await;
    let j = journal(&pg, &account).await;
    eprintln!(
        "crash test: sent {sent}, 2xx {ok}, failed {failed}, upstream got {upstream_got}, \
         left in Redis at the kill {left:?}, journal {j:?}, caught up {:?} after the kill",
        killed_at.elapsed()
    );
    assert!(ok >= KILL_AFTER as i64);
    // The kill hit a request in flight: it reached the upstream (so it was debited) and was
    // never answered.
    assert!(
        upstream_got > ok,
        "no request was in flight upstream at the kill: upstream {upstream_got}, 2xx {ok}"
    );
    assert_eq!(
        j.debits, j.distinct_debit_ids,
        "a debit stored twice: {j:?}"
    );
    // Every request the upstream saw was debited first; nothing was debited that was not sent.
    assert!(
        j.debits >= upstream_got && upstream_got >= ok,
        "debits {} < upstream {upstream_got} or upstream < 2xx {ok}",
        j.debits
    );
    assert!(
        j.debits <= sent,
        "debits {} > requests sent {sent}",
        j.debits
    );
    // Every debit is 0.25 credits from the 1000-credit allowance, opened once.
    assert_eq!(
        j.rows,
        j.debits + 1,
        "only debits and the opening entry: {j:?}"
    );
    assert_eq!(j.sum_allowance, 1_000_000_000 - j.debits * 250_000, "{j:?}");
    assert_balance_is_journal_sum(&app, &pg, &account).await;

    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    assert!(!audit.stdout.contains("DRIFT"), "{audit}");
}

/// Entries delivered to a consumer that then died (never acknowledged) are taken over by a
/// running flusher once idle for `claim_idle_seconds`, and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_pending_at_a_dead_consumer_are_claimed() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let account = format!("ghost_{}", random_id(8));
    let stream = account_stream(&env, &account);
    let mut conn = env.redis().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("tollgate-journal")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let now_ms = chrono::Utc::now().timestamp_millis();
    for i in 0..5 {
        xadd(
            &mut conn,
            &stream,
            &[
                ("id", format!("{account}:r{i}:debit")),
                ("acct", account.clone()),
                ("kind", "debit".into()),
                ("amount", "250000".into()),
                ("d_allow", "-250000".into()),
                ("d_purch", "0".into()),
                ("allow", "0".into()),
                ("purch", "0".into()),
                ("route", "chat".into()),
                ("action", "ai_message".into()),
                ("req", format!("{account}:r{i}")),
                ("ts", (now_ms + i).to_string()),
            ],
        )
        .await;
    }
    // A consumer reads them and dies without acknowledging.
    let _: redis::Value = redis::cmd("XREADGROUP")
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
        .unwrap();
    assert_eq!(backlog(&env).await.pending, 5);

    let started = Instant::now();
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    let pg = env.pg().await;
    for i in 0..5 {
        assert_eq!(rows_with_id(&pg, &format!("{account}:r{i}:debit")).await, 1);
    }
    let j = journal(&pg, &account).await;
    assert_eq!((j.debits, j.sum_allowance), (5, -1_250_000), "{j:?}");
    eprintln!("claimed after {:?}", started.elapsed());
}
