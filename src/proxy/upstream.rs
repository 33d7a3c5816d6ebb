//! Phase 5 — the upstream: where to connect (resolved addresses cached briefly, so DNS never
//! blocks a worker), what to send (credential removed, `set_headers` applied, `X-Request-Id`,
//! the upstream's own `Host`, its base path), and which error to answer when it fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::config::UpstreamConfig;
use crate::error::GatewayError;

const DNS_TTL: Duration = Duration::from_secs(30);

/// Upstream host → resolved address, refreshed every [`DNS_TTL`].
#[derive(Default)]
pub struct Resolver {
    cache: RwLock<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

impl Resolver {
    pub async fn resolve(&self, host: &str, port: u16) -> pingora::Result<SocketAddr> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = (host.to_string(), port);
        if let Some((addr, at)) = self.cache.read().get(&key) {
            if at.elapsed() < DNS_TTL {
                return Ok(*addr);
            }
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| {
                Error::explain(ErrorType::ConnectNoRoute, format!("cannot resolve {host}"))
            })?;
        self.cache.write().insert(key, (addr, Instant::now()));
        Ok(addr)
    }
}

pub async fn peer(resolver: &Resolver, up: &UpstreamConfig) -> pingora::Result<Box<HttpPeer>> {
    let addr = resolver.resolve(&up.host, up.port).await.map_err(|mut e| {
        e.esource = ErrorSource::Upstream;
        e
    })?;
    let mut peer = HttpPeer::new(addr, up.tls, up.host.clone());
    peer.options.connection_timeout = Some(up.connect_timeout);
    peer.options.total_connection_timeout = Some(up.connect_timeout + up.connect_timeout);
    peer.options.read_timeout = Some(up.read_timeout);
    peer.options.write_timeout = Some(up.write_timeout);
    peer.options.idle_timeout = Some(Duration::from_secs(60));
    peer.options.verify_cert = up.tls_verify;
    peer.options.verify_hostname = up.tls_verify;
    peer.options.ca = up.ca.clone();
    Ok(Box::new(peer))
}

/// Rewrites the request for the upstream. `credential` is the header tollgate consumed.
pub fn rewrite_request(
    req: &mut RequestHeader,
    up: &UpstreamConfig,
    credential: Option<&'static str>,
    request_id: &str,
) -> pingora::Result<()> {
    if let Some(name) = credential {
        req.remove_header(name);
    }
    for (name, value) in &up.set_headers {
        req.insert_header(name.clone(), value.clone())?;
    }
    req.insert_header("x-request-id", request_id)?;
    if !up.preserve_host {
        req.insert_header(http::header::HOST, up.authority.as_str())?;
    }
    if !up.base_path.is_empty() {
        let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri: http::Uri = format!("{}{}", up.base_path, pq).parse().map_err(|_| {
            Error::explain(
                ErrorType::InvalidHTTPHeader,
                "cannot join upstream base path",
            )
        })?;
        req.set_uri(uri);
    }
    Ok(())
}

/// How a proxying failure looks to the client: `None` when the client itself is gone.
pub fn classify(e: &Error) -> Option<GatewayError> {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            Some(GatewayError::UpstreamTimeout { refunded: false })
        }
        ErrorType::ConnectTimedout => Some(GatewayError::UpstreamTimeout { refunded: false }),
        _ => match e.esource() {
            ErrorSource::Upstream => Some(GatewayError::UpstreamUnavailable { refunded: false }),
            ErrorSource::Downstream => None,
            ErrorSource::Internal | ErrorSource::Unset => Some(GatewayError::Internal),
        },
    }
}

/// Whether the failure happened before any byte reached the upstream (a connect failure).
pub fn is_connect_error(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
    )
}

pub fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}
