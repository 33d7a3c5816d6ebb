//! Partition maintenance of the journal (`migrations/0004_journal_partitions.sql`): one
//! `ledger_entries_YYYY_MM` partition per calendar month (UTC), created ahead of time, and
//! retention, which rolls whole old months up into `carry_forward` entries and drops them.
//!
//! Every step runs in its own transaction under one Postgres advisory lock, so any number of
//! tollgate processes can run maintenance at once: the second finds the work done. Locks on
//! the journal are waited for at most `LOCK_TIMEOUT`: the flusher and readers queue behind a
//! waiting DDL lock no longer than that, and a busy moment only postpones maintenance.
//!
//! Money: rows are only ever moved (DEFAULT → their month) or replaced by entries with the
//! same sums, in one transaction, so for every account balance = sum of its entries holds
//! before and after each step (README: "Postgres at volume").

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use redis::aio::ConnectionLike;
use redis::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ledger::keys;
use crate::metrics::Metrics;

/// The partitioned journal.
const PARENT: &str = "ledger_entries";
/// Partitions of this month and of this many months after it exist at all times.
pub const MONTHS_AHEAD: u32 = 2;
/// How often the background task runs (and how soon after a failure it tries again).
pub const EVERY: Duration = Duration::from_secs(3600);
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(300);
/// Serializes maintenance across processes ("tollgate" in ASCII).
const LOCK_KEY: i64 = 0x746f_6c6c_6761_7465;
/// How long a step waits for a lock on the journal before giving up until the next run: the
/// flusher and readers queue behind a waiting DDL lock, so this bounds their stall.
const LOCK_TIMEOUT: &str = "2s";
/// A journal entry waiting in Redis this close to (or before) the end of a month keeps that
/// month from being rolled up (clock differences between instances are far smaller).
const PENDING_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// A calendar month in UTC, by its first day (years 1..=9999, the range partition names cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(NaiveDate);

impl Month {
    pub fn new(year: i32, month: u32) -> Option<Month> {
        if !(1..=9999).contains(&year) {
            return None;
        }
        NaiveDate::from_ymd_opt(year, month, 1).map(Month)
    }

    /// The month `t` falls in.
    pub fn of(t: DateTime<Utc>) -> Option<Month> {
        Month::new(t.year(), t.month())
    }

    pub fn plus(self, months: u32) -> Option<Month> {
        self.0
            .checked_add_months(Months::new(months))
            .and_then(|d| Month::new(d.year(), d.month()))
    }

    /// Its first instant.
    pub fn start(self) -> DateTime<Utc> {
        self.0.and_time(chrono::NaiveTime::MIN).and_utc()
    }

    /// `ledger_entries_2026_11`.
    pub fn partition_name(self) -> String {
        format!("{PARENT}_{:04}_{:02}", self.0.year(), self.0.month())
    }

    /// The month a managed partition holds, from its name.
    pub fn from_partition_name(name: &str) -> Option<Month> {
        let rest = name.strip_prefix(PARENT)?.strip_prefix('_')?;
        let (y, m) = rest.split_once('_')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        Month::new(y.parse().ok()?, m.parse().ok()?)
    }

    /// A timestamptz literal of its first instant, independent of the session's time zone.
    fn bound(self) -> String {
        format!("'{} 00:00:00+00'", self.0.format("%Y-%m-%d"))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("{what}: {source}")]
    Postgres {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("reading the journal streams: {0}")]
    Redis(#[from] redis::RedisError),
    /// A roll-up whose carry entries would not add up to the rows they replace (rolled back).
    #[error("{0}")]
    Inconsistent(String),
}

fn pg(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> MaintenanceError {
    let what = what.into();
    move |source| MaintenanceError::Postgres { what, source }
}

/// Runs a statement built here (DDL, LOCK, SET: no parameters) without caching it as a
/// prepared statement; returns the rows it affected.
async fn exec(conn: &mut sqlx::PgConnection, sql: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(sql)
        .persistent(false)
        .execute(conn)
        .await?
        .rows_affected())
}

/// A transaction holding the maintenance lock, with a bounded lock wait on the journal.
async fn locked_tx(pool: &PgPool) -> Result<Transaction<'static, Postgres>, MaintenanceError> {
    let mut tx = pool.begin().await.map_err(pg("starting a transaction"))?;
    // Another process's maintenance may hold the lock for a roll-up: wait for it, boundedly.
    exec(&mut tx, "SET LOCAL lock_timeout = '60s'")
        .await
        .map_err(pg("setting lock_timeout"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(pg("taking the maintenance lock"))?;
    exec(
        &mut tx,
        &format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"),
    )
    .await
    .map_err(pg("setting lock_timeout"))?;
    Ok(tx)
}

/// A partition of the journal: its name and the name to use in SQL (schema-qualified when
/// needed, quoted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    name: String,
    sql_name: String,
}

/// Every partition of the journal, the DEFAULT one included.
async fn partitions(
    conn: &mut sqlx::PgConnection,
) -> Result<(Vec<Partition>, Option<Partition>), MaintenanceError> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT c.relname::TEXT, c.oid::regclass::TEXT, c.oid = pt.partdefid
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_partitioned_table pt ON pt.partrelid = i.inhparent
          WHERE i.inhparent = $1::regclass",
    )
    .bind(PARENT)
    .fetch_all(conn)
    .await
    .map_err(pg("listing the journal partitions"))?;
    let mut all = Vec::new();
    let mut default = None;
    for (name, sql_name, is_default) in rows {
        let p = Partition { name, sql_name };
        if is_default {
            default = Some(p);
        } else {
            all.push(p);
        }
    }
    Ok((all, default))
}

/// The monthly partitions tollgate manages (named `ledger_entries_YYYY_MM`), oldest first.
async fn monthly_partitions(
    conn: &mut sqlx::PgConnection,
) -> Result<Vec<(Month, Partition)>, MaintenanceError> {
    let (all, _) = partitions(conn).await?;
    let mut months: Vec<(Month, Partition)> = all
        .into_iter()
        .filter_map(|p| Month::from_partition_name(&p.name).map(|m| (m, p)))
        .collect();
    months.sort_by_key(|(m, _)| *m);
    Ok(months)
}

/// Names of the monthly partitions that exist, oldest first.
pub async fn list_months(pool: &PgPool) -> Result<Vec<Month>, MaintenanceError> {
    let mut conn = pool.acquire().await.map_err(pg("connecting"))?;
    Ok(monthly_partitions(&mut conn)
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .collect())
}

/// Creates the partition of `month` unless it exists; rows of that month that landed in the
/// DEFAULT partition are moved into it first, in the same transaction. Returns the rows moved,
/// or `None` when the partition already existed.
///
/// The partition is built as a plain table and then attached, which locks the parent only in
/// SHARE UPDATE EXCLUSIVE mode: inserts and reads of the other months go on meanwhile.
pub async fn ensure_month(pool: &PgPool, month: Month) -> Result<Option<u64>, MaintenanceError> {
    let name = month.partition_name();
    let end = month
        .plus(1)
        .ok_or_else(|| MaintenanceError::Inconsistent(format!("no month after {month}")))?;
    let mut tx = locked_tx(pool).await?;
    let (all, default) = partitions(&mut tx).await?;
    if all.iter().any(|p| p.name == name) {
        tx.commit().await.map_err(pg("committing"))?;
        return Ok(None);
    }
    let what = |step: &str| format!("creating partition {name}: {step}");
    // Parent first, then DEFAULT: the order an insert takes them, so no deadlock with the
    // flusher (which then waits for this transaction if its rows go to DEFAULT).
    exec(
        &mut tx,
        &format!("LOCK TABLE ONLY {PARENT} IN SHARE UPDATE EXCLUSIVE MODE"),
    )
    .await
    .map_err(pg(what("locking the journal")))?;
    exec(&mut tx, &format!("CREATE TABLE {name} (LIKE {PARENT})"))
        .await
        .map_err(pg(what("CREATE TABLE")))?;
    let mut moved = 0;
    if let Some(default) = &default {
        exec(
            &mut tx,
            &format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", default.sql_name),
        )
        .await
        .map_err(pg(what("locking the DEFAULT partition")))?;
        moved = exec(
            &mut tx,
            &format!(
                "WITH moved AS (
                 DELETE FROM {} WHERE created_at >= {} AND created_at < {} RETURNING *
             )
             INSERT INTO {name} SELECT * FROM moved",
                default.sql_name,
                month.bound(),
                end.bound()
            ),
        )
        .await
        .map_err(pg(what("moving its rows out of DEFAULT")))?;
    }
    exec(
        &mut tx,
        &format!(
            "ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ({}) TO ({})",
            month.bound(),
            end.bound()
        ),
    )
    .await
    .map_err(pg(what("ATTACH PARTITION")))?;
    tx.commit().await.map_err(pg(what("commit")))?;
    tracing::info!(partition = %name, moved_from_default = moved, "journal partition created");
    Ok(Some(moved))
}

/// What [`ensure_partitions`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnsureReport {
    /// Partitions created, oldest first.
    pub created: Vec<String>,
    /// Rows moved from DEFAULT into their month's new partition.
    pub moved_from_default: u64,
    /// Rows left in DEFAULT (dated outside the years 1-9999, which get no partition).
    pub left_in_default: i64,
}

/// Creates the partitions of this month and of the next [`MONTHS_AHEAD`] months, and of every
/// month that has rows in the DEFAULT partition (moving them there). Idempotent; safe to run
/// from several processes at once.
pub async fn ensure_partitions(
    pool: &PgPool,
    now: DateTime<Utc>,
) -> Result<EnsureReport, MaintenanceError> {
    let mut wanted = BTreeSet::new();
    if let Some(this) = Month::of(now) {
        for n in 0..=MONTHS_AHEAD {
            wanted.extend(this.plus(n));
        }
    }
    let mut left_in_default = 0;
    {
        let mut conn = pool.acquire().await.map_err(pg("connecting"))?;
        let (_, default) = partitions(&mut conn).await?;
        if let Some(default) = default {
            let months: Vec<(Option<i32>, Option<i32>, i64)> = sqlx::query_as(&format!(
                "SELECT extract(year FROM m)::INT, extract(month FROM m)::INT, count(*)
                   FROM (SELECT date_trunc('month', created_at AT TIME ZONE 'UTC') AS m
                           FROM {}) d
                  GROUP BY m",
                default.sql_name
            ))
            .fetch_all(&mut *conn)
            .await
            .map_err(pg("reading the DEFAULT partition"))?;
            for (y, m, rows) in months {
                match y
                    .zip(m.and_then(|m| u32::try_from(m).ok()))
                    .and_then(|(y, m)| Month::new(y, m))
                {
                    Some(month) => {
                        wanted.insert(month);
                    }
                    None => left_in_default += rows,
                }
            }
        }
    }
    let mut report = EnsureReport {
        left_in_default,
        ..EnsureReport::default()
    };
    for month in wanted {
        if let Some(moved) = ensure_month(pool, month).await? {
            report.created.push(month.partition_name());
            report.moved_from_default += moved;
        }
    }
    if left_in_default > 0 {
        tracing::warn!(
            rows = left_in_default,
            "journal rows dated outside the years 1-9999 stay in the DEFAULT partition"
        );
    }
    Ok(report)
}

/// The oldest journal entry still waiting in a shard stream (not yet flushed, or flushed but
/// not yet deleted), by the earlier of its stream id time and its own `ts`. `None` when every
/// stream is empty.
pub async fn oldest_unflushed<C: ConnectionLike + Send>(
    redis: &mut C,
    prefix: &str,
    shards: u32,
) -> redis::RedisResult<Option<DateTime<Utc>>> {
    let mut oldest: Option<i64> = None;
    for shard in 0..shards {
        let reply: Value = redis::cmd("XRANGE")
            .arg(keys::stream(prefix, shard))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(redis)
            .await?;
        let Value::Array(entries) = reply else {
            continue;
        };
        for entry in entries {
            if let Some(ms) = entry_time_ms(&entry) {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
    }
    // A time chrono cannot represent is older than anything: it holds back every roll-up.
    Ok(oldest.map(|ms| DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)))
}

/// `[id, [field, value, …]]` → the earlier of the id's milliseconds and the `ts` field. An
/// entry without either reads as the epoch: it holds back every roll-up until it is gone.
fn entry_time_ms(entry: &Value) -> Option<i64> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    let id_ms = parts
        .first()
        .and_then(text)
        .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<i64>().ok()));
    let ts = match parts.get(1) {
        Some(Value::Array(fields)) => fields.chunks(2).find_map(|pair| match pair {
            [k, v] if text(k).as_deref() == Some("ts") => {
                text(v).and_then(|t| t.parse::<i64>().ok())
            }
            _ => None,
        }),
        _ => None,
    };
    Some(match (id_ms, ts) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => 0,
    })
}

/// One month rolled up (or, in a dry run, that would be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledUp {
    pub partition: String,
    pub month: Month,
    /// When the carry entries are dated: the first instant of the oldest month kept.
    pub carried_to: DateTime<Utc>,
    pub rows: i64,
    pub accounts: i64,
    /// Sums of the rows (µc): what the carry entries hold.
    pub d_allowance: i64,
    pub d_purchased: i64,
}

/// What [`prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// `now - retention days`: months ending at or before it are rolled up.
    pub horizon: Option<DateTime<Utc>>,
    pub dry_run: bool,
    pub rolled_up: Vec<RolledUp>,
    /// Why older months were left in place this time, if any were.
    pub postponed: Option<String>,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would roll up"
        } else {
            "rolled up"
        };
        for r in &self.rolled_up {
            writeln!(
                f,
                "{verb} {} ({}): {} rows of {} accounts into carry_forward entries dated {} (allowance {}, purchased {})",
                r.partition,
                r.month,
                r.rows,
                r.accounts,
                r.carried_to.to_rfc3339(),
                crate::money::Credits::from_micros(r.d_allowance),
                crate::money::Credits::from_micros(r.d_purchased),
            )?;
        }
        match self.horizon {
            None => writeln!(f, "retention off (a tier has no history_days)")?,
            Some(h) if self.rolled_up.is_empty() => {
                writeln!(f, "no month ends before {}", h.to_rfc3339())?
            }
            Some(_) => {}
        }
        if let Some(why) = &self.postponed {
            writeln!(f, "postponed: {why}")?;
        }
        Ok(())
    }
}

/// Retention: every monthly partition that ends at or before `now - keep_days` is rolled up,
/// oldest first, each in one transaction: per account one `carry_forward` entry (amount 0;
/// d_allowance / d_purchased = the sums of its rows; allowance_after / purchased_after = its
/// last row's; entry id `carry:<account>:<partition>`; dated the first instant of the oldest
/// month kept, the one `now - keep_days` falls in, whose partition is created first if
/// needed) is inserted, a row is added to `ledger_rollups`, and the partition is detached and
/// dropped. A re-run finds nothing left to do; when the kept month itself is rolled up later,
/// its carry entries fold into the next one per account.
///
/// A month is left in place while any journal entry dated in it (or within an hour of its
/// end) still waits in a shard stream: that entry may be a re-delivery of a row the roll-up
/// would drop, which would then be stored a second time. With `dry_run`, only reports.
pub async fn prune<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    prefix: &str,
    shards: u32,
    keep_days: u32,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, MaintenanceError> {
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    let Some(horizon) = now.checked_sub_signed(chrono::TimeDelta::days(i64::from(keep_days)))
    else {
        return Ok(report);
    };
    report.horizon = Some(horizon);
    // The oldest month kept: every carry entry is dated at its first instant.
    let Some(kept) = Month::of(horizon) else {
        return Ok(report);
    };
    let due: Vec<(Month, Partition)> = {
        let mut conn = pool.acquire().await.map_err(pg("connecting"))?;
        monthly_partitions(&mut conn)
            .await?
            .into_iter()
            .filter(|(m, _)| *m < kept)
            .collect()
    };
    if due.is_empty() {
        return Ok(report);
    }
    let pending = oldest_unflushed(redis, prefix, shards).await?;
    if !dry_run {
        // The carry entries go to that month's partition (not to DEFAULT).
        ensure_month(pool, kept).await?;
    }
    for (month, part) in due {
        let Some(end) = month.plus(1) else {
            break;
        };
        let blocks = |t: &DateTime<Utc>| {
            t.checked_sub_signed(PENDING_MARGIN)
                .is_none_or(|t| t < end.start())
        };
        if let Some(t) = pending.filter(blocks) {
            report.postponed = Some(format!(
                "a journal entry from {} still waits in Redis; {} and later months are rolled up once it is flushed",
                t.to_rfc3339(),
                part.name
            ));
            break;
        }
        if dry_run {
            let (rows, accounts, a, p) = totals(pool, &part).await?;
            report.rolled_up.push(RolledUp {
                partition: part.name.clone(),
                month,
                carried_to: kept.start(),
                rows,
                accounts,
                d_allowance: a,
                d_purchased: p,
            });
        } else if let Some(r) = roll_up(pool, month, kept).await? {
            tracing::info!(
                partition = %r.partition,
                rows = r.rows,
                accounts = r.accounts,
                "journal month rolled up and dropped (retention)"
            );
            report.rolled_up.push(r);
        }
    }
    Ok(report)
}

async fn totals(pool: &PgPool, part: &Partition) -> Result<(i64, i64, i64, i64), MaintenanceError> {
    sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT account_id),
                COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT
           FROM {}",
        part.sql_name
    ))
    .fetch_one(pool)
    .await
    .map_err(pg(format!("reading {}", part.name)))
}

/// Rolls one month up and drops its partition, in one transaction (see [`prune`]). `None`
/// when the partition is gone already (another process did it).
async fn roll_up(
    pool: &PgPool,
    month: Month,
    kept: Month,
) -> Result<Option<RolledUp>, MaintenanceError> {
    let name = month.partition_name();
    let what = |step: &str| format!("rolling up {name}: {step}");
    let mut tx = locked_tx(pool).await?;
    let (all, _) = partitions(&mut tx).await?;
    let Some(part) = all.into_iter().find(|p| p.name == name) else {
        tx.commit().await.map_err(pg(what("commit")))?;
        return Ok(None);
    };
    // Nothing may be written to the month from here on: what is summed is what is dropped.
    exec(
        &mut tx,
        &format!("LOCK TABLE {} IN SHARE MODE", part.sql_name),
    )
    .await
    .map_err(pg(what("locking it")))?;
    // A month rolled up before whose rows came back (a replayed entry) gets new carry ids.
    let seq: i32 = sqlx::query_scalar(
        "SELECT COALESCE(max(seq), 0) + 1 FROM ledger_rollups WHERE partition = $1",
    )
    .bind(&name)
    .fetch_one(&mut *tx)
    .await
    .map_err(pg(what("reading ledger_rollups")))?;
    let tag = if seq == 1 {
        name.clone()
    } else {
        format!("{name}:{seq}")
    };
    let (rows, accounts, sum_a, sum_p): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT account_id),
                COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT
           FROM {}",
        part.sql_name
    ))
    .fetch_one(&mut *tx)
    .await
    .map_err(pg(what("summing")))?;
    let carried_to = kept.start();
    // No ON CONFLICT: a carry id that exists already is an error that rolls everything back,
    // never a silently skipped sum.
    let (carried, carry_a, carry_p): (i64, i64, i64) = sqlx::query_as(&format!(
        "WITH sums AS (
             SELECT account_id, sum(d_allowance)::BIGINT AS a, sum(d_purchased)::BIGINT AS p
               FROM {part} GROUP BY account_id
         ), last AS (
             SELECT DISTINCT ON (account_id) account_id, allowance_after, purchased_after, tier
               FROM {part} ORDER BY account_id, created_at DESC, entry_id DESC
         ), ins AS (
             INSERT INTO {PARENT} (entry_id, account_id, kind, amount, d_allowance, d_purchased,
                    allowance_after, purchased_after, tier, reason, created_at)
             SELECT 'carry:' || s.account_id || ':' || $1, s.account_id, 'carry_forward', 0,
                    s.a, s.p, l.allowance_after, l.purchased_after, l.tier, 'retention', $2
               FROM sums s JOIN last l ON l.account_id = s.account_id
             RETURNING d_allowance, d_purchased
         )
         SELECT count(*), COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT
           FROM ins",
        part = part.sql_name
    ))
    .bind(&tag)
    .bind(carried_to)
    .fetch_one(&mut *tx)
    .await
    .map_err(pg(what("inserting the carry_forward entries")))?;
    if (carried, carry_a, carry_p) != (accounts, sum_a, sum_p) {
        return Err(MaintenanceError::Inconsistent(format!(
            "rolling up {name}: carry entries ({carried} accounts, {carry_a}/{carry_p} µc) do not match the rows ({accounts} accounts, {sum_a}/{sum_p} µc); nothing changed"
        )));
    }
    sqlx::query(
        "INSERT INTO ledger_rollups (partition, seq, range_from, range_to, carried_to, rows,
             accounts, d_allowance, d_purchased)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&name)
    .bind(seq)
    .bind(month.start())
    .bind(month.plus(1).map_or(carried_to, Month::start))
    .bind(carried_to)
    .bind(rows)
    .bind(accounts)
    .bind(sum_a)
    .bind(sum_p)
    .execute(&mut *tx)
    .await
    .map_err(pg(what("recording it in ledger_rollups")))?;
    exec(
        &mut tx,
        &format!("ALTER TABLE {PARENT} DETACH PARTITION {}", part.sql_name),
    )
    .await
    .map_err(pg(what("DETACH PARTITION")))?;
    exec(&mut tx, &format!("DROP TABLE {}", part.sql_name))
        .await
        .map_err(pg(what("DROP TABLE")))?;
    tx.commit().await.map_err(pg(what("commit")))?;
    Ok(Some(RolledUp {
        partition: name,
        month,
        carried_to,
        rows,
        accounts,
        d_allowance: sum_a,
        d_purchased: sum_p,
    }))
}

/// What the background task needs from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceSettings {
    /// Redis key prefix and shard count: where unflushed journal entries wait.
    pub prefix: String,
    pub shards: u32,
    /// Days of journal kept: the longest `history_days` of all tiers, `None` (keep
    /// everything) when a tier has none.
    pub keep_days: Option<u32>,
    pub every: Duration,
}

impl MaintenanceSettings {
    pub fn from_config(config: &Config) -> Self {
        MaintenanceSettings {
            prefix: config.redis.key_prefix.clone(),
            shards: config.redis.shards,
            keep_days: config.journal_retention_days(),
            every: EVERY,
        }
    }
}

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// `None` in a dry run (partitions are neither checked nor created).
    pub ensure: Option<EnsureReport>,
    pub prune: PruneReport,
}

impl fmt::Display for MaintenanceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ensure) = &self.ensure {
            if ensure.created.is_empty() {
                writeln!(f, "partitions: all present")?;
            } else {
                writeln!(
                    f,
                    "partitions created: {} ({} rows moved out of DEFAULT)",
                    ensure.created.join(", "),
                    ensure.moved_from_default
                )?;
            }
            if ensure.left_in_default > 0 {
                writeln!(
                    f,
                    "{} rows dated outside the years 1-9999 stay in DEFAULT",
                    ensure.left_in_default
                )?;
            }
        }
        write!(f, "{}", self.prune)
    }
}

/// One maintenance run: [`ensure_partitions`], then [`prune`] when retention is on. With
/// `dry_run`, nothing changes: only what retention would roll up is reported.
pub async fn run_once<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    settings: &MaintenanceSettings,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<MaintenanceReport, MaintenanceError> {
    let ensure = if dry_run {
        None
    } else {
        Some(ensure_partitions(pool, now).await?)
    };
    let prune = match settings.keep_days {
        Some(days) => {
            prune(
                pool,
                redis,
                &settings.prefix,
                settings.shards,
                days,
                now,
                dry_run,
            )
            .await?
        }
        None => PruneReport {
            dry_run,
            ..PruneReport::default()
        },
    };
    Ok(MaintenanceReport { ensure, prune })
}

/// Counters of the background task, registered on the process's registry.
struct MaintenanceMetrics {
    created: prometheus::IntCounter,
    rolled_up: prometheus::IntCounter,
    moved: prometheus::IntCounter,
    errors: prometheus::IntCounter,
    last_success: prometheus::IntGauge,
}

impl MaintenanceMetrics {
    fn new(metrics: Option<&Metrics>) -> Option<Self> {
        let counter = |name: &str, help: &str| prometheus::IntCounter::new(name, help).ok();
        let m = MaintenanceMetrics {
            created: counter(
                "tollgate_journal_partitions_created_total",
                "Monthly journal partitions created by this process's maintenance.",
            )?,
            rolled_up: counter(
                "tollgate_journal_partitions_rolled_up_total",
                "Monthly journal partitions rolled up into carry_forward entries and dropped (retention).",
            )?,
            moved: counter(
                "tollgate_journal_default_rows_moved_total",
                "Journal rows moved out of the DEFAULT partition into their month's partition.",
            )?,
            errors: counter(
                "tollgate_journal_maintenance_errors_total",
                "Journal partition maintenance runs that failed (retried in 5 minutes).",
            )?,
            last_success: prometheus::IntGauge::new(
                "tollgate_journal_maintenance_last_success_timestamp_seconds",
                "When journal partition maintenance last completed (Unix time).",
            )
            .ok()?,
        };
        if let Some(metrics) = metrics {
            let r = &metrics.registry;
            for c in [&m.created, &m.rolled_up, &m.moved, &m.errors] {
                if let Err(e) = r.register(Box::new(c.clone())) {
                    tracing::debug!(error = %e, "journal maintenance metric not registered");
                }
            }
            if let Err(e) = r.register(Box::new(m.last_success.clone())) {
                tracing::debug!(error = %e, "journal maintenance metric not registered");
            }
        }
        Some(m)
    }
}

/// The background task: [`run_once`] at start and then every `settings.every` (5 minutes
/// after a failure) until `stop`. Failures are logged and counted, never fatal: the DEFAULT
/// partition keeps every entry storable meanwhile. Its metrics are registered by this call,
/// not when the task first runs, so they are on `/metrics` before `serve` says it listens.
pub fn run_maintenance<C: ConnectionLike + Send>(
    pool: PgPool,
    redis: C,
    settings: MaintenanceSettings,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    let m = MaintenanceMetrics::new(metrics.as_deref());
    maintenance_loop(pool, redis, settings, m, stop)
}

async fn maintenance_loop<C: ConnectionLike + Send>(
    pool: PgPool,
    mut redis: C,
    settings: MaintenanceSettings,
    m: Option<MaintenanceMetrics>,
    stop: CancellationToken,
) {
    loop {
        let run = tokio::select! {
            _ = stop.cancelled() => return,
            run = run_once(&pool, &mut redis, &settings, Utc::now(), false) => run,
        };
        let wait = match run {
            Ok(report) => {
                if let Some(m) = &m {
                    let ensure = report.ensure.unwrap_or_default();
                    m.created.inc_by(ensure.created.len() as u64);
                    m.moved.inc_by(ensure.moved_from_default);
                    m.rolled_up.inc_by(report.prune.rolled_up.len() as u64);
                    m.last_success.set(Utc::now().timestamp());
                }
                if let Some(why) = &report.prune.postponed {
                    tracing::info!(reason = %why, "journal retention postponed");
                }
                settings.every
            }
            Err(e) => {
                if let Some(m) = &m {
                    m.errors.inc();
                }
                tracing::warn!(error = %e, "journal partition maintenance failed; retrying later");
                RETRY_AFTER_ERROR.min(settings.every)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the background task can be `tokio::spawn`ed with any connection.
    #[allow(dead_code)]
    fn the_background_task_is_spawnable<C: ConnectionLike + Send + 'static>(
        pool: PgPool,
        redis: C,
        settings: MaintenanceSettings,
    ) {
        fn spawnable<T: std::future::Future + Send + 'static>(_: &T) {}
        spawnable(&run_maintenance(
            pool,
            redis,
            settings,
            None,
            CancellationToken::new(),
        ));
    }

    #[test]
    fn months_name_and_bound_their_partitions() {
        let m = Month::new(2026, 11).unwrap();
        assert_eq!(m.partition_name(), "ledger_entries_2026_11");
        assert_eq!(m.bound(), "'2026-11-01 00:00:00+00'");
        assert_eq!(m.plus(2), Month::new(2027, 1));
        assert_eq!(
            Month::from_partition_name("ledger_entries_2026_11"),
            Some(m)
        );
        assert_eq!(Month::from_partition_name("ledger_entries_default"), None);
        assert_eq!(Month::from_partition_name("ledger_entries_2026_13"), None);
        assert_eq!(Month::from_partition_name("other_2026_11"), None);
        let t = DateTime::parse_from_rfc3339("2026-11-30T23:59:59.999Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Month::of(t), Some(m));
        assert_eq!(m.start().to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(Month::new(10_000, 1), None);
        assert_eq!(Month::new(9999, 12).unwrap().plus(1), None);
    }

    #[test]
    fn a_stream_entry_dates_by_its_id_or_ts_whichever_is_older() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, ts: Option<&str>| {
            let mut fields = vec![bulk("id"), bulk("x")];
            if let Some(ts) = ts {
                fields.extend([bulk("ts"), bulk(ts)]);
            }
            Value::Array(vec![bulk(id), Value::Array(fields)])
        };
        assert_eq!(entry_time_ms(&entry("2000-0", Some("1500"))), Some(1500));
        assert_eq!(entry_time_ms(&entry("1000-3", Some("1500"))), Some(1000));
        assert_eq!(entry_time_ms(&entry("1000-3", None)), Some(1000));
        assert_eq!(entry_time_ms(&entry("junk", None)), Some(0));
    }
}
