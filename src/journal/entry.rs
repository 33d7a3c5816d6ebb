//! A journal entry as the ledger scripts write it to a shard stream and as the flusher writes
//! it to `ledger_entries`.
//!
//! A stream entry comes in one of two forms:
//!
//! - **one row**: flat field/value pairs (`id`, `acct`, `kind`, `amount`, `d_allow`, …), one
//!   XADD per journal entry, as the per-request scripts write them;
//! - **packed rows**: a single field `rows` holding many rows (one batch report of a credit
//!   slice), so a batch window costs one XADD instead of one per request. Settle rows' usage
//!   (tokens, upstream status, duration, reason) travels beside them in an optional `usage`
//!   field, one line per settle row: `entry_id|tok_in|tok_out|status|duration_ms|reason`. Rows are joined by
//!   `\n`; each row is [`PACKED_FIELDS`] joined by `|`, `req` last because it is the only part
//!   that may itself contain `|` (a client-chosen request id). Integers are decimal text; empty
//!   text is `None`. Every row keeps its own entry id and request id, so a charge is still
//!   traced to its request.
//!
//! Both forms are acknowledged by their one stream id; a packed entry with one bad row is
//! set aside whole (the dead-letter stream), never half written.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::Value;

mod packed;

pub use packed::{
    pack_rows, packed_min_ts, PackError, RowFields, PACKED_FIELDS, ROWS_FIELD, USAGE_FIELD,
};
use packed::{parse_int, split_row};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The stream entry id (for XACK), not stored.
    pub stream_id: String,
    pub entry_id: String,
    pub account_id: String,
    pub kind: String,
    pub amount: i64,
    pub d_allowance: i64,
    pub d_purchased: i64,
    pub allowance_after: i64,
    pub purchased_after: i64,
    pub request_id: Option<String>,
    pub route: Option<String>,
    pub action: Option<String>,
    pub tier: Option<String>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub upstream_status: Option<i32>,
    pub duration_ms: Option<i32>,
    pub reason: Option<String>,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

fn bytes_to_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Why a stream entry cannot become a journal row (it is set aside, never silently dropped).
#[derive(Debug, thiserror::Error)]
#[error("stream entry {stream_id}: {reason}")]
pub struct BadEntry {
    pub stream_id: String,
    pub reason: String,
}

/// Fills the settle rows of a packed entry with their usage lines
/// (`entry_id|tok_in|tok_out|status|duration_ms|reason`, see the module doc).
fn add_usage(stream_id: &str, entries: &mut [JournalEntry], usage: &str) -> Result<(), BadEntry> {
    let bad = |reason: String| BadEntry {
        stream_id: stream_id.to_string(),
        reason,
    };
    for (n, line) in usage.split('\n').enumerate() {
        let mut parts = line.splitn(6, '|');
        let mut next = || parts.next().unwrap_or_default();
        let (id, tok_in, tok_out, status, dur, reason) =
            (next(), next(), next(), next(), next(), next());
        let num = |v: &str| (!v.is_empty()).then(|| v.parse::<i64>().ok()).flatten();
        let entry = entries
            .iter_mut()
            .find(|e| e.entry_id == id)
            .ok_or_else(|| bad(format!("usage line {n}: no row {id:?}")))?;
        entry.tokens_in = num(tok_in);
        entry.tokens_out = num(tok_out);
        entry.upstream_status = num(status).and_then(|s| i32::try_from(s).ok());
        entry.duration_ms = num(dur).and_then(|s| i32::try_from(s).ok());
        entry.reason = (!reason.is_empty()).then(|| reason.to_string());
    }
    Ok(())
}

impl JournalEntry {
    /// Parses one stream entry, `[id, [field, value, ...]]`, in either form (one row, or
    /// packed rows under `rows`) into its journal rows, all carrying the entry's stream id.
    /// Any bad row makes the whole entry bad.
    pub fn from_stream(v: &Value) -> Result<Vec<JournalEntry>, BadEntry> {
        let bad = |stream_id: &str, reason: &str| BadEntry {
            stream_id: stream_id.to_string(),
            reason: reason.to_string(),
        };
        let Value::Array(parts) = v else {
            return Err(bad("?", "not an array"));
        };
        let stream_id = parts
            .first()
            .and_then(bytes_to_string)
            .ok_or_else(|| bad("?", "no id"))?;
        let fields = match parts.get(1) {
            Some(Value::Array(f)) => f,
            _ => return Err(bad(&stream_id, "no fields")),
        };
        let field = |name: &str| {
            fields.chunks(2).find_map(|pair| match pair {
                [k, v] if bytes_to_string(k).as_deref() == Some(name) => Some(v),
                _ => None,
            })
        };
        match field(ROWS_FIELD) {
            Some(rows) => {
                let rows =
                    bytes_to_string(rows).ok_or_else(|| bad(&stream_id, "rows is not text"))?;
                let usage = match field(USAGE_FIELD) {
                    Some(v) => Some(
                        bytes_to_string(v).ok_or_else(|| bad(&stream_id, "usage is not text"))?,
                    ),
                    None => None,
                };
                let mut entries = Self::from_packed(&stream_id, &rows)?;
                if let Some(usage) = usage {
                    add_usage(&stream_id, &mut entries, &usage)?;
                }
                Ok(entries)
            }
            None => Ok(vec![Self::from_fields(stream_id, fields)?]),
        }
    }

    /// The rows of a packed stream entry (see the module doc).
    pub fn from_packed(stream_id: &str, rows: &str) -> Result<Vec<JournalEntry>, BadEntry> {
        let bad = |reason: String| BadEntry {
            stream_id: stream_id.to_string(),
            reason,
        };
        if rows.is_empty() {
            return Err(bad("rows is empty".into()));
        }
        let mut out = Vec::with_capacity(rows.len() / 96 + 1);
        for (n, row) in rows.split('\n').enumerate() {
            let p = split_row(row).ok_or_else(|| {
                bad(format!(
                    "row {n}: fewer than {} parts separated by '|'",
                    PACKED_FIELDS.len()
                ))
            })?;
            let int = |i: usize| {
                parse_int(p[i]).ok_or_else(|| {
                    bad(format!(
                        "row {n}: {} = {:?} is not an integer",
                        PACKED_FIELDS[i], p[i]
                    ))
                })
            };
            let required = |i: usize| {
                if p[i].is_empty() {
                    Err(bad(format!("row {n}: no {}", PACKED_FIELDS[i])))
                } else {
                    Ok(p[i].to_string())
                }
            };
            let text = |i: usize| (!p[i].is_empty()).then(|| p[i].to_string());
            let ts = int(11)?;
            let created_at = DateTime::from_timestamp_millis(ts)
                .ok_or_else(|| bad(format!("row {n}: bad ts {ts}")))?;
            out.push(JournalEntry {
                stream_id: stream_id.to_string(),
                entry_id: required(0)?,
                account_id: required(1)?,
                kind: required(2)?,
                amount: int(3)?,
                d_allowance: int(4)?,
                d_purchased: int(5)?,
                allowance_after: int(6)?,
                purchased_after: int(7)?,
                route: text(8),
                action: text(9),
                tier: text(10),
                created_at,
                request_id: text(12),
                tokens_in: None,
                tokens_out: None,
                upstream_status: None,
                duration_ms: None,
                reason: None,
                period_start: None,
                period_end: None,
            });
        }
        Ok(out)
    }

    /// Parses the flat field/value form (one row).
    fn from_fields(stream_id: String, fields: &[Value]) -> Result<JournalEntry, BadEntry> {
        let bad = |stream_id: &str, reason: &str| BadEntry {
            stream_id: stream_id.to_string(),
            reason: reason.to_string(),
        };
        let mut map = HashMap::new();
        for pair in fields.chunks(2) {
            if let [k, v] = pair {
                if let (Some(k), Some(v)) = (bytes_to_string(k), bytes_to_string(v)) {
                    map.insert(k, v);
                }
            }
        }
        let text = |k: &str| map.get(k).filter(|v| !v.is_empty()).cloned();
        let num = |k: &str| -> Result<i64, BadEntry> {
            match map.get(k) {
                None => Ok(0),
                Some(v) => v
                    .parse::<i64>()
                    .or_else(|_| v.parse::<f64>().map(|f| f as i64))
                    .map_err(|_| bad(&stream_id, &format!("{k} = {v:?} is not an integer"))),
            }
        };
        let opt_num = |k: &str| map.get(k).and_then(|v| v.parse::<i64>().ok());
        let secs = |k: &str| opt_num(k).and_then(|s| DateTime::from_timestamp(s, 0));
        let entry_id = text("id").ok_or_else(|| bad(&stream_id, "no entry id"))?;
        let account_id = text("acct").ok_or_else(|| bad(&stream_id, "no account"))?;
        let kind = text("kind").ok_or_else(|| bad(&stream_id, "no kind"))?;
        let ts = num("ts")?;
        let created_at =
            DateTime::from_timestamp_millis(ts).ok_or_else(|| bad(&stream_id, "bad ts"))?;
        Ok(JournalEntry {
            entry_id,
            account_id,
            kind,
            amount: num("amount")?,
            d_allowance: num("d_allow")?,
            d_purchased: num("d_purch")?,
            allowance_after: num("allow")?,
            purchased_after: num("purch")?,
            request_id: text("req"),
            route: text("route"),
            action: text("action"),
            tier: text("tier"),
            tokens_in: opt_num("tok_in"),
            tokens_out: opt_num("tok_out"),
            upstream_status: opt_num("status").and_then(|s| i32::try_from(s).ok()),
            duration_ms: opt_num("dur").and_then(|s| i32::try_from(s).ok()),
            reason: text("reason"),
            period_start: secs("period_start"),
            period_end: secs("period_end"),
            created_at,
            stream_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_a_debit() {
        let fields: Vec<Value> = [
            "id",
            "r1:debit",
            "acct",
            "acme",
            "kind",
            "debit",
            "amount",
            "200000",
            "d_allow",
            "-200000",
            "d_purch",
            "-0",
            "allow",
            "19800000",
            "purch",
            "0",
            "route",
            "chat",
            "action",
            "ai",
            "req",
            "r1",
            "tier",
            "free",
            "ts",
            "1795239492723",
        ]
        .iter()
        .map(|s| bulk(s))
        .collect();
        let v = Value::Array(vec![bulk("1-0"), Value::Array(fields)]);
        let rows = JournalEntry::from_stream(&v).unwrap();
        assert_eq!(rows.len(), 1);
        let e = &rows[0];
        assert_eq!(e.stream_id, "1-0");
        assert_eq!(e.entry_id, "r1:debit");
        assert_eq!(e.d_allowance, -200_000);
        assert_eq!(e.d_purchased, 0);
        assert_eq!(e.allowance_after, 19_800_000);
        assert_eq!(e.route.as_deref(), Some("chat"));
        assert_eq!(e.created_at.timestamp_millis(), 1_795_239_492_723);
    }

    #[test]
    fn rejects_entries_without_ids() {
        let v = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("kind"), bulk("debit")]),
        ]);
        assert!(JournalEntry::from_stream(&v).is_err());
    }

    fn packed(stream_id: &str, rows: &str) -> Value {
        Value::Array(vec![
            bulk(stream_id),
            Value::Array(vec![bulk(ROWS_FIELD), bulk(rows)]),
        ])
    }

    fn row<'a>(entry_id: &'a str, req: Option<&'a str>) -> RowFields<'a> {
        RowFields {
            entry_id,
            account_id: "acme",
            kind: "debit",
            amount: 200_000,
            d_allowance: -150_000,
            d_purchased: -50_000,
            allowance_after: 0,
            purchased_after: 9_950_000,
            route: Some("chat"),
            action: None,
            tier: Some("pro"),
            ts_ms: 1_795_239_492_723,
            request_id: req,
        }
    }

    #[test]
    fn packed_rows_round_trip() {
        let rows = [
            row("c1:debit", Some("req|with|bars")),
            row("c2:debit", None),
            row("c3:debit", Some("plain")),
        ];
        let text = pack_rows(&rows).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with(
            "c1:debit|acme|debit|200000|-150000|-50000|0|9950000|chat||pro|1795239492723|req|with|bars\n"
        ));
        let parsed = JournalEntry::from_stream(&packed("7-1", &text)).unwrap();
        assert_eq!(parsed.len(), 3);
        for (p, r) in parsed.iter().zip(&rows) {
            // Every row shares the one stream id the flusher acknowledges.
            assert_eq!(p.stream_id, "7-1");
            assert_eq!(p.entry_id, r.entry_id);
            assert_eq!(p.account_id, r.account_id);
            assert_eq!(p.kind, r.kind);
            assert_eq!(
                (p.amount, p.d_allowance, p.d_purchased),
                (r.amount, r.d_allowance, r.d_purchased)
            );
            assert_eq!(
                (p.allowance_after, p.purchased_after),
                (r.allowance_after, r.purchased_after)
            );
            assert_eq!(p.route.as_deref(), r.route);
            assert_eq!(p.action.as_deref(), r.action);
            assert_eq!(p.tier.as_deref(), r.tier);
            assert_eq!(p.request_id.as_deref(), r.request_id);
            assert_eq!(p.created_at.timestamp_millis(), r.ts_ms);
        }
        assert_eq!(packed_min_ts(&text), Some(1_795_239_492_723));
    }

    #[test]
    fn packed_rows_written_by_hand_parse() {
        // As a Lua script would write them: `-0`, an integral float, empty optional parts.
        let text = "a:debit|acct1|debit|5|-0|-5|10|1.0e+2||||1000|r|1\nb:settle|acct1|settle|-5|0|5|10|105|r||free|999|";
        let parsed = JournalEntry::from_stream(&packed("1-0", text)).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].d_allowance, 0);
        assert_eq!(parsed[0].purchased_after, 100);
        assert_eq!(parsed[0].route, None);
        assert_eq!(parsed[0].request_id.as_deref(), Some("r|1"));
        assert_eq!(parsed[1].request_id, None);
        assert_eq!(parsed[1].route.as_deref(), Some("r"));
        assert_eq!(parsed[1].tier.as_deref(), Some("free"));
        assert_eq!(packed_min_ts(text), Some(999));
    }

    #[test]
    fn settle_rows_take_their_usage_from_the_usage_field() {
        let rows = "a:debit|acct1|debit|5|-5|0|10|0|r|ai|free|1000|q1\na:settle|acct1|settle|-2|2|0|12|0|r|ai|free|1001|q1";
        let with = |usage: &str| {
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![
                    bulk(ROWS_FIELD),
                    bulk(rows),
                    bulk(USAGE_FIELD),
                    bulk(usage),
                ]),
            ])
        };
        let parsed = JournalEntry::from_stream(&with("a:settle|10|20|200|35|usage")).unwrap();
        assert_eq!(
            (parsed[0].tokens_in, parsed[0].reason.as_deref()),
            (None, None)
        );
        let s = &parsed[1];
        assert_eq!((s.tokens_in, s.tokens_out), (Some(10), Some(20)));
        assert_eq!((s.upstream_status, s.duration_ms), (Some(200), Some(35)));
        assert_eq!(s.reason.as_deref(), Some("usage"));
        // A usage line naming no row of the entry makes the entry bad, as a bad row does.
        assert!(JournalEntry::from_stream(&with("b:settle|1|1|200|1|usage")).is_err());
    }

    #[test]
    fn one_bad_row_makes_the_whole_entry_bad() {
        let good = pack_rows(&[row("c1:debit", Some("r1"))]).unwrap();
        for bad_row in [
            // Too few parts.
            "c2:debit|acme|debit|1|2",
            // Not an integer.
            "c2:debit|acme|debit|one|0|0|0|0||||1000|r2",
            // No account.
            "c2:debit||debit|1|0|0|0|0||||1000|r2",
            // A fractional amount.
            "c2:debit|acme|debit|1.5|0|0|0|0||||1000|r2",
            // No ts.
            "c2:debit|acme|debit|1|0|0|0|0|||||r2",
            // An empty line.
            "",
        ] {
            let text = format!("{good}\n{bad_row}");
            let err = JournalEntry::from_stream(&packed("3-0", &text)).unwrap_err();
            assert_eq!(err.stream_id, "3-0", "{bad_row:?}");
        }
        assert!(JournalEntry::from_stream(&packed("3-0", "")).is_err());
    }

    #[test]
    fn packing_refuses_parts_that_would_read_back_wrong() {
        let mut r = row("c1:debit", Some("r1"));
        r.route = Some("a|b");
        assert!(matches!(
            pack_rows(&[r]),
            Err(PackError::Separator { field: "route", .. })
        ));
        let r = row("c1:debit", Some("line\nbreak"));
        assert!(matches!(
            pack_rows(&[r]),
            Err(PackError::Separator { field: "req", .. })
        ));
        let mut r = row("c1:debit", None);
        r.account_id = "";
        assert!(matches!(
            pack_rows(&[r]),
            Err(PackError::Empty { field: "acct", .. })
        ));
        assert_eq!(pack_rows(&[]).unwrap(), "");
    }
}
