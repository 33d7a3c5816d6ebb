//! Hot reload: `kill -HUP <pid>` and `POST /v1/config/reload` read the config file again.
//!
//! The file goes through the same parse and validation as `tollgate check-config`; a file with
//! any problem changes nothing. A valid file that changes a field only a restart can apply
//! (listeners, stores, the Redis layout, settings captured by background tasks at start) is
//! refused by field name, so an operator never believes a change is live when it is not.
//! Otherwise [`Live::install`] builds a new [`Snapshot`](crate::state::Snapshot) and swaps it
//! in one atomic store: a request keeps the snapshot it started with (`RequestCtx::snapshot`),
//! the next one sees the new prices, routes, tiers, packs, upstreams and `[auth.jwt]` keys.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{Config, RouteConfig};
use crate::metrics::Metrics;

/// The `outcome` label values of `tollgate_config_reloads_total` (defined beside the metric).
pub use crate::metrics::RELOAD_OUTCOMES as OUTCOMES;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not validate (or cannot be read, or names an unset secret); `problems`
    /// are the lines `check-config` prints.
    #[error("the config file is not valid; nothing changed")]
    Invalid { problems: Vec<String> },
    /// The file changes fields only a restart applies.
    #[error("{} only change with a restart; nothing changed", .fields.join(", "))]
    RestartRequired { fields: Vec<String> },
}

impl ReloadError {
    /// The stable `error` code of the admin answer.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Invalid { .. } => "config_invalid",
            ReloadError::RestartRequired { .. } => "restart_required",
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            ReloadError::Invalid { .. } => "invalid",
            ReloadError::RestartRequired { .. } => "restart_required",
        }
    }
}

/// A reload that was applied.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Reloaded {
    /// 1 at start, +1 per applied reload (also `tollgate_config_version`).
    pub version: u64,
    /// What differs from the previous config: `routes.<name>`, `tiers.<name>`,
    /// `upstreams.<name>`, `credit_packs.<id>` (added, removed or changed), `routes (order)`,
    /// and whole sections (`auth.jwt`, `stripe`, `admin`, `server.shutdown_grace_seconds`).
    pub changed: Vec<String>,
}

/// Serializes reloads (two at once would race on "the previous config") and numbers them.
pub struct Reloads {
    lock: tokio::sync::Mutex<()>,
    version: AtomicU64,
}

impl Default for Reloads {
    fn default() -> Self {
        Reloads {
            lock: tokio::sync::Mutex::new(()),
            version: AtomicU64::new(1),
        }
    }
}

impl Reloads {
    /// The version serving now.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

/// The running process as a reload sees it. Implemented by the composition root, which alone
/// knows what a new config rebuilds (router, limiters, JWT keys), so this module does not
/// depend on it.
pub trait Live: Send + Sync + 'static {
    fn reloads(&self) -> &Reloads;
    fn metrics(&self) -> &Metrics;
    /// The config serving now.
    fn config(&self) -> Arc<Config>;
    /// Makes `new` (valid, no restart-only change) the config of the next request.
    fn install(&self, new: Arc<Config>);
}

/// Reads the config file the process was started with again and, when it is valid and needs
/// no restart, swaps it in. Counts the attempt in `tollgate_config_reloads_total`.
pub async fn reload(live: &impl Live) -> Result<Reloaded, ReloadError> {
    let _one_at_a_time = live.reloads().lock.lock().await;
    let result = apply(live);
    let outcome = match &result {
        Ok(_) => "applied",
        Err(e) => e.outcome(),
    };
    live.metrics()
        .config_reloads
        .with_label_values(&[outcome])
        .inc();
    result
}

fn apply(live: &impl Live) -> Result<Reloaded, ReloadError> {
    let old = &live.config();
    let invalid = |e: crate::config::ConfigError| ReloadError::Invalid {
        problems: e.to_string().lines().map(str::to_string).collect(),
    };
    let new = Config::load(&old.source).map_err(invalid)?;
    new.require_secrets().map_err(invalid)?;
    let fields = restart_only_changes(old, &new);
    if !fields.is_empty() {
        return Err(ReloadError::RestartRequired { fields });
    }
    // New handshakes get the certificate as the files hold it now (open connections keep
    // theirs); a broken file leaves the old certificate serving and changes nothing.
    crate::tls::reload_tls().map_err(|e| ReloadError::Invalid {
        problems: vec![format!("server.tls: {e}")],
    })?;
    let changed = changes(old, &new);
    let new = Arc::new(new);
    // Route series first, so the first request on a new route finds its handles.
    live.metrics().expect_routes(&new);
    live.install(new);
    let version = live.reloads().version.fetch_add(1, Ordering::SeqCst) + 1;
    live.metrics().config_version.set(version as i64);
    Ok(Reloaded { version, changed })
}

/// The fields whose new value only a restart applies: they are bound (listeners), connected
/// (Redis, Postgres), part of every Redis key (prefix, shards), or read once by a task or
/// cache built at start (Redis timeout and lease TTL, the journal's timings, the key cache's
/// TTL, alert delivery).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut fields = Vec::new();
    let mut check = |name: &str, differs: bool| {
        if differs {
            fields.push(name.to_string());
        }
    };
    // A field of a section, named as in the file, compared as is.
    macro_rules! compare {
        ($($section:ident . $field:ident),* $(,)?) => {
            $(check(
                concat!(stringify!($section), ".", stringify!($field)),
                old.$section.$field != new.$section.$field,
            );)*
        };
    }
    compare!(
        server.listen,
        server.admin_listen,
        server.metrics_listen,
        server.threads,
        // The listener speaks TLS or not from the start; the same files are re-read on reload.
        server.tls,
    );
    // The slices' instance state is built from it at start.
    check("leases", old.leases != new.leases);
    // The log subscriber and the trace exporter are process-wide, set up at start.
    check("telemetry", differs(&old.telemetry, &new.telemetry));
    compare!(
        redis.url,
        redis.key_prefix,
        redis.shards,
        redis.timeout_ms,
        redis.group_commit,
        redis.lease_ttl_seconds,
        postgres.url,
        postgres.max_connections,
        journal.claim_idle_seconds,
        journal.reconcile_after_seconds,
    );
    check(
        "auth.key_cache_ttl_seconds",
        old.auth.key_cache_ttl != new.auth.key_cache_ttl,
    );
    check("alerts", differs(&old.alerts, &new.alerts));
    fields
}

/// Compares by the derived `Debug` text: the config types are plain data, and this keeps
/// `PartialEq` off types that carry secrets (the text is compared, never printed).
fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// A route's own settings: its upstream by name (an upstream change is reported under
/// `upstreams.`), its position left out (reported as `routes (order)`).
fn route_text(r: &RouteConfig) -> String {
    format!(
        "{:?}",
        (
            &r.method,
            &r.path_prefix,
            &r.upstream.name,
            &r.action,
            &r.price,
            &r.feature,
            &r.refund_on,
            r.public,
            &r.fail_mode,
            r.cap_max_tokens,
            &r.counts,
        )
    )
}

/// What a reload changes, for the answer and the log: per section, the names in order.
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut named = |section: &str, a: BTreeMap<String, String>, b: BTreeMap<String, String>| {
        // Added, removed or changed, in name order.
        let names: std::collections::BTreeSet<&String> = a
            .iter()
            .filter(|(name, text)| b.get(*name) != Some(text))
            .map(|(name, _)| name)
            .chain(b.keys().filter(|name| !a.contains_key(*name)))
            .collect();
        changed.extend(names.into_iter().map(|name| format!("{section}.{name}")));
    };
    let upstreams = |c: &Config| -> BTreeMap<String, String> {
        c.upstreams
            .iter()
            .map(|(n, u)| (n.clone(), format!("{u:?}")))
            .collect()
    };
    named("upstreams", upstreams(old), upstreams(new));
    let routes = |c: &Config| -> BTreeMap<String, String> {
        c.routes
            .iter()
            .map(|r| (r.name.clone(), route_text(r)))
            .collect()
    };
    named("routes", routes(old), routes(new));
    let tiers = |c: &Config| -> BTreeMap<String, String> {
        c.tiers
            .iter()
            .map(|(n, t)| (n.clone(), format!("{t:?}")))
            .collect()
    };
    named("tiers", tiers(old), tiers(new));
    let packs = |c: &Config| -> BTreeMap<String, String> {
        c.credit_packs
            .iter()
            .map(|p| (p.id.clone(), format!("{p:?}")))
            .collect()
    };
    named("credit_packs", packs(old), packs(new));
    let order = |c: &Config| c.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let (old_order, new_order) = (order(old), order(new));
    let mut same_names = old_order.clone();
    same_names.sort();
    let mut new_sorted = new_order.clone();
    new_sorted.sort();
    if same_names == new_sorted && old_order != new_order {
        changed.push("routes (order)".into());
    }
    if differs(&old.auth.jwt, &new.auth.jwt) {
        changed.push("auth.jwt".into());
    }
    if differs(&old.stripe, &new.stripe) {
        changed.push("stripe".into());
    }
    if old.admin_token_env != new.admin_token_env || old.admin_token != new.admin_token {
        changed.push("admin".into());
    }
    if old.server.shutdown_grace != new.server.shutdown_grace {
        changed.push("server.shutdown_grace_seconds".into());
    }
    changed
}

/// Reloads on every SIGHUP until `stop`; a refused reload is logged with every problem.
/// Installed before the `listening` line, so a SIGHUP never hits the default action (exit).
pub fn on_sighup(
    live: Arc<impl Live>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match reload(&*live).await {
                Ok(r) => tracing::info!(
                    version = r.version,
                    changed = ?r.changed,
                    "SIGHUP: config reloaded"
                ),
                Err(ReloadError::Invalid { problems }) => {
                    tracing::error!("SIGHUP: config not reloaded, the file is not valid; the old config keeps serving");
                    for problem in problems {
                        tracing::error!("{problem}");
                    }
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "u"
cost = 1
[[routes]]
name = "b"
path_prefix = "/b"
upstream = "u"
cost = 1
[tiers.free]
monthly_credits = 10
"#;

    #[test]
    fn changes_name_routes_tiers_and_sections() {
        let old = crate::config::for_tests(ROUTES);
        let same = crate::config::for_tests(ROUTES);
        assert!(changes(&old, &same).is_empty());
        assert!(restart_only_changes(&old, &same).is_empty());
        let new = crate::config::for_tests(
            &ROUTES
                .replace(
                    "path_prefix = \"/a\"\nupstream = \"u\"\ncost = 1",
                    "path_prefix = \"/a\"\nupstream = \"u\"\ncost = 2",
                )
                .replace(
                    "monthly_credits = 10",
                    "monthly_credits = 10\n[tiers.pro]\nmonthly_credits = 99",
                ),
        );
        assert_eq!(changes(&old, &new), vec!["routes.a", "tiers.pro"]);
    }

    #[test]
    fn restart_only_fields_are_named() {
        let old = crate::config::for_tests(ROUTES);
        let mut new = crate::config::for_tests(ROUTES);
        new.redis.shards = 8;
        new.server.listen = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            restart_only_changes(&old, &new),
            vec!["server.listen", "redis.shards"]
        );
    }
}
