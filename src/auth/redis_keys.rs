//! API key records in Redis, so a key resolves without Postgres (a fresh instance during a
//! Postgres outage serves every known key). Only the SHA-256 the store already keeps is used:
//! nothing here lets anyone recover a key.
//!
//! Layout (each command touches one slot, so it runs on Redis Cluster):
//! - `{prefix:kN}:key:<sha256 hex>` (hash, N = FNV-1a of the hex over `redis.shards`): key id,
//!   account, the account's tier and status, `revoked`, `ver` (µs of the last change). One
//!   HGETALL resolves a key.
//! - `{prefix:kN}:kid:<key id>` (string, N from the key id): the key's hash, so a revocation
//!   by id needs no Postgres.
//! - `{prefix:sN}:keys:<account>` (set, on the account's ledger shard): the hashes of the
//!   account's live keys, so a suspension or a tier change reaches every key record.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::KeyHash;
use super::Identity;
use crate::ledger::keys::{shard_of, shard_tag};
use crate::redis_conn::RedisConn;

static PUT_KEY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("put_key.lua")));

/// How a record is written (see `put_key.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only where Redis holds nothing (a re-fill from Postgres).
    Fill,
    /// Unless Redis holds a newer version.
    Set,
    /// Existing records only.
    Patch,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Fill => "fill",
            Mode::Set => "set",
            Mode::Patch => "patch",
        }
    }
}

/// What Redis knows about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub account_id: String,
    pub tier: String,
    pub status: String,
    pub revoked: bool,
}

impl KeyRecord {
    /// The caller this key stands for, `None` once revoked.
    pub fn identity(&self) -> Option<Identity> {
        (!self.revoked).then(|| Identity {
            account_id: self.account_id.clone(),
            key_id: Some(self.key_id.clone()),
            tier: self.tier.clone(),
            status: self.status.clone(),
        })
    }
}

/// A change's version: microseconds since the epoch (later change, larger version).
pub fn now_version() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Names of the key records under one prefix.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    prefix: String,
    shards: u32,
}

impl KeyIndex {
    pub fn new(prefix: &str, shards: u32) -> Self {
        KeyIndex {
            prefix: prefix.to_string(),
            shards: shards.max(1),
        }
    }

    fn key_tag(&self, name: &str) -> String {
        format!("{{{}:k{}}}", self.prefix, shard_of(name, self.shards))
    }

    /// The record of the key with this hash.
    pub fn record_key(&self, hash: &KeyHash) -> String {
        let hex = hex::encode(hash);
        format!("{}:key:{hex}", self.key_tag(&hex))
    }

    /// Key id → hash.
    pub fn id_key(&self, key_id: &str) -> String {
        format!("{}:kid:{key_id}", self.key_tag(key_id))
    }

    /// The account's live key hashes, on the account's ledger shard.
    pub fn account_keys(&self, account_id: &str) -> String {
        format!(
            "{}:keys:{account_id}",
            shard_tag(&self.prefix, shard_of(account_id, self.shards))
        )
    }

    /// An account's tier and status from its ledger hash, if Redis holds the account.
    pub async fn account_plan(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
    ) -> redis::RedisResult<Option<(String, String)>> {
        let name = crate::ledger::keys::AccountKeys::new(&self.prefix, self.shards, account_id);
        let (tier, status): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&name.account)
            .arg("tier")
            .arg("status")
            .query_async(conn)
            .await?;
        // `past_due` is the ledger's to enforce (served until the grace deadline); the gate
        // refuses only what an operator set, as with the status Postgres keeps.
        let status = match status.as_deref() {
            None | Some("past_due") => "active".to_string(),
            Some(other) => other.to_string(),
        };
        Ok(tier.map(|t| (t, status)))
    }

    /// One round trip: the key's record, if Redis holds one.
    pub async fn get(
        &self,
        conn: &mut RedisConn,
        hash: &KeyHash,
    ) -> redis::RedisResult<Option<KeyRecord>> {
        let fields: HashMap<String, String> = conn.hgetall(self.record_key(hash)).await?;
        Ok(parse_record(&fields))
    }

    /// The hash of the key with this id, if Redis knows it.
    pub async fn hash_of(
        &self,
        conn: &mut RedisConn,
        key_id: &str,
    ) -> redis::RedisResult<Option<KeyHash>> {
        let hex: Option<String> = conn.get(self.id_key(key_id)).await?;
        Ok(hex
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| KeyHash::try_from(b.as_slice()).ok()))
    }

    /// Writes a whole record (and its id and account entries). `Ok(false)` when Redis held a
    /// newer state (or, for [`Mode::Fill`], any state) and kept it.
    pub async fn put(
        &self,
        conn: &mut RedisConn,
        hash: &KeyHash,
        record: &KeyRecord,
        version: i64,
        mode: Mode,
    ) -> redis::RedisResult<bool> {
        let written: i64 = PUT_KEY
            .key(self.record_key(hash))
            .arg(version)
            .arg(mode.arg())
            .arg("id")
            .arg(&record.key_id)
            .arg("acct")
            .arg(&record.account_id)
            .arg("tier")
            .arg(&record.tier)
            .arg("status")
            .arg(&record.status)
            .arg("revoked")
            .arg(if record.revoked { "1" } else { "0" })
            .invoke_async(conn)
            .await?;
        if written != 1 {
            // Redis holds a newer (or, for a fill, any) state: its id and set entries stand.
            return Ok(false);
        }
        let _: () = conn
            .set(self.id_key(&record.key_id), hex::encode(hash))
            .await?;
        let set = self.account_keys(&record.account_id);
        let hex = hex::encode(hash);
        if record.revoked {
            let _: i64 = conn.srem(set, hex).await?;
        } else {
            let _: i64 = conn.sadd(set, hex).await?;
        }
        Ok(written == 1)
    }

    /// Marks a key revoked (a tombstone that no re-fill overwrites). The account comes from
    /// the record, or from `account_id` when Redis has none yet.
    pub async fn revoke(
        &self,
        conn: &mut RedisConn,
        hash: &KeyHash,
        key_id: &str,
        account_id: &str,
        version: i64,
    ) -> redis::RedisResult<()> {
        let record = KeyRecord {
            key_id: key_id.to_string(),
            account_id: account_id.to_string(),
            tier: String::new(),
            status: String::new(),
            revoked: true,
        };
        let current = self.get(conn, hash).await?;
        let record = match current {
            Some(cur) => KeyRecord {
                revoked: true,
                ..cur
            },
            None => record,
        };
        self.put(conn, hash, &record, version, Mode::Set).await?;
        Ok(())
    }

    /// Sets one field (`tier` or `status`) on every live key record of the account.
    pub async fn patch_account(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        field: &str,
        value: &str,
        version: i64,
    ) -> redis::RedisResult<usize> {
        let members: Vec<String> = conn.smembers(self.account_keys(account_id)).await?;
        let mut patched = 0;
        for hex in members {
            let rec = format!("{}:key:{hex}", self.key_tag(&hex));
            let written: i64 = PUT_KEY
                .key(rec)
                .arg(version)
                .arg(Mode::Patch.arg())
                .arg(field)
                .arg(value)
                .invoke_async(conn)
                .await?;
            patched += usize::try_from(written).unwrap_or(0);
        }
        Ok(patched)
    }
}

fn parse_record(fields: &HashMap<String, String>) -> Option<KeyRecord> {
    let get = |f: &str| fields.get(f).cloned();
    Some(KeyRecord {
        key_id: get("id")?,
        account_id: get("acct")?,
        tier: get("tier").unwrap_or_default(),
        status: get("status").unwrap_or_default(),
        revoked: get("revoked").as_deref() == Some("1"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_one_slot_per_record_and_hide_nothing_but_the_hash() {
        let idx = KeyIndex::new("tg", 64);
        let hash = crate::auth::keys::hash("tg_example");
        let rec = idx.record_key(&hash);
        assert!(rec.starts_with("{tg:k"), "{rec}");
        assert!(rec.ends_with(&hex::encode(hash)));
        assert!(idx
            .account_keys("acme")
            .starts_with(&shard_tag("tg", shard_of("acme", 64))));
        assert!(idx.id_key("key_1").contains("}:kid:key_1"));
    }

    #[test]
    fn revoked_records_resolve_to_nobody() {
        let mut fields = HashMap::new();
        for (k, v) in [
            ("id", "key_1"),
            ("acct", "acme"),
            ("tier", "pro"),
            ("status", "active"),
            ("revoked", "0"),
        ] {
            fields.insert(k.to_string(), v.to_string());
        }
        let live = parse_record(&fields).and_then(|r| r.identity());
        assert_eq!(live.map(|i| i.account_id), Some("acme".to_string()));
        fields.insert("revoked".into(), "1".into());
        assert_eq!(parse_record(&fields).and_then(|r| r.identity()), None);
        assert_eq!(parse_record(&HashMap::new()), None);
    }
}
