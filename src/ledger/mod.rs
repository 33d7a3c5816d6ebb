//! The money path in Redis: live balances, quotas and leases per account, changed only by Lua
//! scripts (one call = one hash slot = atomic), each change appended to the shard's usage
//! stream in the same script. Scripts are called by SHA and reloaded on NOSCRIPT
//! (`redis::Script`); a changed script has a new SHA, so old and new proxies coexist during a
//! rolling deploy.

pub mod billing;
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
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("account {0:?} does not exist")]
    NoSuchAccount(String),
    #[error("account {account:?} has tier {tier:?}, which the config does not define")]
    UnknownTier { account: String, tier: String },
}

/// One debit: what the proxy knows about the caller's plan and the price.
#[derive(Debug, Clone)]
pub struct DebitRequest<'a> {
    pub account_id: &'a str,
    pub tier: &'a str,
    /// `None` = unlimited.
    pub monthly: Option<Credits>,
    pub cost: Credits,
    pub now_ms: i64,
    /// The request id as the client and the logs know it (may be client-supplied).
    pub request_id: &'a str,
    /// Unique per debit, minted by tollgate: journal entry ids and the concurrency lease are
    /// keyed by it, so a client repeating an `X-Request-Id` cannot collide with itself.
    pub charge_id: &'a str,
    pub route: &'a str,
    pub action: &'a str,
    pub requests_per_hour: u64,
    pub requests_per_month: u64,
    pub action_per_hour: u64,
    pub action_per_month: u64,
    pub max_concurrent: u32,
    pub lease_ttl_ms: u64,
    /// Past this instant in Redis's clock (unix ms) the script refuses to charge: the caller
    /// will have timed out. 0 = no deadline.
    pub deadline_ms: i64,
    /// Hold what is taken until settle (ms it lives unsettled; 0 = a plain debit).
    pub hold_ttl_ms: u64,
    /// Holds only: take up to this much when available (at least `cost`); `None` = all.
    pub wanted: Option<Credits>,
    /// The tier's tokens per period (0 = no limit).
    pub tokens_per_month: u64,
    /// The resource the route counts, its delta, and the tier's limit (`None` = unlimited).
    pub counts: Option<(&'a str, i64, Option<u64>)>,
    /// Requests of this action in flight (0 = no limit).
    pub action_max_concurrent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebitOutcome {
    Charged {
        from_allowance: Credits,
        from_purchased: Credits,
        allowance: Credits,
        purchased: Credits,
        period_end: i64,
        /// The amount debited (and held, for a hold).
        taken: Credits,
    },
    /// Not in Redis: hydrate from Postgres and retry.
    Missing,
    Insufficient {
        allowance: Credits,
        purchased: Credits,
        /// Reserved by credit slices (not free, though part of the balance).
        leased: Credits,
    },
    Quota {
        name: String,
        limit: u64,
        retry_after_secs: u64,
    },
    Concurrency {
        limit: u32,
    },
    Inactive {
        status: String,
    },
    /// Redis holds another tier than the caller's cached identity (a tier change in flight).
    TierMismatch {
        tier: String,
    },
    /// The script ran after the caller's deadline and charged nothing.
    Expired,
    /// The counted resource is at the tier's limit.
    LimitReached {
        resource: String,
        limit: u64,
    },
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
        }
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

    /// The hot path: one EVALSHA.
    pub async fn debit(
        &self,
        conn: &mut RedisConn,
        r: &DebitRequest<'_>,
    ) -> Result<DebitOutcome, LedgerError> {
        let k = self.keys(r.account_id);
        let monthly = r.monthly.map_or(-1, Credits::micros);
        let reply: Vec<Value> = self
            .timed(
                self.debit
                    .key(&k.account)
                    .key(&k.stream)
                    .key(&k.leases)
                    .key(&k.holds)
                    .key(&k.hold_data)
                    .key(k.action_leases(r.action))
                    .arg(r.account_id)
                    .arg(r.tier)
                    .arg(monthly)
                    .arg(r.cost.micros())
                    .arg(r.now_ms)
                    .arg(r.request_id)
                    .arg(r.route)
                    .arg(r.action)
                    .arg(r.requests_per_hour)
                    .arg(r.requests_per_month)
                    .arg(r.action_per_hour)
                    .arg(r.action_per_month)
                    .arg(r.max_concurrent)
                    .arg(r.lease_ttl_ms)
                    .arg(r.charge_id)
                    .arg(r.deadline_ms)
                    .arg(r.hold_ttl_ms)
                    .arg(r.wanted.map_or(-1, Credits::micros))
                    .arg(r.tokens_per_month)
                    .arg(r.counts.map_or("", |c| c.0))
                    .arg(r.counts.map_or(0, |c| c.1))
                    .arg(
                        r.counts
                            .and_then(|c| c.2)
                            .map_or(-1, |l| l.min(i64::MAX as u64) as i64),
                    )
                    .arg(r.action_max_concurrent)
                    .invoke_async(conn),
            )
            .await?;
        let at = |i: usize| reply.get(i).and_then(int).ok_or_else(|| reply_err(&reply));
        let c = |i: usize| at(i).map(Credits::from_micros);
        Ok(match at(0)? {
            0 => DebitOutcome::Charged {
                from_allowance: c(1)?,
                from_purchased: c(2)?,
                allowance: c(3)?,
                purchased: c(4)?,
                period_end: at(5)?,
                taken: c(6)?,
            },
            1 => DebitOutcome::Missing,
            2 => DebitOutcome::Insufficient {
                allowance: c(1)?,
                purchased: c(2)?,
                leased: c(3).unwrap_or(Credits::ZERO),
            },
            3 => DebitOutcome::Quota {
                name: reply.get(1).and_then(text).unwrap_or_default(),
                limit: at(2)?.max(0) as u64,
                retry_after_secs: at(3)?.max(1) as u64,
            },
            4 => DebitOutcome::Concurrency {
                limit: at(1)?.max(0) as u32,
            },
            5 => DebitOutcome::Inactive {
                status: reply.get(1).and_then(text).unwrap_or_default(),
            },
            6 => DebitOutcome::TierMismatch {
                tier: reply.get(1).and_then(text).unwrap_or_default(),
            },
            7 => DebitOutcome::Expired,
            8 => DebitOutcome::LimitReached {
                resource: reply.get(1).and_then(text).unwrap_or_default(),
                limit: at(2)?.max(0) as u64,
            },
            _ => return Err(reply_err(&reply)),
        })
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
