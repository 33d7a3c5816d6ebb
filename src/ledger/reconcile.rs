//! Credits recorded in Postgres whose journal entry never came.
//!
//! A credit pack purchase, a refund's clawback and an admin grant are recorded in Postgres
//! (`purchases`, `purchase_refunds`, `grants`) and applied by the credit script, which writes
//! the bucket, the idempotency mark and the stream entry in one step. Redis replicates
//! asynchronously: a failover can lose an acknowledged write, and with it the credit, its
//! mark and its entry together (a script's effects replicate as one unit). The customer paid
//! and the row says so, but the balance and the journal do not.
//!
//! Every `journal.reconcile_after_seconds`, every instance looks for credits recorded at least
//! that long ago (and less than [`WINDOW`] ago) whose entry is not in the journal and applies
//! them again with the same idempotency key. Where Redis still holds the mark (the entry is
//! only waiting in the stream) that is a no-op; where the mark is gone, the credit was lost and
//! is applied now. Concurrent passes are safe (the script checks the mark atomically). The
//! window is shorter than every mark's lifetime, so an expired mark is never taken for a lost
//! credit. Both applications date their entry by the record's `created_at`, so the journal's
//! key `(entry_id, created_at)` stores one row even when a flusher still held the lost original
//! and writes it late.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{CreditOutcome, CreditRequest, Ledger, LedgerError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::money::Credits;
use crate::redis_conn::RedisConn;

/// How far back recorded credits are checked; shorter than the marks' lifetimes.
pub const WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Idempotency marks of Stripe credits (purchases, clawbacks, renewals).
pub const STRIPE_MARK_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Idempotency marks of admin grants.
pub const GRANT_MARK_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A credit as Postgres recorded it: everything the credit script needs to apply it, built the
/// same way by the handler that applied it first and by the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCredit {
    pub account_id: String,
    /// Journal kind: purchase, adjustment (a clawback) or grant.
    pub kind: &'static str,
    /// The journal entry id, also the idempotency key.
    pub entry_id: String,
    pub to_purchased: Credits,
    pub request_id: String,
    pub reason: String,
    pub mark_ttl: Duration,
    /// When Postgres recorded it (unix ms): the journal entry's date, whoever applies it.
    pub at_ms: i64,
}

impl RecordedCredit {
    /// A credit pack bought through Stripe Checkout.
    pub fn purchase(
        account_id: &str,
        session_id: &str,
        pack_id: &str,
        total: Credits,
        at_ms: i64,
    ) -> Self {
        RecordedCredit {
            account_id: account_id.to_string(),
            kind: "purchase",
            entry_id: format!("purchase:{session_id}"),
            to_purchased: total,
            request_id: session_id.to_string(),
            reason: format!("credit pack {pack_id} (Stripe {session_id})"),
            mark_ttl: STRIPE_MARK_TTL,
            at_ms,
        }
    }

    /// Credits taken back by a Stripe refund state of a purchase (`clawed_back` > 0).
    pub fn clawback(
        account_id: &str,
        charge_id: &str,
        session_id: &str,
        refunded_cents: i64,
        amount_cents: i64,
        clawed_back: Credits,
        at_ms: i64,
    ) -> Self {
        RecordedCredit {
            account_id: account_id.to_string(),
            kind: "adjustment",
            entry_id: format!("refund:{charge_id}:{refunded_cents}"),
            to_purchased: -clawed_back,
            request_id: charge_id.to_string(),
            reason: format!(
                "Stripe refund of {session_id}: {refunded_cents} of {amount_cents} cents"
            ),
            mark_ttl: STRIPE_MARK_TTL,
            at_ms,
        }
    }

    /// An admin grant (`POST /v1/accounts/{id}/grants`).
    pub fn grant(
        account_id: &str,
        idempotency_key: &str,
        credits: Credits,
        reason: &str,
        at_ms: i64,
    ) -> Self {
        RecordedCredit {
            account_id: account_id.to_string(),
            kind: "grant",
            entry_id: format!("grant:{account_id}:{idempotency_key}"),
            to_purchased: credits,
            request_id: String::new(),
            reason: reason.to_string(),
            mark_ttl: GRANT_MARK_TTL,
            at_ms,
        }
    }

    /// The credit script's request (the entry id is the idempotency key).
    pub fn request(&self) -> CreditRequest<'_> {
        CreditRequest {
            account_id: &self.account_id,
            kind: self.kind,
            to_allowance: Credits::ZERO,
            to_purchased: self.to_purchased,
            counted: Credits::ZERO,
            entry_id: &self.entry_id,
            external_id: &self.entry_id,
            mark_ttl: self.mark_ttl,
            route: "",
            action: "",
            request_id: &self.request_id,
            reason: &self.reason,
            now_ms: self.at_ms,
        }
    }
}

/// `created_at` as unix milliseconds, the date of the credit's journal entry.
pub const CREATED_MS: &str = "(extract(epoch FROM created_at) * 1000)::BIGINT";

/// Recorded credits between `WINDOW` and `older_than` ago without their journal entry.
pub async fn missing_from_journal(
    pg: &PgPool,
    older_than: Duration,
) -> Result<Vec<RecordedCredit>, sqlx::Error> {
    let secs = |d: Duration| d.as_secs_f64();
    // The entry carries the record's `created_at`: the lookup hits one partition.
    let purchases: Vec<(String, String, String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT p.account_id, p.session_id, p.pack_id, p.credits + p.bonus_credits, {CREATED_MS}
           FROM purchases p
          WHERE p.created_at < now() - make_interval(secs => $1)
            AND p.created_at > now() - make_interval(secs => $2)
            AND NOT EXISTS (SELECT 1 FROM ledger_entries e
                             WHERE e.entry_id = 'purchase:' || p.session_id
                               AND e.created_at > p.created_at - interval '1 day')
          ORDER BY p.created_at"
    ))
    .bind(secs(older_than))
    .bind(secs(WINDOW))
    .fetch_all(pg)
    .await?;
    let clawbacks: Vec<(String, String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.account_id, r.charge_id, r.session_id, r.amount_refunded,
                COALESCE(r.charge_amount_cents, p.amount_cents), r.clawed_back,
                (extract(epoch FROM r.created_at) * 1000)::BIGINT
           FROM purchase_refunds r JOIN purchases p ON p.session_id = r.session_id
          WHERE r.clawed_back > 0
            AND r.created_at < now() - make_interval(secs => $1)
            AND r.created_at > now() - make_interval(secs => $2)
            AND NOT EXISTS (SELECT 1 FROM ledger_entries e
                             WHERE e.entry_id = 'refund:' || r.charge_id || ':' || r.amount_refunded
                               AND e.created_at > r.created_at - interval '1 day')
          ORDER BY r.created_at",
    )
    .bind(secs(older_than))
    .bind(secs(WINDOW))
    .fetch_all(pg)
    .await?;
    // Only grants the API confirmed (`applied`): one answered with an error is not owed.
    let grants: Vec<(String, String, i64, String, i64)> = sqlx::query_as(&format!(
        "SELECT g.account_id, g.idempotency_key, g.credits, g.reason, {CREATED_MS}
           FROM grants g
          WHERE g.applied
            AND g.created_at < now() - make_interval(secs => $1)
            AND g.created_at > now() - make_interval(secs => $2)
            AND NOT EXISTS (SELECT 1 FROM ledger_entries e
                             WHERE e.entry_id = 'grant:' || g.account_id || ':' || g.idempotency_key
                               AND e.created_at > g.created_at - interval '1 day')
          ORDER BY g.created_at"
    ))
    .bind(secs(older_than))
    .bind(secs(WINDOW))
    .fetch_all(pg)
    .await?;

    let mut out = Vec::with_capacity(purchases.len() + clawbacks.len() + grants.len());
    out.extend(purchases.into_iter().map(|(a, s, pack, total, at)| {
        RecordedCredit::purchase(&a, &s, &pack, Credits::from_micros(total), at)
    }));
    out.extend(
        clawbacks
            .into_iter()
            .map(|(a, charge, session, refunded, amount, clawed, at)| {
                RecordedCredit::clawback(
                    &a,
                    &charge,
                    &session,
                    refunded,
                    amount,
                    Credits::from_micros(clawed),
                    at,
                )
            }),
    );
    out.extend(grants.into_iter().map(|(a, key, credits, reason, at)| {
        RecordedCredit::grant(&a, &key, Credits::from_micros(credits), &reason, at)
    }));
    Ok(out)
}

/// What a reconciliation found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Recorded credits without their journal entry.
    pub checked: usize,
    /// Still in Redis (the mark is there): their entries are waiting to be flushed.
    pub in_redis: usize,
    /// Lost by Redis and applied again (with `dry_run`: would be).
    pub reapplied: Vec<RecordedCredit>,
    /// Credits that could not be checked this time: `(entry id, error)`.
    pub failed: Vec<(String, String)>,
    pub dry_run: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would re-apply"
        } else {
            "re-applied"
        };
        for c in &self.reapplied {
            writeln!(
                f,
                "{verb} {} {} to {}: {} credits ({})",
                c.kind, c.entry_id, c.account_id, c.to_purchased, c.reason
            )?;
        }
        for (entry, error) in &self.failed {
            writeln!(f, "could not check {entry}: {error}")?;
        }
        writeln!(
            f,
            "reconcile: {} recorded credits without a journal entry, {} still in Redis, {} {verb}, {} failed",
            self.checked,
            self.in_redis,
            self.reapplied.len(),
            self.failed.len()
        )
    }
}

/// One pass: every recorded credit missing from the journal is applied again unless Redis
/// still holds its mark. An account Redis lost altogether is loaded from the journal first.
/// A credit that cannot be checked is reported and the pass goes on.
pub async fn run_once(
    ledger: &Ledger,
    conn: &mut RedisConn,
    pg: &PgPool,
    config: &Config,
    older_than: Duration,
    dry_run: bool,
) -> Result<Report, LedgerError> {
    let missing = missing_from_journal(pg, older_than).await?;
    let mut report = Report {
        checked: missing.len(),
        dry_run,
        ..Report::default()
    };
    for credit in missing {
        let applied = if dry_run {
            ledger
                .credit_mark_exists(conn, &credit.account_id, &credit.entry_id)
                .await
                .map(|exists| !exists)
        } else {
            apply(ledger, conn, pg, config, &credit).await
        };
        match applied {
            Ok(true) => report.reapplied.push(credit),
            Ok(false) => report.in_redis += 1,
            Err(e) => report.failed.push((credit.entry_id, e.to_string())),
        }
    }
    Ok(report)
}

/// Applies one credit again; `true` when Redis had lost it.
async fn apply(
    ledger: &Ledger,
    conn: &mut RedisConn,
    pg: &PgPool,
    config: &Config,
    credit: &RecordedCredit,
) -> Result<bool, LedgerError> {
    for _ in 0..2 {
        match ledger.credit(conn, &credit.request()).await? {
            CreditOutcome::Applied { .. } => return Ok(true),
            CreditOutcome::Duplicate { .. } => return Ok(false),
            // Redis lost the whole account: load it from the journal, then credit it.
            CreditOutcome::Missing => {
                ledger.hydrate(conn, pg, config, &credit.account_id).await?;
            }
        }
    }
    Err(LedgerError::Reply(format!(
        "account {} vanished from Redis while its credit {} was re-applied",
        credit.account_id, credit.entry_id
    )))
}

/// The background task of `serve`: a pass every `every` (checking credits recorded at least
/// that long ago); `config` gives the tiers to load an account with.
pub async fn run(
    ledger: &Ledger,
    mut conn: RedisConn,
    pg: &PgPool,
    config: impl Fn() -> Arc<Config>,
    metrics: &Metrics,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let report = match run_once(ledger, &mut conn, pg, &config(), every, false).await {
            Ok(report) => report,
            Err(e) => Report {
                failed: vec![(String::new(), e.to_string())],
                ..Report::default()
            },
        };
        for c in &report.reapplied {
            metrics.credits_reapplied.with_label_values(&[c.kind]).inc();
            tracing::warn!(
                account = %c.account_id, entry = %c.entry_id, kind = c.kind,
                credits = %c.to_purchased,
                "credit lost by Redis (failover?) applied again"
            );
        }
        for (entry, error) in &report.failed {
            metrics
                .credits_reapplied
                .with_label_values(&["error"])
                .inc();
            tracing::warn!(entry = %entry, error = %error, "credit reconciliation failed; retrying next round");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_credits_keep_the_entry_ids_of_their_first_application() {
        let p = RecordedCredit::purchase("acct_1", "cs_1", "starter", Credits::from_micros(5), 9);
        assert_eq!(p.entry_id, "purchase:cs_1");
        assert_eq!(p.request().external_id, "purchase:cs_1");
        assert_eq!(p.request().now_ms, 9, "dated by the record");
        let r = RecordedCredit::clawback(
            "acct_1",
            "ch_1",
            "cs_1",
            250,
            1000,
            Credits::from_micros(7),
            9,
        );
        assert_eq!(r.entry_id, "refund:ch_1:250");
        assert_eq!(r.to_purchased, Credits::from_micros(-7));
        assert_eq!(r.kind, "adjustment");
        let g = RecordedCredit::grant("acct_1", "k1", Credits::from_micros(3), "welcome", 9);
        assert_eq!(g.entry_id, "grant:acct_1:k1");
        assert_eq!(g.request().reason, "welcome");
    }

    #[test]
    fn the_window_is_shorter_than_every_mark() {
        assert!(WINDOW < STRIPE_MARK_TTL && WINDOW < GRANT_MARK_TTL);
    }
}
