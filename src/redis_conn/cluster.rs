//! A slot router for Redis Cluster: one `ConnectionManager` per primary, the slot map from
//! `CLUSTER SLOTS`, refreshed on MOVED and on connection errors (so a promoted replica is
//! found). A command is sent again only when Redis answered that it did not run it:
//! MOVED (to the new owner), ASK (to the importing node, after ASKING), TRYAGAIN, CLUSTERDOWN,
//! LOADING and MASTERDOWN (after a short wait). A timeout or a dropped connection is returned
//! to the caller as is: the command may have run, and only the caller knows what that means.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, Value};

use super::slot::{self, Target};
use super::{manager_config, reply_int as int, reply_text as text, NodeUrl};

mod topology;

use topology::{parse_slots, Topology};

/// MOVED/ASK redirects followed for one command before giving up (a slot moves once per
/// reshard step; more means the slot map is flapping).
const MAX_REDIRECTS: usize = 5;
/// Refreshes of the slot map are at least this far apart.
const REFRESH_GAP: Duration = Duration::from_millis(200);

pub struct ClusterRouter {
    seeds: Vec<String>,
    node_url: NodeUrl,
    timeout: Duration,
    topology: ArcSwap<Topology>,
    nodes: Mutex<HashMap<String, ConnectionManager>>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
    next_any: AtomicUsize,
}

/// What a reply says about where the command should have gone.
enum Redirect {
    Moved {
        slot: u16,
        addr: String,
    },
    Ask {
        addr: String,
    },
    /// The cluster is busy (TRYAGAIN, CLUSTERDOWN, LOADING, MASTERDOWN): the command did not run.
    Wait,
}

fn server_redirect(kind: Option<ServerErrorKind>, details: Option<&str>) -> Option<Redirect> {
    let parse = || {
        let mut parts = details?.split_ascii_whitespace();
        let slot = parts.next()?.parse::<u16>().ok()?;
        Some((slot, parts.next()?.to_string()))
    };
    match kind? {
        ServerErrorKind::Moved => parse().map(|(slot, addr)| Redirect::Moved { slot, addr }),
        ServerErrorKind::Ask => parse().map(|(_, addr)| Redirect::Ask { addr }),
        ServerErrorKind::TryAgain
        | ServerErrorKind::ClusterDown
        | ServerErrorKind::BusyLoading
        | ServerErrorKind::MasterDown => Some(Redirect::Wait),
        _ => None,
    }
}

fn value_redirect(v: &Value) -> Option<Redirect> {
    match v {
        Value::ServerError(e) => server_redirect(e.kind(), e.details()),
        _ => None,
    }
}

fn error_redirect(e: &RedisError) -> Option<Redirect> {
    match e.kind() {
        ErrorKind::Server(kind) => server_redirect(Some(kind), e.detail()),
        _ => None,
    }
}

fn reply_redirect(r: &RedisResult<Value>) -> Option<Redirect> {
    match r {
        Ok(v) => value_redirect(v),
        Err(e) => error_redirect(e),
    }
}

fn pipeline_redirect(r: &RedisResult<Vec<Value>>) -> Option<Redirect> {
    match r {
        Ok(values) => values.iter().find_map(value_redirect),
        Err(e) => error_redirect(e),
    }
}

fn no_owner(slot: u16) -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ClusterDown),
        "no reachable node serves the slot",
        slot.to_string(),
    ))
}

/// A wait before retrying a busy cluster: 5, 10, 20, 40 ms, then 40 ms on, and never more
/// than a tenth of the command's budget.
fn wait_for(attempt: usize, timeout: Duration) -> Duration {
    let ms = 5u64 << attempt.min(3);
    Duration::from_millis(ms).min(timeout / 10)
}

impl ClusterRouter {
    pub fn new(seeds: Vec<String>, node_url: NodeUrl, timeout: Duration) -> Self {
        ClusterRouter {
            seeds,
            node_url,
            timeout,
            topology: ArcSwap::from_pointee(Topology::empty()),
            nodes: Mutex::new(HashMap::new()),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
            next_any: AtomicUsize::new(0),
        }
    }

    /// The primaries as last seen (for tests, metrics and the CLI).
    pub fn primaries(&self) -> Vec<String> {
        self.topology.load().primaries.clone()
    }

    /// The connection to one node, made on first use; it reconnects by itself.
    fn node(&self, addr: &str) -> RedisResult<ConnectionManager> {
        let mut nodes = self
            .nodes
            .lock()
            .map_err(|_| RedisError::from((ErrorKind::Client, "node map poisoned")))?;
        if let Some(c) = nodes.get(addr) {
            return Ok(c.clone());
        }
        let client = self.node_url.client(addr)?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))?;
        nodes.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// Reads the slot map from the first node that answers (known primaries, then the seeds).
    pub async fn refresh(&self) -> RedisResult<()> {
        let mut candidates = self.topology.load().primaries.clone();
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut last_err = None;
        for addr in candidates {
            let reply = async {
                let mut conn = self.node(&addr)?;
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
            };
            let reply =
                match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), reply).await {
                    Ok(r) => r,
                    Err(_) => Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("CLUSTER SLOTS from {addr} timed out"),
                    ))),
                };
            match reply.and_then(|v| parse_slots(&v, &addr)) {
                Ok(topology) => {
                    self.topology.store(Arc::new(topology));
                    if let Ok(mut last) = self.last_refresh.lock() {
                        *last = Some(Instant::now());
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(node = %addr, error = %e, "cluster: cannot read the slot map");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| RedisError::from((ErrorKind::Client, "no cluster node"))))
    }

    /// Refreshes the slot map on the side, at most once per `REFRESH_GAP`.
    fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let since = me
                .last_refresh
                .lock()
                .ok()
                .and_then(|l| *l)
                .map(|t| t.elapsed());
            if let Some(since) = since.filter(|s| *s < REFRESH_GAP) {
                tokio::time::sleep(REFRESH_GAP - since).await;
            }
            if let Err(e) = me.refresh().await {
                tracing::warn!(error = %e, "cluster: slot map refresh failed");
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// A moved slot is known at once; the full map follows on the side.
    fn learn_moved(self: &Arc<Self>, slot: u16, addr: &str) {
        let current = self.topology.load();
        let mut primaries = current.primaries.clone();
        let index = match primaries.iter().position(|p| p == addr) {
            Some(i) => i,
            None => {
                primaries.push(addr.to_string());
                primaries.len() - 1
            }
        };
        let mut owner = current.owner.clone();
        if let (Some(o), Ok(i)) = (owner.get_mut(usize::from(slot)), u16::try_from(index)) {
            *o = i;
        }
        self.topology.store(Arc::new(Topology { owner, primaries }));
        self.refresh_soon();
    }

    fn owner(&self, slot: u16) -> Option<String> {
        self.topology.load().owner_of(slot).map(str::to_string)
    }

    fn any_primary(&self) -> Option<String> {
        let t = self.topology.load();
        if t.primaries.is_empty() {
            return self.seeds.first().cloned();
        }
        let i = self.next_any.fetch_add(1, Ordering::Relaxed) % t.primaries.len();
        t.primaries.get(i).cloned()
    }

    /// After an error that may mean the node is gone, look for the new owner.
    fn observe<T>(self: &Arc<Self>, r: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &r {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                self.refresh_soon();
            }
        }
        r
    }

    pub async fn command(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        let slot = match slot::target(cmd) {
            Target::Slot(s) => s,
            Target::AllPrimaries => return self.all_primaries(cmd).await,
            Target::Any => {
                let addr = self
                    .any_primary()
                    .ok_or_else(|| RedisError::from((ErrorKind::Client, "no cluster node")))?;
                let mut conn = self.node(&addr)?;
                let r = conn.req_packed_command(cmd).await;
                return self.observe(r);
            }
        };
        let started = Instant::now();
        let mut addr = self.routed(slot).await?;
        let mut asking = false;
        let mut redirects = 0;
        let mut waits = 0;
        loop {
            let mut conn = self.node(&addr)?;
            let reply = if asking {
                let mut p = redis::pipe();
                p.cmd("ASKING").ignore().add_command(cmd.clone());
                conn.req_packed_commands(&p, 0, 2)
                    .await
                    .map(|mut v| v.pop().unwrap_or(Value::Nil))
            } else {
                conn.req_packed_command(cmd).await
            };
            asking = false;
            match reply_redirect(&reply) {
                None => return self.observe(reply),
                Some(Redirect::Moved { slot, addr: to }) => {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return reply;
                    }
                    self.learn_moved(slot, &to);
                    addr = to;
                }
                Some(Redirect::Ask { addr: to }) => {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        // A migration in progress: wait for it like a TRYAGAIN.
                        redirects = 0;
                        if !self.wait(&mut waits, started).await {
                            return reply;
                        }
                        addr = self.routed(slot).await?;
                        continue;
                    }
                    addr = to;
                    asking = true;
                }
                Some(Redirect::Wait) => {
                    // A multi-key script during a slot migration gets TRYAGAIN until the slot
                    // settles; a node loading its AOF answers LOADING. Neither ran the command.
                    if !self.wait(&mut waits, started).await {
                        return reply;
                    }
                    addr = self.routed(slot).await?;
                }
            }
        }
    }

    /// Sleeps before retrying a command the cluster did not run; `false` once the command's
    /// time budget (`redis.timeout_ms`) would be exceeded.
    async fn wait(&self, waits: &mut usize, started: Instant) -> bool {
        let pause = wait_for(*waits, self.timeout);
        *waits += 1;
        if started.elapsed() + pause >= self.timeout {
            return false;
        }
        tokio::time::sleep(pause).await;
        true
    }

    /// Pipelines carry commands of one slot (tollgate never mixes slots in one); a redirect
    /// applies to all of them. During a slot migration (ASK) the pipeline waits for the slot
    /// to settle (MOVED) instead of splitting it.
    pub async fn pipeline(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let target = pipeline
            .cmd_iter()
            .map(slot::target)
            .find(|t| matches!(t, Target::Slot(_)))
            .unwrap_or(Target::Any);
        let Target::Slot(slot) = target else {
            let addr = self
                .any_primary()
                .ok_or_else(|| RedisError::from((ErrorKind::Client, "no cluster node")))?;
            let mut conn = self.node(&addr)?;
            let r = conn.req_packed_commands(pipeline, offset, count).await;
            return self.observe(r);
        };
        let started = Instant::now();
        let mut addr = self.routed(slot).await?;
        let mut redirects = 0;
        let mut waits = 0;
        loop {
            let mut conn = self.node(&addr)?;
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            match pipeline_redirect(&reply) {
                None => return self.observe(reply),
                Some(Redirect::Moved { slot, addr: to }) => {
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return reply;
                    }
                    self.learn_moved(slot, &to);
                    addr = to;
                }
                Some(Redirect::Ask { .. }) | Some(Redirect::Wait) => {
                    if !self.wait(&mut waits, started).await {
                        return reply;
                    }
                    addr = self.routed(slot).await?;
                }
            }
        }
    }

    /// The owner of a slot, reading the map again once when nobody is known to serve it.
    async fn routed(self: &Arc<Self>, slot: u16) -> RedisResult<String> {
        if let Some(a) = self.owner(slot) {
            return Ok(a);
        }
        self.refresh().await?;
        self.owner(slot).ok_or_else(|| no_owner(slot))
    }

    /// SCRIPT LOAD and friends: every primary has its own script cache. Succeeds when one
    /// primary took it (a primary that is down loads it on its next NOSCRIPT).
    async fn all_primaries(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        let mut primaries = self.primaries();
        if primaries.is_empty() {
            self.refresh().await?;
            primaries = self.primaries();
        }
        let mut first_ok = None;
        let mut last_err = None;
        for addr in primaries {
            let r = match self.node(&addr) {
                Ok(mut conn) => conn.req_packed_command(cmd).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(Value::ServerError(e)) => last_err = Some(RedisError::from(e)),
                Ok(v) => {
                    if first_ok.is_none() {
                        first_ok = Some(v);
                    }
                }
                Err(e) => {
                    last_err =
                        Some(self.observe::<()>(Err(e)).err().unwrap_or_else(|| {
                            RedisError::from((ErrorKind::Client, "unreachable"))
                        }))
                }
            }
        }
        match (first_ok, last_err) {
            (Some(v), _) => Ok(v),
            (None, Some(e)) => Err(e),
            (None, None) => Err(RedisError::from((ErrorKind::Client, "no cluster node"))),
        }
    }
}

#[cfg(test)]
mod tests;
