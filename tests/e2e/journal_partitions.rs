//! The journal at volume: `ledger_entries` partitioned by month with a DEFAULT partition
//! (migration 0004), partition maintenance (`journal::partitions`: next months created
//! ahead, idempotently and concurrently; rows that landed in DEFAULT moved to their month) and
//! retention (`history_days`: old months rolled up into `carry_forward` entries and dropped,
//! balance = sum of entries and `ledger audit` intact; the API hides what the tier does not
//! keep).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Months, SecondsFormat, TimeDelta, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::journal::partitions::{self, Month};

use crate::harness::{passthrough_toml, TestEnv};
use crate::journal_util::{
    account_stream, assert_balance_is_journal_sum, assert_caught_up, call_ok, journal, ledger_cmd,
    metered_config, micros, rows_with_id, wait_journal, xadd, SHARDS,
};
use crate::upstream::FakeUpstream;

const DEFAULT_PARTITION: &str = "ledger_entries_default";

/// Names of the partitions of `ledger_entries` (DEFAULT included), sorted.
async fn partition_names(pg: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'ledger_entries'::regclass ORDER BY 1",
    )
    .fetch_all(pg)
    .await
    .unwrap()
}

/// The partition that holds an entry.
async fn partition_of(pg: &sqlx::PgPool, entry_id: &str) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::TEXT FROM ledger_entries WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_one(pg)
        .await
        .unwrap_or_else(|e| panic!("entry {entry_id}: {e}"))
}

async fn count_in(pg: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pg)
        .await
        .unwrap()
}

/// The month `k` months before (negative: after) `now`.
fn month_off(now: DateTime<Utc>, k: i32) -> Month {
    let t = if k >= 0 {
        now.checked_sub_months(Months::new(k as u32))
    } else {
        now.checked_add_months(Months::new((-k) as u32))
    };
    Month::of(t.unwrap()).unwrap()
}

/// An instant inside `month` (its 3rd day, plus `i` minutes).
fn inside(month: Month, i: i64) -> DateTime<Utc> {
    month.start() + TimeDelta::days(2) + TimeDelta::minutes(i)
}

/// The stream fields of a journal entry as the ledger scripts write them.
fn entry(
    account: &str,
    id: &str,
    kind: &str,
    d_purchased: i64,
    purchased_after: i64,
    at: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    vec![
        ("id", id.to_string()),
        ("acct", account.to_string()),
        ("kind", kind.to_string()),
        ("amount", (-d_purchased).max(0).to_string()),
        ("d_allow", "0".into()),
        ("d_purch", d_purchased.to_string()),
        ("allow", "0".into()),
        ("purch", purchased_after.to_string()),
        ("req", id.to_string()),
        ("route", "chat".into()),
        ("action", "ai_message".into()),
        ("tier", "pro".into()),
        ("ts", at.timestamp_millis().to_string()),
    ]
}

/// An account that exists in Postgres only (never loaded in Redis): its balance is whatever
/// its journal says once it is hydrated.
async fn dormant_account(pg: &sqlx::PgPool, id: &str) {
    tollgate::store::accounts::create(pg, id, "pro")
        .await
        .unwrap()
        .expect("a new account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_partitions_the_journal_by_month() {
    let env = TestEnv::new().await;
    let cfg = env.config().toml(passthrough_toml("http://127.0.0.1:9"));
    let out = cfg.run_subcommand("migrate", Duration::from_secs(60)).await;
    assert!(out.success(), "{out}");
    let pg = env.pg().await;

    let kind: String = sqlx::query_scalar(
        "SELECT relkind::TEXT FROM pg_class WHERE oid = 'ledger_entries'::regclass",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(kind, "p", "ledger_entries is a partitioned table");
    let key: String = sqlx::query_scalar("SELECT pg_get_partkeydef('ledger_entries'::regclass)")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(key, "RANGE (created_at)");
    let pk: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conrelid = 'ledger_entries'::regclass AND contype = 'p'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(pk, "PRIMARY KEY (entry_id, created_at)");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'ledger_entries' ORDER BY 1",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(
        indexes
            .iter()
            .any(|i| i.contains("(account_id, created_at DESC, entry_id DESC)")),
        "{indexes:?}"
    );

    // DEFAULT, this month and the next two.
    let now = Utc::now();
    let names = partition_names(&pg).await;
    let mut expected: Vec<String> = (0..3)
        .map(|k| month_off(now, -k).partition_name())
        .collect();
    expected.push(DEFAULT_PARTITION.into());
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(
        partitions::list_months(&pg).await.unwrap(),
        (0..3).map(|k| month_off(now, -k)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_any_month_are_flushed_deduped_and_moved_out_of_default() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = metered_config(&env, &up.url(), 1).spawn().await;
    let pg = env.pg().await;
    let account = "dormant_flush";
    dormant_account(&pg, account).await;
    let now = Utc::now();

    // (entry id, Δ purchased, when): two months without a partition in the past, this month,
    // next month (created ahead by the migration) and one far ahead without a partition.
    let plan: Vec<(String, i64, DateTime<Utc>)> = vec![
        (
            format!("{account}:a:grant"),
            10_000_000,
            inside(month_off(now, 14), 0),
        ),
        (
            format!("{account}:b:debit"),
            -1_000_000,
            inside(month_off(now, 3), 5),
        ),
        (
            format!("{account}:c:debit"),
            -500_000,
            now - TimeDelta::seconds(5),
        ),
        (
            format!("{account}:d:grant"),
            2_000_000,
            inside(month_off(now, -1), 0),
        ),
        (
            format!("{account}:e:debit"),
            -250_000,
            inside(month_off(now, -6), 0),
        ),
    ];
    let mut after = 0;
    let fields: Vec<Vec<(&'static str, String)>> = plan
        .iter()
        .map(|(id, d, at)| {
            after += d;
            let kind = id.rsplit(':').next().unwrap();
            entry(account, id, kind, *d, after, *at)
        })
        .collect();
    let stream = account_stream(&env, account);
    let mut conn = env.redis().await;
    for f in &fields {
        xadd(&mut conn, &stream, f).await;
    }
    wait_journal(&pg, account, Duration::from_secs(10), |j| j.rows == 5).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let where_now: Vec<String> = {
        let mut v = Vec::new();
        for (id, _, _) in &plan {
            v.push(partition_of(&pg, id).await);
        }
        v
    };
    assert_eq!(
        where_now,
        vec![
            DEFAULT_PARTITION.to_string(),
            DEFAULT_PARTITION.into(),
            month_off(now, 0).partition_name(),
            month_off(now, -1).partition_name(),
            DEFAULT_PARTITION.into(),
        ]
    );

    // Re-delivered: stored once, in DEFAULT as in the monthly partitions.
    for f in &fields {
        xadd(&mut conn, &stream, f).await;
    }
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    for (id, _, _) in &plan {
        assert_eq!(rows_with_id(&pg, id).await, 1, "{id}");
    }
    assert_eq!(journal(&pg, account).await.rows, 5);

    // Maintenance gives the DEFAULT rows their months.
    let report = partitions::ensure_partitions(&pg, now).await.unwrap();
    let created: BTreeSet<String> = report.created.iter().cloned().collect();
    for k in [14, 3, -6] {
        assert!(
            created.contains(&month_off(now, k).partition_name()),
            "{report:?}"
        );
    }
    assert_eq!(report.moved_from_default, 3, "{report:?}");
    assert_eq!(count_in(&pg, DEFAULT_PARTITION).await, 0);
    for (id, _, at) in &plan {
        assert_eq!(
            partition_of(&pg, id).await,
            Month::of(*at).unwrap().partition_name(),
            "{id}"
        );
    }
    // Idempotent.
    let again = partitions::ensure_partitions(&pg, now).await.unwrap();
    assert!(again.created.is_empty(), "{again:?}");
    assert_eq!(again.moved_from_default, 0);

    // Re-delivered once more, now that they live in their months: still once.
    for f in &fields {
        xadd(&mut conn, &stream, f).await;
    }
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    let j = journal(&pg, account).await;
    assert_eq!(j.rows, 5, "{j:?}");
    assert_eq!(j.sum_purchased, 10_250_000, "{j:?}");
    // Hydrated from the journal: the balance is its sum.
    assert_balance_is_journal_sum(&app, &pg, account).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_creates_partitions_once_when_two_processes_run_it_at_once() {
    let env = TestEnv::new().await;
    let cfg = env.config().toml(passthrough_toml("http://127.0.0.1:9"));
    let out = cfg.run_subcommand("migrate", Duration::from_secs(60)).await;
    assert!(out.success(), "{out}");
    let (pg1, pg2) = (env.pg().await, env.pg().await);

    // Rows of a month without a partition wait in DEFAULT.
    let now = Utc::now();
    let stray = month_off(now, 20);
    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance,
             d_purchased, allowance_after, purchased_after, created_at)
         SELECT 'stray:' || i, 'acct_stray', 'grant', 0, 0, 1, 0, i, $1 + i * interval '1 second'
           FROM generate_series(1, 100) AS i",
    )
    .bind(stray.start())
    .execute(&pg1)
    .await
    .unwrap();
    assert_eq!(count_in(&pg1, DEFAULT_PARTITION).await, 100);

    // Two years on: three months to create, from two "processes" at once.
    let later = now.checked_add_months(Months::new(24)).unwrap();
    let (a, b) = tokio::join!(
        partitions::ensure_partitions(&pg1, later),
        partitions::ensure_partitions(&pg2, later)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut all: Vec<String> = a.created.iter().chain(&b.created).cloned().collect();
    all.sort();
    let mut expected: Vec<String> = (0..3)
        .map(|k| month_off(later, -k).partition_name())
        .chain([stray.partition_name()])
        .collect();
    expected.sort();
    assert_eq!(
        all, expected,
        "each partition created exactly once: {a:?} {b:?}"
    );
    assert_eq!(a.moved_from_default + b.moved_from_default, 100);
    assert_eq!(count_in(&pg1, DEFAULT_PARTITION).await, 0);
    assert_eq!(count_in(&pg1, &stray.partition_name()).await, 100);

    let names = partition_names(&pg1).await;
    for name in &expected {
        assert!(names.contains(name), "{name} attached: {names:?}");
    }
    // Again: nothing to do.
    let (a, b) = tokio::join!(
        partitions::ensure_partitions(&pg1, later),
        partitions::ensure_partitions(&pg2, later)
    );
    assert!(a.unwrap().created.is_empty() && b.unwrap().created.is_empty());
    assert_eq!(partition_names(&pg1).await, names);
}

/// Tiers `pro` (history_days = 40) and `free` (history_days = 10): the journal keeps 40 days.
fn retention_toml(upstream_url: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream_url}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
action = "ai_message"
cost = 0.25
refund_on = ["connect_error", "5xx"]

[tiers.pro]
monthly_credits = 1000
history_days = 40

[tiers.free]
monthly_credits = 2
history_days = 10

[journal]
claim_idle_seconds = 1
"#
    )
}

/// Sets the date of an entry (moving it to another partition).
async fn redate(pg: &sqlx::PgPool, entry_id: &str, at: DateTime<Utc>) {
    let n = sqlx::query("UPDATE ledger_entries SET created_at = $2 WHERE entry_id = $1")
        .bind(entry_id)
        .bind(at)
        .execute(pg)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1, "{entry_id}");
}

async fn entry_ids(pg: &sqlx::PgPool, account: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT entry_id FROM ledger_entries WHERE account_id = $1 ORDER BY created_at, entry_id",
    )
    .bind(account)
    .fetch_all(pg)
    .await
    .unwrap()
}

/// (Δ allowance, Δ purchased) summed, and the last row's (allowance_after, purchased_after),
/// of an account's rows before `before`.
async fn before_summary(
    pg: &sqlx::PgPool,
    account: &str,
    before: DateTime<Utc>,
) -> ((i64, i64), (i64, i64)) {
    let sums: (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT
           FROM ledger_entries WHERE account_id = $1 AND created_at < $2",
    )
    .bind(account)
    .bind(before)
    .fetch_one(pg)
    .await
    .unwrap();
    let last: (i64, i64) = sqlx::query_as(
        "SELECT allowance_after, purchased_after FROM ledger_entries
          WHERE account_id = $1 AND created_at < $2 ORDER BY created_at DESC, entry_id DESC LIMIT 1",
    )
    .bind(account)
    .bind(before)
    .fetch_one(pg)
    .await
    .unwrap();
    (sums, last)
}

/// A carry_forward row: entry id, amount, Δ allowance, Δ purchased, allowance_after,
/// purchased_after, created_at.
type Carry = (String, i64, i64, i64, i64, i64, DateTime<Utc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_rolls_old_months_up_and_the_balance_stays_the_sum_of_the_journal() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = env.config().toml(retention_toml(&up.url()));
    let mut app = cfg.spawn().await;
    let pg = env.pg().await;
    let (a, key_a) = app.account_with_key("pro").await;
    let (b, key_b) = app.account_with_key("free").await;
    let (status, body) = app
        .admin_post(
            &format!("/v1/accounts/{a}/grants"),
            json!({"credits": "5.5", "reason": "e2e", "idempotency_key": "g1"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for _ in 0..6 {
        call_ok(&app, &key_a, "/v1/chat/x").await;
    }
    for _ in 0..2 {
        call_ok(&app, &key_b, "/v1/chat/x").await;
    }
    wait_journal(&pg, &a, Duration::from_secs(10), |j| j.debits == 6).await;
    wait_journal(&pg, &b, Duration::from_secs(10), |j| j.debits == 2).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;

    // Age the history: A's first rows 5 and 3 months back, one a month back; B's 5 and 3.
    let now = Utc::now();
    let ids_a = entry_ids(&pg, &a).await;
    let ids_b = entry_ids(&pg, &b).await;
    assert!(ids_a.len() >= 8 && ids_b.len() >= 3, "{ids_a:?} {ids_b:?}");
    for (i, (id, k)) in ids_a.iter().zip([5, 5, 3, 3, 1]).enumerate() {
        redate(&pg, id, inside(month_off(now, k), i as i64)).await;
    }
    for (i, (id, k)) in ids_b.iter().zip([5, 3]).enumerate() {
        redate(&pg, id, inside(month_off(now, k), i as i64)).await;
    }
    let ensured = partitions::ensure_partitions(&pg, now).await.unwrap();
    assert_eq!(ensured.moved_from_default, 7, "{ensured:?}");

    let keep_days = 40;
    let horizon = now - TimeDelta::days(keep_days);
    let kept = Month::of(horizon).unwrap();
    let before_a = journal(&pg, &a).await;
    let before_b = journal(&pg, &b).await;
    let (old_sums_a, last_a) = before_summary(&pg, &a, kept.start()).await;
    let (old_sums_b, last_b) = before_summary(&pg, &b, kept.start()).await;
    let far = now + TimeDelta::days(1);
    let usage_kept_a = tollgate::journal::usage::usage(&pg, &a, kept.start(), far, None)
        .await
        .unwrap();

    // A dormant account's entry from 4 months ago is still in Redis (the process is down):
    // months from there on wait; the one before goes.
    app.terminate();
    assert!(app.wait_exit(Duration::from_secs(15)).await.is_some());
    let d = "dormant_retention";
    dormant_account(&pg, d).await;
    let d_entry = format!("{d}:late:grant");
    let mut conn = env.redis().await;
    xadd(
        &mut conn,
        &account_stream(&env, d),
        &entry(
            d,
            &d_entry,
            "grant",
            3_000_000,
            3_000_000,
            inside(month_off(now, 4), 0),
        ),
    )
    .await;
    let first = partitions::prune(&pg, &mut conn, env.prefix(), SHARDS, 40, now, false)
        .await
        .unwrap();
    assert_eq!(
        first.rolled_up.iter().map(|r| r.month).collect::<Vec<_>>(),
        vec![month_off(now, 5)],
        "{first}"
    );
    assert!(first.postponed.is_some(), "{first}");
    let names = partition_names(&pg).await;
    assert!(
        !names.contains(&month_off(now, 5).partition_name()),
        "{names:?}"
    );
    assert!(
        names.contains(&month_off(now, 3).partition_name()),
        "{names:?}"
    );
    // The money rule holds at every step.
    assert_eq!(journal(&pg, &a).await.total(), before_a.total());
    assert_eq!(journal(&pg, &b).await.total(), before_b.total());

    // Back up: the entry is flushed (into DEFAULT: its month has no partition), then the
    // rest is rolled up.
    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;
    assert_eq!(rows_with_id(&pg, &d_entry).await, 1);
    let settings = partitions::MaintenanceSettings {
        prefix: env.prefix().to_string(),
        shards: SHARDS,
        keep_days: Some(keep_days as u32),
        every: Duration::from_secs(3600),
    };
    let second = partitions::run_once(&pg, &mut conn, &settings, now, false)
        .await
        .unwrap();
    assert!(second.prune.postponed.is_none(), "{second}");

    // Only kept months are left, DEFAULT is empty.
    let months = partitions::list_months(&pg).await.unwrap();
    assert!(
        months.iter().all(|m| *m >= kept),
        "{months:?} (kept from {kept})"
    );
    assert_eq!(count_in(&pg, DEFAULT_PARTITION).await, 0);
    let rolled: Vec<(String, i64)> =
        sqlx::query_as("SELECT partition, rows FROM ledger_rollups ORDER BY partition, seq")
            .fetch_all(&pg)
            .await
            .unwrap();
    let rolled_names: Vec<&str> = rolled.iter().map(|(p, _)| p.as_str()).collect();
    for k in [5, 4, 3] {
        assert!(
            rolled_names.contains(&month_off(now, k).partition_name().as_str()),
            "{rolled:?}"
        );
    }
    assert_eq!(
        rolled.iter().map(|(_, n)| n).sum::<i64>(),
        7,
        "A's 4 + B's 2 + D's 1 rows (the carry entries are in the kept month): {rolled:?}"
    );

    // Per account: the same sums; the dropped rows' sums in carry_forward entries dated at
    // the first kept month, the newest of them with the last dropped row's balances.
    for (acct, before, old_sums, last) in [
        (&a, &before_a, old_sums_a, last_a),
        (&b, &before_b, old_sums_b, last_b),
    ] {
        let j = journal(&pg, acct).await;
        assert_eq!(
            (j.sum_allowance, j.sum_purchased),
            (before.sum_allowance, before.sum_purchased),
            "{acct}"
        );
        let carries: Vec<Carry> = sqlx::query_as(
            "SELECT entry_id, amount, d_allowance, d_purchased, allowance_after, purchased_after,
                    created_at
               FROM ledger_entries WHERE account_id = $1 AND kind = 'carry_forward'
              ORDER BY created_at DESC, entry_id DESC",
        )
        .bind(acct)
        .fetch_all(&pg)
        .await
        .unwrap();
        assert!(!carries.is_empty(), "{acct}");
        assert!(
            carries.iter().all(|c| c.1 == 0
                && c.6 == kept.start()
                && c.0.starts_with(&format!("carry:{acct}:"))),
            "{carries:?}"
        );
        let sums = carries.iter().fold((0, 0), |s, c| (s.0 + c.2, s.1 + c.3));
        assert_eq!(sums, old_sums, "{acct}: {carries:?}");
        assert_eq!((carries[0].4, carries[0].5), last, "{acct}: {carries:?}");
        let old_rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ledger_entries WHERE account_id = $1 AND created_at < $2",
        )
        .bind(acct)
        .bind(kept.start())
        .fetch_one(&pg)
        .await
        .unwrap();
        assert_eq!(old_rows, 0, "{acct}");
    }
    let jd = journal(&pg, d).await;
    assert_eq!((jd.rows, jd.sum_purchased), (1, 3_000_000), "{jd:?}");

    // Usage does not count carry entries as spending.
    let usage_after = tollgate::journal::usage::usage(&pg, &a, kept.start(), far, None)
        .await
        .unwrap();
    assert_eq!(usage_after, usage_kept_a);
    let all_time = tollgate::journal::usage::usage(
        &pg,
        &a,
        DateTime::from_timestamp(0, 0).unwrap(),
        far,
        None,
    )
    .await
    .unwrap();
    assert_eq!(all_time, usage_kept_a);

    // The live balances are the journal's sums; the audit agrees; a rebuild changes nothing.
    for acct in [&a, &b, &d.to_string()] {
        assert_balance_is_journal_sum(&app, &pg, acct).await;
    }
    let audit = ledger_cmd(&env, &cfg, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
    assert!(!audit.stdout.contains("DRIFT"), "{audit}");
    let rebuild = ledger_cmd(&env, &cfg, "rebuild", &[]).await;
    assert!(rebuild.success(), "{rebuild}");
    assert!(rebuild.stdout.contains(" 0 restored"), "{rebuild}");
    // Still serving from the same balance.
    let (_, _, total_before) = crate::journal_util::balance(&app, &a).await;
    let remaining = call_ok(&app, &key_a, "/v1/chat/x").await;
    assert_eq!(remaining, total_before - 250_000);

    // Nothing left to do.
    let third = partitions::run_once(&pg, &mut conn, &settings, now, false)
        .await
        .unwrap();
    assert!(third.prune.rolled_up.is_empty(), "{third}");
    assert_eq!(third.ensure.map(|e| e.created), Some(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_and_changes_nothing_and_no_retention_without_every_tier() {
    let env = TestEnv::new().await;
    let cfg = env.config().toml(passthrough_toml("http://127.0.0.1:9"));
    let out = cfg.run_subcommand("migrate", Duration::from_secs(60)).await;
    assert!(out.success(), "{out}");
    let pg = env.pg().await;
    let now = Utc::now();
    let old = month_off(now, 6);
    partitions::ensure_month(&pg, old).await.unwrap();
    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance,
             d_purchased, allowance_after, purchased_after, created_at)
         SELECT 'old:' || i, 'acct_' || (i % 3), 'grant', 0, 0, 10, 0, 10, $1 + i * interval '1 minute'
           FROM generate_series(1, 30) AS i",
    )
    .bind(old.start())
    .execute(&pg)
    .await
    .unwrap();
    let mut conn = env.redis().await;
    let dry = partitions::prune(&pg, &mut conn, env.prefix(), SHARDS, 30, now, true)
        .await
        .unwrap();
    assert_eq!(dry.rolled_up.len(), 1, "{dry}");
    let r = &dry.rolled_up[0];
    assert_eq!((r.rows, r.accounts, r.d_purchased), (30, 3, 300), "{dry}");
    assert!(dry.to_string().contains("would roll up"), "{dry}");
    assert_eq!(count_in(&pg, &old.partition_name()).await, 30);

    // The config decides: one tier without history_days (`default`) keeps everything.
    let text = format!(
        "{}\n[tiers.extra]\nmonthly_credits = 1\nhistory_days = 30\n",
        cfg.render()
    );
    let some = tollgate::config::Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| {
        Some("x-secret-value-long-enough".into())
    })
    .unwrap();
    assert_eq!(some.tiers["extra"].history_days(), Some(30));
    assert_eq!(
        partitions::MaintenanceSettings::from_config(&some).keep_days,
        None
    );
    let settings = partitions::MaintenanceSettings::from_config(&some);
    let report = partitions::run_once(&pg, &mut conn, &settings, now, false)
        .await
        .unwrap();
    assert!(report.prune.rolled_up.is_empty(), "{report}");
    assert_eq!(count_in(&pg, &old.partition_name()).await, 30);

    // The same through the CLI, with every tier keeping 30 days: a dry run names the month
    // and changes nothing.
    let all_short = env.config().toml(
        passthrough_toml("http://127.0.0.1:9")
            .replace("[tiers.default]", "[tiers.default]\nhistory_days = 30"),
    );
    let path = all_short.write();
    let out = crate::harness::run_tollgate(
        &[
            "journal".into(),
            "prune".into(),
            "--config".into(),
            path.display().to_string(),
            "--dry-run".into(),
        ],
        &all_short.process_env(),
        Duration::from_secs(60),
    )
    .await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout
            .contains(&format!("would roll up {}", old.partition_name())),
        "{out}"
    );
    assert_eq!(count_in(&pg, &old.partition_name()).await, 30);
}

/// Tiers `short` (history_days = 10) and `long` (no limit).
fn history_toml(upstream_url: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream_url}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
action = "ai_message"
cost = 0.25

[tiers.short]
monthly_credits = 100
history_days = 10

[tiers.long]
monthly_credits = 100
"#
    )
}

/// Every entry of an account's history, through all pages of `limit`.
async fn all_history(app: &crate::harness::App, account: &str, limit: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let path = match &cursor {
            None => format!("/v1/accounts/{account}/ledger?limit={limit}"),
            Some(c) => format!("/v1/accounts/{account}/ledger?limit={limit}&cursor={c}"),
        };
        let (status, body) = app.admin_get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        seen.extend(body["entries"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return seen,
        }
    }
    panic!("pagination does not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_usage_hide_what_the_tier_does_not_keep() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(history_toml(&up.url())).spawn().await;
    let pg = env.pg().await;
    let (short, key_short) = app.account_with_key("short").await;
    let (long, long_key) = app.account_with_key("long").await;
    for key in [&key_short, &long_key] {
        for _ in 0..4 {
            call_ok(&app, key, "/v1/chat/x").await;
        }
    }
    wait_journal(&pg, &short, Duration::from_secs(10), |j| j.debits == 4).await;
    wait_journal(&pg, &long, Duration::from_secs(10), |j| j.debits == 4).await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(10)).await;

    // Two debits of each account happened 20 days ago.
    let now = Utc::now();
    for acct in [&short, &long] {
        let debits: Vec<String> = sqlx::query_scalar(
            "SELECT entry_id FROM ledger_entries WHERE account_id = $1 AND kind = 'debit'
              ORDER BY entry_id LIMIT 2",
        )
        .bind(acct)
        .fetch_all(&pg)
        .await
        .unwrap();
        for (i, id) in debits.iter().enumerate() {
            redate(
                &pg,
                id,
                now - TimeDelta::days(20) + TimeDelta::seconds(i as i64),
            )
            .await;
        }
    }
    let rows_short = journal(&pg, &short).await.rows;
    let rows_long = journal(&pg, &long).await.rows;

    // History: the short tier sees its last 10 days only, on every page.
    for limit in [1, 2, 50] {
        let seen = all_history(&app, &short, limit).await;
        assert_eq!(seen.len() as i64, rows_short - 2, "limit {limit}: {seen:?}");
        for e in &seen {
            let at: DateTime<Utc> = e["created_at"].as_str().unwrap().parse().unwrap();
            assert!(at > now - TimeDelta::days(10), "{e}");
        }
        let seen = all_history(&app, &long, limit).await;
        assert_eq!(seen.len() as i64, rows_long, "limit {limit}");
    }

    // Usage: a range reaching back 30 days starts at the tier's limit.
    let from = (now - TimeDelta::days(30)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let (status, body) = app
        .admin_get(&format!("/v1/accounts/{short}/usage?from={from}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requests"], 2, "{body}");
    assert_eq!(micros(&body["credits"]), 500_000, "{body}");
    let shown_from: DateTime<Utc> = body["from"].as_str().unwrap().parse().unwrap();
    assert!(shown_from > now - TimeDelta::days(11), "{body}");
    let (status, body) = app
        .admin_get(&format!(
            "/v1/accounts/{long}/usage?from={from}&group_by=day"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let requests: i64 = body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(requests, 4, "{body}");
    // Entirely before the limit: nothing.
    let old_to = (now - TimeDelta::days(15)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let (status, body) = app
        .admin_get(&format!(
            "/v1/accounts/{short}/usage?from={from}&to={old_to}"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requests"], 0, "{body}");

    // The caller's own usage follows the same rule.
    let resp = app
        .client()
        .get(app.proxy_url(&format!("/_tollgate/v1/usage?from={from}")))
        .bearer_auth(&key_short)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["requests"], 2, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_with_rows_is_migrated_into_monthly_partitions() {
    let env = TestEnv::new().await;
    let pg = env.pg().await;

    // Migrations 1-3 as an older tollgate applied them.
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut copied = 0;
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sql") && name.as_str() < "0004" {
            std::fs::copy(f.path(), dir.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, 3);
    sqlx::migrate::Migrator::new(dir.path())
        .await
        .unwrap()
        .run(&pg)
        .await
        .unwrap();
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::TEXT FROM pg_class WHERE oid = 'ledger_entries'::regclass",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(kind, "r", "a plain table before 0004");

    // 3 accounts × 200 rows over the last ~8 months.
    for i in 0..3 {
        tollgate::store::accounts::create(&pg, &format!("old_{i}"), "default")
            .await
            .unwrap();
    }
    let now = Utc::now();
    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance,
             d_purchased, allowance_after, purchased_after, route, created_at)
         SELECT 'old:' || i, 'old_' || (i % 3), CASE WHEN i % 10 = 0 THEN 'grant' ELSE 'debit' END,
                CASE WHEN i % 10 = 0 THEN 0 ELSE 7 END,
                CASE WHEN i % 10 = 0 THEN 0 ELSE -7 END,
                CASE WHEN i % 10 = 0 THEN 100 ELSE 0 END,
                0, 0, 'r', $1 - i * interval '29 hours'
           FROM generate_series(1, 600) AS i",
    )
    .bind(now)
    .execute(&pg)
    .await
    .unwrap();
    type Sums = Vec<(String, i64, i64, i64)>;
    let sums = |pg: sqlx::PgPool| async move {
        let s: Sums = sqlx::query_as(
            "SELECT account_id, count(*), sum(d_allowance)::BIGINT, sum(d_purchased)::BIGINT
               FROM ledger_entries GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&pg)
        .await
        .unwrap();
        s
    };
    let by_month = |pg: sqlx::PgPool| async move {
        let m: Vec<(String, i64)> = sqlx::query_as(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY_MM'), count(*)
               FROM ledger_entries GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&pg)
        .await
        .unwrap();
        m
    };
    let before = sums(pg.clone()).await;
    let months_before = by_month(pg.clone()).await;
    assert!(months_before.len() >= 8, "{months_before:?}");

    // `tollgate migrate` applies 0004 and the migrations after it.
    let cfg = env.config().toml(passthrough_toml("http://127.0.0.1:9"));
    let out = cfg.run_subcommand("migrate", Duration::from_secs(60)).await;
    assert!(out.success(), "{out}");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pg)
        .await
        .unwrap();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, shipped);
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::TEXT FROM pg_class WHERE oid = 'ledger_entries'::regclass",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(kind, "p");
    assert_eq!(sums(pg.clone()).await, before, "every row moved over");
    assert_eq!(by_month(pg.clone()).await, months_before);
    // Each month's rows are in that month's partition; DEFAULT is empty.
    for (month, n) in &months_before {
        let table = format!("ledger_entries_{month}");
        assert_eq!(count_in(&pg, &table).await, *n, "{table}");
    }
    assert_eq!(count_in(&pg, DEFAULT_PARTITION).await, 0);

    // The flusher's insert still dedupes on (entry_id, created_at).
    let (id, at): (String, DateTime<Utc>) = sqlx::query_as(
        "SELECT entry_id, created_at FROM ledger_entries ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    let again = tollgate::journal::entry::JournalEntry {
        stream_id: "1-0".into(),
        entry_id: id.clone(),
        account_id: "old_0".into(),
        kind: "debit".into(),
        amount: 7,
        d_allowance: -7,
        d_purchased: 0,
        allowance_after: 0,
        purchased_after: 0,
        request_id: None,
        route: None,
        action: None,
        tier: None,
        tokens_in: None,
        tokens_out: None,
        upstream_status: None,
        duration_ms: None,
        reason: None,
        period_start: None,
        period_end: None,
        created_at: at,
    };
    let fresh = tollgate::journal::entry::JournalEntry {
        entry_id: "new:1".into(),
        created_at: now,
        ..again.clone()
    };
    let inserted = tollgate::journal::write::insert_batch(&pg, &[again.clone(), fresh.clone()])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let inserted = tollgate::journal::write::insert_batch(&pg, &[again, fresh])
        .await
        .unwrap();
    assert_eq!(inserted, 0);
    assert_eq!(rows_with_id(&pg, &id).await, 1);

    // And the service runs on it: balances hydrate from the migrated journal.
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;
    for i in 0..3 {
        let (status, body) = app.admin_get(&format!("/v1/accounts/old_{i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}
