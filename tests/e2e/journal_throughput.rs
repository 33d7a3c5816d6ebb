//! How fast the flusher drains the shard streams into Postgres: a measurement, not a check
//! (`#[ignore]`: run it with
//! `cargo test --release --test e2e -- --ignored --nocapture journal_throughput`).

use std::time::{Duration, Instant};

use crate::harness::TestEnv;
use crate::journal_util::{backlog, metered_config, shard_of, stream_key, total_rows, SHARDS};
use crate::upstream::FakeUpstream;

const ENTRIES: usize = 50_000;
const ACCOUNTS: usize = 500;

/// XADDs `n` valid debit entries (ids `<tag>:<i>:debit`) over `ACCOUNTS` accounts, pipelined.
async fn xadd_synthetic(env: &TestEnv, tag: &str, n: usize) {
    let mut conn = env.redis().await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut pipe = redis::pipe();
    for i in 0..n {
        let account = format!("tp_{}", i % ACCOUNTS);
        let stream = stream_key(env.prefix(), shard_of(&account, SHARDS));
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("id")
            .arg(format!("{tag}:{i}:debit"))
            .arg("acct")
            .arg(&account)
            .arg("kind")
            .arg("debit")
            .arg("amount")
            .arg(250_000)
            .arg("d_allow")
            .arg(-250_000)
            .arg("d_purch")
            .arg(0)
            .arg("allow")
            .arg(1_000_000_000 - 250_000 * (i / ACCOUNTS + 1) as i64)
            .arg("purch")
            .arg(0)
            .arg("route")
            .arg("chat")
            .arg("action")
            .arg("ai_message")
            .arg("req")
            .arg(format!("{tag}:{i}"))
            .arg("tier")
            .arg("pro")
            .arg("ts")
            .arg(now_ms + (i / 1000) as i64)
            .ignore();
        if (i + 1) % 2000 == 0 || i + 1 == n {
            let _: () = pipe.query_async(&mut conn).await.expect("XADD batch");
            pipe = redis::pipe();
        }
    }
}

async fn wait_drained(env: &TestEnv, pg: &sqlx::PgPool, rows: i64) -> Duration {
    let started = Instant::now();
    loop {
        let b = backlog(env).await;
        if b.len == 0 && b.pending == 0 && total_rows(pg).await >= rows {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not drained after 300 s: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn journal_throughput() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 10).postgres("max_connections = 10");

    // 1. A backlog waiting at start (as after an outage): how fast is it drained?
    let t = Instant::now();
    xadd_synthetic(&env, "cold", ENTRIES).await;
    let xadd_time = t.elapsed();
    assert_eq!(backlog(&env).await.len, ENTRIES as u64);
    let started = Instant::now();
    let app = cfg.spawn().await;
    let pg = env.pg().await;
    let startup = started.elapsed();
    let drained = startup + wait_drained(&env, &pg, ENTRIES as i64).await;
    let cold_rate = ENTRIES as f64 / drained.as_secs_f64();
    eprintln!(
        "journal throughput, backlog at start: {ENTRIES} entries (XADD took {xadd_time:?}) \
         drained in {drained:?} (process start {startup:?}) = {cold_rate:.0} rows/s"
    );

    // 2. Entries arriving while it runs: from the first XADD until the backlog is 0.
    let started = Instant::now();
    xadd_synthetic(&env, "live", ENTRIES).await;
    let added = started.elapsed();
    let drained = added + wait_drained(&env, &pg, 2 * ENTRIES as i64).await;
    let live_rate = ENTRIES as f64 / drained.as_secs_f64();
    eprintln!(
        "journal throughput, live: {ENTRIES} entries XADDed in {added:?}, all in Postgres \
         {drained:?} after the first = {live_rate:.0} rows/s"
    );
    let text = app.metrics_text().await;
    for line in text
        .lines()
        .filter(|l| {
            l.starts_with("tollgate_journal_batch_duration_seconds_")
                || l.starts_with("tollgate_journal_entries_flushed_total")
        })
        .filter(|l| !l.contains("_bucket"))
    {
        eprintln!("  {line}");
    }
    let logs = app.logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    eprintln!("  {} warnings in the log", warnings.len());
    for w in warnings.iter().take(5) {
        eprintln!("  {}", &w[..w.len().min(300)]);
    }
    assert_eq!(total_rows(&pg).await, 2 * ENTRIES as i64);
}

/// A read whose reply misses the Redis response timeout (a big backlog after an outage) has
/// still delivered its entries to the flusher's consumer: they are read back from its own
/// pending list in smaller batches, not left for a claim (here an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_bigger_than_one_timely_reply_drains_without_waiting_for_claims() {
    const N: usize = 3_000;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    xadd_synthetic(&env, "big", N).await;
    let cfg = metered_config(&env, &up.url(), 3600).redis("timeout_ms = 100");
    let app = cfg.spawn().await;
    let pg = env.pg().await;
    let started = Instant::now();
    loop {
        let b = backlog(&env).await;
        let rows = total_rows(&pg).await;
        if b.len == 0 && b.pending == 0 && rows == N as i64 {
            break;
        }
        // Usually a few seconds; generous for a loaded machine (the reads that time out are
        // the point here), far from the hour a claim would take.
        if started.elapsed() > Duration::from_secs(40) {
            app.print_logs();
            panic!("not drained after 40 s: {b:?}, {rows} rows");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timeouts = app.logs().matches("reading the streams failed").count();
    eprintln!(
        "{N} entries drained in {:?} with {timeouts} timed-out reads",
        started.elapsed()
    );
}
