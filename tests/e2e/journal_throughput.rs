//! The flusher drains the shard streams into Postgres: a backlog waiting at start and entries
//! arriving while it runs are all stored, each once (checked in the normal suite on a small
//! volume); a read that times out is read back from the consumer's own pending list.
//!
//! How fast it drains is a measurement, not a check (`#[ignore]`: run it with
//! `cargo test --release --test e2e -- --ignored --nocapture journal_throughput`).

use std::time::{Duration, Instant};

use crate::harness::{poll_until, TestEnv};
use crate::journal_util::{
    backlog, metered_config, redis_to_json, shard_of, stream_key, total_rows, SHARDS,
};
use crate::ledger_util::{GateMode, RedisGate};
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

/// The row counts the throughput measurement ends with, on a volume the normal suite can
/// afford: a backlog waiting at start, then entries arriving while it runs, each stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_at_start_and_entries_arriving_live_are_each_stored_once() {
    const N: usize = 2_000;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = metered_config(&env, &up.url(), 10).postgres("max_connections = 10");
    xadd_synthetic(&env, "cold", N).await;
    assert_eq!(backlog(&env).await.len, N as u64);
    let app = cfg.spawn().await;
    let pg = env.pg().await;
    wait_drained(&env, &pg, N as i64).await;
    assert_eq!(total_rows(&pg).await, N as i64);
    xadd_synthetic(&env, "live", N).await;
    wait_drained(&env, &pg, 2 * N as i64).await;
    assert_eq!(total_rows(&pg).await, 2 * N as i64);
    drop(app);
}

/// A measurement, not a check: its row counts are checked by the test above on a small
/// volume; 2 × 50,000 entries take too long for the normal suite on a slow machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (rows/s); run by hand"]
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

/// A read whose reply misses the Redis response timeout (a big backlog after an outage, or a
/// reply lost on the way) has still delivered its entries to the flusher's consumer: they are
/// read back from its own pending list, not left for a claim (here an hour away).
///
/// Made deterministic: a relay drops Redis's replies to tollgate, so its reads fail; meanwhile
/// the test delivers the backlog to the flusher's consumer exactly as a read whose reply was
/// lost does (XREADGROUP under its consumer name). Then replies flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_by_a_read_whose_reply_was_lost_are_read_back_without_a_claim() {
    const N: usize = 3_000;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let app = metered_config(&env, &up.url(), 3600)
        .redis_url(gate.url())
        .redis("timeout_ms = 300")
        .spawn()
        .await;
    let pg = env.pg().await;
    let mut conn = env.redis().await;
    let streams: Vec<String> = (0..SHARDS).map(|s| stream_key(env.prefix(), s)).collect();

    // The flusher's consumer, once it has read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let consumer = loop {
        let r: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&streams[0])
            .arg("tollgate-journal")
            .query_async(&mut conn)
            .await;
        let name = r.ok().map(redis_to_json).and_then(|v| {
            let fields = v.as_array()?.first()?.as_array()?.clone();
            let at = fields.iter().position(|f| f == "name")?;
            fields.get(at + 1)?.as_str().map(str::to_string)
        });
        if let Some(name) = name {
            break name;
        }
        assert!(Instant::now() < deadline, "the flusher never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Replies are lost: tollgate's reads fail.
    gate.set(GateMode::MuteReplies);
    let failed = poll_until(Duration::from_secs(20), || async {
        app.logs().contains("reading the streams failed")
    })
    .await;
    assert!(failed, "no read failed while the replies were lost");

    // What a read whose reply was lost leaves: the entries delivered to the flusher's consumer.
    xadd_synthetic(&env, "big", N).await;
    for stream in &streams {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("tollgate-journal")
            .arg(&consumer)
            .arg("COUNT")
            .arg(N)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("XREADGROUP as the flusher's consumer");
    }
    let b = backlog(&env).await;
    assert_eq!((b.len, b.pending), (N as u64, N as u64));
    assert_eq!(total_rows(&pg).await, 0);

    // Replies flow again: the pending entries are read back and stored, each once, long
    // before a claim could take them.
    gate.set(GateMode::Up);
    let drained = poll_until(Duration::from_secs(40), || async {
        let b = backlog(&env).await;
        b.len == 0 && b.pending == 0 && total_rows(&pg).await == N as i64
    })
    .await;
    if !drained {
        app.print_logs();
    }
    assert!(
        drained,
        "not drained: {:?}, {} rows",
        backlog(&env).await,
        total_rows(&pg).await
    );
}
