//! `tollgate serve`: connect the stores, bind the three listeners, run the proxy (Pingora's
//! `HttpProxy` on our own accept loop, so port 0 works and everything shares one runtime), the
//! admin API, the metrics endpoint and the background tasks; drain gracefully on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::ServerApp;
use pingora::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthCaches;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::redis_conn::{RedisConn, RedisTarget};
use crate::state::{AppState, Snapshot};

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot reach Postgres: {0}")]
    Postgres(String),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot reach Redis at {url}: {reason}")]
    Redis { url: String, reason: String },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub struct ServeOptions {
    pub migrate: bool,
}

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
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
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
async fn pg_reason(url: &str, pool_error: &sqlx::Error) -> String {
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
async fn watch_postgres(
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

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Runs until SIGTERM/SIGINT, then drains.
pub async fn serve(config: Config, opts: ServeOptions) -> Result<(), StartError> {
    config.require_secrets()?;
    let config = Arc::new(config);
    // Redis is the data plane: without it there is nothing to serve. Postgres is not: the
    // pool connects lazily and the tasks that need it wait for it (see `watch_postgres`).
    let pg = lazy_postgres(&config)?;
    let (redis_target, redis) = connect_redis(&config.redis).await?;
    // Postgres up at start: migrate before serving, as ever (a failing migration stops the
    // start). Down: serve anyway; `watch_postgres` migrates once it answers.
    let pg_answers = tokio::time::timeout(
        PG_ACQUIRE_TIMEOUT * 2,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pg),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if pg_answers && opts.migrate {
        crate::store::migrate(&pg).await?;
    }

    let state = Arc::new(AppState {
        snapshot: ArcSwap::from_pointee(Snapshot::new(Arc::clone(&config))),
        pg,
        redis_target: redis_target.clone(),
        redis,
        caches: Arc::new(AuthCaches::new(config.auth.key_cache_ttl)),
        ledger: crate::ledger::Ledger::new(
            &config.redis.key_prefix,
            config.redis.shards,
            Duration::from_millis(config.redis.timeout_ms),
        ),
        metrics: Arc::new(Metrics::new()?),
        unanswered: Default::default(),
    });

    // Debit deadlines are set in Redis's clock; keep the offset to ours fresh.
    {
        let mut conn = state.redis.clone();
        if let Err(e) = state.ledger.sync_clock(&mut conn).await {
            tracing::warn!(error = %e, "cannot read Redis's clock; debits run without a deadline until it can");
        }
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                let mut conn = state.redis.clone();
                let _ = state.ledger.sync_clock(&mut conn).await;
            }
        });
    }

    let proxy_listener = bind("the proxy", config.server.listen).await?;
    let admin_listener = bind("the admin API", config.server.admin_listen).await?;
    let metrics_listener = bind("metrics", config.server.metrics_listen).await?;
    let local = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
    let proxy_addr = local(&proxy_listener, config.server.listen);
    let admin_addr = local(&admin_listener, config.server.admin_listen);
    let metrics_addr = local(&metrics_listener, config.server.metrics_listen);

    let stop = CancellationToken::new();
    let background = TaskTracker::new();

    let (pg_ready_tx, pg_ready) = watch::channel(false);
    background.spawn(watch_postgres(
        state.pg.clone(),
        config.postgres.url.clone(),
        opts.migrate && !pg_answers,
        Arc::clone(&state.metrics),
        pg_ready_tx,
        stop.clone(),
    ));

    background.spawn(crate::auth::invalidation::listen(
        redis_target,
        config.redis.key_prefix.clone(),
        Arc::clone(&state.caches),
        stop.clone(),
    ));
    background.spawn(crate::auth::outbox::run(Arc::clone(&state), stop.clone()));

    // The flusher has its own Redis connection: its batch reads never queue behind, or in
    // front of, the hot path's debits. It stops last, after the connections drained, so the
    // entries of the final requests reach Postgres before exit.
    let journal_stop = CancellationToken::new();
    let (_, flusher_redis) =
        connect_redis_with_timeout(&config.redis, Duration::from_secs(10)).await?;
    let flusher = crate::journal::flusher::Flusher {
        redis: flusher_redis,
        pg: state.pg.clone(),
        prefix: config.redis.key_prefix.clone(),
        shards: config.redis.shards,
        consumer: crate::journal::flusher::Flusher::consumer_name(),
        claim_idle: Duration::from_secs(config.journal.claim_idle_seconds),
        metrics: Arc::clone(&state.metrics),
        on_flushed: crate::stripe::alerts::start(Arc::clone(&state), &background),
        retry_streams: Default::default(),
        pg_ready: Some(pg_ready.clone()),
    };
    let flusher_task = tokio::spawn(flusher.run(journal_stop.clone()));

    // The journal's monthly partitions ahead of time, and retention (hourly).
    background.spawn({
        let maintenance = crate::journal::partitions::run_maintenance(
            state.pg.clone(),
            state.redis.clone(),
            crate::journal::partitions::MaintenanceSettings::from_config(&config),
            Some(Arc::clone(&state.metrics)),
            stop.clone(),
        );
        let (mut ready, stop) = (pg_ready.clone(), stop.clone());
        async move {
            if postgres_ready(&mut ready, &stop).await {
                maintenance.await;
            }
        }
    });

    // Credits recorded in Postgres that Redis lost (a failover) are applied again.
    let reconcile_state = Arc::clone(&state);
    background.spawn({
        let stop = stop.clone();
        let every = Duration::from_secs(config.journal.reconcile_after_seconds);
        let mut ready = pg_ready.clone();
        async move {
            if !postgres_ready(&mut ready, &stop).await {
                return;
            }
            let s = &reconcile_state;
            crate::ledger::reconcile::run(
                &s.ledger,
                s.redis.clone(),
                &s.pg,
                || s.config(),
                &s.metrics,
                every,
                stop,
            )
            .await;
        }
    });

    // Debits whose reply was lost are refunded once the journal shows they ran.
    let unanswered_state = Arc::clone(&state);
    background.spawn({
        // Stopped with the flusher, after the in-flight requests: a debit noted while they
        // drain is still stored for another instance.
        let stop = journal_stop.clone();
        let mut ready = pg_ready.clone();
        async move {
            if !postgres_ready(&mut ready, &stop).await {
                return;
            }
            let s = &unanswered_state;
            crate::ledger::unanswered::run(
                &s.unanswered,
                &s.ledger,
                s.redis.clone(),
                &s.pg,
                &s.metrics,
                stop,
            )
            .await;
        }
    });

    // Every instance sweeps expired holds (their instance died before settling); the settle
    // script removes a hold atomically, so sweepers never settle one twice.
    let sweep_every = Duration::from_secs((config.redis.lease_ttl_seconds / 4).clamp(1, 10));
    let sweep_state = Arc::clone(&state);
    let sweep_stop = stop.clone();
    background.spawn(async move {
        let mut conn = sweep_state.redis.clone();
        loop {
            tokio::select! {
                _ = sweep_stop.cancelled() => return,
                _ = tokio::time::sleep(sweep_every) => {}
            }
            match sweep_state.ledger.sweep_expired(&mut conn).await {
                Ok(n) => sweep_state.metrics.holds_expired.inc_by(n),
                Err(e) => tracing::warn!(error = %e, "could not sweep expired holds"),
            }
        }
    });

    let admin_app = crate::admin::router(Arc::clone(&state));
    let admin_stop = stop.clone();
    background.spawn(async move {
        let served = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });

    let metrics_app = {
        let state = Arc::clone(&state);
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let state = Arc::clone(&state);
                async move {
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        state.metrics.render(),
                    )
                }
            }),
        )
    };
    let metrics_stop = stop.clone();
    background.spawn(async move {
        let served = axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move { metrics_stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });

    let server_conf = Arc::new(ServerConf {
        threads: config.server.threads.max(1),
        ..ServerConf::default()
    });
    let app = Arc::new(pingora::proxy::http_proxy(
        &server_conf,
        Gateway::new(Arc::clone(&state)),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let connections = TaskTracker::new();

    eprintln!("listening proxy={proxy_addr} admin={admin_addr} metrics={metrics_addr}");
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, metrics = %metrics_addr, "tollgate serving");

    let accept = tokio::spawn(accept_loop(
        proxy_listener,
        Arc::clone(&app),
        shutdown_rx,
        connections.clone(),
        stop.clone(),
    ));
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    // Stop accepting, tell keep-alive connections to close after their current request, and
    // wake idle ones so they close now.
    stop.cancel();
    // The accept loop owns the listener: once it returns, the port is closed and new
    // connections are refused.
    let _ = accept.await;
    let _ = shutdown_tx.send(true);
    app.cleanup().await;
    connections.close();
    if tokio::time::timeout(config.server.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace period over; closing the remaining connections"
        );
    }
    journal_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), flusher_task)
        .await
        .is_err()
    {
        tracing::warn!("the journal flusher did not finish in 10 s; unflushed entries stay in Redis for the next start");
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    listener: TcpListener,
    app: Arc<A>,
    shutdown: watch::Receiver<bool>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = Arc::clone(&app);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let stream: pingora::protocols::Stream =
                Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(stream) = next {
                next = app.process_new(stream, &shutdown).await;
            }
        });
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
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
