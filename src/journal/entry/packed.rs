//! The packed-row form of a stream entry (see the parent module's doc): building it for the
//! batch report script and splitting it back into parts.

/// The parts of a packed row, in order (`req` last: it may contain `|`).
pub const PACKED_FIELDS: [&str; 13] = [
    "id", "acct", "kind", "amount", "d_allow", "d_purch", "allow", "purch", "route", "action",
    "tier", "ts", "req",
];

/// The stream field that holds packed rows.
pub const ROWS_FIELD: &str = "rows";

/// The stream field beside `rows` that holds settle rows' usage (see the parent module's doc).
pub const USAGE_FIELD: &str = "usage";

/// One journal row to pack into a batched stream entry ([`pack_rows`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowFields<'a> {
    pub entry_id: &'a str,
    pub account_id: &'a str,
    pub kind: &'a str,
    pub amount: i64,
    pub d_allowance: i64,
    pub d_purchased: i64,
    pub allowance_after: i64,
    pub purchased_after: i64,
    pub route: Option<&'a str>,
    pub action: Option<&'a str>,
    pub tier: Option<&'a str>,
    /// The entry's time, Unix milliseconds (`created_at`, and the partition it lands in).
    pub ts_ms: i64,
    pub request_id: Option<&'a str>,
}

/// Why rows cannot be packed: a part would be read back as something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// Only `req` (last) may contain `|`; no part may contain a newline (the row separator).
    #[error("journal row {entry_id:?}: {field} contains a separator ('|' or newline)")]
    Separator {
        entry_id: String,
        field: &'static str,
    },
    /// An empty text reads back as `None`: the required parts must not be empty.
    #[error("journal row {entry_id:?}: {field} is empty")]
    Empty {
        entry_id: String,
        field: &'static str,
    },
}

/// Packs rows into the value of a batched stream entry's `rows` field (the form the batch
/// report script XADDs; see the module doc).
pub fn pack_rows(rows: &[RowFields<'_>]) -> Result<String, PackError> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows.len() * 128);
    for (i, r) in rows.iter().enumerate() {
        let texts: [(&'static str, Option<&str>, bool); 6] = [
            ("id", Some(r.entry_id), true),
            ("acct", Some(r.account_id), true),
            ("kind", Some(r.kind), true),
            ("route", r.route, false),
            ("action", r.action, false),
            ("tier", r.tier, false),
        ];
        for (field, value, required) in texts {
            let v = value.unwrap_or("");
            if v.contains(['|', '\n']) {
                return Err(PackError::Separator {
                    entry_id: r.entry_id.to_string(),
                    field,
                });
            }
            if required && v.is_empty() {
                return Err(PackError::Empty {
                    entry_id: r.entry_id.to_string(),
                    field,
                });
            }
        }
        let req = r.request_id.unwrap_or("");
        if req.contains('\n') {
            return Err(PackError::Separator {
                entry_id: r.entry_id.to_string(),
                field: "req",
            });
        }
        if i > 0 {
            out.push('\n');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            r.entry_id,
            r.account_id,
            r.kind,
            r.amount,
            r.d_allowance,
            r.d_purchased,
            r.allowance_after,
            r.purchased_after,
            r.route.unwrap_or(""),
            r.action.unwrap_or(""),
            r.tier.unwrap_or(""),
            r.ts_ms,
            req
        );
    }
    Ok(out)
}

/// An integer part as the scripts write it: decimal, possibly `-0`, or (Lua number formatting)
/// a float with an integral value.
pub(super) fn parse_int(v: &str) -> Option<i64> {
    v.parse::<i64>().ok().or_else(|| {
        v.parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && f.is_finite())
            .map(|f| f as i64)
    })
}

/// Splits a packed row into its 13 parts (`req`, last, keeps any `|` it contains).
pub(super) fn split_row(row: &str) -> Option<[&str; 13]> {
    let mut parts = [""; 13];
    let mut rest = row;
    for part in parts.iter_mut().take(12) {
        let (head, tail) = rest.split_once('|')?;
        *part = head;
        rest = tail;
    }
    parts[12] = rest;
    Some(parts)
}

/// The earliest `ts` (Unix ms) among packed rows, skipping rows that do not parse (the
/// flusher parks those); `None` if no row has one.
pub fn packed_min_ts(rows: &str) -> Option<i64> {
    rows.split('\n')
        .filter_map(|row| split_row(row).and_then(|p| parse_int(p[11])))
        .min()
}
