//! Retention: old months rolled up into `carry_forward` entries and dropped, unless an entry
//! of theirs still waits in Redis.

use std::fmt;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use redis::Value;
use sqlx::PgPool;

use super::{
    ensure_month, exec, locked_tx, monthly_partitions, partitions, pg, MaintenanceError, Month,
    Partition, PARENT,
};
use crate::ledger::keys;

/// A journal entry waiting in Redis this close to (or before) the end of a month keeps that
/// month from being rolled up (clock differences between instances are far smaller).
const PENDING_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

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

/// `[id, [field, value, …]]` → the earlier of the id's milliseconds and the `ts` field (of a
/// packed entry: its earliest row's). An
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
            // A packed entry (a batch report): its earliest row.
            [k, v] if text(k).as_deref() == Some(crate::journal::entry::ROWS_FIELD) => {
                text(v).and_then(|rows| crate::journal::entry::packed_min_ts(&rows))
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // A packed entry: its earliest row.
        let packed = Value::Array(vec![
            bulk("5000-0"),
            Value::Array(vec![
                bulk("rows"),
                bulk("a|x|debit|1|-1|0|0|0||||1800|r1\nb|x|debit|1|-1|0|0|0||||1700|r|2"),
            ]),
        ]);
        assert_eq!(entry_time_ms(&packed), Some(1700));
    }
}
