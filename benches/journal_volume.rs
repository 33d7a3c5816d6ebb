//! `cargo bench --bench journal_volume [-- --rows N --accounts N --months N --runs N]`: the
//! journal's queries on a large table (README: "Postgres at volume").
//!
//! On a throwaway database (`tg_bench_vol_*`, dropped at the end, also on a panic) migrated
//! like production, it generates `--rows` journal rows (default 10^7) over `--months` monthly
//! partitions (default 12, ending with this month) and `--accounts` accounts (default 10^4),
//! each month bulk-loaded with one `INSERT … SELECT generate_series` into its partition (built
//! detached with its indexes, then attached, as a restore would), then ANALYZEs and measures:
//!
//! - every journal read the admin API and the ledger run, through the same library functions
//!   (so the same SQL): usage totals and `group_by` over 30 days and a year, history first
//!   page, a deep page by cursor and a page under a tier's `history_days`, and the audit /
//!   hydration sums of an account; each `--runs` times on random accounts (median, p90), plus
//!   its `EXPLAIN (ANALYZE, BUFFERS)` shape: scan types, partitions scanned, buffers;
//! - the flusher's insert of a 1,000-entry batch into the big table, and the Postgres CPU per
//!   row of each write path (UNNEST … ON CONFLICT, COPY into staging + INSERT, COPY straight in,
//!   the flusher's `write_batch`), read from the backend's `/proc/<pid>/schedstat` (`--cpu-rows N`,
//!   default 200,000 rows per path);
//! - maintenance: `ensure_partitions` with nothing to do, creating a month whose rows sit in
//!   DEFAULT, and rolling the oldest month up (retention), also as a dry run;
//! - the upgrade: migration 0004 on another database holding the same rows in the old,
//!   unpartitioned table (skip with `--no-migration`).
//!
//! The revenue report (`GET /v1/reports/revenue`) reads the Stripe tables, not the journal, and
//! is not measured here. Full plans go to `target/journal_volume_plans.txt`.
//!
//! Environment: `TOLLGATE_TEST_PG_URL` (a Postgres URL allowed to CREATE/DROP DATABASE;
//! default `postgres://postgres@127.0.0.1:5432/postgres`), `TOLLGATE_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`; retention reads the, here empty, journal streams).

// A benchmark harness should stop loudly: a broken setup is a panic with the reason, not a number.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use tollgate::journal::partitions::{self, Month};
use tollgate::journal::usage::{self, GroupBy};

struct Args {
    rows: u64,
    accounts: u64,
    months: u32,
    runs: usize,
    /// Also time migration 0004 on an unpartitioned journal of `rows` rows.
    migration: bool,
    /// Rows written per write path when measuring Postgres CPU per row.
    cpu_rows: u64,
}

fn args() -> Args {
    let mut a = Args {
        rows: 10_000_000,
        accounts: 10_000,
        months: 12,
        runs: 25,
        migration: true,
        cpu_rows: 200_000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || {
            argv.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value", argv[i]))
                .replace('_', "")
        };
        match argv[i].as_str() {
            "--rows" => a.rows = value().parse().expect("--rows N"),
            "--accounts" => a.accounts = value().parse().expect("--accounts N"),
            "--months" => a.months = value().parse().expect("--months N"),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--cpu-rows" => a.cpu_rows = value().parse().expect("--cpu-rows N"),
            "--no-migration" => {
                a.migration = false;
                i += 1;
                continue;
            }
            // `cargo bench` passes --bench; criterion-style filters are ignored.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(a.months >= 3, "--months must be at least 3");
    assert!(a.accounts >= 1 && a.rows >= a.accounts);
    a
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.into())
}

fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The throwaway database, dropped on drop.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Database {
        let admin_url = env_or(
            "TOLLGATE_TEST_PG_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        );
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres (set TOLLGATE_TEST_PG_URL): {e}"));
        // Leftovers of killed runs (older than two hours).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'tg\\_bench\\_vol\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        let now = Utc::now().timestamp();
        for name in stale {
            let born = name
                .trim_start_matches("tg_bench_vol_")
                .split('_')
                .next()
                .and_then(|s| s.parse::<i64>().ok());
            if born.is_some_and(|b| now - b > 7200) {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
        let name = format!("tg_bench_vol_{now}_{}", random_id(8));
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin_url).expect("TOLLGATE_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        Database {
            admin_url,
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut c)
                            .await;
                }
            });
        });
        let _ = done.join();
        eprintln!("dropped database {}", self.name);
    }
}

/// A way of writing a journal batch, measured for Postgres CPU per row.
#[derive(Debug, Clone, Copy)]
enum WritePath {
    /// What the flusher runs (`tollgate::journal::write::write_batch`).
    Flusher,
    Unnest,
    CopyStaged,
    CopyDirect,
}

impl WritePath {
    fn label(self) -> &'static str {
        match self {
            WritePath::Flusher => "flusher's path (write_batch)",
            WritePath::Unnest => "INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING",
            WritePath::CopyStaged => {
                "binary COPY into temp staging + INSERT … SELECT … ON CONFLICT DO NOTHING"
            }
            WritePath::CopyDirect => "binary COPY straight into ledger_entries (no ON CONFLICT)",
        }
    }

    async fn write(
        self,
        conn: &mut sqlx::PgConnection,
        b: &[tollgate::journal::entry::JournalEntry],
    ) -> u64 {
        use tollgate::journal::write;
        if let WritePath::Flusher = self {
            return write::write_batch(conn, b).await.unwrap();
        }
        let mut tx = conn.begin().await.unwrap();
        let n = match self {
            WritePath::Unnest => write::insert_unnest(&mut tx, b).await.unwrap(),
            WritePath::CopyStaged => write::copy_staged(&mut tx, b).await.unwrap(),
            WritePath::CopyDirect => write::copy_direct(&mut tx, b).await.unwrap(),
            WritePath::Flusher => unreachable!(),
        };
        tx.commit().await.unwrap();
        n
    }
}

/// CPU time a process has run, in ns (`/proc/<pid>/schedstat`, first field: nanosecond
/// precision, unlike utime+stime in clock ticks); `None` if unreadable (another machine).
fn cpu_ns(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Postgres CPU per journal row of each write path: the CPU of the backend that runs the
/// writes (its pid's schedstat before and after `--cpu-rows` rows), plus the WAL writer,
/// background writer and checkpointer (shared by every database on the server: other load
/// shows up there, so it is reported apart). Needs Postgres on this machine.
async fn measure_write_cpu(pool: &PgPool, a: &Args, report: &mut String) {
    let background: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
          WHERE backend_type IN ('walwriter', 'background writer', 'checkpointer')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let bg_ns = || background.iter().filter_map(|p| cpu_ns(*p)).sum::<u64>();
    let _ = writeln!(
        report,
        "\n| journal write path ({} rows per path, synchronous_commit on) | batch | backend CPU µs/row | background CPU µs/row | wall µs/row |\n|---|---|---|---|---|",
        a.cpu_rows
    );
    let mut seq = 1_000_000u64;
    let paths = [
        (WritePath::Unnest, 1000),
        (WritePath::CopyStaged, 1000),
        (WritePath::CopyDirect, 1000),
        (WritePath::Unnest, 10_000),
        (WritePath::CopyStaged, 10_000),
        (WritePath::CopyDirect, 10_000),
        (WritePath::Flusher, 1000),
    ];
    for (path, size) in paths {
        let mut conn = pool.acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        if cpu_ns(pid).is_none() {
            let _ = writeln!(
                report,
                "| {} | {size} | (Postgres is not on this machine: /proc/{pid} unreadable) | | |",
                path.label()
            );
            continue;
        }
        // Warm-up: plans cached, the staging table created.
        seq += 1;
        path.write(&mut conn, &batch(size, seq, Utc::now(), a.accounts))
            .await;
        let batches = (a.cpu_rows as usize).div_ceil(size);
        let prepared: Vec<_> = (0..batches)
            .map(|_| {
                seq += 1;
                batch(size, seq, Utc::now(), a.accounts)
            })
            .collect();
        let (cpu0, bg0, t) = (cpu_ns(pid).unwrap(), bg_ns(), Instant::now());
        let mut written = 0;
        for b in &prepared {
            written += path.write(&mut conn, b).await;
        }
        let wall = t.elapsed();
        let (cpu1, bg1) = (cpu_ns(pid).unwrap(), bg_ns());
        assert_eq!(written, (batches * size) as u64, "{}", path.label());
        let rows = written as f64;
        let _ = writeln!(
            report,
            "| {} | {size} | {:.2} | {:.2} | {:.2} |",
            path.label(),
            (cpu1 - cpu0) as f64 / 1000.0 / rows,
            bg1.saturating_sub(bg0) as f64 / 1000.0 / rows,
            wall.as_secs_f64() * 1e6 / rows
        );
        // A re-delivery of the last batches (every row already stored) on the paths that
        // take one: what a flusher restart costs.
        if matches!(
            path,
            WritePath::Unnest | WritePath::CopyStaged | WritePath::Flusher
        ) {
            let again = &prepared[prepared.len().saturating_sub(10)..];
            let (cpu0, t) = (cpu_ns(pid).unwrap(), Instant::now());
            let mut n = 0;
            for b in again {
                n += b.len();
                assert_eq!(path.write(&mut conn, b).await, 0);
            }
            let _ = writeln!(
                report,
                "| … re-delivered (all conflicts) | {size} | {:.2} | | {:.2} |",
                (cpu_ns(pid).unwrap() - cpu0) as f64 / 1000.0 / n as f64,
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and 90th percentile (ms).
fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.9))
}

/// Account `n` of the generated set.
fn account(n: u64) -> String {
    format!("acct_{n:05}")
}

/// `rows` generated journal rows (global numbers from `first`) spread evenly over
/// [`month` start, `until`), in time order, on `accounts` random accounts: 85 % debits, then
/// settles, extends, refunds, grants, resets, subscriptions.
async fn insert_rows(
    conn: &mut sqlx::PgConnection,
    table: &str,
    month: Month,
    first: u64,
    rows: u64,
    accounts: u64,
    until: DateTime<Utc>,
) {
    sqlx::query(&format!(
        "INSERT INTO {table}
         SELECT md5(g::text) || ':' || k.kind,
                'acct_' || lpad((abs(hashint8(g)::bigint) % $3)::text, 5, '0'),
                k.kind,
                CASE k.kind WHEN 'refund' THEN -200000 WHEN 'debit' THEN 200000
                            WHEN 'settle' THEN -35000 WHEN 'extend' THEN 50000 ELSE 0 END,
                CASE k.kind WHEN 'refund' THEN 200000 WHEN 'debit' THEN -200000
                            WHEN 'settle' THEN 35000 WHEN 'extend' THEN -50000
                            WHEN 'reset' THEN 1000000 ELSE 0 END,
                CASE k.kind WHEN 'grant' THEN 5000000 ELSE 0 END,
                (g % 1000) * 10000, (g % 7) * 1000000,
                md5((g * 7)::text),
                (ARRAY['chat', 'tools', 'embed', 'voice', 'files'])[1 + g % 5],
                (ARRAY['ai_message', 'tool_call', 'embed', 'voice', 'upload'])[1 + g % 5],
                'pro',
                CASE WHEN k.kind = 'settle' THEN 100 + g % 900 END,
                CASE WHEN k.kind = 'settle' THEN 50 + g % 2000 END,
                CASE WHEN k.kind IN ('debit', 'settle') THEN 200 END,
                CASE WHEN k.kind = 'settle' THEN (g % 5000)::int END,
                CASE WHEN k.kind = 'settle' THEN 'usage' END,
                NULL, NULL,
                $4::timestamptz + ($5::timestamptz - $4::timestamptz) * ((g - $1)::float8 / $2)
           FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS g,
                LATERAL (SELECT CASE WHEN g % 100 < 85 THEN 'debit' WHEN g % 100 < 92 THEN 'settle'
                                     WHEN g % 100 < 95 THEN 'extend' WHEN g % 100 < 97 THEN 'refund'
                                     WHEN g % 100 < 98 THEN 'grant' WHEN g % 100 < 99 THEN 'reset'
                                     ELSE 'subscription' END AS kind) k"
    ))
    .bind(first as i64)
    .bind(rows as i64)
    .bind(accounts as i64)
    .bind(month.start())
    .bind(until)
    .execute(conn)
    .await
    .unwrap();
}

/// Bulk-loads one month: a detached table with the parent's shape, `rows` rows spread evenly
/// over the month (up to `until`) in time order (the order the flusher appends them), random accounts, then
/// the two indexes, then ATTACH (which adopts them).
async fn load_month(
    pool: &PgPool,
    month: Month,
    first: u64,
    rows: u64,
    accounts: u64,
    until: DateTime<Utc>,
) {
    let name = month.partition_name();
    let end = month.plus(1).expect("a next month");
    let until = until.min(end.start());
    let staging = format!("{name}_load");
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE {staging} (LIKE ledger_entries);
         SET maintenance_work_mem = '512MB';"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    insert_rows(&mut conn, &staging, month, first, rows, accounts, until).await;
    sqlx::raw_sql(&format!(
        "ALTER TABLE {staging} ADD CONSTRAINT {name}_pkey PRIMARY KEY (entry_id, created_at);
         CREATE INDEX {name}_account_id_created_at_entry_id_idx
             ON {staging} (account_id, created_at DESC, entry_id DESC);
         ALTER TABLE {staging} RENAME TO {name};
         ALTER TABLE ledger_entries ATTACH PARTITION {name}
             FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00');",
        month.start().format("%Y-%m-%d"),
        end.start().format("%Y-%m-%d"),
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
}

/// A plan's shape, from `EXPLAIN (ANALYZE, BUFFERS)` text: scans by type, the partitions
/// scanned, run-time pruning, the top node's buffers and the execution time.
fn plan_shape(lines: &[String]) -> String {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    let mut parts = std::collections::BTreeSet::new();
    let mut removed = 0;
    let mut buffers = None;
    let mut time = String::new();
    for line in lines {
        let l = line.trim().trim_start_matches("->").trim();
        if let Some(n) = l.strip_prefix("Subplans Removed:") {
            removed += n.trim().parse::<i64>().unwrap_or(0);
        }
        if let Some(b) = l.strip_prefix("Buffers:") {
            buffers.get_or_insert_with(|| b.trim().to_string());
        }
        if let Some(t) = l.strip_prefix("Execution Time:") {
            time = t.trim().to_string();
        }
        let head = l.split("  (").next().unwrap_or_default();
        if head.contains("Scan") {
            let node = head
                .split(" using ")
                .next()
                .unwrap_or_default()
                .split(" on ")
                .next()
                .unwrap_or_default()
                .to_string();
            *kinds.entry(node).or_default() += 1;
            if let Some(rel) = head.split(" on ").nth(1) {
                let rel = rel.split_whitespace().next().unwrap_or_default();
                if Month::from_partition_name(rel).is_some() || rel == "ledger_entries_default" {
                    parts.insert(rel.to_string());
                }
            }
        }
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n}× {k}")).collect();
    format!(
        "{}; {} partition(s){}; buffers {}; {time}",
        kinds.join(", "),
        parts.len(),
        if removed > 0 {
            format!(" ({removed} pruned at run time)")
        } else {
            String::new()
        },
        buffers.unwrap_or_else(|| "-".into()),
    )
}

/// One journal read: how to run it through the library, and its SQL and binds for EXPLAIN.
#[derive(Clone, Copy)]
enum Read {
    Usage30d(Option<GroupBy>),
    UsageYear,
    HistoryFirst,
    HistoryDeep,
    HistoryLimited,
    Sums,
}

impl Read {
    fn label(self) -> &'static str {
        match self {
            Read::Usage30d(None) => "usage, 30 days (default)",
            Read::Usage30d(Some(GroupBy::Day)) => "usage group_by=day, 30 days",
            Read::Usage30d(Some(GroupBy::Route)) => "usage group_by=route, 30 days",
            Read::Usage30d(Some(GroupBy::Action)) => "usage group_by=action, 30 days",
            Read::UsageYear => "usage, 365 days",
            Read::HistoryFirst => "history, first page (50)",
            Read::HistoryDeep => "history, page 10 by cursor",
            Read::HistoryLimited => "history, first page, history_days = 90",
            Read::Sums => "audit / hydration sums (all months)",
        }
    }
}

/// The cursor of page 10 of an account's history (pages of 50), or of its last page when it
/// has fewer (small `--rows` runs).
async fn deep_cursor(pool: &PgPool, acct: &str) -> Option<(DateTime<Utc>, String)> {
    let mut cursor = None;
    for _ in 0..9 {
        let (_, next) = usage::history(pool, acct, 50, cursor.clone(), None)
            .await
            .unwrap();
        match next.and_then(|n| usage::decode_cursor(&n)) {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    cursor
}

async fn run(pool: &PgPool, read: Read, acct: &str, now: DateTime<Utc>) -> Duration {
    let month_ago = now - TimeDelta::days(30);
    match read {
        Read::HistoryDeep => {
            let cursor = deep_cursor(pool, acct).await;
            let t = Instant::now();
            usage::history(pool, acct, 50, cursor, None).await.unwrap();
            t.elapsed()
        }
        _ => {
            let t = Instant::now();
            match read {
                Read::Usage30d(g) => {
                    usage::usage(pool, acct, month_ago, now, g).await.unwrap();
                }
                Read::UsageYear => {
                    usage::usage(pool, acct, now - TimeDelta::days(365), now, None)
                        .await
                        .unwrap();
                }
                Read::HistoryFirst => {
                    usage::history(pool, acct, 50, None, None).await.unwrap();
                }
                Read::HistoryLimited => {
                    usage::history(pool, acct, 50, None, Some(now - TimeDelta::days(90)))
                        .await
                        .unwrap();
                }
                Read::Sums => {
                    tollgate::journal::audit::journal_view(pool, acct, &[])
                        .await
                        .unwrap();
                }
                Read::HistoryDeep => {}
            }
            t.elapsed()
        }
    }
}

async fn explain(pool: &PgPool, read: Read, acct: &str, now: DateTime<Utc>) -> (String, String) {
    let month_ago = now - TimeDelta::days(30);
    let text = |sql: &str| format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
    macro_rules! both {
        ($sql:expr, $($b:expr),*) => {{
            let sql: String = $sql;
            let lines: Vec<String> = sqlx::query_scalar(&text(&sql))$(.bind($b))*.fetch_all(pool).await.unwrap();
            (plan_shape(&lines), lines.join("\n"))
        }};
    }
    match read {
        Read::Usage30d(g) => both!(usage::usage_sql(g), acct, month_ago, now),
        Read::UsageYear => both!(
            usage::usage_sql(None),
            acct,
            now - TimeDelta::days(365),
            now
        ),
        Read::HistoryFirst => both!(usage::history_sql(false, false), acct, 51i64),
        Read::HistoryDeep => {
            let (at, id) = deep_cursor(pool, acct).await.expect("more than one page of history");
            both!(usage::history_sql(true, false), acct, at, id.clone(), 51i64)
        }
        Read::HistoryLimited => both!(
            usage::history_sql(false, true),
            acct,
            now - TimeDelta::days(90),
            51i64
        ),
        // The statement of `journal::audit::journal_view`, which the hydration also runs.
        Read::Sums => both!(
            "SELECT count(*), COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT,
                    COALESCE(array_agg(entry_id) FILTER (WHERE entry_id = ANY($2)), '{}')
               FROM ledger_entries WHERE account_id = $1"
                .to_string(),
            acct,
            Vec::<String>::new()
        ),
    }
}

fn batch(
    n: usize,
    seq: u64,
    now: DateTime<Utc>,
    accounts: u64,
) -> Vec<tollgate::journal::entry::JournalEntry> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let id = format!("bench:{seq}:{i}:{}", random_id(12));
            tollgate::journal::entry::JournalEntry {
                stream_id: format!("{seq}-{i}"),
                entry_id: format!("{id}:debit"),
                account_id: account(rng.random_range(0..accounts)),
                kind: "debit".into(),
                amount: 200_000,
                d_allowance: -200_000,
                d_purchased: 0,
                allowance_after: 1_000_000,
                purchased_after: 0,
                request_id: Some(id),
                route: Some("chat".into()),
                action: Some("ai_message".into()),
                tier: Some("pro".into()),
                tokens_in: None,
                tokens_out: None,
                upstream_status: Some(200),
                duration_ms: Some(120),
                reason: None,
                period_start: None,
                period_end: None,
                created_at: now - TimeDelta::milliseconds(rng.random_range(0..60_000)),
            }
        })
        .collect()
}

async fn size(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(sum(pg_table_size(inhrelid)), 0)::BIGINT,
                COALESCE(sum(pg_indexes_size(inhrelid)), 0)::BIGINT,
                (SELECT count(*) FROM ledger_entries)
           FROM pg_inherits WHERE inhparent = 'ledger_entries'::regclass",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Migration 0004 on a journal that already holds `a.rows` rows in the old, unpartitioned
/// table (migrations 1-3 applied, the rows loaded, its indexes built): one table row.
async fn measure_migration(a: &Args, months: &[Month], now: DateTime<Utc>) -> String {
    let db = Database::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(600))
        .connect(&db.url)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sql") && name.as_str() < "0004" {
            std::fs::copy(f.path(), dir.path().join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(dir.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_pkey;
         DROP INDEX ledger_entries_account_time_idx;
         DROP INDEX ledger_entries_time_idx;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let per_month = a.rows / u64::from(a.months);
    let indexed: Vec<(usize, Month)> = months.iter().copied().enumerate().collect();
    for pair in indexed.chunks(2) {
        futures_util::future::join_all(pair.iter().map(|(i, m)| {
            let pool = pool.clone();
            let rows = if i + 1 == months.len() {
                a.rows - per_month * (u64::from(a.months) - 1)
            } else {
                per_month
            };
            let (i, m, accounts) = (*i, *m, a.accounts);
            async move {
                let mut conn = pool.acquire().await.unwrap();
                let until = now.min(m.plus(1).unwrap().start());
                insert_rows(
                    &mut conn,
                    "ledger_entries",
                    m,
                    per_month * i as u64,
                    rows,
                    accounts,
                    until,
                )
                .await;
            }
        }))
        .await;
    }
    // The indexes of migration 0002.
    sqlx::raw_sql(
        "SET maintenance_work_mem = '512MB';
         ALTER TABLE ledger_entries ADD PRIMARY KEY (entry_id, created_at);
         CREATE INDEX ledger_entries_account_time_idx
             ON ledger_entries (account_id, created_at DESC, entry_id DESC);
         CREATE INDEX ledger_entries_time_idx ON ledger_entries (created_at);
         ANALYZE ledger_entries;",
    )
    .execute(&mut *pool.acquire().await.unwrap())
    .await
    .unwrap();
    let t = Instant::now();
    tollgate::store::migrate(&pool).await.unwrap();
    let took = t.elapsed();
    let (_, _, count) = size(&pool).await;
    assert_eq!(count as u64, a.rows, "every row migrated");
    let parts = partitions::list_months(&pool).await.unwrap().len();
    pool.close().await;
    drop(db);
    format!(
        "| migration 0004 on an unpartitioned journal of {count} rows | {:.1} s | rows copied into {parts} monthly partitions, then the indexes built; the journal is locked meanwhile |",
        took.as_secs_f64()
    )
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(bench(a));
}

async fn bench(a: Args) {
    let db = Database::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(600))
        .connect(&db.url)
        .await
        .unwrap();
    let mut report = String::new();
    let mut plans = String::new();
    let server: (String, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('shared_buffers'),
                current_setting('work_mem')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let _ = writeln!(
        report,
        "journal_volume: {} rows, {} accounts, {} months; PostgreSQL {} (shared_buffers {}, work_mem {}), {} CPUs",
        a.rows,
        a.accounts,
        a.months,
        server.0,
        server.1,
        server.2,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let t = Instant::now();
    tollgate::store::migrate(&pool).await.unwrap();
    let _ = writeln!(
        report,
        "\nmigrate (empty database): {:.0} ms",
        ms(t.elapsed())
    );

    // Accounts (the audit lists them) and the months: the oldest first, this one last. The
    // migration created this month and the next two; the older ones are loaded detached.
    let now = Utc::now();
    sqlx::query(
        "INSERT INTO accounts (id, tier, period_start, period_end)
         SELECT 'acct_' || lpad(n::text, 5, '0'), 'pro', now(), now() + interval '1 month'
           FROM generate_series(0, $1 - 1) AS n",
    )
    .bind(a.accounts as i64)
    .execute(&pool)
    .await
    .unwrap();
    let this = Month::of(now).unwrap();
    let months: Vec<Month> = (0..a.months)
        .rev()
        .map(|k| Month::of(now.checked_sub_months(chrono::Months::new(k)).unwrap()).unwrap())
        .collect();
    let per_month = a.rows / u64::from(a.months);
    let t = Instant::now();
    let load = |i: usize, m: Month| {
        let pool = pool.clone();
        let rows = if i + 1 == months.len() {
            a.rows - per_month * (u64::from(a.months) - 1)
        } else {
            per_month
        };
        let first = per_month * i as u64;
        let accounts = a.accounts;
        async move {
            if m == this {
                // The migration created this month's partition, empty: replaced by a loaded
                // one whose rows stop at `now`.
                let name = m.partition_name();
                sqlx::raw_sql(&format!(
                    "ALTER TABLE ledger_entries DETACH PARTITION {name}; DROP TABLE {name};"
                ))
                .execute(&pool)
                .await
                .unwrap();
            }
            load_month(&pool, m, first, rows, accounts, now).await;
        }
    };
    // Two months at a time (this machine's CPUs), oldest first.
    let indexed: Vec<(usize, Month)> = months.iter().copied().enumerate().collect();
    for pair in indexed.chunks(2) {
        futures_util::future::join_all(pair.iter().map(|(i, m)| load(*i, *m))).await;
    }
    let load_time = t.elapsed();
    let t = Instant::now();
    sqlx::raw_sql("ANALYZE ledger_entries; ANALYZE accounts;")
        .execute(&pool)
        .await
        .unwrap();
    let analyze = t.elapsed();
    let (table, indexes, count) = size(&pool).await;
    let _ = writeln!(
        report,
        "generated {count} rows in {:.1} s (INSERT … SELECT generate_series + index build + ATTACH per month), ANALYZE {:.1} s; table {:.0} MiB, indexes {:.0} MiB",
        load_time.as_secs_f64(),
        analyze.as_secs_f64(),
        table as f64 / 1048576.0,
        indexes as f64 / 1048576.0
    );

    // Reads: a warm-up pass, then `runs` random accounts per read.
    let reads = [
        Read::Usage30d(None),
        Read::Usage30d(Some(GroupBy::Day)),
        Read::Usage30d(Some(GroupBy::Route)),
        Read::Usage30d(Some(GroupBy::Action)),
        Read::UsageYear,
        Read::HistoryFirst,
        Read::HistoryDeep,
        Read::HistoryLimited,
        Read::Sums,
    ];
    let _ = writeln!(
        report,
        "\n| query (one account, ~{} rows each) | median | p90 | plan (EXPLAIN ANALYZE, BUFFERS) |\n|---|---|---|---|",
        a.rows / a.accounts
    );
    let pick = || account(rand::rng().random_range(0..a.accounts));
    for read in reads {
        for _ in 0..3 {
            run(&pool, read, &pick(), now).await;
        }
        let mut times = Vec::new();
        for _ in 0..a.runs {
            times.push(run(&pool, read, &pick(), now).await);
        }
        let (p50, p90) = stats(times);
        let acct = pick();
        let (shape, text) = explain(&pool, read, &acct, now).await;
        let _ = writeln!(
            report,
            "| {} | {p50:.2} ms | {p90:.2} ms | {shape} |",
            read.label()
        );
        let _ = writeln!(plans, "== {} ({acct})\n{text}\n", read.label());
    }

    // The flusher's insert: batches of 1,000 debits of the last minute.
    let mut times = Vec::new();
    for seq in 0..a.runs as u64 {
        let b = batch(1000, seq, Utc::now(), a.accounts);
        let t = Instant::now();
        let n = tollgate::journal::write::insert_batch(&pool, &b)
            .await
            .unwrap();
        times.push(t.elapsed());
        assert_eq!(n, 1000);
    }
    let (p50, p90) = stats(times);
    let _ = writeln!(
        report,
        "| flusher insert, 1,000 entries (ON CONFLICT DO NOTHING) | {p50:.2} ms | {p90:.2} ms | {:.0} rows/s at the median |",
        1000.0 / (p50 / 1000.0)
    );

    measure_write_cpu(&pool, &a, &mut report).await;

    // Maintenance.
    let _ = writeln!(report, "\n| maintenance | time | what |\n|---|---|---|");
    let t = Instant::now();
    let r = partitions::ensure_partitions(&pool, now).await.unwrap();
    let _ = writeln!(
        report,
        "| ensure_partitions, all present | {:.1} ms | created {:?} |",
        ms(t.elapsed()),
        r.created
    );
    // Rows for a month without a partition land in DEFAULT; maintenance moves them.
    let stray = this.plus(3).unwrap();
    let stray_rows = (per_month / 10).max(1);
    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance, d_purchased,
             allowance_after, purchased_after, created_at)
         SELECT 'stray:' || g, 'acct_' || lpad((g % $2)::text, 5, '0'), 'debit', 1, -1, 0, 0, 0,
                $3::timestamptz + g * interval '1 second'
           FROM generate_series(1, $1) AS g",
    )
    .bind(stray_rows as i64)
    .bind(a.accounts as i64)
    .bind(stray.start())
    .execute(&pool)
    .await
    .unwrap();
    let t = Instant::now();
    let r = partitions::ensure_partitions(&pool, now).await.unwrap();
    let _ = writeln!(
        report,
        "| ensure_partitions, {stray_rows} rows in DEFAULT | {:.0} ms | created {:?}, moved {} rows |",
        ms(t.elapsed()),
        r.created,
        r.moved_from_default
    );
    // Retention of the oldest month: `now` placed so that exactly that month is due.
    let oldest = months[0];
    let second = oldest.plus(1).unwrap();
    let fake_now = second.start() + TimeDelta::days(2);
    let redis_url = env_or("TOLLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis (set TOLLGATE_TEST_REDIS_URL)");
    let prefix = format!("bench{}", random_id(8));
    let t = Instant::now();
    let dry = partitions::prune(&pool, &mut redis, &prefix, 64, 1, fake_now, true)
        .await
        .unwrap();
    let _ = writeln!(
        report,
        "| prune --dry-run, oldest month | {:.0} ms | {} |",
        ms(t.elapsed()),
        dry.to_string().trim()
    );
    let sums_before: (i64, i64) = sqlx::query_as(
        "SELECT sum(d_allowance)::BIGINT, sum(d_purchased)::BIGINT FROM ledger_entries",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let t = Instant::now();
    let done = partitions::prune(&pool, &mut redis, &prefix, 64, 1, fake_now, false)
        .await
        .unwrap();
    let _ = writeln!(
        report,
        "| prune, oldest month ({} rows) | {:.0} ms | {} |",
        done.rolled_up.first().map_or(0, |r| r.rows),
        ms(t.elapsed()),
        done.to_string().trim()
    );
    let sums_after: (i64, i64) = sqlx::query_as(
        "SELECT sum(d_allowance)::BIGINT, sum(d_purchased)::BIGINT FROM ledger_entries",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        sums_before, sums_after,
        "retention changed the journal's sums"
    );
    let (table, indexes, count) = size(&pool).await;
    let _ = writeln!(
        report,
        "\nafter: {count} rows, table {:.0} MiB, indexes {:.0} MiB; journal sums unchanged",
        table as f64 / 1048576.0,
        indexes as f64 / 1048576.0
    );

    pool.close().await;
    drop(db);
    if a.migration {
        let row = measure_migration(&a, &months, now).await;
        let _ = writeln!(report, "\n| upgrade | time | what |\n|---|---|---|\n{row}");
    }

    println!("{report}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/journal_volume_plans.txt");
    if std::fs::write(&path, &plans).is_ok() {
        println!("plans: {}", path.display());
    }
}
