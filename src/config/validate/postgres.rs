//! `[postgres]`: the URL (inline or from the environment) and the pool size.

use super::*;

/// `[postgres]`: exactly one of `url` / `url_env`, a postgres:// URL, a pool size.
pub(super) fn postgres(
    raw: &raw::Config,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> PostgresConfig {
    // [postgres]
    let pg_url = match (&raw.postgres.url, &raw.postgres.url_env) {
        (Some(u), None) => substitute(u, "postgres.url", env, missing, p),
        (None, Some(name)) => secret(name, "postgres.url_env", env, missing).unwrap_or_default(),
        (Some(_), Some(_)) => {
            p.add("postgres", "set either url or url_env, not both");
            String::new()
        }
        (None, None) => {
            p.add("postgres.url", "missing (or set url_env)");
            String::new()
        }
    };
    if !pg_url.is_empty() {
        match url::Url::parse(&pg_url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            _ => p.add("postgres.url", "is not a postgres:// URL"),
        }
    }
    if raw.postgres.max_connections == 0 {
        p.add("postgres.max_connections", "must be greater than 0");
    }
    PostgresConfig {
        url: pg_url,
        max_connections: raw.postgres.max_connections,
    }
}
