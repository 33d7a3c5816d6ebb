//! Debits whose reply never came back.
//!
//! A debit script that ran while its reply was lost (Redis or a cluster node died after
//! executing it, the connection dropped, the reply came after `redis.timeout_ms`) has charged
//! a client who was answered 503 and never served. Re-sending it could charge twice, so no
//! one re-sends; instead the charge id is noted here and settled once the facts are in:
//!
//! 1. wait until Redis's clock is past the debit's deadline (the script refuses to run after
//!    it, so the debit cannot happen any more);
//! 2. a hold is settled at zero (the settle script removes it atomically; gone = never held or
//!    already settled, go on);
//! 3. wait until the shard's usage stream holds nothing older than the deadline (every entry
//!    written by then has reached Postgres), then look the debit entry up in the journal:
//!    absent = it never ran; present = refund exactly what it took (a `refund` entry with
//!    reason `unanswered_debit`, idempotent on the charge id).
//!
//! The list is worked on in the process that noted it and kept in Postgres too
//! (`unanswered_store`): a proxy that dies or shuts down with unresolved entries leaves them
//! to another instance. Bounded, so an outage cannot grow it without limit.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use redis::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::holds::{SettleOutcome, SettleRequest};
use super::unanswered_store as store;
pub use super::unanswered_store::Unanswered;
use super::{CreditOutcome, CreditRequest, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::money::Credits;
use crate::redis_conn::RedisConn;

/// Entries kept at most; past it new ones are only logged (error level, with the charge id).
const CAPACITY: usize = 100_000;
/// Skew allowed between the proxy's view of Redis's clock and the node that ran the script.
const CLOCK_MARGIN_MS: i64 = 1_000;
/// Without a known deadline (clock offset not measured yet), wait this long instead.
const NO_DEADLINE_WAIT: Duration = Duration::from_secs(5);
/// Unresolved this long (Redis or Postgres down all the while): give up, log it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
const ROUND_EVERY: Duration = Duration::from_secs(1);
const MARK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether an error leaves the debit's outcome unknown (it may have run).
pub fn outcome_unknown(e: &LedgerError) -> bool {
    match e {
        LedgerError::Timeout(_) | LedgerError::Reply(_) => true,
        LedgerError::Batch(failure) => failure.outcome_unknown,
        LedgerError::Redis(e) => {
            !e.is_connection_refusal()
                && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
        }
        _ => false,
    }
}

pub struct UnansweredDebits {
    queue: Mutex<VecDeque<Tracked>>,
    /// This process's name on the rows it works on.
    owner: String,
}

impl Default for UnansweredDebits {
    fn default() -> Self {
        UnansweredDebits {
            queue: Mutex::default(),
            owner: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// An entry of the list and whether Postgres has its row yet.
struct Tracked {
    u: Unanswered,
    stored: bool,
}

enum Resolution {
    Voided,
    NotRun,
    /// Already given back (by an earlier resolution of the same charge): nothing to do.
    Even,
    Later,
}

impl UnansweredDebits {
    /// Notes a debit to resolve; `false` when the list is full (the debit is logged instead).
    pub fn note(&self, u: Unanswered) -> bool {
        let Ok(mut q) = self.queue.lock() else {
            return false;
        };
        if q.len() >= CAPACITY {
            tracing::error!(account = %u.account_id, charge_id = %u.charge_id, request_id = %u.request_id, "unanswered debit not tracked (list full); check it by hand");
            return false;
        }
        q.push_back(Tracked { u, stored: false });
        true
    }

    pub fn len(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take_all(&self) -> Vec<Tracked> {
        self.queue
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }

    fn put_back(&self, items: Vec<Tracked>) {
        if let Ok(mut q) = self.queue.lock() {
            q.extend(items);
        }
    }
}

/// Resolves noted debits until `stop` (one round a second), and those other instances left.
pub async fn run(
    list: &UnansweredDebits,
    ledger: &Ledger,
    mut conn: RedisConn,
    pg: &PgPool,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                release(list, pg).await;
                return;
            }
            _ = tokio::time::sleep(ROUND_EVERY) => {}
        }
        let mut items = list.take_all();
        keep_durable(pg, &list.owner, &mut items).await;
        let mut later = Vec::new();
        let mut done = Vec::new();
        for t in items {
            let u = &t.u;
            let outcome = if u.noted.elapsed() > GIVE_UP_AFTER {
                tracing::error!(account = %u.account_id, charge_id = %u.charge_id, request_id = %u.request_id, "gave up resolving an unanswered debit");
                Some("gave_up")
            } else {
                match resolve(ledger, &mut conn, pg, u).await {
                    Ok(Resolution::Voided) => {
                        tracing::warn!(account = %u.account_id, charge_id = %u.charge_id, request_id = %u.request_id, "a debit whose reply was lost had run; refunded");
                        Some("voided")
                    }
                    Ok(Resolution::NotRun) => Some("not_run"),
                    Ok(Resolution::Even) => None,
                    Ok(Resolution::Later) => {
                        later.push(t);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, charge_id = %u.charge_id, "unanswered debit: not resolvable yet");
                        later.push(t);
                        continue;
                    }
                }
            };
            if let Some(outcome) = outcome {
                metrics
                    .unanswered_debits
                    .with_label_values(&[outcome])
                    .inc();
            }
            if t.stored {
                done.push(t.u.charge_id);
            }
        }
        list.put_back(later);
        // A row left behind by a failure here is taken over and found resolved (idempotent).
        if let Err(e) = store::forget(pg, &done).await {
            tracing::debug!(error = %e, "unanswered debits: resolved rows not removed yet");
        }
    }
}

/// Stores new entries, renews the claim on the held ones (dropping those another instance
/// has taken over meanwhile) and takes over the rows other instances left (dead, or shut
/// down). Postgres being down only delays this.
async fn keep_durable(pg: &PgPool, owner: &str, items: &mut Vec<Tracked>) {
    let saved = {
        let fresh: Vec<&Unanswered> = items.iter().filter(|t| !t.stored).map(|t| &t.u).collect();
        let held: Vec<&str> = items
            .iter()
            .filter(|t| t.stored)
            .map(|t| t.u.charge_id.as_str())
            .collect();
        store::save(pg, owner, &fresh, &held).await
    };
    match saved {
        Ok(lost) => {
            items.retain(|t| !(t.stored && lost.contains(&t.u.charge_id)));
            items.iter_mut().for_each(|t| t.stored = true);
        }
        Err(e) => tracing::debug!(error = %e, "unanswered debits not stored yet"),
    }
    match store::adopt(pg, owner).await {
        Ok(rows) => {
            for u in rows {
                if items.iter().any(|t| t.u.charge_id == u.charge_id) {
                    continue;
                }
                tracing::info!(account = %u.account_id, charge_id = %u.charge_id, "taking over an unanswered debit another instance left");
                items.push(Tracked { u, stored: true });
            }
        }
        Err(e) => tracing::debug!(error = %e, "unanswered debits of other instances not read"),
    }
}

/// At shutdown (once the in-flight requests are done): what is unresolved goes to Postgres
/// with its claim lapsed, for another instance to resolve at once.
async fn release(list: &UnansweredDebits, pg: &PgPool) {
    let items = list.take_all();
    if items.is_empty() {
        return;
    }
    let refs: Vec<&Unanswered> = items.iter().map(|t| &t.u).collect();
    match store::release(pg, &list.owner, &refs).await {
        Ok(()) => tracing::info!(
            count = items.len(),
            "shutting down: unresolved unanswered debits left to the other instances"
        ),
        Err(e) => {
            for u in &refs {
                tracing::warn!(error = %e, account = %u.account_id, charge_id = %u.charge_id, request_id = %u.request_id, "shutting down with an unanswered debit unresolved and not stored; it may have charged without serving");
            }
        }
    }
}

/// The Redis stream id's milliseconds (`1700000000000-3` → 1700000000000).
fn stream_id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

async fn resolve(
    ledger: &Ledger,
    conn: &mut RedisConn,
    pg: &PgPool,
    u: &Unanswered,
) -> Result<Resolution, LedgerError> {
    // 1. The debit can no longer run.
    let cutoff = if u.deadline_ms > 0 {
        match ledger.redis_now_ms() {
            Some(now) if now > u.deadline_ms + CLOCK_MARGIN_MS => u.deadline_ms + CLOCK_MARGIN_MS,
            _ => return Ok(Resolution::Later),
        }
    } else {
        if u.noted.elapsed() < NO_DEADLINE_WAIT {
            return Ok(Resolution::Later);
        }
        ledger.redis_now_ms().unwrap_or_else(super::now_ms)
    };
    // 2. A hold that is still there is released in full.
    if u.hold {
        let outcome = ledger
            .settle(
                conn,
                &SettleRequest {
                    account_id: &u.account_id,
                    charge_id: &u.charge_id,
                    cost: Some(Credits::ZERO),
                    reason: "unanswered_debit",
                    action: &u.action,
                    ..SettleRequest::default()
                },
            )
            .await?;
        if matches!(outcome, SettleOutcome::Settled { .. }) {
            return Ok(Resolution::Voided);
        }
    }
    // 3. Everything the shard wrote before the cutoff is in Postgres.
    let k = ledger.keys(&u.account_id);
    let oldest: Value = ledger
        .timed(
            redis::cmd("XRANGE")
                .arg(&k.stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(conn),
        )
        .await?;
    let oldest_ms = match &oldest {
        Value::Array(items) => items.first().and_then(|item| match item {
            Value::Array(parts) => parts.first().and_then(super::text),
            _ => None,
        }),
        _ => None,
    }
    .and_then(|id| stream_id_ms(&id));
    if oldest_ms.is_some_and(|ms| ms <= cutoff) {
        return Ok(Resolution::Later);
    }
    // 4. The journal decides. What the charge's entries took in all (the debit, a settle, an
    //    earlier void) is given back, so resolving a charge again (another instance took it
    //    over, a row was not removed) gives back nothing more.
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT entry_id, amount, d_allowance, d_purchased FROM ledger_entries
          WHERE entry_id LIKE $1",
    )
    .bind(format!("{}:%", u.charge_id))
    .fetch_all(pg)
    .await?;
    if !rows.iter().any(|r| r.0.ends_with(":debit")) {
        return Ok(Resolution::NotRun);
    }
    if u.hold && !rows.iter().any(|r| r.0.ends_with(":settle")) {
        // The hold is gone from Redis (settled at zero by an earlier resolution, or at its
        // reserve by the sweeper): its settle entry decides, once it is in the journal.
        return Ok(Resolution::Later);
    }
    let (amount, d_allowance, d_purchased) = rows
        .iter()
        .fold((0, 0, 0), |acc, r| (acc.0 + r.1, acc.1 + r.2, acc.2 + r.3));
    if d_allowance + d_purchased >= 0 {
        return Ok(Resolution::Even);
    }
    let void_id = format!("{}:void", u.charge_id);
    let external_id = format!("void:{}", u.charge_id);
    let outcome = ledger
        .credit(
            conn,
            &CreditRequest {
                account_id: &u.account_id,
                kind: "refund",
                to_allowance: Credits::from_micros(-d_allowance),
                to_purchased: Credits::from_micros(-d_purchased),
                counted: Credits::from_micros(-amount),
                entry_id: &void_id,
                external_id: &external_id,
                mark_ttl: MARK_TTL,
                route: &u.route,
                action: &u.action,
                request_id: &u.request_id,
                reason: "unanswered_debit",
                now_ms: super::now_ms(),
            },
        )
        .await?;
    match outcome {
        CreditOutcome::Applied { .. } | CreditOutcome::Duplicate { .. } => Ok(Resolution::Voided),
        // Not in Redis (evicted or lost): it is loaded from the journal, which already holds
        // the debit; try again once a request loads it.
        CreditOutcome::Missing => Ok(Resolution::Later),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_carry_their_millisecond() {
        assert_eq!(stream_id_ms("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(stream_id_ms("x"), None);
    }

    #[test]
    fn only_lost_replies_are_unknown() {
        assert!(outcome_unknown(&LedgerError::Timeout(
            Duration::from_millis(5)
        )));
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(!outcome_unknown(&LedgerError::Redis(refused)));
        let reset = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(outcome_unknown(&LedgerError::Redis(reset)));
        assert!(!outcome_unknown(&LedgerError::NoSuchAccount("a".into())));
    }
}
