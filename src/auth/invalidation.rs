//! Cross-instance cache invalidation over Redis pub/sub. A revoked key or a changed account is
//! announced on `{prefix}:invalidate`; every instance drops its cached entry. While this
//! instance is not subscribed, the caches fall back to a 1 s TTL, so revocation still reaches
//! every instance within 2 s.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::AuthCaches;

pub fn channel(prefix: &str) -> String {
    format!("{prefix}:invalidate")
}

/// What to drop.
pub enum Invalidation<'a> {
    Key(&'a [u8]),
    Account(&'a str),
}

impl Invalidation<'_> {
    fn message(&self) -> String {
        match self {
            Invalidation::Key(hash) => format!("key:{}", hex::encode(hash)),
            Invalidation::Account(id) => format!("account:{id}"),
        }
    }
}

/// Applies locally and announces to the other instances.
pub async fn publish(
    redis: &mut crate::redis_conn::RedisConn,
    prefix: &str,
    caches: &AuthCaches,
    what: Invalidation<'_>,
) -> redis::RedisResult<()> {
    let message = what.message();
    caches.apply(&message);
    let _: i64 = redis.publish(channel(prefix), message).await?;
    Ok(())
}

/// Keeps a subscription alive until `stop`; (re)subscribing clears the caches, because
/// messages sent while unsubscribed are lost.
pub async fn listen(
    target: crate::redis_conn::RedisTarget,
    prefix: String,
    caches: Arc<AuthCaches>,
    stop: CancellationToken,
) {
    let channel = channel(&prefix);
    loop {
        caches.set_push_healthy(false);
        let subscribed = async {
            let mut pubsub = target.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), subscribed) => r,
        };
        match pubsub {
            Ok(Ok(mut pubsub)) => {
                caches.clear();
                caches.set_push_healthy(true);
                tracing::debug!(%channel, "subscribed to cache invalidations");
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                if let Ok(payload) = msg.get_payload::<String>() {
                                    caches.apply(&payload);
                                }
                            }
                            None => break,
                        }
                    }
                }
                tracing::warn!("cache invalidation channel lost; resubscribing");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to cache invalidations"),
            Err(_) => tracing::warn!("subscribing to cache invalidations timed out"),
        }
        caches.set_push_healthy(false);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// After an account's tier changed (admin call or Stripe event): its key records in Redis get
/// the new tier and every instance drops what it cached of the account. Failures are logged,
/// not returned: the change itself is committed, and the debit script answers with the
/// account's real tier, which the proxy follows until the records are re-filled.
pub async fn tier_changed(
    redis: &mut crate::redis_conn::RedisConn,
    config: &crate::config::Config,
    caches: &AuthCaches,
    account_id: &str,
    tier: &str,
) {
    let prefix = &config.redis.key_prefix;
    let index = super::redis_keys::KeyIndex::new(prefix, config.redis.shards);
    let version = super::redis_keys::now_version();
    if let Err(e) = index
        .patch_account(redis, account_id, "tier", tier, version)
        .await
    {
        tracing::error!(error = %e, account = %account_id, "could not update the key records' tier");
    }
    if let Err(e) = publish(redis, prefix, caches, Invalidation::Account(account_id)).await {
        tracing::error!(error = %e, account = %account_id, "could not announce the tier change");
    }
}
