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

mod create;
mod month;
mod retention;
mod task;

pub use create::{ensure_month, ensure_partitions, EnsureReport};
pub use month::Month;
pub use retention::{oldest_unflushed, prune, PruneReport, RolledUp};
pub use task::{run_maintenance, run_once, MaintenanceReport, MaintenanceSettings};

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

/// The partitioned journal.
const PARENT: &str = "ledger_entries";
/// Partitions of this month and of this many months after it exist at all times.
pub const MONTHS_AHEAD: u32 = 2;
/// How often the background task runs (and how soon after a failure it tries again).
pub const EVERY: Duration = Duration::from_secs(3600);
/// Serializes maintenance across processes ("tollgate" in ASCII).
const LOCK_KEY: i64 = 0x746f_6c6c_6761_7465;
/// How long a step waits for a lock on the journal before giving up until the next run: the
/// flusher and readers queue behind a waiting DDL lock, so this bounds their stall.
const LOCK_TIMEOUT: &str = "2s";

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
