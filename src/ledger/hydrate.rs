//! Hydration: an account missing from Redis (new, evicted, or Redis lost its data) is rebuilt
//! from Postgres: tier, status and period from `accounts`, the buckets from the journal's sums.
//! An account with no journal yet opens with its tier's monthly allowance, journaled.

use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::{Ledger, LedgerError};
use crate::config::{Config, MonthlyCredits};
use crate::money::Credits;

/// Bucket sums of an account's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalSums {
    pub entries: i64,
    pub allowance: Credits,
    pub purchased: Credits,
}

pub async fn journal_sums(pg: &PgPool, account_id: &str) -> Result<JournalSums, sqlx::Error> {
    let (entries, allowance, purchased): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT
           FROM ledger_entries WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_one(pg)
    .await?;
    Ok(JournalSums {
        entries,
        allowance: Credits::from_micros(allowance),
        purchased: Credits::from_micros(purchased),
    })
}

impl Ledger {
    /// Loads the account into Redis unless it is already there. `Ok(true)` when this call
    /// created it.
    pub async fn hydrate(
        &self,
        conn: &mut ConnectionManager,
        pg: &PgPool,
        config: &Config,
        account_id: &str,
    ) -> Result<bool, LedgerError> {
        let row = crate::store::accounts::get(pg, account_id)
            .await?
            .ok_or_else(|| LedgerError::NoSuchAccount(account_id.to_string()))?;
        let tier = config
            .tier(&row.tier)
            .ok_or_else(|| LedgerError::UnknownTier {
                account: account_id.to_string(),
                tier: row.tier.clone(),
            })?;
        let sums = journal_sums(pg, account_id).await?;
        let opening = sums.entries == 0;
        let (allowance, purchased) = if opening {
            let monthly = match tier.raw.monthly_credits {
                MonthlyCredits::Limited(c) => c,
                MonthlyCredits::Unlimited => Credits::ZERO,
            };
            (monthly, Credits::ZERO)
        } else {
            (sums.allowance, sums.purchased)
        };
        let k = self.keys(account_id);
        let created: i64 = self
            .timed(
                self.hydrate
                    .key(&k.account)
                    .key(&k.stream)
                    .arg(&row.tier)
                    .arg(&row.status)
                    .arg(allowance.micros())
                    .arg(purchased.micros())
                    .arg(row.period_start.timestamp())
                    .arg(row.period_end.timestamp())
                    .arg(row.anchor_day)
                    .arg(account_id)
                    .arg(if opening { "1" } else { "0" })
                    .arg(super::now_ms())
                    .invoke_async(conn),
            )
            .await?;
        if created == 1 {
            tracing::info!(account = %account_id, opening, "account hydrated into Redis");
        }
        Ok(created == 1)
    }
}
