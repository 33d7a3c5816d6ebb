//! The hot path's one ledger call: `debit.lua` (rolls the period, checks status, quotas,
//! concurrency and balance, takes the price, journals it), made alone or in the shard's next
//! grouped call (`group_commit.rs`).

use redis::Value;

use super::group_commit::{Call, Shape};
use super::{int, keys, reply_err, text, Ledger, LedgerError};
use crate::money::Credits;
use crate::redis_conn::RedisConn;

/// `debit.lua` takes 6 keys and 23 arguments (its header lists them).
pub(super) const SHAPE: Shape = Shape { keys: 6, args: 23 };

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

impl Ledger {
    /// The hot path: one EVALSHA, or a place in the shard's next grouped call.
    pub async fn debit(
        &self,
        conn: &mut RedisConn,
        r: &DebitRequest<'_>,
    ) -> Result<DebitOutcome, LedgerError> {
        let shard = keys::shard_of(r.account_id, self.shards);
        let call = self.debit_call(r);
        let reply = self
            .call_script(self.group_debit.as_ref(), &self.debit, shard, conn, call)
            .await?;
        parse_debit(reply)
    }

    /// `debit.lua`'s keys and arguments (the order its header documents).
    fn debit_call(&self, r: &DebitRequest<'_>) -> Call {
        use redis::ToRedisArgs;
        let k = self.keys(r.account_id);
        let monthly = r.monthly.map_or(-1, Credits::micros);
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(SHAPE.args);
        r.account_id.write_redis_args(&mut args);
        r.tier.write_redis_args(&mut args);
        monthly.write_redis_args(&mut args);
        r.cost.micros().write_redis_args(&mut args);
        r.now_ms.write_redis_args(&mut args);
        r.request_id.write_redis_args(&mut args);
        r.route.write_redis_args(&mut args);
        r.action.write_redis_args(&mut args);
        r.requests_per_hour.write_redis_args(&mut args);
        r.requests_per_month.write_redis_args(&mut args);
        r.action_per_hour.write_redis_args(&mut args);
        r.action_per_month.write_redis_args(&mut args);
        r.max_concurrent.write_redis_args(&mut args);
        r.lease_ttl_ms.write_redis_args(&mut args);
        r.charge_id.write_redis_args(&mut args);
        r.deadline_ms.write_redis_args(&mut args);
        r.hold_ttl_ms.write_redis_args(&mut args);
        r.wanted
            .map_or(-1, Credits::micros)
            .write_redis_args(&mut args);
        r.tokens_per_month.write_redis_args(&mut args);
        r.counts.map_or("", |c| c.0).write_redis_args(&mut args);
        r.counts.map_or(0, |c| c.1).write_redis_args(&mut args);
        r.counts
            .and_then(|c| c.2)
            .map_or(-1, |l| l.min(i64::MAX as u64) as i64)
            .write_redis_args(&mut args);
        r.action_max_concurrent.write_redis_args(&mut args);
        debug_assert_eq!(args.len(), SHAPE.args);
        let action_leases = k.action_leases(r.action);
        let keys = vec![
            k.account,
            k.stream,
            k.leases,
            k.holds,
            k.hold_data,
            action_leases,
        ];
        debug_assert_eq!(keys.len(), SHAPE.keys);
        Call { keys, args }
    }
}

/// `debit.lua`'s reply (documented in its header); `{-1, message}` is a grouped debit whose
/// script raised an error.
fn parse_debit(reply: Vec<Value>) -> Result<DebitOutcome, LedgerError> {
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
