//! The durable copy of the unanswered-debit list (table `unanswered_debits`).
//!
//! The list is worked on in the process that noted it (no Postgres on the request path: new
//! entries are written by the resolver's next round, at most a second later). Each round
//! pushes the claim of the rows it holds forward; a row whose claim has lapsed (its process
//! died, or shut down and released it) is taken over by any instance. Two instances resolving
//! the same debit is harmless: the hold settle and the refund are idempotent on the charge id.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// A debit with an unknown outcome.
#[derive(Debug, Clone)]
pub struct Unanswered {
    pub account_id: String,
    pub charge_id: String,
    pub request_id: String,
    pub route: String,
    pub action: String,
    /// The script's deadline in Redis's clock (0 = none was set).
    pub deadline_ms: i64,
    pub hold: bool,
    pub noted: Instant,
}

/// How far ahead a claim reaches; another instance takes a row over once it has lapsed.
pub const CLAIM: Duration = Duration::from_secs(10);

/// Writes the entries not stored yet and pushes the claim of every held one forward; returns
/// the held ones whose row this process no longer owns (taken over, or gone).
pub async fn save(
    pg: &PgPool,
    owner: &str,
    fresh: &[&Unanswered],
    held: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    let claim = CLAIM.as_secs_f64();
    if !fresh.is_empty() {
        let col = |f: fn(&Unanswered) -> String| fresh.iter().map(|u| f(u)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO unanswered_debits
                 (charge_id, account_id, request_id, route, action, deadline_ms, hold, noted_at,
                  claimed_until, owner)
             SELECT c, a, r, ro, ac, d, h, now() - make_interval(secs => age),
                    now() + make_interval(secs => $9), $10
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::bigint[], $7::bool[], $8::float8[]) AS t(c, a, r, ro, ac, d, h, age)
             ON CONFLICT (charge_id) DO NOTHING",
        )
        .bind(col(|u| u.charge_id.clone()))
        .bind(col(|u| u.account_id.clone()))
        .bind(col(|u| u.request_id.clone()))
        .bind(col(|u| u.route.clone()))
        .bind(col(|u| u.action.clone()))
        .bind(fresh.iter().map(|u| u.deadline_ms).collect::<Vec<_>>())
        .bind(fresh.iter().map(|u| u.hold).collect::<Vec<_>>())
        .bind(
            fresh
                .iter()
                .map(|u| u.noted.elapsed().as_secs_f64())
                .collect::<Vec<_>>(),
        )
        .bind(claim)
        .bind(owner)
        .execute(pg)
        .await?;
    }
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let renewed: Vec<String> = sqlx::query_scalar(
        "UPDATE unanswered_debits SET claimed_until = now() + make_interval(secs => $2)
          WHERE charge_id = ANY($1) AND owner = $3
          RETURNING charge_id",
    )
    .bind(held)
    .bind(claim)
    .bind(owner)
    .fetch_all(pg)
    .await?;
    Ok(held
        .iter()
        .filter(|id| !renewed.iter().any(|r| r == *id))
        .map(|id| id.to_string())
        .collect())
}

/// Takes over the rows whose claim has lapsed, claiming them for `owner`.
pub async fn adopt(pg: &PgPool, owner: &str) -> Result<Vec<Unanswered>, sqlx::Error> {
    type Row = (
        String,
        String,
        String,
        String,
        String,
        i64,
        bool,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "UPDATE unanswered_debits SET claimed_until = now() + make_interval(secs => $2), owner = $1
          WHERE charge_id IN (
                SELECT charge_id FROM unanswered_debits
                 WHERE claimed_until < now()
                 ORDER BY claimed_until LIMIT 1000 FOR UPDATE SKIP LOCKED)
          RETURNING charge_id, account_id, request_id, route, action, deadline_ms, hold, noted_at",
    )
    .bind(owner)
    .bind(CLAIM.as_secs_f64())
    .fetch_all(pg)
    .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(
            |(charge_id, account_id, request_id, route, action, deadline_ms, hold, noted_at)| {
                // Aged as Postgres saw it; where the monotonic clock cannot reach that far
                // back, it counts as noted now (only the one-day give-up limit uses it).
                let age = (now - noted_at).to_std().unwrap_or_default();
                Unanswered {
                    account_id,
                    charge_id,
                    request_id,
                    route,
                    action,
                    deadline_ms,
                    hold,
                    noted: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                }
            },
        )
        .collect())
}

/// Removes resolved (or given up) rows.
pub async fn forget(pg: &PgPool, charge_ids: &[String]) -> Result<(), sqlx::Error> {
    if charge_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM unanswered_debits WHERE charge_id = ANY($1)")
        .bind(charge_ids)
        .execute(pg)
        .await?;
    Ok(())
}

/// At shutdown: stores what is still unresolved with its claim lapsed, so another instance
/// takes it over at once.
pub async fn release(pg: &PgPool, owner: &str, items: &[&Unanswered]) -> Result<(), sqlx::Error> {
    save(pg, owner, items, &[]).await?;
    let ids: Vec<&str> = items.iter().map(|u| u.charge_id.as_str()).collect();
    sqlx::query(
        "UPDATE unanswered_debits SET claimed_until = now() WHERE charge_id = ANY($1) AND owner = $2",
    )
    .bind(ids)
    .bind(owner)
    .execute(pg)
    .await?;
    Ok(())
}
