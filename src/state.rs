//! What every request and admin call shares: the current config snapshot (swappable), the
//! Postgres pool, the Redis connection, the auth caches and the metrics.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sqlx::PgPool;

use crate::auth::jwt::JwtVerifier;
use crate::auth::AuthCaches;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::gate::RateLimiters;
use crate::proxy::route::Router;

/// Everything derived from one config file; replaced as a whole so a request sees one version.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub jwt: Option<JwtVerifier>,
    pub limiters: RateLimiters,
}

impl Snapshot {
    pub fn new(config: Arc<Config>) -> Self {
        Snapshot {
            router: Router::new(&config.routes),
            jwt: config.auth.jwt.as_ref().map(JwtVerifier::new),
            limiters: RateLimiters::new(&config),
            config,
        }
    }
}

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub pg: PgPool,
    /// Where Redis is (for the pub/sub subscription).
    pub redis_target: crate::redis_conn::RedisTarget,
    pub redis: crate::redis_conn::RedisConn,
    pub caches: Arc<AuthCaches>,
    pub ledger: Ledger,
    /// Debits whose reply was lost, resolved on the side.
    pub unanswered: crate::ledger::unanswered::UnansweredDebits,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.snapshot.load().config)
    }
}
