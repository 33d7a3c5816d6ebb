//! `[redis]` and `[journal]`: where the ledger and the journal streams live.

use super::*;

/// `[redis]`: URL (`${VAR}` substituted), key prefix, shards and timeouts.
pub(super) fn redis(
    raw: &raw::Config,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> raw::Redis {
    // [redis]
    let mut redis = raw.redis.clone();
    redis.url = substitute(&redis.url, "redis.url", env, missing, p);
    // One server (redis://, rediss://, unix) or a cluster (redis+cluster://host:port,…).
    if !raw.redis.url.contains("${") {
        match url::Url::parse(&redis.url) {
            Ok(u)
                if !matches!(
                    u.scheme(),
                    "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" | "rediss+cluster"
                ) =>
            {
                p.add(
                    "redis.url",
                    format!(
                        "scheme {:?} is not redis://, rediss:// or redis+cluster://",
                        u.scheme()
                    ),
                )
            }
            _ => {
                if let Err(e) = crate::redis_conn::RedisTarget::parse(&redis.url) {
                    p.add("redis.url", format!("{:?}: {e}", raw.redis.url));
                }
            }
        }
    }
    if !is_name(&redis.key_prefix) {
        p.add(
            "redis.key_prefix",
            format!(
                "{:?} must be 1-64 characters of letters, digits, '_', '-', '.'",
                redis.key_prefix
            ),
        );
    }
    if !(1..=16384).contains(&redis.shards) {
        p.add("redis.shards", "must be between 1 and 16384");
    }
    if !(1..=86_400).contains(&redis.lease_ttl_seconds) {
        p.add("redis.lease_ttl_seconds", "must be between 1 and 86400");
    }
    if redis.timeout_ms == 0 {
        p.add("redis.timeout_ms", "must be greater than 0");
    }
    redis
}

/// `[journal]`: claim and reconcile timings of the journal streams.
pub(super) fn journal(raw: &raw::Config, p: &mut Problems) -> raw::Journal {
    if !(1..=3600).contains(&raw.journal.claim_idle_seconds) {
        p.add("journal.claim_idle_seconds", "must be between 1 and 3600");
    }
    if !(1..=86_400).contains(&raw.journal.reconcile_after_seconds) {
        p.add(
            "journal.reconcile_after_seconds",
            "must be between 1 and 86400",
        );
    }
    raw.journal.clone()
}
