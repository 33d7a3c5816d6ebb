//! `tollgate ledger audit` and `ledger rebuild`: the invariant "balance = sum of journal
//! entries", checked and restored.
//!
//! For an account, the journal's view is the sum of its `ledger_entries` plus the entries
//! still waiting in the shard stream (not yet flushed). The Redis buckets and the stream are
//! read in one atomic script; the Postgres sums and the "already flushed?" check in one
//! statement, so the flusher running meanwhile never makes an entry count twice.

use std::sync::LazyLock;

use crate::redis_conn::RedisConn;
use redis::{Script, Value};
use sqlx::PgPool;

use crate::ledger::keys::AccountKeys;
use crate::ledger::{Ledger, LedgerError};
use crate::money::Credits;

static SNAPSHOT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../ledger/snapshot.lua")));

/// An account as Redis holds it, read atomically: the hash's buckets (when it exists) and the
/// account's entries still in its shard stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub exists: bool,
    pub allowance: i64,
    pub purchased: i64,
    /// (entry id, d_allowance, d_purchased) of each entry still in the stream.
    pub pending: Vec<(String, i64, i64)>,
}

pub async fn snapshot(
    conn: &mut RedisConn,
    keys: &AccountKeys,
    account_id: &str,
) -> redis::RedisResult<Snapshot> {
    let reply: Vec<Value> = SNAPSHOT
        .key(&keys.account)
        .key(&keys.stream)
        .arg(account_id)
        .invoke_async(conn)
        .await?;
    let mut pending = Vec::new();
    if let Some(Value::Array(items)) = reply.get(3) {
        for chunk in items.chunks(3) {
            if let [id, a, p] = chunk {
                pending.push((text(id), int(a), int(p)));
            }
        }
    }
    Ok(Snapshot {
        exists: reply.first().map(int) == Some(1),
        allowance: reply.get(1).map_or(0, int),
        purchased: reply.get(2).map_or(0, int),
        pending,
    })
}

/// The journal's view of an account, given the entries a [`Snapshot`] found in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalView {
    /// Rows in Postgres.
    pub rows: i64,
    /// Sums of those rows (µc).
    pub stored: (i64, i64),
    /// Entries of the snapshot not yet in Postgres, and their sums (µc).
    pub unflushed: usize,
    pub unflushed_sum: (i64, i64),
}

impl JournalView {
    /// Every entry, stored or still in the stream.
    pub fn entries(&self) -> i64 {
        self.rows + self.unflushed as i64
    }

    /// (allowance, purchased) in µc: stored plus unflushed.
    pub fn total(&self) -> (i64, i64) {
        (
            self.stored.0 + self.unflushed_sum.0,
            self.stored.1 + self.unflushed_sum.1,
        )
    }
}

/// Postgres' sums and which of the `pending` stream entries it already holds, in one
/// statement. With the snapshot taken first, every entry counts exactly once: the flusher
/// commits an entry before deleting it from the stream, so an entry gone from the snapshot
/// is in Postgres, and one in the snapshot is either stored (counted in the sums) or not
/// (counted as unflushed).
pub async fn journal_view(
    pg: &PgPool,
    account_id: &str,
    pending: &[(String, i64, i64)],
) -> Result<JournalView, sqlx::Error> {
    let ids: Vec<String> = pending.iter().map(|(id, _, _)| id.clone()).collect();
    let (rows, sum_a, sum_p, flushed): (i64, i64, i64, Vec<String>) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT,
                COALESCE(array_agg(entry_id) FILTER (WHERE entry_id = ANY($2)), '{}')
           FROM ledger_entries WHERE account_id = $1",
    )
    .bind(account_id)
    .bind(&ids)
    .fetch_one(pg)
    .await?;
    let mut unflushed = 0;
    let (mut ua, mut up) = (0i64, 0i64);
    for (id, a, p) in pending {
        if !flushed.contains(id) {
            unflushed += 1;
            ua += a;
            up += p;
        }
    }
    Ok(JournalView {
        rows,
        stored: (sum_a, sum_p),
        unflushed,
        unflushed_sum: (ua, up),
    })
}

/// One account's audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub account_id: String,
    /// `None`: the account is not loaded in Redis (nothing to compare).
    pub redis: Option<(Credits, Credits)>,
    pub journal: (Credits, Credits),
    /// Entries in the stream not yet in Postgres, and their effect.
    pub unflushed: usize,
    pub unflushed_sum: (Credits, Credits),
}

impl AuditRow {
    pub fn expected(&self) -> (Credits, Credits) {
        (
            self.journal.0 + self.unflushed_sum.0,
            self.journal.1 + self.unflushed_sum.1,
        )
    }

    pub fn drifts(&self) -> bool {
        self.redis.is_some_and(|r| r != self.expected())
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

pub struct Auditor<'a> {
    pub ledger: &'a Ledger,
    pub pg: &'a PgPool,
    pub redis: RedisConn,
    restore: Script,
}

impl<'a> Auditor<'a> {
    pub fn new(ledger: &'a Ledger, pg: &'a PgPool, redis: RedisConn) -> Self {
        Auditor {
            ledger,
            pg,
            redis,
            restore: Script::new(include_str!("../ledger/restore.lua")),
        }
    }

    /// Accounts to look at: one, or all in Postgres. A named account must exist in Postgres or
    /// in Redis ([`LedgerError::NoSuchAccount`] otherwise): a mistyped id would otherwise
    /// audit clean as "not loaded in Redis".
    pub async fn accounts(&mut self, only: Option<&str>) -> Result<Vec<String>, LedgerError> {
        match only {
            Some(id) => {
                if self.exists(id).await? {
                    Ok(vec![id.to_string()])
                } else {
                    Err(LedgerError::NoSuchAccount(id.to_string()))
                }
            }
            None => Ok(sqlx::query_scalar("SELECT id FROM accounts ORDER BY id")
                .fetch_all(self.pg)
                .await?),
        }
    }

    /// The account is a row of `accounts` or a hash in Redis (Redis alone can still hold an
    /// account whose row is gone; the audit should show it rather than deny it).
    async fn exists(&mut self, account_id: &str) -> Result<bool, LedgerError> {
        let in_pg: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(account_id)
                .fetch_one(self.pg)
                .await?;
        if in_pg {
            return Ok(true);
        }
        let k = self.ledger.keys(account_id);
        Ok(snapshot(&mut self.redis, &k, account_id).await?.exists)
    }

    /// One consistent comparison for an account.
    pub async fn check(&mut self, account_id: &str) -> Result<AuditRow, LedgerError> {
        let k = self.ledger.keys(account_id);
        let snap = snapshot(&mut self.redis, &k, account_id).await?;
        let view = journal_view(self.pg, account_id, &snap.pending).await?;
        Ok(AuditRow {
            account_id: account_id.to_string(),
            redis: snap.exists.then(|| {
                (
                    Credits::from_micros(snap.allowance),
                    Credits::from_micros(snap.purchased),
                )
            }),
            journal: (
                Credits::from_micros(view.stored.0),
                Credits::from_micros(view.stored.1),
            ),
            unflushed: view.unflushed,
            unflushed_sum: (
                Credits::from_micros(view.unflushed_sum.0),
                Credits::from_micros(view.unflushed_sum.1),
            ),
        })
    }

    /// Checks an account, retrying a few times when it appears to drift (live traffic can
    /// move the balance between the Redis and the Postgres reads).
    pub async fn audit(&mut self, account_id: &str) -> Result<AuditRow, LedgerError> {
        let mut row = self.check(account_id).await?;
        for _ in 0..3 {
            if !row.drifts() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            row = self.check(account_id).await?;
        }
        Ok(row)
    }

    /// Sets the Redis buckets to the journal's view (journal + unflushed stream entries).
    /// Returns the row it restored from; `None` when the account is not in Redis (the next
    /// request hydrates it from the journal anyway).
    pub async fn rebuild(&mut self, account_id: &str) -> Result<Option<AuditRow>, LedgerError> {
        for _ in 0..20 {
            let row = self.check(account_id).await?;
            let Some((a, p)) = row.redis else {
                return Ok(None);
            };
            let (ea, ep) = row.expected();
            let k = self.ledger.keys(account_id);
            let done: i64 = self
                .restore
                .key(&k.account)
                .arg(a.micros())
                .arg(p.micros())
                .arg(ea.micros())
                .arg(ep.micros())
                .invoke_async(&mut self.redis)
                .await?;
            match done {
                1 => return Ok(Some(row)),
                -1 => return Ok(None),
                _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        Err(LedgerError::Reply(format!(
            "account {account_id:?} kept changing; rebuild it under less traffic"
        )))
    }
}
