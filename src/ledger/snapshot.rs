//! An account read back for a check or a rebuild: its Redis buckets and the entries still in
//! its shard stream, in one atomic script (`snapshot.lua`), and the journal's view of those
//! entries in one Postgres statement. Used by the hydration here and by the journal's audit.

use std::sync::LazyLock;

use crate::redis_conn::RedisConn;
use redis::{Script, Value};
use sqlx::PgPool;

use super::keys::AccountKeys;

static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("snapshot.lua")));

/// An account as Redis holds it, read atomically: the hash's buckets (when it exists) and the
/// account's entries still in its shard stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub exists: bool,
    pub allowance: i64,
    pub purchased: i64,
    /// (entry id, d_allowance, d_purchased) of each entry still in the stream.
    pub pending: Vec<(String, i64, i64)>,
}

pub async fn snapshot(
    conn: &mut RedisConn,
    keys: &AccountKeys,
    account_id: &str,
) -> redis::RedisResult<Snapshot> {
    let reply: Vec<Value> = SNAPSHOT
        .key(&keys.account)
        .key(&keys.stream)
        .arg(account_id)
        .invoke_async(conn)
        .await?;
    let mut pending = Vec::new();
    if let Some(Value::Array(items)) = reply.get(3) {
        for chunk in items.chunks(3) {
            if let [id, a, p] = chunk {
                pending.push((text(id), int(a), int(p)));
            }
        }
    }
    Ok(Snapshot {
        exists: reply.first().map(int) == Some(1),
        allowance: reply.get(1).map_or(0, int),
        purchased: reply.get(2).map_or(0, int),
        pending,
    })
}

/// The journal's view of an account, given the entries a [`Snapshot`] found in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalView {
    /// Rows in Postgres.
    pub rows: i64,
    /// Sums of those rows (µc).
    pub stored: (i64, i64),
    /// Entries of the snapshot not yet in Postgres, and their sums (µc).
    pub unflushed: usize,
    pub unflushed_sum: (i64, i64),
}

impl JournalView {
    /// Every entry, stored or still in the stream.
    pub fn entries(&self) -> i64 {
        self.rows + self.unflushed as i64
    }

    /// (allowance, purchased) in µc: stored plus unflushed.
    pub fn total(&self) -> (i64, i64) {
        (
            self.stored.0 + self.unflushed_sum.0,
            self.stored.1 + self.unflushed_sum.1,
        )
    }
}

/// Postgres' sums and which of the `pending` stream entries it already holds, in one
/// statement. With the snapshot taken first, every entry counts exactly once: the flusher
/// commits an entry before deleting it from the stream, so an entry gone from the snapshot
/// is in Postgres, and one in the snapshot is either stored (counted in the sums) or not
/// (counted as unflushed).
pub async fn journal_view(
    pg: &PgPool,
    account_id: &str,
    pending: &[(String, i64, i64)],
) -> Result<JournalView, sqlx::Error> {
    let ids: Vec<String> = pending.iter().map(|(id, _, _)| id.clone()).collect();
    let (rows, sum_a, sum_p, flushed): (i64, i64, i64, Vec<String>) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(d_allowance), 0)::BIGINT, COALESCE(sum(d_purchased), 0)::BIGINT,
                COALESCE(array_agg(entry_id) FILTER (WHERE entry_id = ANY($2)), '{}')
           FROM ledger_entries WHERE account_id = $1",
    )
    .bind(account_id)
    .bind(&ids)
    .fetch_one(pg)
    .await?;
    let mut unflushed = 0;
    let (mut ua, mut up) = (0i64, 0i64);
    for (id, a, p) in pending {
        if !flushed.contains(id) {
            unflushed += 1;
            ua += a;
            up += p;
        }
    }
    Ok(JournalView {
        rows,
        stored: (sum_a, sum_p),
        unflushed,
        unflushed_sum: (ua, up),
    })
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}
