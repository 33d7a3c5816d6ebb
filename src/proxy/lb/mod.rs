//! Several backends behind one upstream (`urls`), built on `pingora-load-balancing`: its
//! [`LoadBalancer`] holds the backends (found by [`UrlDiscovery`], which re-resolves DNS names
//! every [`DNS_REFRESH`]), runs the active health checks ([`Probe`]) and selects round robin or
//! by consistent hashing on the account id. On top of it, per backend and per instance: requests
//! in flight (least_conn, which Pingora does not offer), passive ejection after a failed
//! connection (`eject_ms`), and the metrics.
//!
//! A connection that fails is retried on another backend ([`Pool::should_retry`], from
//! Pingora's `fail_to_connect`): nothing reached the upstream, and the debit happened once in
//! `request_filter`, before any attempt, so a retry never charges again; a request whose
//! connection was made is never retried by tollgate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use parking_lot::Mutex;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use prometheus::{IntCounter, IntGauge};

use crate::config::raw::LbPolicy;
use crate::config::{BackendAddr, Config, UpstreamConfig};
use crate::metrics::Metrics;

mod discovery;

use discovery::{literal, url_index, UrlDiscovery};

/// How often backends' DNS names are resolved again: the bound on how long a changed record
/// can go unnoticed (the system resolver does not tell its TTL).
pub const DNS_REFRESH: Duration = Duration::from_secs(30);
/// Bound on the backends a selection looks at (Pingora's `max_iterations`).
const MAX_ITERATIONS: usize = 256;

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Hash(LoadBalancer<Consistent>),
}

impl Selector {
    fn backends(&self) -> &Backends {
        match self {
            Selector::RoundRobin(lb) => lb.backends(),
            Selector::Hash(lb) => lb.backends(),
        }
    }

    async fn update(&self) -> pingora::Result<()> {
        match self {
            Selector::RoundRobin(lb) => lb.update().await,
            Selector::Hash(lb) => lb.update().await,
        }
    }
}

/// One backend's per-instance state and metric handles.
struct BackendState {
    addr: BackendAddr,
    in_flight: AtomicUsize,
    /// Milliseconds since [`Pool::epoch`] until which the backend gets no traffic.
    ejected_until: AtomicU64,
    requests: IntCounter,
    errors: IntCounter,
    healthy: IntGauge,
}

/// A load-balanced upstream's backends.
pub struct Pool {
    pub upstream: Arc<UpstreamConfig>,
    selector: Selector,
    backends: Vec<BackendState>,
    epoch: Instant,
    /// Where least_conn starts looking, so ties rotate.
    rotation: AtomicUsize,
    /// Serialises discovery (Pingora's updates must not overlap).
    updating: tokio::sync::Mutex<()>,
}

/// Active health check of one backend: `GET path` answered 2xx within the timeout.
struct Probe {
    upstream: Arc<UpstreamConfig>,
    path: String,
    timeout: Duration,
    connector: Connector,
    gauges: Vec<IntGauge>,
}

#[async_trait]
impl HealthCheck for Probe {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let (Some(i), Some(addr)) = (url_index(target), target.addr.as_inet()) else {
            return Err(Error::explain(ErrorType::InternalError, "unknown backend"));
        };
        let Some(b) = self.upstream.backends.get(i) else {
            return Err(Error::explain(ErrorType::InternalError, "unknown backend"));
        };
        let mut peer = backend_peer(&self.upstream, *addr, &b.host);
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.total_connection_timeout = Some(self.timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        let check = async {
            let (mut session, _) = self.connector.get_http_session(&peer).await?;
            let mut req = RequestHeader::build("GET", self.path.as_bytes(), None)?;
            req.insert_header(http::header::HOST, b.authority.as_str())?;
            req.insert_header("user-agent", "tollgate-health-check")?;
            session.write_request_header(Box::new(req)).await?;
            session.finish_request_body().await?;
            session.read_response_header().await?;
            let status = session.response_header().map_or(0, |r| r.status.as_u16());
            while session.read_response_body().await?.is_some() {}
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(Error::explain(
                    ErrorType::CustomCode("health check status", status),
                    "backend answered its health check with a non-2xx status",
                ))
            }
        };
        match tokio::time::timeout(self.timeout, check).await {
            Ok(result) => result,
            Err(_) => Err(Error::explain(
                ErrorType::ReadTimedout,
                "health check timed out",
            )),
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let Some(i) = url_index(target) else { return };
        if let (Some(gauge), Some(b)) = (self.gauges.get(i), self.upstream.backends.get(i)) {
            gauge.set(i64::from(healthy));
            if healthy {
                tracing::info!(upstream = %self.upstream.name, backend = %b.authority, "backend passes its health checks again");
            } else {
                tracing::warn!(upstream = %self.upstream.name, backend = %b.authority, "backend fails its health checks; no traffic until it recovers");
            }
        }
    }

    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}

/// The peer for one backend: its address, its own host for SNI and certificate checks.
pub fn backend_peer(up: &UpstreamConfig, addr: SocketAddr, host: &str) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, up.tls, host.to_string());
    peer.options.connection_timeout = Some(up.connect_timeout);
    peer.options.total_connection_timeout = Some(up.connect_timeout + up.connect_timeout);
    peer.options.read_timeout = Some(up.read_timeout);
    peer.options.write_timeout = Some(up.write_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer.options.verify_cert = up.tls_verify;
    peer.options.verify_hostname = up.tls_verify;
    peer.options.ca = up.ca.clone();
    peer
}

/// One attempt's backend: counted in flight until dropped (the request ended, or a retry moved
/// on to another backend).
pub struct Picked {
    pool: Arc<Pool>,
    index: usize,
}

impl Picked {
    pub fn authority(&self) -> &str {
        self.pool
            .backends
            .get(self.index)
            .map_or("", |b| b.addr.authority.as_str())
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if let Some(b) = self.pool.backends.get(self.index) {
            b.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request's attempts on a load-balanced upstream.
#[derive(Default)]
pub struct Attempts {
    pub current: Option<Picked>,
    /// Backends (`urls` positions) this request's connection failed on.
    pub failed: Vec<usize>,
}

impl Pool {
    fn new(upstream: Arc<UpstreamConfig>, metrics: &Metrics) -> Arc<Pool> {
        let name = upstream.name.as_str();
        let backends: Vec<BackendState> = upstream
            .backends
            .iter()
            .map(|b| {
                let labels = [name, b.authority.as_str()];
                let healthy = metrics.backend_healthy.with_label_values(&labels);
                healthy.set(1);
                BackendState {
                    addr: b.clone(),
                    in_flight: AtomicUsize::new(0),
                    ejected_until: AtomicU64::new(0),
                    requests: metrics.backend_requests.with_label_values(&labels),
                    errors: metrics.backend_errors.with_label_values(&labels),
                    healthy,
                }
            })
            .collect();
        let mut view = Backends::new(Box::new(UrlDiscovery::new(&upstream.backends)));
        if let Some(hc) = &upstream.health_check {
            view.set_health_check(Box::new(Probe {
                upstream: Arc::clone(&upstream),
                path: hc.path.clone(),
                timeout: hc.timeout,
                connector: Connector::new(None),
                gauges: backends.iter().map(|b| b.healthy.clone()).collect(),
            }));
        }
        let selector = match upstream.lb {
            LbPolicy::HashAccount => Selector::Hash(LoadBalancer::from_backends(view)),
            LbPolicy::RoundRobin | LbPolicy::LeastConn => {
                Selector::RoundRobin(LoadBalancer::from_backends(view))
            }
        };
        let pool = Arc::new(Pool {
            upstream,
            selector,
            backends,
            epoch: Instant::now(),
            rotation: AtomicUsize::new(0),
            updating: tokio::sync::Mutex::new(()),
        });
        // IP literals need no lookup: the backends are known before the first request.
        if let Some(Err(e)) = pool.selector.update().now_or_never() {
            tracing::warn!(upstream = %pool.upstream.name, error = %e, "backend discovery failed");
        }
        pool.spawn_maintenance();
        pool
    }

    /// Health checks every `interval`, DNS every [`DNS_REFRESH`], until the pool is dropped
    /// (a reload that replaced the upstream).
    fn spawn_maintenance(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Pool> = Arc::downgrade(self);
        let interval = self
            .upstream
            .health_check
            .as_ref()
            .map_or(DNS_REFRESH, |hc| hc.interval.min(DNS_REFRESH));
        let needs_dns = self.upstream.backends.iter().any(|b| literal(b).is_none());
        runtime.spawn(async move {
            let mut resolved = Instant::now();
            loop {
                {
                    let Some(pool) = weak.upgrade() else { return };
                    if needs_dns && resolved.elapsed() >= DNS_REFRESH {
                        resolved = Instant::now();
                        pool.discover().await;
                    }
                    if pool.upstream.health_check.is_some() {
                        pool.selector.backends().run_health_check(true).await;
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
    }

    async fn discover(&self) {
        let _one = self.updating.lock().await;
        if let Err(e) = self.selector.update().await {
            tracing::warn!(upstream = %self.upstream.name, error = %e, "backend discovery failed");
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn usable(&self, b: &Backend, healthy: bool, failed: &[usize], now: u64) -> bool {
        let Some(i) = url_index(b) else { return false };
        healthy
            && !failed.contains(&i)
            && self
                .backends
                .get(i)
                .is_some_and(|s| s.ejected_until.load(Ordering::Relaxed) <= now)
    }

    /// The backend for an attempt: by policy among the healthy, not ejected backends this
    /// request has not failed on; when none is, any backend it has not failed on (traffic to a
    /// maybe-sick backend beats a certain 502).
    fn select(&self, account: Option<&str>, failed: &[usize]) -> Option<(usize, SocketAddr)> {
        let now = self.now_ms();
        let chosen = match &self.selector {
            Selector::RoundRobin(lb) if self.upstream.lb == LbPolicy::LeastConn => {
                let all = lb.backends().get_backend();
                let start = self.rotation.fetch_add(1, Ordering::Relaxed);
                let n = all.len().max(1);
                all.iter()
                    .enumerate()
                    .filter(|(_, b)| self.usable(b, lb.backends().ready(b), failed, now))
                    .min_by_key(|(pos, b)| {
                        let load = url_index(b)
                            .and_then(|i| self.backends.get(i))
                            .map_or(usize::MAX, |s| s.in_flight.load(Ordering::Relaxed));
                        (load, (pos + n - start % n) % n)
                    })
                    .map(|(_, b)| b.clone())
            }
            Selector::RoundRobin(lb) => lb.select_with(b"", MAX_ITERATIONS, |b, healthy| {
                self.usable(b, healthy, failed, now)
            }),
            Selector::Hash(lb) => lb.select_with(
                account.unwrap_or_default().as_bytes(),
                MAX_ITERATIONS,
                |b, healthy| self.usable(b, healthy, failed, now),
            ),
        };
        let chosen = chosen.or_else(|| {
            self.selector
                .backends()
                .get_backend()
                .iter()
                .find(|b| url_index(b).is_some_and(|i| !failed.contains(&i)))
                .cloned()
        })?;
        Some((url_index(&chosen)?, *chosen.addr.as_inet()?))
    }

    /// Picks the backend for the next attempt and builds its peer.
    pub async fn peer(
        self: &Arc<Self>,
        account: Option<&str>,
        attempts: &mut Attempts,
    ) -> pingora::Result<Box<HttpPeer>> {
        if self.selector.backends().get_backend().is_empty() {
            // Names not resolved yet (first request after start or reload).
            self.discover().await;
        }
        let (index, addr) = self.select(account, &attempts.failed).ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {}: no backend is available", self.upstream.name),
            )
        })?;
        let state = &self.backends[index];
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.requests.inc();
        attempts.current = Some(Picked {
            pool: Arc::clone(self),
            index,
        });
        Ok(Box::new(backend_peer(
            &self.upstream,
            addr,
            &state.addr.host,
        )))
    }

    /// After a failed connection to the current backend: ejects it for `eject_ms`, and says
    /// whether another backend is left to retry on.
    pub fn connect_failed(&self, attempts: &mut Attempts) -> bool {
        if let Some(picked) = attempts.current.take() {
            if let Some(state) = self.backends.get(picked.index) {
                state.errors.inc();
                if let Some(eject) = self.upstream.eject {
                    let until = self.now_ms() + eject.as_millis() as u64;
                    state.ejected_until.store(until, Ordering::Relaxed);
                    tracing::warn!(upstream = %self.upstream.name, backend = %state.addr.authority, eject_ms = eject.as_millis() as u64, "backend refused a connection; ejected");
                }
            }
            attempts.failed.push(picked.index);
        }
        attempts.failed.len() < self.backends.len()
    }
}

/// The load-balanced upstreams of the current config, by name. A reload that changes an
/// upstream gets a new pool on its first request (its health checks start then); one that
/// leaves it as it was keeps the pool, and its health state.
#[derive(Default)]
pub struct Pools {
    pools: arc_swap::ArcSwap<HashMap<String, Arc<Pool>>>,
    building: Mutex<()>,
}

/// Whether two configs of an upstream would build the same pool.
fn same_shape(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.backends == b.backends
        && a.lb == b.lb
        && a.health_check == b.health_check
        && a.eject == b.eject
        && a.tls == b.tls
        && a.tls_verify == b.tls_verify
        && a.connect_timeout == b.connect_timeout
        && a.read_timeout == b.read_timeout
        && a.write_timeout == b.write_timeout
        && a.ca.is_none()
        && b.ca.is_none()
}

impl Pools {
    /// Builds the pools of `config`'s load-balanced upstreams (and so their metric series).
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        let pools = config
            .upstreams
            .values()
            .filter(|u| !u.backends.is_empty())
            .map(|u| (u.name.clone(), Pool::new(Arc::clone(u), metrics)))
            .collect();
        Pools {
            pools: arc_swap::ArcSwap::from_pointee(pools),
            building: Mutex::new(()),
        }
    }

    /// The pool for `up` (`None`: a single-`url` upstream).
    pub fn get(&self, up: &Arc<UpstreamConfig>, metrics: &Metrics) -> Option<Arc<Pool>> {
        if up.backends.is_empty() {
            return None;
        }
        let fits = |p: &Arc<Pool>| Arc::ptr_eq(&p.upstream, up) || same_shape(&p.upstream, up);
        if let Some(pool) = self.pools.load().get(&up.name).filter(|p| fits(p)) {
            return Some(Arc::clone(pool));
        }
        let _one = self.building.lock();
        if let Some(pool) = self.pools.load().get(&up.name).filter(|p| fits(p)) {
            return Some(Arc::clone(pool));
        }
        let pool = Pool::new(Arc::clone(up), metrics);
        let mut next = HashMap::clone(&self.pools.load());
        next.insert(up.name.clone(), Arc::clone(&pool));
        self.pools.store(Arc::new(next));
        Some(pool)
    }
}
