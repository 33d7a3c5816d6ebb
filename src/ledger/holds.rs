//! Reserve-then-settle in Redis: a hold is taken by the debit script (what was debited is
//! remembered per shard with an expiry), grown by `extend.lua` (per-minute sessions, long
//! streams), ended by `settle.lua` with the true cost, and — when its instance died — found by
//! `sweep.lua` and settled at what it holds by any instance.

use crate::redis_conn::RedisConn;
use redis::Value;

use super::group_commit::{Call, Shape};
use super::{int, keys, reply_err, Ledger, LedgerError};
use crate::money::Credits;

/// `settle.lua` takes 6 keys and 9 arguments (its header lists them).
pub(super) const SETTLE_SHAPE: Shape = Shape { keys: 6, args: 9 };

/// What a request really used, for the settle entry.
#[derive(Debug, Clone, Default)]
pub struct SettleRequest<'a> {
    pub account_id: &'a str,
    pub charge_id: &'a str,
    /// The true cost; `None` settles at what is held (an expired hold).
    pub cost: Option<Credits>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub status: u16,
    pub duration_ms: u64,
    pub reason: &'a str,
    /// The request's action (its per-action lease is released with the hold).
    pub action: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled {
        /// True cost minus what was held: negative is a refund, positive an extra charge.
        delta: Credits,
        allowance: Credits,
        purchased: Credits,
    },
    /// Already settled (by this request's other path, or by a sweeper).
    NotFound,
    /// The account is no longer in Redis; the hold was dropped.
    AccountGone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extended {
    pub taken: Credits,
    pub held: Credits,
    /// Took less than the step: the balance has run out.
    pub short: bool,
    pub balance: Credits,
}

impl Ledger {
    pub async fn settle(
        &self,
        conn: &mut RedisConn,
        r: &SettleRequest<'_>,
    ) -> Result<SettleOutcome, LedgerError> {
        use redis::ToRedisArgs;
        let k = self.keys(r.account_id);
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(SETTLE_SHAPE.args);
        r.charge_id.write_redis_args(&mut args);
        r.cost
            .map_or(0, Credits::micros)
            .write_redis_args(&mut args);
        super::now_ms().write_redis_args(&mut args);
        r.tokens_in.write_redis_args(&mut args);
        r.tokens_out.write_redis_args(&mut args);
        r.status.write_redis_args(&mut args);
        r.duration_ms.write_redis_args(&mut args);
        r.reason.write_redis_args(&mut args);
        (if r.cost.is_none() { "1" } else { "0" }).write_redis_args(&mut args);
        let action_leases = k.action_leases(r.action);
        let keys = vec![
            k.account,
            k.stream,
            k.holds,
            k.hold_data,
            k.leases,
            action_leases,
        ];
        let reply: Vec<Value> = self
            .call_script(
                self.group_settle.as_ref(),
                &self.settle,
                k.shard,
                conn,
                Call { keys, args },
            )
            .await?;
        let at = |i: usize| reply.get(i).and_then(int).ok_or_else(|| reply_err(&reply));
        Ok(match at(0)? {
            0 => SettleOutcome::Settled {
                delta: Credits::from_micros(at(1)?),
                allowance: Credits::from_micros(at(4)?),
                purchased: Credits::from_micros(at(5)?),
            },
            1 => SettleOutcome::NotFound,
            2 => SettleOutcome::AccountGone,
            _ => return Err(reply_err(&reply)),
        })
    }

    /// Renews a hold (and its lease) for `ttl_ms`, taking `step` more when it is not zero.
    /// `None`: the hold is gone (settled or swept).
    #[allow(clippy::too_many_arguments)] // the script's own arguments, one each
    pub async fn extend(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        charge_id: &str,
        step: Credits,
        ttl_ms: u64,
        reason: &str,
        action: &str,
    ) -> Result<Option<Extended>, LedgerError> {
        let k = self.keys(account_id);
        let reply: Vec<Value> = self
            .timed(
                self.extend
                    .key(&k.account)
                    .key(&k.stream)
                    .key(&k.holds)
                    .key(&k.hold_data)
                    .key(&k.leases)
                    .key(k.action_leases(action))
                    .arg(charge_id)
                    .arg(step.micros())
                    .arg(super::now_ms())
                    .arg(ttl_ms)
                    .arg(reason)
                    .invoke_async(conn),
            )
            .await?;
        let at = |i: usize| reply.get(i).and_then(int).ok_or_else(|| reply_err(&reply));
        Ok(match at(0)? {
            0 => Some(Extended {
                taken: Credits::from_micros(at(1)?),
                held: Credits::from_micros(at(2)?),
                short: at(3)? == 1,
                balance: Credits::from_micros(at(4)?),
            }),
            1 => None,
            _ => return Err(reply_err(&reply)),
        })
    }

    /// Expired holds of one shard: `(charge id, account id, action)`, at most `limit`.
    pub async fn expired_holds(
        &self,
        conn: &mut RedisConn,
        shard: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>, LedgerError> {
        let reply: Vec<String> = self
            .timed(
                self.sweep
                    .key(keys::holds(&self.prefix, shard))
                    .key(keys::hold_data(&self.prefix, shard))
                    .arg(now_ms)
                    .arg(limit)
                    .invoke_async(conn),
            )
            .await?;
        Ok(reply
            .chunks_exact(3)
            .map(|t| (t[0].clone(), t[1].clone(), t[2].clone()))
            .collect())
    }

    /// Settles every expired hold of every shard at what it holds; returns how many. A shard
    /// that cannot be reached (its cluster node is down) is skipped until the next sweep; the
    /// error is returned only after the other shards were swept.
    pub async fn sweep_expired(&self, conn: &mut RedisConn) -> Result<u64, LedgerError> {
        let mut settled = 0;
        let mut first_err = None;
        for shard in 0..self.shards {
            match self.sweep_shard(conn, shard).await {
                Ok(n) => settled += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if settled == 0 => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "sweeping holds: some shards could not be reached");
                Ok(settled)
            }
            None => Ok(settled),
        }
    }

    async fn sweep_shard(&self, conn: &mut RedisConn, shard: u32) -> Result<u64, LedgerError> {
        let mut settled = 0;
        loop {
            let expired = self
                .expired_holds(conn, shard, super::now_ms(), 100)
                .await?;
            let batch = expired.len();
            for (charge_id, account_id, action) in expired {
                let outcome = self
                    .settle(
                        conn,
                        &SettleRequest {
                            account_id: &account_id,
                            charge_id: &charge_id,
                            cost: None,
                            reason: "hold_expired",
                            action: &action,
                            ..SettleRequest::default()
                        },
                    )
                    .await?;
                if matches!(outcome, SettleOutcome::Settled { .. }) {
                    tracing::warn!(account = %account_id, charge_id = %charge_id, "an expired hold was settled at what it holds (its instance stopped before settling)");
                    settled += 1;
                }
            }
            if batch < 100 {
                return Ok(settled);
            }
        }
    }
}
