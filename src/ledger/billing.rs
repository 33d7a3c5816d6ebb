//! Subscription billing in Redis: a paid invoice renews the account (`renew.lua`), a failed one
//! puts it past due with a grace deadline (`billing_status.lua`). The Stripe webhooks call
//! these after recording the event in Postgres; both are safe to repeat.

use std::sync::LazyLock;
use std::time::Duration;

use crate::redis_conn::RedisConn;
use redis::{Script, Value};

use super::{int, reply_err, text, Ledger, LedgerError};
use crate::money::Credits;

static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("renew.lua")));
static BILLING_STATUS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("billing_status.lua")));

/// A paid subscription invoice, as the account should follow it.
#[derive(Debug, Clone)]
pub struct Renewal<'a> {
    pub account_id: &'a str,
    /// The account's tier (journaled with the reset).
    pub tier: &'a str,
    /// The tier's monthly credits; `None` = unlimited.
    pub monthly: Option<Credits>,
    /// The billing period the invoice starts (unix s).
    pub period_start: i64,
    pub period_end: i64,
    /// Day of month periods end on from now on.
    pub anchor_day: u32,
    /// `true` for a renewal (the allowance is reset), `false` to align the period only.
    pub reset: bool,
    /// Journal entry id of the reset, also the idempotency mark (one per invoice).
    pub entry_id: &'a str,
    pub mark_ttl: Duration,
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Applied; `reset` tells whether the allowance was reset (a new period began).
    Applied { reset: bool },
    /// This invoice was applied before.
    Duplicate,
    /// Not in Redis: hydrate and retry.
    Missing,
}

impl Ledger {
    /// Applies a paid invoice: status back to active, period aligned, allowance reset on a
    /// renewal. Idempotent on `entry_id`.
    pub async fn renew(
        &self,
        conn: &mut RedisConn,
        r: &Renewal<'_>,
    ) -> Result<RenewOutcome, LedgerError> {
        let k = self.keys(r.account_id);
        let reply: Vec<Value> = self
            .timed(
                RENEW
                    .key(&k.account)
                    .key(&k.stream)
                    .key(k.seen(r.entry_id))
                    .arg(r.account_id)
                    .arg(r.monthly.map_or(-1, Credits::micros))
                    .arg(r.period_start)
                    .arg(r.period_end)
                    .arg(r.anchor_day)
                    .arg(if r.reset { "1" } else { "0" })
                    .arg(r.now_ms)
                    .arg(r.entry_id)
                    .arg(r.mark_ttl.as_secs().max(1))
                    .arg(r.tier)
                    .invoke_async(conn),
            )
            .await?;
        let at = |i: usize| reply.get(i).and_then(int).ok_or_else(|| reply_err(&reply));
        Ok(match at(0)? {
            0 => RenewOutcome::Applied { reset: at(3)? == 1 },
            1 => RenewOutcome::Missing,
            2 => RenewOutcome::Duplicate,
            _ => return Err(reply_err(&reply)),
        })
    }

    /// Past due until `grace_until` (unix s), or back in good standing with `None`. Returns
    /// the status after the call (an operator's `suspended` is kept), `None` when the account
    /// is not in Redis.
    pub async fn set_billing_status(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        grace_until: Option<i64>,
    ) -> Result<Option<String>, LedgerError> {
        let k = self.keys(account_id);
        let reply: Vec<Value> = self
            .timed(
                BILLING_STATUS
                    .key(&k.account)
                    .arg(if grace_until.is_some() {
                        "past_due"
                    } else {
                        "active"
                    })
                    .arg(grace_until.unwrap_or(0))
                    .invoke_async(conn),
            )
            .await?;
        match reply.first().and_then(int) {
            Some(0) => Ok(Some(reply.get(1).and_then(text).unwrap_or_default())),
            Some(1) => Ok(None),
            _ => Err(reply_err(&reply)),
        }
    }
}
