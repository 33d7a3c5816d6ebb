//! The money path in Redis: live balances, quotas and leases per account, changed only by Lua
//! scripts (one call = one hash slot = atomic), each change appended to the shard's usage
//! stream in the same script. Scripts are called by SHA and reloaded on NOSCRIPT
//! (`redis::Script`); a changed script has a new SHA, so old and new proxies coexist during a
//! rolling deploy.

pub mod billing;
mod debit;
mod group_commit;
pub mod holds;
pub mod hydrate;
pub mod keys;
pub mod reconcile;
pub mod snapshot;
pub mod unanswered;
pub mod unanswered_store;

mod request_ops;
mod state;

use std::time::Duration;

use crate::redis_conn::RedisConn;
use redis::{Script, Value};

use crate::money::Credits;
pub use debit::{DebitOutcome, DebitRequest};
pub use group_commit::BatchFailure;
pub use keys::AccountKeys;

const PERIOD_LUA: &str = include_str!("period.lua");
const HOLD_LUA: &str = include_str!("hold.lua");

/// Why a ledger call failed (all map to "metering unavailable" on the request path).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected script reply: {0}")]
    Reply(String),
    /// A grouped call failed; `outcome_unknown` as for a single call.
    #[error("redis (grouped call): {}", .0.message)]
    Batch(group_commit::BatchFailure),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("account {0:?} does not exist")]
    NoSuchAccount(String),
    #[error("account {account:?} has tier {tier:?}, which the config does not define")]
    UnknownTier { account: String, tier: String },
}

/// The group-commit counters, labelled by script (`debit`, `settle`).
#[derive(Clone)]
pub struct GroupMetrics {
    pub calls: prometheus::IntCounterVec,
    pub requests: prometheus::IntCounterVec,
}

/// One credit movement outside the hot path.
#[derive(Debug, Clone)]
pub struct CreditRequest<'a> {
    pub account_id: &'a str,
    /// Journal kind: grant, purchase, refund, adjustment, settle.
    pub kind: &'a str,
    pub to_allowance: Credits,
    pub to_purchased: Credits,
    /// Amount counted in usage stats (negative for a refund of a charge).
    pub counted: Credits,
    pub entry_id: &'a str,
    /// The idempotency key: the same id never applies twice (within `mark_ttl`).
    pub external_id: &'a str,
    pub mark_ttl: Duration,
    pub route: &'a str,
    pub action: &'a str,
    pub request_id: &'a str,
    pub reason: &'a str,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditOutcome {
    Applied {
        allowance: Credits,
        purchased: Credits,
    },
    Duplicate {
        allowance: Credits,
        purchased: Credits,
    },
    Missing,
}

/// Balances as the admin and self-service APIs show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub tier: String,
    pub status: String,
    pub allowance: Credits,
    pub purchased: Credits,
    pub period_start: i64,
    pub period_end: i64,
    /// Part of the balance reserved by instances' credit slices (spent from them or given back).
    pub leased: Credits,
}

/// Plan counters of an account (admin view).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: i64,
    pub tokens: i64,
    pub resources: std::collections::BTreeMap<String, i64>,
}

impl AccountState {
    pub fn total(&self) -> Credits {
        self.allowance + self.purchased
    }

    /// Takes what this instance served from its slice and Redis has not seen yet off the
    /// balance (allowance first, as its report will), so the view is exact for one instance.
    pub fn less_unconfirmed(mut self, unconfirmed: Credits) -> Self {
        if unconfirmed != Credits::ZERO {
            let from_allowance = unconfirmed.min(self.allowance.max(Credits::ZERO));
            self.allowance -= from_allowance;
            self.purchased -= unconfirmed - from_allowance;
            self.leased = (self.leased - unconfirmed).max(Credits::ZERO);
        }
        self
    }
}

/// The scripts and the key layout of one deployment.
pub struct Ledger {
    /// Redis's clock minus ours (ms), measured at start and refreshed, so debit deadlines are
    /// expressed in Redis's clock whatever the skew between hosts.
    clock_offset_ms: std::sync::atomic::AtomicI64,
    clock_known: std::sync::atomic::AtomicBool,
    pub prefix: String,
    pub shards: u32,
    pub timeout: Duration,
    debit: Script,
    credit: Script,
    hydrate: Script,
    set_tier: Script,
    settle: Script,
    extend: Script,
    sweep: Script,
    uncount: Script,
    /// Group commit of exact debits and settles (`[redis] group_commit`); `None`: one call
    /// per request.
    group_debit: Option<group_commit::GroupCommit>,
    group_settle: Option<group_commit::GroupCommit>,
}

use crate::redis_conn::{reply_int as int, reply_text as text};

fn reply_err(reply: &[Value]) -> LedgerError {
    LedgerError::Reply(format!("{reply:?}"))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Ledger {
    pub fn new(prefix: &str, shards: u32, timeout: Duration) -> Self {
        let with_period = |body: &str| format!("{PERIOD_LUA}\n{body}");
        Ledger {
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            clock_known: std::sync::atomic::AtomicBool::new(false),
            prefix: prefix.to_string(),
            shards,
            timeout,
            debit: Script::new(&with_period(include_str!("debit.lua"))),
            credit: Script::new(include_str!("credit.lua")),
            hydrate: Script::new(include_str!("hydrate.lua")),
            set_tier: Script::new(include_str!("set_tier.lua")),
            settle: Script::new(&format!("{HOLD_LUA}\n{}", include_str!("settle.lua"))),
            extend: Script::new(&format!("{HOLD_LUA}\n{}", include_str!("extend.lua"))),
            sweep: Script::new(include_str!("sweep.lua")),
            uncount: Script::new(include_str!("uncount.lua")),
            group_debit: None,
            group_settle: None,
        }
    }

    /// Group commit: exact debits (and settles) of one shard that arrive while one is in
    /// flight go together in one call (at most `max_batch` per call). `metrics`: the counters
    /// by script (`tollgate_redis_grouped_*_total`).
    pub fn with_group_commit(mut self, max_batch: usize, metrics: Option<GroupMetrics>) -> Self {
        let counters = |script: &str| {
            metrics.as_ref().map(|m| group_commit::GroupCounters {
                calls: m.calls.with_label_values(&[script]),
                requests: m.requests.with_label_values(&[script]),
            })
        };
        self.group_debit = Some(group_commit::GroupCommit::new(
            group_commit::batch_script(&format!("{PERIOD_LUA}\n{}", include_str!("debit.lua"))),
            debit::SHAPE,
            self.shards,
            max_batch,
            self.timeout,
            counters("debit"),
        ));
        self.group_settle = Some(group_commit::GroupCommit::new(
            group_commit::batch_script(&format!("{HOLD_LUA}\n{}", include_str!("settle.lua"))),
            holds::SETTLE_SHAPE,
            self.shards,
            max_batch,
            self.timeout,
            counters("settle"),
        ));
        self
    }

    /// One call of `single` (a script of `group`'s shape): a place in the shard's next grouped
    /// call when group commit is on, else a call of its own; both within the ledger's timeout.
    async fn call_script(
        &self,
        group: Option<&group_commit::GroupCommit>,
        single: &Script,
        shard: u32,
        conn: &mut RedisConn,
        call: group_commit::Call,
    ) -> Result<Vec<Value>, LedgerError> {
        let call = match group {
            Some(group) => {
                match tokio::time::timeout(self.timeout, group.call(shard, conn, call)).await {
                    Ok(Ok(Ok(Value::Array(reply)))) => return Ok(reply),
                    Ok(Ok(Ok(other))) => return Err(LedgerError::Reply(format!("{other:?}"))),
                    Ok(Ok(Err(failure))) => return Err(LedgerError::Batch(failure)),
                    Err(_) => return Err(LedgerError::Timeout(self.timeout)),
                    // No queue could take it: a call of its own.
                    Ok(Err(call)) => call,
                }
            }
            None => call,
        };
        let mut inv = single.prepare_invoke();
        for k in &call.keys {
            inv.key(k.as_str());
        }
        for a in &call.args {
            inv.arg(a.as_slice());
        }
        self.timed(inv.invoke_async(conn)).await
    }

    /// Measures Redis's clock against ours (half the round trip assumed each way).
    pub async fn sync_clock(&self, conn: &mut RedisConn) -> Result<(), LedgerError> {
        let before = now_ms();
        let (secs, micros): (i64, i64) = self.timed(redis::cmd("TIME").query_async(conn)).await?;
        let after = now_ms();
        let redis_ms = secs * 1000 + micros / 1000;
        let offset = redis_ms - (before + after) / 2;
        self.clock_offset_ms
            .store(offset, std::sync::atomic::Ordering::Relaxed);
        self.clock_known
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The debit deadline for a call starting now: three quarters of the Redis timeout, in
    /// Redis's clock, so a reply still has time to arrive before the caller gives up. 0 while
    /// the clock offset is unknown.
    pub fn deadline_ms(&self) -> i64 {
        if !self.clock_known.load(std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        let budget = (self.timeout.as_millis() as i64 * 3) / 4;
        now_ms()
            + self
                .clock_offset_ms
                .load(std::sync::atomic::Ordering::Relaxed)
            + budget
    }

    /// Redis's clock now (unix ms), or `None` while the offset is unknown.
    pub fn redis_now_ms(&self) -> Option<i64> {
        self.clock_known
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| {
                now_ms()
                    + self
                        .clock_offset_ms
                        .load(std::sync::atomic::Ordering::Relaxed)
            })
    }

    pub fn keys(&self, account_id: &str) -> AccountKeys {
        AccountKeys::new(&self.prefix, self.shards, account_id)
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LedgerError::Timeout(self.timeout)),
        }
    }

    /// Grants, purchases, refunds: idempotent on `external_id`.
    pub async fn credit(
        &self,
        conn: &mut RedisConn,
        r: &CreditRequest<'_>,
    ) -> Result<CreditOutcome, LedgerError> {
        let k = self.keys(r.account_id);
        let reply: Vec<Value> = self
            .timed(
                self.credit
                    .key(&k.account)
                    .key(&k.stream)
                    .key(k.seen(r.external_id))
                    .arg(r.account_id)
                    .arg(r.kind)
                    .arg(r.to_allowance.micros())
                    .arg(r.to_purchased.micros())
                    .arg(r.now_ms)
                    .arg(r.entry_id)
                    .arg(r.mark_ttl.as_secs().max(1))
                    .arg(r.route)
                    .arg(r.action)
                    .arg(r.request_id)
                    .arg(r.reason)
                    .arg(r.counted.micros())
                    .invoke_async(conn),
            )
            .await?;
        let at = |i: usize| reply.get(i).and_then(int).ok_or_else(|| reply_err(&reply));
        Ok(match at(0)? {
            0 => CreditOutcome::Applied {
                allowance: Credits::from_micros(at(1)?),
                purchased: Credits::from_micros(at(2)?),
            },
            1 => CreditOutcome::Missing,
            2 => CreditOutcome::Duplicate {
                allowance: Credits::from_micros(at(1)?),
                purchased: Credits::from_micros(at(2)?),
            },
            _ => return Err(reply_err(&reply)),
        })
    }

    /// Whether Redis holds the idempotency mark of a credit (it ran and was not lost).
    pub async fn credit_mark_exists(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        external_id: &str,
    ) -> Result<bool, LedgerError> {
        let mark = self.keys(account_id).seen(external_id);
        self.timed(redis::cmd("EXISTS").arg(&mark).query_async(conn))
            .await
    }

    /// Changes the tier in Redis (allowance becomes the new tier's monthly credits). `false`
    /// when the account is not in Redis (it will be hydrated with the new tier).
    pub async fn set_tier(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        tier: &str,
        monthly: Option<Credits>,
        entry_id: &str,
    ) -> Result<bool, LedgerError> {
        let k = self.keys(account_id);
        let reply: Vec<Value> = self
            .timed(
                self.set_tier
                    .key(&k.account)
                    .key(&k.stream)
                    .arg(account_id)
                    .arg(tier)
                    .arg(monthly.map_or(-1, Credits::micros))
                    .arg(now_ms())
                    .arg(entry_id)
                    .invoke_async(conn),
            )
            .await?;
        Ok(reply.first().and_then(int) == Some(0))
    }
}
