//! `[server]` and `[admin]`: listeners, TLS files, threads, the admin token.

use super::*;

/// `[server]`: listener addresses, TLS files (loaded once to check them), threads.
pub(super) fn server(raw: &raw::Config, path: &Path, p: &mut Problems) -> ServerConfig {
    // [server]
    let server = ServerConfig {
        listen: addr("server.listen", &raw.server.listen, p),
        admin_listen: addr("server.admin_listen", &raw.server.admin_listen, p),
        metrics_listen: addr("server.metrics_listen", &raw.server.metrics_listen, p),
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_seconds),
        threads: raw.server.threads,
        tls: raw.server.tls.as_ref().and_then(|t| {
            let dir = path.parent().unwrap_or(Path::new("."));
            let files = crate::tls::TlsFiles {
                cert: dir.join(&t.cert),
                key: dir.join(&t.key),
            };
            match crate::tls::build_acceptor(&files) {
                Ok(_) => Some(files),
                Err(e) => {
                    p.add("server.tls", e);
                    None
                }
            }
        }),
    };
    if raw.server.threads > 1024 {
        p.add("server.threads", "must be at most 1024");
    }
    server
}

/// `[admin]`: the bearer token, from the environment.
pub(super) fn admin(
    raw: &raw::Config,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> Option<String> {
    // [admin]
    let admin_token = secret(&raw.admin.token_env, "admin.token_env", env, missing);
    if let Some(t) = &admin_token {
        if t.len() < 16 {
            p.add(
                "admin.token_env",
                format!(
                    "the token in {} must be at least 16 characters",
                    raw.admin.token_env
                ),
            );
        }
    }
    admin_token
}
