//! What every request and admin call shares: the current config snapshot (swappable), the
//! Postgres pool, the Redis connection, the auth caches and the metrics.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use sqlx::PgPool;

use crate::auth::jwt::JwtVerifier;
use crate::auth::AuthCaches;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;
use crate::routing::limits::RateLimiters;
use crate::routing::table::Router;

/// Everything derived from one config file; replaced as a whole so a request sees one version.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub jwt: Option<JwtVerifier>,
    pub limiters: RateLimiters,
}

impl Snapshot {
    pub fn new(config: Arc<Config>) -> Self {
        Self::reloaded(None, config)
    }

    /// The snapshot of a reloaded config: router and limiters rebuilt from it, but what must
    /// outlive a reload carried over from `previous` (the rate limiters of tiers whose rate
    /// did not change, the JWKS keys of an unchanged `jwks_url`).
    pub fn reloaded(previous: Option<&Snapshot>, config: Arc<Config>) -> Self {
        Snapshot {
            router: Router::new(&config.routes),
            jwt: config
                .auth
                .jwt
                .as_ref()
                .map(|j| JwtVerifier::carried_over(previous.and_then(|p| p.jwt.as_ref()), j)),
            limiters: RateLimiters::carried_over(previous.map(|p| &p.limiters), &config),
            config,
        }
    }

    /// Starts what runs beside requests (the JWKS refresh); a no-op for what already runs.
    /// Needs a Tokio runtime.
    pub fn start_background(&self) {
        if let Some(jwks) = self.jwt.as_ref().and_then(|j| j.jwks()) {
            jwks.start();
        }
    }
}

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub pg: PgPool,
    /// Where Redis is (for the pub/sub subscription).
    pub redis_target: crate::redis_conn::RedisTarget,
    pub redis: RedisConn,
    pub caches: Arc<AuthCaches>,
    pub ledger: Ledger,
    /// Debits whose reply was lost, resolved on the side.
    pub unanswered: crate::ledger::unanswered::UnansweredDebits,
    pub metrics: Arc<Metrics>,
    /// Credit slices held by this instance.
    pub leases: Arc<crate::lease::Leases>,
    /// Serializes config reloads and numbers them (SIGHUP, `POST /v1/config/reload`).
    pub reloads: crate::reload::Reloads,
    /// The customer portal's and operator console's run-time state.
    pub web: WebState,
}

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.snapshot.load().config)
    }
}

impl crate::auth::outbox::Stores for AppState {
    fn redis(&self) -> RedisConn {
        self.redis.clone()
    }
    fn pg(&self) -> &PgPool {
        &self.pg
    }
    fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

impl crate::lease::Stores for AppState {
    fn redis(&self) -> RedisConn {
        self.redis.clone()
    }
    fn pg(&self) -> &PgPool {
        &self.pg
    }
    fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn config(&self) -> Arc<Config> {
        AppState::config(self)
    }
}

impl crate::reload::Live for AppState {
    fn reloads(&self) -> &crate::reload::Reloads {
        &self.reloads
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn config(&self) -> Arc<Config> {
        AppState::config(self)
    }
    /// Rebuilds what derives from the config, carrying over from the serving snapshot what
    /// must outlive a reload, and swaps it in (reloads are serialized, so nothing else swaps
    /// meanwhile).
    fn install(&self, new: Arc<Config>) {
        let previous = self.snapshot.load_full();
        let snapshot = Snapshot::reloaded(Some(&previous), new);
        snapshot.start_background();
        self.snapshot.store(Arc::new(snapshot));
    }
}

/// What the browser surfaces need at run time beyond the config.
#[derive(Default)]
pub struct WebState {
    /// `http://ADDR` of the bound proxy listener: the origin of portal links when
    /// `[portal] public_url` is not set (known only once the listener is bound, port 0 included).
    pub proxy_origin: OnceLock<String>,
    /// API key uses not yet written to Redis (the portal's "last used").
    pub key_usage: Arc<crate::auth::last_used::KeyUsage>,
}
