//! Reaching slices at once: an instance short of money asks the others to give their slices of
//! the account back (`{prefix}:recall`), and an account change announced to the auth caches
//! (`{prefix}:invalidate`: tier, status, keys) makes every instance give its slice back too.
//! Without the subscription, the next report (within one batch window, at most 1 s) does it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Leases, Stores};

pub fn channel(prefix: &str) -> String {
    format!("{prefix}:recall")
}

/// Asks every instance to give back its slice of the account.
pub async fn publish(
    redis: &mut crate::redis_conn::RedisConn,
    prefix: &str,
    account_id: &str,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(channel(prefix))
        .arg(account_id)
        .query_async::<i64>(redis)
        .await
        .map(|_| ())
}

/// Keeps the subscription alive until `stop`.
pub async fn listen(
    target: crate::redis_conn::RedisTarget,
    prefix: String,
    leases: Arc<Leases>,
    stop: CancellationToken,
) {
    let recall = channel(&prefix);
    let invalidate = crate::auth::invalidation::channel(&prefix);
    loop {
        let subscribed = async {
            let mut pubsub = target.pubsub().await?;
            pubsub.subscribe(&recall).await?;
            pubsub.subscribe(&invalidate).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), subscribed) => r,
        };
        if let Ok(Ok(mut pubsub)) = pubsub {
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    msg = messages.next() => match msg {
                        Some(msg) => {
                            let Ok(payload) = msg.get_payload::<String>() else { continue };
                            if msg.get_channel_name() == recall {
                                leases.recall(&payload, true);
                            } else if let Some(account) = payload.strip_prefix("account:") {
                                leases.recall(account, false);
                            }
                        }
                        None => break,
                    }
                }
            }
        }
        tracing::debug!("slice recall channel lost; resubscribing");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Brings every instance's slice of the account home before a change that must not be
/// crossed by requests served under the old plan (a tier change resets the allowance: what
/// was served before it must be charged before it). Asks once, then waits until Redis shows
/// no slice out, or gives up after a bounded wait (the change then goes ahead: at worst
/// what was served before it is charged after it).
pub async fn drain(leases: &Leases, stores: &impl Stores, account_id: &str) {
    let key = stores.ledger().keys(account_id).account;
    let mut conn = stores.redis();
    let leased = |conn: &mut crate::redis_conn::RedisConn| {
        let key = key.clone();
        let mut conn = conn.clone();
        async move {
            redis::cmd("HGET")
                .arg(&key)
                .arg("leased")
                .query_async::<Option<i64>>(&mut conn)
                .await
                .ok()
                .flatten()
                .unwrap_or(0)
        }
    };
    if leased(&mut conn).await <= 0 {
        return;
    }
    leases.recall(account_id, true);
    if let Err(e) = publish(&mut conn, &stores.ledger().prefix, account_id).await {
        tracing::warn!(error = %e, account = %account_id, "cannot ask instances for their credit slices");
    }
    let wait = Duration::from_millis((leases.cfg.recall_wait_ms * 3).clamp(300, 2_000));
    let until = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if leased(&mut conn).await <= 0 {
            return;
        }
    }
    tracing::warn!(account = %account_id, "credit slices still out after {wait:?}; changing the plan anyway");
}
