//! Config: TOML → serde structs (`raw`) → a validated [`Config`] the rest of the program trusts.
//!
//! Every problem is reported as `FILE: field.path: reason`, all of them at once, before anything
//! starts. Credit amounts never pass through a float: TOML floats are replaced by their literal
//! text before serde sees them, and [`Credits`] parses that text exactly.

mod parse;
pub mod raw;
mod tier;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::money::Credits;
pub use raw::{FailMode, MonthlyCredits, RefundOn};
pub use tier::TierConfig;

/// A config file that cannot be used, with every reason found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", .problems.iter().map(|p| format!("{path}: {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub redis: raw::Redis,
    pub postgres: PostgresConfig,
    /// Admin bearer token; `None` when its environment variable is unset (serve refuses).
    pub admin_token: Option<String>,
    pub admin_token_env: String,
    pub journal: raw::Journal,
    pub leases: raw::Leases,
    pub auth: AuthConfig,
    pub stripe: Option<StripeConfig>,
    pub alerts: Option<AlertsConfig>,
    /// `[portal]`; `public_url` is checked and has no trailing slash.
    pub portal: raw::Portal,
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
    pub routes: Vec<Arc<RouteConfig>>,
    pub tiers: BTreeMap<String, Arc<TierConfig>>,
    pub credit_packs: Vec<raw::CreditPack>,
    pub telemetry: TelemetryConfig,
    /// Secrets named by the file but absent from the environment: fatal for `serve`, reported
    /// by `check-config`.
    pub missing_secrets: Vec<String>,
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Where spans are POSTed (the full `/v1/traces` URL); `None`: tracing is off.
    pub otlp_traces_url: Option<String>,
    pub sample_ratio: f64,
    pub service_name: String,
    pub log_format: raw::LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub threads: usize,
    /// HTTPS on the proxy listener; the files are read at start and by a reload.
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_cache_ttl: Duration,
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// HS256 secret bytes.
    pub secret: Option<Vec<u8>>,
    /// RS256/ES256 public key PEM.
    pub public_key_pem: Option<Vec<u8>>,
    pub account_claim: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: u64,
    /// RS256/ES256 keys from a JWKS URL instead of `public_key_pem`.
    pub jwks: Option<JwksConfig>,
}

/// Where RS256/ES256 keys come from when the identity provider publishes a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksConfig {
    pub url: String,
    /// Periodic refetch.
    pub refresh: Duration,
    /// The least time between two fetches caused by unknown `kid`s.
    pub min_refetch: Duration,
}

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: Option<String>,
    pub webhook_secret: Option<String>,
    pub api_base: String,
    pub success_url: String,
    pub cancel_url: String,
    /// How long a past-due account keeps its allowance.
    pub past_due_grace: Duration,
    /// The tier accounts return to when their subscription ends (validated to exist).
    pub default_tier: String,
    /// Per Stripe API call.
    pub timeout: Duration,
    /// Whether the portal links into Stripe's billing portal.
    pub billing_portal: bool,
}

#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub webhook_url: String,
    /// `None` when its environment variable is unset (serve refuses).
    pub secret: Option<String>,
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path the upstream URL carries (without trailing slash), prepended to every request path.
    pub base_path: String,
    /// `host[:port]` as the upstream expects it in `Host`.
    pub authority: String,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub preserve_host: bool,
    pub tls_verify: bool,
    /// The backends of `urls` (empty for a single `url`, which `host`/`port` describe).
    pub backends: Vec<BackendAddr>,
    pub lb: raw::LbPolicy,
    pub health_check: Option<HealthCheckConfig>,
    /// How long a backend whose connection failed is skipped (`None`: never).
    pub eject: Option<Duration>,
    /// Trusted instead of the system roots for this https upstream (`ca`).
    pub ca: Option<Arc<Box<[pingora::tls::x509::X509]>>>,
}

/// One of an upstream's `urls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written: the backend's `Host` header and its metric label.
    pub authority: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// How a route is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Price {
    /// A fixed amount per request (may be zero: authenticated but free).
    Fixed(Credits),
    /// Metered from the request/response (tokens, size, duration).
    Metered(raw::Pricing),
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub index: usize,
    pub name: String,
    pub method: Option<Method>,
    pub path_prefix: String,
    pub upstream: Arc<UpstreamConfig>,
    pub action: String,
    pub price: Option<Price>,
    pub feature: Option<String>,
    pub refund_on: Vec<RefundOn>,
    pub public: bool,
    pub fail_mode: FailMode,
    pub cap_max_tokens: bool,
    /// The resource this route adds to or removes from (`counts`), and by how much.
    pub counts: Option<(String, i64)>,
}

impl RouteConfig {
    pub fn refunds(&self, on: RefundOn) -> bool {
        self.refund_on.contains(&on)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses and validates TOML text; `env` resolves environment variables (injectable for tests).
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let parse_err = |message: String| ConfigError::Parse {
            path: display.clone(),
            message,
        };
        let exact = floats_as_literal_text(text).map_err(|e| parse_err(e.to_string()))?;
        let parsed = parse::parse(&exact).map_err(parse_err)?;
        let lines = parse::Lines::new(&exact);
        let invalid = |problems: Vec<String>| ConfigError::Invalid {
            path: display.clone(),
            problems,
        };
        let Some(raw) = parsed.raw else {
            return Err(invalid(parsed.problems));
        };
        match validate::validate(raw, path, env) {
            Ok(config) if parsed.problems.is_empty() => Ok(config),
            Ok(_) => Err(invalid(parsed.problems)),
            Err(problems) => {
                // Reference problems after the type problems, each with its line. Those about
                // an item the parser had to drop, or about the table it was dropped from (a route
                // left without its bad `cost`), would only echo the report already made.
                let mut all = parsed.problems;
                for problem in problems {
                    let field = problem.split(": ").next().unwrap_or_default();
                    if parsed
                        .removed
                        .iter()
                        .any(|r| is_under(field, r) || is_under(r, field))
                    {
                        continue;
                    }
                    match lines.line(&field_path(field)) {
                        Some(line) => all.push(format!("{problem} (line {line})")),
                        None => all.push(problem),
                    }
                }
                Err(invalid(all))
            }
        }
    }

    /// Fails when a secret the file names is missing from the environment.
    pub fn require_secrets(&self) -> Result<(), ConfigError> {
        if self.missing_secrets.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: self.source.display().to_string(),
                problems: self.missing_secrets.clone(),
            })
        }
    }

    pub fn tier(&self, name: &str) -> Option<&Arc<TierConfig>> {
        self.tiers.get(name)
    }

    /// Days of journal to keep in Postgres: the longest `history_days` of all tiers, or `None`
    /// (keep everything) when any tier keeps its history forever, or there are no tiers.
    /// Months older than this are rolled up by `journal::partitions::prune`.
    pub fn journal_retention_days(&self) -> Option<u32> {
        let mut longest: Option<u32> = None;
        for tier in self.tiers.values() {
            let days = tier.history_days()?;
            longest = Some(longest.map_or(days, |l| l.max(days)));
        }
        longest
    }
}

/// Whether `field` names `item` or something inside it.
fn is_under(field: &str, item: &str) -> bool {
    field
        .strip_prefix(item)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// `routes[2].pricing.reserve` → its path segments (for line look-ups).
fn field_path(field: &str) -> Vec<parse::Seg> {
    let mut path = Vec::new();
    for part in field.split('.') {
        let (key, mut indices) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            path.push(parse::Seg::Key(key.to_string()));
        }
        while let Some(rest) = indices.strip_prefix('[') {
            let Some(end) = rest.find(']') else { break };
            match rest[..end].parse() {
                Ok(i) => path.push(parse::Seg::Index(i)),
                Err(_) => break,
            }
            indices = &rest[end + 1..];
        }
    }
    path
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Replaces every TOML float by a string holding its literal text, so `cost = 0.2` reaches
/// [`Credits`] as `"0.2"` and is parsed exactly. Line numbers are unchanged.
fn floats_as_literal_text(text: &str) -> Result<String, toml_edit::TomlError> {
    use toml_edit::visit_mut::{self, VisitMut};
    struct Floats;
    impl VisitMut for Floats {
        fn visit_value_mut(&mut self, node: &mut toml_edit::Value) {
            if let toml_edit::Value::Float(f) = node {
                let literal = f
                    .as_repr()
                    .and_then(|r| r.as_raw().as_str())
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|| f.value().to_string());
                let decor = f.decor().clone();
                let mut replacement = toml_edit::Value::from(literal);
                *replacement.decor_mut() = decor;
                *node = replacement;
                return;
            }
            visit_mut::visit_value_mut(self, node);
        }
    }
    let mut doc: toml_edit::DocumentMut = text.parse()?;
    Floats.visit_document_mut(&mut doc);
    Ok(doc.to_string())
}

/// A config for unit tests elsewhere in the crate: listeners on port 0, a local Redis and
/// Postgres and one upstream `u`, followed by the test's own routes and tiers.
#[cfg(test)]
pub(crate) fn for_tests(routes_and_tiers: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[redis]
url = "redis://127.0.0.1"
[postgres]
url = "postgres://x@127.0.0.1/db"
[[upstreams]]
name = "u"
url = "http://127.0.0.1:1"
{routes_and_tiers}"#
    );
    Config::from_toml(&text, Path::new("t.toml"), &|_| {
        Some("0123456789abcdef".into())
    })
    .unwrap_or_else(|e| panic!("test config: {e}"))
}

#[cfg(test)]
mod tests;
