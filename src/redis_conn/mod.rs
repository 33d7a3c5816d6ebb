//! One Redis handle for the whole process, on a single server or on a Redis Cluster.
//!
//! `redis.url` names either one server (`redis://host:port/db`, kept alive by the redis
//! crate's `ConnectionManager`) or a cluster: `redis+cluster://[user:pass@]host:port,host:port`
//! (any reachable nodes; the rest are discovered). The redis crate's own convention for a
//! cluster is a list of node URLs; the `+cluster` scheme packs that list into the one string
//! the config and the contract already have.
//!
//! The cluster path uses tollgate's own slot router ([`cluster::ClusterRouter`]) rather than
//! the crate's `ClusterConnection`, for one reason: money. The crate re-sends a command after
//! a dropped connection or a timeout, and a debit script whose reply was lost may already have
//! run, so a re-send can charge twice. Our router re-sends only when Redis said the command
//! did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, LOADING); a lost reply surfaces as an
//! error, exactly as on a single server, where the ledger's deadline and hold rules already
//! decide what it means.

pub mod cluster;
pub mod slot;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use cluster::ClusterRouter;

/// Where Redis is, parsed from `redis.url`.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    Single(redis::Client),
    /// Seed nodes of a cluster, plus what every node URL shares (scheme and credentials), so
    /// nodes discovered later are reached the same way.
    Cluster {
        /// `host:port` of the nodes named in the URL.
        seeds: Vec<String>,
        node_url: NodeUrl,
    },
}

/// How to build the URL of a cluster node from its `host:port`.
#[derive(Debug, Clone)]
pub struct NodeUrl {
    scheme: String,
    userinfo: String,
    query: String,
}

impl NodeUrl {
    pub fn for_addr(&self, addr: &str) -> String {
        format!("{}://{}{}{}", self.scheme, self.userinfo, addr, self.query)
    }

    pub fn client(&self, addr: &str) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.for_addr(addr).as_str())
    }
}

/// Why `redis.url` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("a cluster URL lists at least one node: redis+cluster://host:port,host:port")]
    NoNodes,
    #[error("node {0:?} is not host:port")]
    BadNode(String),
    #[error("a Redis Cluster has only database 0; remove /{0} from the URL")]
    Database(String),
    #[error("{0}")]
    Invalid(String),
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return redis::Client::open(url)
                .map(RedisTarget::Single)
                .map_err(|e| UrlError::Invalid(e.to_string()));
        };
        let Some(node_scheme) = scheme.strip_suffix("+cluster") else {
            return redis::Client::open(url)
                .map(RedisTarget::Single)
                .map_err(|e| UrlError::Invalid(e.to_string()));
        };
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, format!("/?{q}")),
            None => (tail, String::new()),
        };
        let db = path.trim_matches('/');
        if !db.is_empty() && db != "0" {
            return Err(UrlError::Database(db.to_string()));
        }
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (&authority[..=i], &authority[i + 1..]),
            None => ("", authority),
        };
        let node_url = NodeUrl {
            scheme: node_scheme.to_string(),
            userinfo: userinfo.to_string(),
            query,
        };
        let mut seeds = Vec::new();
        for node in hosts.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let port_ok = node
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(UrlError::BadNode(node.to_string()));
            }
            node_url
                .client(node)
                .map_err(|e| UrlError::Invalid(e.to_string()))?;
            seeds.push(node.to_string());
        }
        if seeds.is_empty() {
            return Err(UrlError::NoNodes);
        }
        Ok(RedisTarget::Cluster { seeds, node_url })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster { .. })
    }

    /// Connects, failing when no node answers PING within `connect`.
    pub async fn connect(
        &self,
        response_timeout: Duration,
        connect: Duration,
    ) -> redis::RedisResult<RedisConn> {
        match self {
            RedisTarget::Single(client) => {
                let probe = async {
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut conn).await
                };
                match tokio::time::timeout(connect, probe).await {
                    Ok(r) => r.map(|_| ())?,
                    Err(_) => return Err(timed_out(connect)),
                }
                let manager = ConnectionManager::new_with_config(
                    client.clone(),
                    manager_config(response_timeout),
                )
                .await?;
                Ok(RedisConn::Single(manager))
            }
            RedisTarget::Cluster { seeds, node_url } => {
                let router = ClusterRouter::new(seeds.clone(), node_url.clone(), response_timeout);
                match tokio::time::timeout(connect, router.refresh()).await {
                    Ok(r) => r?,
                    Err(_) => return Err(timed_out(connect)),
                }
                Ok(RedisConn::Cluster(Arc::new(router)))
            }
        }
    }

    /// A pub/sub connection. On a cluster, PUBLISH reaches every node, so a subscription on
    /// any one node hears every message: the seeds are tried in turn.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            RedisTarget::Single(client) => client.get_async_pubsub().await,
            RedisTarget::Cluster { seeds, node_url } => {
                let mut last = None;
                for seed in seeds {
                    let client = match node_url.client(seed) {
                        Ok(c) => c,
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    };
                    match client.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no cluster node"))
                }))
            }
        }
    }
}

/// An integer reply, or a number sent as a string (Lua scripts return both).
pub fn reply_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A string reply (an integer is written out).
pub fn reply_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn timed_out(after: Duration) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("timed out after {after:?}"),
    ))
}

/// Reconnects in the background with a short backoff; requests during an outage fail fast
/// (the failure policy decides), they are never queued behind a reconnect.
pub fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

/// The connection every part of tollgate uses; cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterRouter>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(r) => Box::pin(r.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(r) => Box::pin(r.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_stay_single() {
        let t = RedisTarget::parse("redis://127.0.0.1:6379/0").map(|t| t.is_cluster());
        assert_eq!(t, Ok(false));
    }

    #[test]
    fn cluster_urls_list_their_nodes() {
        let Ok(RedisTarget::Cluster { seeds, node_url }) =
            RedisTarget::parse("redis+cluster://u:p%40ss@10.0.0.1:7000, 10.0.0.2:7001")
        else {
            panic!("not a cluster");
        };
        assert_eq!(seeds.len(), 2);
        assert_eq!(
            node_url.for_addr("10.0.0.9:7005"),
            "redis://u:p%40ss@10.0.0.9:7005"
        );
        let Ok(RedisTarget::Cluster { node_url, .. }) =
            RedisTarget::parse("redis+cluster://h:1/0?protocol=resp2")
        else {
            panic!("not a cluster");
        };
        assert_eq!(node_url.for_addr("h:2"), "redis://h:2/?protocol=resp2");
    }

    #[test]
    fn bad_cluster_urls_say_why() {
        assert_eq!(
            RedisTarget::parse("redis+cluster://").err(),
            Some(UrlError::NoNodes)
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://h:1,nohostport").err(),
            Some(UrlError::BadNode("nohostport".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://h:1/3").err(),
            Some(UrlError::Database("3".into()))
        );
    }
}
