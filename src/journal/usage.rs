//! Usage statistics and history, as queries over the journal.

use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::money::Credits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Route,
    Action,
    Day,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "route" => Some(GroupBy::Route),
            "action" => Some(GroupBy::Action),
            "day" => Some(GroupBy::Day),
            _ => None,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            GroupBy::Route => "COALESCE(route, '')",
            GroupBy::Action => "COALESCE(action, '')",
            GroupBy::Day => "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub credits: Credits,
    pub tokens_in: i64,
    pub tokens_out: i64,
}

/// Parses `2026-11-01` or an RFC 3339 timestamp.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

/// The statement [`usage`] runs ($1 account, $2 from, $3 to); public for the benchmark's
/// EXPLAIN (`benches/journal_volume.rs`).
pub fn usage_sql(group_by: Option<GroupBy>) -> String {
    let key = group_by.map_or("''", GroupBy::sql);
    format!(
        "SELECT {key} AS k,
                count(*) FILTER (WHERE kind = 'debit'),
                COALESCE(sum(amount), 0)::BIGINT,
                COALESCE(sum(tokens_in), 0)::BIGINT,
                COALESCE(sum(tokens_out), 0)::BIGINT
           FROM ledger_entries
          WHERE account_id = $1 AND created_at >= $2 AND created_at < $3
            AND kind IN ('debit', 'refund', 'settle', 'extend')
          GROUP BY 1 ORDER BY 1"
    )
}

/// Totals (or groups) of metered requests in `[from, to)`. Refunds count against credits;
/// a refunded request still counts as a request. Only request kinds count: bookkeeping
/// entries (`grant`, `reset`, `carry_forward`, …) are not spending.
pub async fn usage(
    pg: &PgPool,
    account_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: Option<GroupBy>,
) -> Result<Vec<(String, Totals)>, sqlx::Error> {
    let sql = usage_sql(group_by);
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(&sql)
        .bind(account_id)
        .bind(from)
        .bind(to)
        .fetch_all(pg)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(k, requests, credits, tokens_in, tokens_out)| {
            (
                k,
                Totals {
                    requests,
                    credits: Credits::from_micros(credits),
                    tokens_in,
                    tokens_out,
                },
            )
        })
        .collect())
}

/// The usage answer: totals, or `{"groups": [...]}`.
pub fn usage_json(
    rows: Vec<(String, Totals)>,
    group_by: Option<GroupBy>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Value {
    match group_by {
        None => {
            let t = rows.into_iter().next().map(|(_, t)| t).unwrap_or(Totals {
                requests: 0,
                credits: Credits::ZERO,
                tokens_in: 0,
                tokens_out: 0,
            });
            json!({"from": from, "to": to, "requests": t.requests, "credits": t.credits, "tokens_in": t.tokens_in, "tokens_out": t.tokens_out})
        }
        Some(_) => json!({
            "from": from,
            "to": to,
            "groups": rows.into_iter().map(|(k, t)| json!({
                "key": k, "requests": t.requests, "credits": t.credits, "tokens_in": t.tokens_in, "tokens_out": t.tokens_out,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// An opaque position in an account's history (newest first).
fn encode_cursor(at: DateTime<Utc>, entry_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{entry_id}", at.timestamp_micros()))
}

pub fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (micros, id) = raw.split_once('|')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id.to_string(),
    ))
}

type Row = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i32>,
    Option<String>,
    DateTime<Utc>,
);

/// The first instant a tier with `history_days` still shows (`None`: everything).
pub fn history_cutoff(history_days: Option<u32>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    history_days.and_then(|d| now.checked_sub_signed(chrono::TimeDelta::days(i64::from(d))))
}

/// The statement [`history`] runs: $1 account, then the cursor's time and entry id when
/// `cursor`, then the history limit when `not_before`, then the row limit. Public for the
/// benchmark's EXPLAIN.
pub fn history_sql(cursor: bool, not_before: bool) -> String {
    let mut conditions = String::from("account_id = $1");
    let mut n = 2;
    if cursor {
        // `created_at <=` prunes partitions; the row comparison is the exact position.
        conditions.push_str(" AND created_at <= $2 AND (created_at, entry_id) < ($2, $3)");
        n = 4;
    }
    if not_before {
        conditions.push_str(&format!(" AND created_at >= ${n}"));
        n += 1;
    }
    format!(
        "SELECT entry_id, kind, amount, d_allowance, d_purchased, allowance_after, purchased_after,
                request_id, route, action, tokens_in, tokens_out, upstream_status, reason, created_at
           FROM ledger_entries
          WHERE {conditions}
          ORDER BY created_at DESC, entry_id DESC
          LIMIT ${n}"
    )
}

/// One page of an account's journal, newest first, and the cursor of the next page; entries
/// before `not_before` (the tier's history limit) are not shown.
///
/// The statement is one of four fixed texts (with or without a cursor, with or without a
/// history limit) rather than one with optional parameters, so every plan, generic ones
/// included, prunes the monthly partitions outside the range and walks the (account, time)
/// index from the cursor.
pub async fn history(
    pg: &PgPool,
    account_id: &str,
    limit: i64,
    cursor: Option<(DateTime<Utc>, String)>,
    not_before: Option<DateTime<Utc>>,
) -> Result<(Vec<Value>, Option<String>), sqlx::Error> {
    let sql = history_sql(cursor.is_some(), not_before.is_some());
    let mut query = sqlx::query_as::<_, Row>(&sql).bind(account_id);
    if let Some((at, id)) = cursor {
        query = query.bind(at).bind(id);
    }
    if let Some(t) = not_before {
        query = query.bind(t);
    }
    let rows: Vec<Row> = query.bind(limit + 1).fetch_all(pg).await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<&Row> = rows.iter().take(limit as usize).collect();
    let next = if more {
        page.last().map(|r| encode_cursor(r.14, &r.0))
    } else {
        None
    };
    let entries = page
        .into_iter()
        .map(|r| {
            json!({
                "id": r.0,
                "kind": r.1,
                "amount": Credits::from_micros(r.2),
                "allowance_delta": Credits::from_micros(r.3),
                "purchased_delta": Credits::from_micros(r.4),
                "balance_after": {
                    "allowance": Credits::from_micros(r.5),
                    "purchased": Credits::from_micros(r.6),
                    "total": Credits::from_micros(r.5 + r.6),
                },
                "request_id": r.7,
                "route": r.8,
                "action": r.9,
                "tokens_in": r.10,
                "tokens_out": r.11,
                "upstream_status": r.12,
                "reason": r.13,
                "created_at": r.14,
            })
        })
        .collect();
    Ok((entries, next))
}
