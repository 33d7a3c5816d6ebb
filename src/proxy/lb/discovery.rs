//! Finding an upstream's backends: each of `urls` resolved to one address, again every
//! [`super::DNS_REFRESH`]; a name that fails to resolve keeps its last address.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::{Backend, Extensions};

use crate::config::BackendAddr;

/// The position of a backend in its upstream's `urls`, kept in the Pingora backend's `ext`.
#[derive(Clone, Copy)]
pub(super) struct UrlIndex(usize);

pub(super) fn url_index(b: &Backend) -> Option<usize> {
    b.ext.get::<UrlIndex>().map(|i| i.0)
}

/// Resolves each of `urls` to one address; a name that fails to resolve keeps its last
/// address (a DNS hiccup does not empty the upstream).
pub(super) struct UrlDiscovery {
    addrs: Vec<BackendAddr>,
    last: Mutex<Vec<Option<SocketAddr>>>,
}

impl UrlDiscovery {
    pub(super) fn new(addrs: &[BackendAddr]) -> Self {
        UrlDiscovery {
            last: Mutex::new(addrs.iter().map(literal).collect()),
            addrs: addrs.to_vec(),
        }
    }

    pub(super) fn backends(&self) -> BTreeSet<Backend> {
        self.last
            .lock()
            .iter()
            .enumerate()
            .filter_map(|(i, addr)| {
                let addr = (*addr)?;
                let mut ext = Extensions::new();
                ext.insert(UrlIndex(i));
                Some(Backend {
                    addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                    weight: 1,
                    ext,
                })
            })
            .collect()
    }
}

/// The address of a backend written as an IP literal (no lookup needed).
pub(super) fn literal(b: &BackendAddr) -> Option<SocketAddr> {
    b.host
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, b.port))
}

#[async_trait]
impl ServiceDiscovery for UrlDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        for (i, b) in self.addrs.iter().enumerate() {
            if literal(b).is_some() {
                continue;
            }
            match tokio::net::lookup_host((b.host.as_str(), b.port)).await {
                Ok(mut found) => {
                    if let Some(addr) = found.next() {
                        self.last.lock()[i] = Some(addr);
                    }
                }
                Err(e) => {
                    tracing::warn!(backend = %b.authority, error = %e, "cannot resolve a backend; keeping its last address");
                }
            }
        }
        Ok((self.backends(), HashMap::new()))
    }
}
