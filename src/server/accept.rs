//! The proxy listener's accept loop (TLS handshake included) and the wait for a stop signal.

use super::*;

/// Longest a client may take over its TLS handshake before the connection is closed.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ListenerTls>>,
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
        // The acceptor current at accept time: a reload's new certificate serves the next
        // handshakes, open connections keep theirs.
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        connections.spawn(async move {
            let l4 = pingora::protocols::l4::stream::Stream::from(tcp);
            let stream: pingora::protocols::Stream = match acceptor {
                None => Box::new(l4),
                Some(acceptor) => {
                    // ALPN (h2 or http/1.1) is chosen here; `process_new` follows it.
                    let handshake = pingora::protocols::tls::server::handshake(&acceptor, l4);
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls_stream)) => Box::new(tls_stream),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(stream) = next {
                next = app.process_new(stream, &shutdown).await;
            }
        });
    }
}

pub(super) async fn wait_for_signal() {
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
