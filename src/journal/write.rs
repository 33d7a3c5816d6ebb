//! Writing journal entries to Postgres, idempotent on the entry id (a re-delivered stream
//! entry is stored once), in one transaction with the period changes that `reset` entries
//! carry.
//!
//! `ledger_entries` is partitioned by month (`partitions`); each row is routed by its
//! `created_at`, the entry's own timestamp from the stream, so a re-delivery reaches the same
//! partition and conflicts on (entry_id, created_at). A month without a partition goes to the
//! DEFAULT partition, so no date ever fails a batch.
//!
//! How rows get there is chosen by Postgres CPU per row (README "Postgres at volume",
//! `benches/journal_volume.rs` measures every path below on the same table):
//!
//! - [`insert_unnest`]: one `INSERT … SELECT FROM UNNEST(arrays) ON CONFLICT DO NOTHING`;
//! - [`copy_staged`]: binary `COPY` into a session-local staging table, then
//!   `INSERT … SELECT … ON CONFLICT DO NOTHING`;
//! - [`copy_direct`]: binary `COPY` straight into `ledger_entries`: no ON CONFLICT, so a
//!   batch holding an entry already stored fails (unique violation) and is rolled back.
//!
//! The flusher ([`write_batch`]) tries `copy_direct` first and, on a unique violation (a
//! re-delivery: rare, after a crash or a lost acknowledgement), writes the batch again with
//! `insert_unnest`, which stores only the rows not there yet. Idempotency is unchanged: a row
//! is never stored twice, whichever path wrote it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::entry::JournalEntry;

/// The columns every path writes, in this order.
const COLUMNS: &str = "entry_id, account_id, kind, amount, d_allowance, d_purchased, \
     allowance_after, purchased_after, request_id, route, action, tier, tokens_in, tokens_out, \
     upstream_status, duration_ms, reason, period_start, period_end, created_at";
const COLUMN_COUNT: i16 = 20;

/// Microseconds from the Unix epoch to 2000-01-01 UTC, Postgres's binary timestamp epoch.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Inserts a batch; returns how many rows were new.
pub async fn insert_batch(pg: &PgPool, batch: &[JournalEntry]) -> Result<u64, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut conn = pg.acquire().await?;
    write_batch(&mut conn, batch).await
}

/// [`insert_batch`] on a given connection (the benchmark reads its backend's CPU).
pub async fn write_batch(
    conn: &mut PgConnection,
    batch: &[JournalEntry],
) -> Result<u64, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    // The common case, entries never written before: binary COPY, the least Postgres CPU
    // per row (no ON CONFLICT arbitration, no parameter arrays to unpack).
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    match copy_direct(&mut tx, batch).await {
        Ok(inserted) => {
            update_periods(&mut tx, batch).await?;
            tx.commit().await?;
            return Ok(inserted);
        }
        // A re-delivery (a flusher died between commit and XACK, an acknowledgement was
        // lost, a report was sent twice): some entry is stored already. Nothing of this
        // attempt stays; the batch is written again with ON CONFLICT DO NOTHING below.
        Err(e) if is_unique_violation(&e) => tx.rollback().await?,
        Err(e) => return Err(e),
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let inserted = insert_unnest(&mut tx, batch).await?;
    update_periods(&mut tx, batch).await?;
    tx.commit().await?;
    Ok(inserted)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505"))
}

/// Period rolls happen in Redis; Postgres follows so a later hydration starts from the right
/// period. Only ever moves forward, judged by the period's start: a Stripe-aligned period can
/// end before the calendar month it replaces (30 vs 31 days), so the account's opening entry,
/// flushed after an invoice aligned the period, must not win on its later end. One row per
/// account (its latest start), since `UPDATE … FROM` with two matching rows applies either.
async fn update_periods(
    conn: &mut PgConnection,
    batch: &[JournalEntry],
) -> Result<(), sqlx::Error> {
    let mut latest: HashMap<&str, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
    for e in batch {
        let (Some(ps), Some(pe)) = (e.period_start, e.period_end) else {
            continue;
        };
        let slot = latest.entry(e.account_id.as_str()).or_insert((ps, pe));
        if ps > slot.0 {
            *slot = (ps, pe);
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let (ids, (starts, ends)): (Vec<String>, (Vec<_>, Vec<_>)) = latest
        .into_iter()
        .map(|(id, (ps, pe))| (id.to_string(), (ps, pe)))
        .unzip();
    sqlx::query(
        "UPDATE accounts a SET period_start = r.ps, period_end = r.pe, updated_at = now()
           FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r(id, ps, pe)
          WHERE a.id = r.id AND a.period_start < r.ps",
    )
    .bind(ids)
    .bind(starts)
    .bind(ends)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One `INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING`; returns the rows inserted.
pub async fn insert_unnest(
    conn: &mut PgConnection,
    batch: &[JournalEntry],
) -> Result<u64, sqlx::Error> {
    macro_rules! col {
        ($f:ident) => {
            batch.iter().map(|e| e.$f.clone()).collect::<Vec<_>>()
        };
    }
    Ok(sqlx::query(&format!(
        "INSERT INTO ledger_entries ({COLUMNS})
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
             $7::int8[], $8::int8[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int8[],
             $14::int8[], $15::int4[], $16::int4[], $17::text[], $18::timestamptz[], $19::timestamptz[],
             $20::timestamptz[])
         ON CONFLICT DO NOTHING"
    ))
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
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Binary COPY into the session's staging table, then one `INSERT … SELECT … ON CONFLICT DO
/// NOTHING`; returns the rows inserted. Call inside a transaction: the staging table is
/// emptied at commit.
pub async fn copy_staged(
    conn: &mut PgConnection,
    batch: &[JournalEntry],
) -> Result<u64, sqlx::Error> {
    // Created once per session (a no-op afterwards), emptied by every commit.
    sqlx::raw_sql(
        "CREATE TEMP TABLE IF NOT EXISTS journal_staging
             (LIKE ledger_entries INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    )
    .execute(&mut *conn)
    .await?;
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY journal_staging ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(encode_binary(batch)).await?;
    copy.finish().await?;
    Ok(sqlx::query(&format!(
        "INSERT INTO ledger_entries ({COLUMNS}) SELECT {COLUMNS} FROM journal_staging
         ON CONFLICT DO NOTHING"
    ))
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Binary COPY straight into `ledger_entries`; returns the rows written. Fails with a unique
/// violation if any entry is already stored (no ON CONFLICT for COPY).
pub async fn copy_direct(
    conn: &mut PgConnection,
    batch: &[JournalEntry],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY ledger_entries ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(encode_binary(batch)).await?;
    copy.finish().await
}

/// The batch in Postgres's binary COPY format, columns as [`COLUMNS`].
pub fn encode_binary(batch: &[JournalEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + 2 + batch.len() * 256);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    fn text(out: &mut Vec<u8>, v: Option<&str>) {
        match v {
            Some(s) => {
                // A journal text is far below 2 GiB (Redis values and config names).
                out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    fn int8(out: &mut Vec<u8>, v: Option<i64>) {
        match v {
            Some(n) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&n.to_be_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    fn int4(out: &mut Vec<u8>, v: Option<i32>) {
        match v {
            Some(n) => {
                out.extend_from_slice(&4i32.to_be_bytes());
                out.extend_from_slice(&n.to_be_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    let ts = |t: &chrono::DateTime<chrono::Utc>| t.timestamp_micros() - PG_EPOCH_OFFSET_US;
    for e in batch {
        out.extend_from_slice(&COLUMN_COUNT.to_be_bytes());
        text(&mut out, Some(&e.entry_id));
        text(&mut out, Some(&e.account_id));
        text(&mut out, Some(&e.kind));
        int8(&mut out, Some(e.amount));
        int8(&mut out, Some(e.d_allowance));
        int8(&mut out, Some(e.d_purchased));
        int8(&mut out, Some(e.allowance_after));
        int8(&mut out, Some(e.purchased_after));
        text(&mut out, e.request_id.as_deref());
        text(&mut out, e.route.as_deref());
        text(&mut out, e.action.as_deref());
        text(&mut out, e.tier.as_deref());
        int8(&mut out, e.tokens_in);
        int8(&mut out, e.tokens_out);
        int4(&mut out, e.upstream_status);
        int4(&mut out, e.duration_ms);
        text(&mut out, e.reason.as_deref());
        int8(&mut out, e.period_start.as_ref().map(ts));
        int8(&mut out, e.period_end.as_ref().map(ts));
        int8(&mut out, Some(ts(&e.created_at)));
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}
