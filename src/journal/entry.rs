//! A journal entry as the ledger scripts write it to a shard stream (flat field/value pairs)
//! and as the flusher writes it to `ledger_entries`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::Value;

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

impl JournalEntry {
    /// Parses `[id, [field, value, ...]]`.
    pub fn from_stream(v: &Value) -> Result<JournalEntry, BadEntry> {
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
        let e = JournalEntry::from_stream(&v).unwrap();
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
}
