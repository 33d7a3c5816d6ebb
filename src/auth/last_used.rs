//! When each API key was last used, for the portal's key list. A request must not cost a
//! Postgres or Redis write for this, so a use is only noted in process (one map entry per key
//! used since the last flush, so memory is bounded by the keys in use) and a background task
//! writes the latest use of each key to Redis every `[portal] key_used_flush_seconds`
//! (60): at most one write per key and interval per instance, batched per account.
//!
//! Layout: `{prefix:sN}:keyused:<account>` (hash on the account's ledger shard, one slot per
//! command as everywhere else): key id → unix seconds of its last use. The portal reads it with
//! one HGETALL per page.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{AsyncCommands, Script};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ledger::keys::{shard_of, shard_tag};
use crate::redis_conn::RedisConn;

static RAISE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("key_used.lua")));

/// A use not yet written to Redis.
#[derive(Debug, Clone)]
struct Pending {
    account_id: String,
    at: i64,
}

/// The uses noted since the last flush (key id → latest use).
#[derive(Debug, Default)]
pub struct KeyUsage {
    pending: Mutex<HashMap<String, Pending>>,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The hash of an account's key uses.
pub fn hash_key(prefix: &str, shards: u32, account_id: &str) -> String {
    format!(
        "{}:keyused:{account_id}",
        shard_tag(prefix, shard_of(account_id, shards))
    )
}

impl KeyUsage {
    /// Notes a request made with `key_id` now. Allocates only for the first use of a key in
    /// an interval.
    pub fn record(&self, account_id: &str, key_id: &str) {
        let at = now_secs();
        let mut pending = self.pending.lock();
        match pending.get_mut(key_id) {
            Some(p) => p.at = p.at.max(at),
            None => {
                pending.insert(
                    key_id.to_string(),
                    Pending {
                        account_id: account_id.to_string(),
                        at,
                    },
                );
            }
        }
    }

    /// This instance's unflushed uses of the account's keys (newer than what Redis holds).
    pub fn pending_for(&self, account_id: &str) -> HashMap<String, i64> {
        self.pending
            .lock()
            .iter()
            .filter(|(_, p)| p.account_id == account_id)
            .map(|(k, p)| (k.clone(), p.at))
            .collect()
    }

    /// Puts back uses a failed flush took, keeping any newer use noted meanwhile.
    fn restore(&self, entries: HashMap<String, Pending>) {
        let mut pending = self.pending.lock();
        for (key_id, p) in entries {
            pending
                .entry(key_id)
                .and_modify(|cur| cur.at = cur.at.max(p.at))
                .or_insert(p);
        }
    }

    /// Writes the noted uses to Redis (one script call per account). Returns how many keys
    /// were written; on an error the unwritten uses stay noted for the next flush.
    pub async fn flush(
        &self,
        conn: &mut RedisConn,
        prefix: &str,
        shards: u32,
    ) -> redis::RedisResult<usize> {
        let taken = std::mem::take(&mut *self.pending.lock());
        let mut by_account: HashMap<String, HashMap<String, Pending>> = HashMap::new();
        for (key_id, p) in taken {
            by_account
                .entry(p.account_id.clone())
                .or_default()
                .insert(key_id, p);
        }
        let mut written = 0;
        let mut accounts = by_account.into_iter();
        while let Some((account, keys)) = accounts.next() {
            let mut call = RAISE.key(hash_key(prefix, shards, &account));
            for (key_id, p) in &keys {
                call.arg(key_id).arg(p.at);
            }
            let result: redis::RedisResult<i64> = call.invoke_async(conn).await;
            if let Err(e) = result {
                self.restore(keys);
                for (_, rest) in accounts {
                    self.restore(rest);
                }
                return Err(e);
            }
            written += keys.len();
        }
        Ok(written)
    }
}

/// The last use (unix seconds) of each of the account's keys that Redis knows.
pub async fn read(
    conn: &mut RedisConn,
    prefix: &str,
    shards: u32,
    account_id: &str,
) -> redis::RedisResult<HashMap<String, i64>> {
    let raw: HashMap<String, String> = conn.hgetall(hash_key(prefix, shards, account_id)).await?;
    Ok(raw
        .into_iter()
        .filter_map(|(k, v)| v.parse().ok().map(|at| (k, at)))
        .collect())
}

/// The background flusher of one instance; flushes once more when stopped. `config` is the
/// config serving now (the interval follows a reload).
pub async fn run(
    usage: Arc<KeyUsage>,
    redis: RedisConn,
    config: impl Fn() -> Arc<Config>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let interval = Duration::from_secs(config().portal.key_used_flush_seconds.max(1));
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        let current = config();
        let mut conn = redis.clone();
        match usage
            .flush(&mut conn, &current.redis.key_prefix, current.redis.shards)
            .await
        {
            Ok(_) => {
                if failing {
                    tracing::info!("key last-use times are written again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "key last-use times not written; retrying");
                    failing = true;
                }
            }
        }
        if stopped {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_the_latest_use_per_key_and_account() {
        let u = KeyUsage::default();
        u.record("acme", "key_1");
        u.record("acme", "key_2");
        u.record("other", "key_3");
        let acme = u.pending_for("acme");
        assert_eq!(acme.len(), 2);
        assert!(acme["key_1"] > 0);
        assert_eq!(u.pending_for("other").len(), 1);
        // A restore never lowers a newer use.
        let mut old = HashMap::new();
        old.insert(
            "key_1".to_string(),
            Pending {
                account_id: "acme".into(),
                at: 1,
            },
        );
        u.restore(old);
        assert!(u.pending_for("acme")["key_1"] > 1);
    }

    #[test]
    fn hash_on_the_account_shard() {
        assert_eq!(hash_key("tg", 1, "acme"), "{tg:s0}:keyused:acme");
    }
}
