//! Revocations and account status changes never wait for Postgres: each is recorded in a Redis
//! stream on a fixed slot (`{prefix:outbox}:auth`), applied to Redis at once, and written to
//! Postgres by a drainer (every instance runs one; a lock lets one drain at a time) in stream
//! order. The Postgres writes are idempotent (`revoked_at IS NULL`, `status <> new`), so an
//! entry replayed after a crash between the write and its `XDEL` changes nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use redis::{AsyncCommands, Script};
use tokio_util::sync::CancellationToken;

use super::keys::KeyHash;
use super::redis_keys::KeyIndex;
use crate::ledger::Ledger;
use crate::redis_conn::RedisConn;

/// Sets an account's status in its ledger hash, if Redis holds the account, unless a newer
/// change (`status_ver`, µs) is already there: a replayed outbox entry never undoes a later one.
static SET_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
         local cur = tonumber(redis.call('HGET', KEYS[1], 'status_ver') or '0') \
         if tonumber(ARGV[2]) < cur then return 0 end \
         redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_ver', ARGV[2]) \
         if ARGV[1] ~= 'past_due' then redis.call('HDEL', KEYS[1], 'grace_until') end \
         return 1",
    )
});

/// Releases the drain lock only if this drainer still holds it.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
         return 0",
    )
});

/// The drain lock outlives any batch: statements are bounded well below it.
const LOCK_TTL_MS: u64 = 15_000;
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);
const BATCH_BUDGET: Duration = Duration::from_secs(8);
const BATCH: usize = 100;
const INTERVAL: Duration = Duration::from_millis(500);

pub fn stream(prefix: &str) -> String {
    format!("{{{prefix}:outbox}}:auth")
}

fn lock(prefix: &str) -> String {
    format!("{{{prefix}:outbox}}:lock")
}

/// One change waiting for Postgres. `at` is when it was made (µs), also its version in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Revoke {
        key_id: String,
        hash: KeyHash,
        account_id: String,
        at: i64,
    },
    Status {
        account_id: String,
        status: String,
        at: i64,
    },
}

impl Change {
    fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Change::Revoke {
                key_id,
                hash,
                account_id,
                at,
            } => vec![
                ("kind", "revoke".into()),
                ("key_id", key_id.clone()),
                ("hash", hex::encode(hash)),
                ("acct", account_id.clone()),
                ("at", at.to_string()),
            ],
            Change::Status {
                account_id,
                status,
                at,
            } => vec![
                ("kind", "status".into()),
                ("acct", account_id.clone()),
                ("status", status.clone()),
                ("at", at.to_string()),
            ],
        }
    }

    fn parse(fields: &HashMap<String, String>) -> Option<Change> {
        let get = |f: &str| fields.get(f).cloned();
        let at = get("at")?.parse().ok()?;
        match get("kind")?.as_str() {
            "revoke" => Some(Change::Revoke {
                key_id: get("key_id")?,
                hash: hex::decode(get("hash")?)
                    .ok()
                    .and_then(|b| KeyHash::try_from(b.as_slice()).ok())?,
                account_id: get("acct")?,
                at,
            }),
            "status" => Some(Change::Status {
                account_id: get("acct")?,
                status: get("status")?,
                at,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("postgres did not answer within {0:?}")]
    Timeout(Duration),
}

/// Records the change durably, then applies it to Redis (the order makes a crash in between
/// harmless: the drainer applies it to Redis again before Postgres).
pub async fn submit(
    conn: &mut RedisConn,
    prefix: &str,
    index: &KeyIndex,
    ledger: &Ledger,
    change: &Change,
) -> redis::RedisResult<()> {
    let fields = change.fields();
    let _: String = conn.xadd(stream(prefix), "*", &fields).await?;
    apply_redis(conn, index, ledger, change).await
}

/// The change's effect in Redis; safe to repeat (versions keep a newer state).
pub async fn apply_redis(
    conn: &mut RedisConn,
    index: &KeyIndex,
    ledger: &Ledger,
    change: &Change,
) -> redis::RedisResult<()> {
    match change {
        Change::Revoke {
            key_id,
            hash,
            account_id,
            at,
        } => index.revoke(conn, hash, key_id, account_id, *at).await,
        Change::Status {
            account_id,
            status,
            at,
        } => {
            let _: i64 = SET_STATUS
                .key(ledger.keys(account_id).account)
                .arg(status)
                .arg(*at)
                .invoke_async(conn)
                .await?;
            index
                .patch_account(conn, account_id, "status", status, *at)
                .await?;
            Ok(())
        }
    }
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, OutboxError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(OutboxError::Timeout(STATEMENT_TIMEOUT)),
    }
}

/// Writes one change to Postgres; a repeat changes nothing.
async fn apply_postgres(pg: &sqlx::PgPool, change: &Change) -> Result<(), OutboxError> {
    match change {
        Change::Revoke { key_id, at, .. } => {
            let at = chrono::DateTime::from_timestamp_micros(*at).unwrap_or_else(chrono::Utc::now);
            bounded(
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(key_id)
                .bind(at)
                .execute(pg),
            )
            .await?;
        }
        Change::Status {
            account_id, status, ..
        } => {
            bounded(
                sqlx::query(
                    "UPDATE accounts SET status = $2, updated_at = now()
                      WHERE id = $1 AND status <> $2",
                )
                .bind(account_id)
                .bind(status)
                .execute(pg),
            )
            .await?;
        }
    }
    Ok(())
}

/// The stores the drainer works on. Implemented by the composition root, which owns them;
/// the drainer runs on its own, so it holds them through an `Arc`.
pub trait Stores: Send + Sync + 'static {
    /// A handle on the shared Redis connection.
    fn redis(&self) -> RedisConn;
    fn pg(&self) -> &sqlx::PgPool;
    /// The account keys a status change applies to; its prefix and shard count (fixed for
    /// the life of the process) also name the outbox and the key index.
    fn ledger(&self) -> &Ledger;
}

/// Drains the outbox into Postgres, oldest first, stopping at the first failure so a later
/// change never lands before an earlier one. Returns how many entries were written; 0 when
/// another drainer holds the lock.
pub async fn drain(stores: &impl Stores) -> Result<usize, OutboxError> {
    let ledger = stores.ledger();
    let prefix = &ledger.prefix;
    let index = KeyIndex::new(prefix, ledger.shards);
    let mut conn = stores.redis();
    let token = uuid::Uuid::now_v7().simple().to_string();
    let locked: Option<String> = redis::cmd("SET")
        .arg(lock(prefix))
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(LOCK_TTL_MS)
        .query_async(&mut conn)
        .await?;
    if locked.is_none() {
        return Ok(0);
    }
    let result = drain_locked(stores, &mut conn, prefix, &index).await;
    let _: i64 = UNLOCK
        .key(lock(prefix))
        .arg(&token)
        .invoke_async(&mut conn)
        .await?;
    result
}

async fn drain_locked(
    stores: &impl Stores,
    conn: &mut RedisConn,
    prefix: &str,
    index: &KeyIndex,
) -> Result<usize, OutboxError> {
    let started = Instant::now();
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_count(stream(prefix), "-", "+", BATCH).await?;
    let mut written = 0;
    for entry in entries.ids {
        if started.elapsed() > BATCH_BUDGET {
            break;
        }
        let fields: HashMap<String, String> = entry
            .map
            .iter()
            .filter_map(|(k, v)| {
                redis::from_redis_value_ref::<String>(v)
                    .ok()
                    .map(|v| (k.clone(), v))
            })
            .collect();
        match Change::parse(&fields) {
            Some(change) => {
                apply_redis(conn, index, stores.ledger(), &change).await?;
                apply_postgres(stores.pg(), &change).await?;
            }
            None => tracing::error!(entry = %entry.id, "dropping a malformed auth outbox entry"),
        }
        let _: i64 = conn.xdel(stream(prefix), &[&entry.id]).await?;
        written += 1;
    }
    Ok(written)
}

/// Drains now, on the side, and waits a little for it: with Postgres up the change is in
/// Postgres before the admin call answers; with Postgres down the call answers anyway (the
/// drain goes on, and releases its lock, by itself).
pub async fn nudge(stores: Arc<impl Stores>) {
    let task = tokio::spawn(async move { drain(&*stores).await });
    match tokio::time::timeout(Duration::from_secs(2), task).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "auth outbox not drained yet"),
        Ok(Err(e)) => tracing::error!(error = %e, "auth outbox drain failed"),
        Err(_) => tracing::warn!("auth outbox drain is slow (Postgres unreachable?)"),
    }
}

/// The background drainer of one instance.
pub async fn run(stores: Arc<impl Stores>, stop: CancellationToken) {
    let mut failing = false;
    loop {
        match drain(&*stores).await {
            Ok(n) => {
                if failing {
                    tracing::info!("auth outbox drains again");
                    failing = false;
                }
                if n > 0 {
                    tracing::info!(entries = n, "auth changes written to postgres");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "auth outbox cannot drain; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_the_stream() {
        let changes = [
            Change::Revoke {
                key_id: "key_1".into(),
                hash: crate::auth::keys::hash("tg_x"),
                account_id: "acme".into(),
                at: 42,
            },
            Change::Status {
                account_id: "acme".into(),
                status: "suspended".into(),
                at: 43,
            },
        ];
        for c in changes {
            let fields: HashMap<String, String> = c
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(Change::parse(&fields), Some(c));
        }
    }

    #[test]
    fn one_fixed_slot() {
        assert_eq!(stream("tg"), "{tg:outbox}:auth");
        assert!(lock("tg").starts_with("{tg:outbox}"));
    }
}
