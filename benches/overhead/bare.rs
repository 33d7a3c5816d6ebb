//! The floor: the smallest Pingora reverse proxy — a `ProxyHttp` with only `upstream_peer` — run
//! the way `tollgate serve` runs its proxy (a multi-threaded tokio runtime with one worker per
//! core, Pingora's `HttpProxy` on an accept loop of our own with `TCP_NODELAY`, the default
//! `ServerConf` and its upstream keep-alive pool, the same `HttpPeer` options as
//! `src/proxy/upstream.rs`), with no logging, no metrics, no request id.
//!
//! It is this benchmark's own binary started again as a child process (`TOLLGATE_BENCH_BARE`
//! names the upstream): its CPU is measured per process like tollgate's and nginx's, and it costs
//! no extra build — Pingora is already compiled for tollgate and this binary links it anyway,
//! whereas an `examples/` program would be one more link step (and `cargo bench` does not build
//! examples, so CI would have to be told to).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

use crate::procs::Proc;

/// Set in the child's environment: the upstream it proxies to.
pub const ENV: &str = "TOLLGATE_BENCH_BARE";

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        // As `tollgate::proxy::upstream::peer` builds it for a plain-HTTP upstream with the
        // default timeouts.
        let mut peer = HttpPeer::new(self.upstream, false, self.upstream.ip().to_string());
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.total_connection_timeout = Some(Duration::from_secs(10));
        peer.options.read_timeout = Some(Duration::from_secs(300));
        peer.options.write_timeout = Some(Duration::from_secs(60));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }
}

/// The child's `main` when [`ENV`] is set: serves until killed (SIGTERM ends the process).
pub fn serve(upstream: &str) -> ! {
    let upstream: SocketAddr = upstream
        .parse()
        .unwrap_or_else(|e| panic!("{ENV}={upstream:?}: {e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the bare proxy's runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the bare proxy");
        let addr = listener.local_addr().expect("its address");
        let conf = Arc::new(ServerConf::default());
        let app = Arc::new(pingora::proxy::http_proxy(&conf, Bare { upstream }));
        let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        // The same line `tollgate serve` prints (admin and metrics: none, the same address).
        eprintln!("listening proxy={addr} admin={addr} metrics={addr}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let app = Arc::clone(&app);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let stream: pingora::protocols::Stream =
                    Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
                let mut next = app.process_new(stream, &shutdown).await;
                while let Some(stream) = next {
                    next = app.process_new(stream, &shutdown).await;
                }
            });
        }
    })
}

/// Starts this binary again as the bare proxy in front of `upstream`; `None` (with the reason
/// printed) when it cannot start.
pub fn start(upstream: SocketAddr) -> Option<(Proc, SocketAddr)> {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("overhead: cannot find this binary ({e}); skipping the bare pingora row");
            return None;
        }
    };
    let mut cmd = Command::new(&exe);
    cmd.env(ENV, upstream.to_string());
    let (proc, lines) = match Proc::spawn("bare pingora", cmd, Duration::from_secs(5)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("overhead: cannot start {}: {e}", Path::new(&exe).display());
            return None;
        }
    };
    let line = lines.recv_timeout(Duration::from_secs(20)).ok();
    let addr = line.as_deref().and_then(crate::procs::parse_listening);
    match addr {
        Some([proxy, _, _]) => {
            std::thread::spawn(move || for _ in lines {});
            Some((proc, proxy))
        }
        None => {
            eprintln!(
                "overhead: the bare pingora proxy did not start; skipping its row:\n{}",
                proc.log_tail()
            );
            None
        }
    }
}
