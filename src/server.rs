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

/// At most this many exact debits go in one grouped script call (`[redis] group_commit`):
/// enough to carry a busy shard's round trip, few enough that the call blocks Redis ~1 ms.
const GROUP_COMMIT_MAX_DEBITS: usize = 32;

use crate::auth::AuthCaches;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::redis_conn::{RedisConn, RedisTarget};
use crate::state::{AppState, Snapshot};

mod accept;
mod stores;

use accept::{accept_loop, wait_for_signal};
pub use stores::{
    connect_postgres, connect_redis, connect_redis_with_timeout, lazy_postgres, postgres_ready,
    redact,
};
use stores::{watch_postgres, PG_ACQUIRE_TIMEOUT};

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
    #[error("server.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

pub struct ServeOptions {
    pub migrate: bool,
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

    let metrics = Arc::new(Metrics::new()?);
    let state = Arc::new(AppState {
        snapshot: ArcSwap::from_pointee(Snapshot::new(Arc::clone(&config))),
        pg,
        redis_target: redis_target.clone(),
        redis,
        caches: Arc::new(AuthCaches::new(config.auth.key_cache_ttl)),
        ledger: {
            let ledger = crate::ledger::Ledger::new(
                &config.redis.key_prefix,
                config.redis.shards,
                Duration::from_millis(config.redis.timeout_ms),
            );
            if config.redis.group_commit {
                ledger.with_group_commit(
                    GROUP_COMMIT_MAX_DEBITS,
                    Some(crate::ledger::GroupMetrics {
                        calls: metrics.grouped_calls.clone(),
                        requests: metrics.grouped_requests.clone(),
                    }),
                )
            } else {
                ledger
            }
        },
        metrics,
        unanswered: Default::default(),
        leases: Arc::new(crate::lease::Leases::new(
            config.leases.clone(),
            config.redis.shards,
        )),
        reloads: Default::default(),
        web: Default::default(),
    });
    state.snapshot.load().start_background();

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

    // The listener's certificate, re-read by `crate::tls::reload_tls` (the config reload).
    let listener_tls = match &config.server.tls {
        Some(files) => {
            let tls = Arc::new(crate::tls::ListenerTls::load(files)?);
            crate::tls::install(Arc::clone(&tls));
            Some(tls)
        }
        None => None,
    };
    let proxy_listener = bind("the proxy", config.server.listen).await?;
    let admin_listener = bind("the admin API", config.server.admin_listen).await?;
    let metrics_listener = bind("metrics", config.server.metrics_listen).await?;
    let local = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
    let proxy_addr = local(&proxy_listener, config.server.listen);
    let admin_addr = local(&admin_listener, config.server.admin_listen);
    let metrics_addr = local(&metrics_listener, config.server.metrics_listen);
    // The portal's links default to the proxy listener as clients reach it.
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let _ = state
        .web
        .proxy_origin
        .set(format!("{scheme}://{proxy_addr}"));

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
    background.spawn(crate::auth::last_used::run(
        Arc::clone(&state.web.key_usage),
        state.redis.clone(),
        {
            let state = Arc::clone(&state);
            move || state.config()
        },
        stop.clone(),
    ));
    // Credit slices stop after the connections drained (their last requests are reported)
    // and before the flusher, so those rows reach Postgres before exit.
    let lease_stop = CancellationToken::new();
    let lease_task = config.leases.enabled.then(|| {
        background.spawn(crate::lease::recall::listen(
            state.redis_target.clone(),
            config.redis.key_prefix.clone(),
            Arc::clone(&state.leases),
            stop.clone(),
        ));
        tokio::spawn(crate::lease::reporter::run(
            Arc::clone(&state.leases),
            Arc::clone(&state),
            lease_stop.clone(),
        ))
    });

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

    // The operator console shares the admin listener (its own sign-in; never on the proxy
    // listener).
    let admin_app = crate::admin::router(Arc::clone(&state))
        .merge(crate::web::console::router(Arc::clone(&state)).with_state(Arc::clone(&state)));
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

    // SIGHUP reloads the config (its default action would end the process).
    match crate::reload::on_sighup(Arc::clone(&state), stop.clone()) {
        Ok(task) => {
            background.spawn(task);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /v1/config/reload")
        }
    }

    eprintln!("listening proxy={proxy_addr} admin={admin_addr} metrics={metrics_addr}");
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, metrics = %metrics_addr, "tollgate serving");

    let accept = tokio::spawn(accept_loop(
        proxy_listener,
        listener_tls,
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
    // The grace period of the config serving now (a reload may have changed it).
    let grace = state.config().server.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace period over; closing the remaining connections"
        );
    }
    lease_stop.cancel();
    if let Some(task) = lease_task {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!("credit slices: the final report did not finish in 5 s; the slices expire back to their accounts");
        }
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
