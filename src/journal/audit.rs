//! `tollgate ledger audit` and `ledger rebuild`: the invariant "balance = sum of journal
//! entries", checked and restored.
//!
//! For an account, the journal's view is the sum of its `ledger_entries` plus the entries
//! still waiting in the shard stream (not yet flushed). The Redis buckets and the stream are
//! read in one atomic script; the Postgres sums and the "already flushed?" check in one
//! statement, so the flusher running meanwhile never makes an entry count twice.

use crate::redis_conn::RedisConn;
use redis::Script;
use sqlx::PgPool;

pub use crate::ledger::snapshot::{journal_view, snapshot, JournalView, Snapshot};
use crate::ledger::{Ledger, LedgerError};
use crate::money::Credits;

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
