//! Partition creation: this month's and the next ones', and those of rows waiting in DEFAULT.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{exec, locked_tx, partitions, pg, MaintenanceError, Month, MONTHS_AHEAD, PARENT};

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
