//! Connecting the stores: Redis (fail fast with a reason), Postgres (eager, or lazy with a
//! background probe that applies migrations and says when it is ready), and redacting
//! their URLs for logs.

use super::*;

/// Connects Redis (one server or a cluster, as `redis.url` says), failing fast with a clear
/// reason instead of retrying forever.
pub async fn connect_redis(
    cfg: &crate::config::raw::Redis,
) -> Result<(RedisTarget, RedisConn), StartError> {
    connect_redis_with_timeout(cfg, Duration::from_millis(cfg.timeout_ms)).await
}

/// Like [`connect_redis`], with another response timeout (the flusher's batch reads and the
/// CLI's audits are not on the hot path and may take longer than `redis.timeout_ms`).
pub async fn connect_redis_with_timeout(
    cfg: &crate::config::raw::Redis,
    timeout: Duration,
) -> Result<(RedisTarget, RedisConn), StartError> {
    let fail = |reason: String| StartError::Redis {
        url: redact(&cfg.url),
        reason,
    };
    let target = RedisTarget::parse(&cfg.url).map_err(|e| fail(e.to_string()))?;
    let conn = target
        .connect(timeout, Duration::from_secs(5))
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok((target, conn))
}

/// Connects Postgres (and migrates when asked).
pub async fn connect_postgres(config: &Config, migrate: bool) -> Result<sqlx::PgPool, StartError> {
    let pool = crate::store::connect(&config.postgres)
        .await
        .map_err(|e| StartError::Postgres(format!("{} ({e})", redact(&config.postgres.url))))?;
    if migrate {
        crate::store::migrate(&pool).await?;
    }
    Ok(pool)
}

/// How long a caller waits for a Postgres connection: an admin call during an outage answers
/// 503 `store_unavailable` after this, instead of hanging.
pub(super) const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often Postgres is probed while it is down, and while it answers.
const PG_PROBE_DOWN_EVERY: Duration = Duration::from_secs(1);
const PG_PROBE_UP_EVERY: Duration = Duration::from_secs(5);

/// A pool that connects on first use, so `serve` starts (and the data plane serves from
/// Redis) while Postgres is down: its users get errors until it is back. Only a URL that does
/// not parse stops the start.
pub fn lazy_postgres(config: &Config) -> Result<sqlx::PgPool, StartError> {
    let options: sqlx::postgres::PgConnectOptions = config
        .postgres
        .url
        .parse()
        .map_err(|e| StartError::Postgres(format!("{} ({e})", redact(&config.postgres.url))))?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.postgres.max_connections)
        .acquire_timeout(PG_ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.application_name("tollgate")))
}

/// Why Postgres cannot be reached, in the server's or the OS's words: the pool only says it
/// timed out, so one direct connection attempt is made to tell "down" from "wrong URL".
pub(super) async fn pg_reason(url: &str, pool_error: &sqlx::Error) -> String {
    use sqlx::Connection;
    let attempt = tokio::time::timeout(PG_ACQUIRE_TIMEOUT, sqlx::PgConnection::connect(url)).await;
    match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            pool_error.to_string()
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {PG_ACQUIRE_TIMEOUT:?} ({pool_error})"),
    }
}

/// Probes Postgres in the background: keeps `tollgate_postgres_up` and the failure counter,
/// logs once when it goes missing and once when it is back (not every retry), applies the
/// migrations (with `migrate`) as soon as it answers, and then sets `ready`, which the tasks
/// that need the schema (flusher, partition maintenance, reconciler, unanswered debits)
/// wait for.
pub(super) async fn watch_postgres(
    pg: sqlx::PgPool,
    url: String,
    migrate: bool,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let mut outage_logged = false;
    let mut migrate_failure_logged = false;
    let mut migrated = !migrate;
    loop {
        let probe = tokio::time::timeout(
            PG_ACQUIRE_TIMEOUT * 2,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pg),
        )
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut));
        let wait = match probe {
            Ok(_) => {
                if outage_logged {
                    tracing::warn!("Postgres is back; the journal catches up");
                    outage_logged = false;
                }
                metrics.postgres_up.set(1);
                metrics.postgres_down_since.store(0, Ordering::Relaxed);
                if !migrated {
                    match crate::store::migrate(&pg).await {
                        Ok(()) => {
                            migrated = true;
                            tracing::info!("migrations applied");
                        }
                        Err(e) if !migrate_failure_logged => {
                            migrate_failure_logged = true;
                            tracing::error!(error = %e, "cannot apply migrations; retrying in the background");
                        }
                        Err(_) => {}
                    }
                }
                if migrated {
                    ready.send_if_modified(|r| !std::mem::replace(r, true));
                    PG_PROBE_UP_EVERY
                } else {
                    PG_PROBE_DOWN_EVERY
                }
            }
            Err(e) => {
                metrics.postgres_connect_failures.inc();
                metrics.postgres_up.set(0);
                let now = chrono::Utc::now().timestamp();
                let _ = metrics.postgres_down_since.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if !outage_logged {
                    outage_logged = true;
                    let reason = pg_reason(&url, &e).await;
                    tracing::warn!(
                        url = %redact(&url),
                        %reason,
                        "Postgres unavailable: serving from Redis; the journal waits in Redis; retrying in the background"
                    );
                }
                PG_PROBE_DOWN_EVERY
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Waits until Postgres is reachable and migrated; `false` when stopped first.
pub async fn postgres_ready(ready: &mut watch::Receiver<bool>, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        r = ready.wait_for(|r| *r) => r.is_ok(),
    }
}

/// Hides a password in a URL before it is printed (also in a cluster URL's node list, which
/// is not one URL to a parser).
pub fn redact(url: &str) -> String {
    if let Ok(mut u) = url::Url::parse(url) {
        if u.password().is_some() && u.set_password(Some("***")).is_ok() {
            return u.to_string();
        }
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_print() {
        assert_eq!(
            super::redact("redis://u:secret@h:1/0"),
            "redis://u:***@h:1/0"
        );
        assert_eq!(
            super::redact("redis+cluster://u:secret@h:1,h:2/?x=1"),
            "redis+cluster://u:***@h:1,h:2/?x=1"
        );
        assert_eq!(
            super::redact("redis+cluster://h:1,h:2"),
            "redis+cluster://h:1,h:2"
        );
    }
}
