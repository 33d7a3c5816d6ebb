//! Hydration: an account missing from Redis (new, evicted, or Redis lost its data) is rebuilt
//! from Postgres: tier, status and period from `accounts`, the buckets from the journal's sums
//! (plus the account's entries still in its shard stream, not yet flushed).
//! An account with no journal yet opens with its tier's monthly allowance, journaled.

use crate::redis_conn::RedisConn;
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

/// The journal's view of an account about to be hydrated: its rows in Postgres plus its
/// entries still waiting in the shard stream. Without the latter, an account hash that goes
/// away (evicted, deleted) while some of its entries are unflushed would come back without
/// their effect, and an account whose opening entry is unflushed would be opened twice.
/// Redis first (atomically), then one Postgres statement: every entry counts once (see
/// [`super::snapshot::journal_view`]). No entry of the account can be added to the
/// stream meanwhile: the scripts refuse an account whose hash is absent.
pub async fn journal_view(
    conn: &mut RedisConn,
    pg: &PgPool,
    keys: &super::keys::AccountKeys,
    account_id: &str,
    timeout: std::time::Duration,
) -> Result<JournalSums, LedgerError> {
    let snap = tokio::time::timeout(timeout, super::snapshot::snapshot(conn, keys, account_id))
        .await
        .map_err(|_| LedgerError::Timeout(timeout))??;
    let view = super::snapshot::journal_view(pg, account_id, &snap.pending).await?;
    let (allowance, purchased) = view.total();
    Ok(JournalSums {
        entries: view.entries(),
        allowance: Credits::from_micros(allowance),
        purchased: Credits::from_micros(purchased),
    })
}

impl Ledger {
    /// Loads the account into Redis unless it is already there. `Ok(true)` when this call
    /// created it.
    pub async fn hydrate(
        &self,
        conn: &mut RedisConn,
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
        let k = self.keys(account_id);
        let sums = journal_view(conn, pg, &k, account_id, self.timeout).await?;
        // A subscription past due (Stripe): the grace deadline, so the debit script keeps
        // freezing the allowance after it even when Redis lost the account.
        let grace_until: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT grace_until FROM accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(pg)
                .await?
                .flatten();
        let opening = sums.entries == 0;
        let (allowance, purchased) = if opening {
            let monthly = match tier.monthly_credits() {
                MonthlyCredits::Limited(c) => c,
                MonthlyCredits::Unlimited => Credits::ZERO,
            };
            (monthly, Credits::ZERO)
        } else {
            (sums.allowance, sums.purchased)
        };
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
                    .arg(grace_until.map_or(0, |t| t.timestamp()))
                    .invoke_async(conn),
            )
            .await?;
        if created == 1 {
            tracing::info!(account = %account_id, opening, "account hydrated into Redis");
        }
        Ok(created == 1)
    }
}
