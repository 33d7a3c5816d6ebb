//! Writing journal entries to Postgres: one multi-row statement per batch, idempotent on the
//! entry id (a re-delivered stream entry is stored once), in one transaction with the period
//! changes that `reset` entries carry.
//!
//! `ledger_entries` is partitioned by month (`partitions`); the statement is the same: each
//! row is routed by its `created_at`, the entry's own timestamp from the stream, so a
//! re-delivery reaches the same partition and conflicts on (entry_id, created_at). A month
//! without a partition goes to the DEFAULT partition, so no date ever fails a batch.

use sqlx::PgPool;

use super::entry::JournalEntry;

/// Inserts a batch; returns how many rows were new.
pub async fn insert_batch(pg: &PgPool, batch: &[JournalEntry]) -> Result<u64, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    macro_rules! col {
        ($f:ident) => {
            batch.iter().map(|e| e.$f.clone()).collect::<Vec<_>>()
        };
    }
    let mut tx = pg.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance, d_purchased,
             allowance_after, purchased_after, request_id, route, action, tier, tokens_in, tokens_out,
             upstream_status, duration_ms, reason, period_start, period_end, created_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
             $7::int8[], $8::int8[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int8[],
             $14::int8[], $15::int4[], $16::int4[], $17::text[], $18::timestamptz[], $19::timestamptz[],
             $20::timestamptz[])
         ON CONFLICT DO NOTHING",
    )
    .bind(col!(entry_id))
    .bind(col!(account_id))
    .bind(col!(kind))
    .bind(col!(amount))
    .bind(col!(d_allowance))
    .bind(col!(d_purchased))
    .bind(col!(allowance_after))
    .bind(col!(purchased_after))
    .bind(col!(request_id))
    .bind(col!(route))
    .bind(col!(action))
    .bind(col!(tier))
    .bind(col!(tokens_in))
    .bind(col!(tokens_out))
    .bind(col!(upstream_status))
    .bind(col!(duration_ms))
    .bind(col!(reason))
    .bind(col!(period_start))
    .bind(col!(period_end))
    .bind(col!(created_at))
    .execute(&mut *tx)
    .await?
    .rows_affected();

    // Period rolls happen in Redis; Postgres follows so a later hydration starts from the
    // right period. Only ever moves forward.
    let resets: Vec<&JournalEntry> = batch
        .iter()
        .filter(|e| e.period_start.is_some() && e.period_end.is_some())
        .collect();
    if !resets.is_empty() {
        sqlx::query(
            "UPDATE accounts a SET period_start = r.ps, period_end = r.pe, updated_at = now()
               FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(id, ps, pe)
              WHERE a.id = r.id AND a.period_end < r.pe",
        )
        .bind(
            resets
                .iter()
                .map(|e| e.account_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(resets.iter().map(|e| e.period_start).collect::<Vec<_>>())
        .bind(resets.iter().map(|e| e.period_end).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}
