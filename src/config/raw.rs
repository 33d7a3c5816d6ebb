//! The TOML file as serde sees it. Unknown fields are errors everywhere; defaults live here so
//! the reference config and the code cannot disagree about them.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::money::Credits;

mod plans;
mod traffic;

pub use plans::*;
pub use traffic::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub redis: Redis,
    pub postgres: Postgres,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub journal: Journal,
    #[serde(default)]
    pub leases: Leases,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub stripe: Option<Stripe>,
    #[serde(default)]
    pub alerts: Option<Alerts>,
    #[serde(default)]
    pub portal: Portal,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub tiers: BTreeMap<String, Tier>,
    #[serde(default)]
    pub credit_packs: Vec<CreditPack>,
    #[serde(default)]
    pub telemetry: Telemetry,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Proxy listener; port 0 picks a free port (the `listening` line tells which).
    pub listen: String,
    pub admin_listen: String,
    pub metrics_listen: String,
    /// How long SIGTERM waits for in-flight requests before closing them.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Worker threads for the proxy runtime; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// HTTPS on the proxy listener (HTTP/2 and HTTP/1.1 through ALPN).
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

/// PEM files of the proxy listener's certificate (chain) and private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert: String,
    pub key: String,
}

fn default_grace() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: String,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// A Redis call slower than this counts as Redis unavailable (fail_mode applies).
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
    /// A concurrency lease (`max_concurrent`) expires after this long even if its request's
    /// instance died without releasing it.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
    /// Group commit of exact debits: while a debit call for a shard is in flight, the next
    /// debits of that shard wait and go together in one script call.
    #[serde(default = "default_group_commit")]
    pub group_commit: bool,
}

fn default_group_commit() -> bool {
    true
}

fn default_lease_ttl() -> u64 {
    300
}

fn default_prefix() -> String {
    "tg".into()
}
fn default_shards() -> u32 {
    64
}
fn default_redis_timeout() -> u64 {
    250
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    #[serde(default)]
    pub url: Option<String>,
    /// Alternative to `url` so a password never sits in the file.
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default = "default_pg_max")]
    pub max_connections: u32,
}

fn default_pg_max() -> u32 {
    10
}

/// The usage flusher (Redis streams → Postgres journal).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// Entries another (dead) instance read but never acknowledged are taken over after
    /// being idle this long.
    #[serde(default = "default_claim_idle")]
    pub claim_idle_seconds: u64,
    /// A purchase, clawback or grant recorded in Postgres whose journal entry is still missing
    /// this long after is checked against Redis and applied again if Redis lost it (a
    /// failover's asynchronous replication); also how often that check runs.
    #[serde(default = "default_reconcile_after")]
    pub reconcile_after_seconds: u64,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            claim_idle_seconds: default_claim_idle(),
            reconcile_after_seconds: default_reconcile_after(),
        }
    }
}

/// Credit slices: each instance serves an account's fixed-price requests from a slice of its
/// balance reserved in Redis, and reports what it spent once per batch window (DESIGN
/// "Credit leases").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leases {
    /// On: eligible requests are served from credit slices. Off (the default for now): every
    /// metered request makes its own debit call (the exact path).
    #[serde(default)]
    pub enabled: bool,
    /// How often spending is reported (one script call per shard). Bounds what a crashed
    /// instance forgives, how long other instances' balance views lag, and how long a tier
    /// change, suspension or clawback takes to reach a slice when pub/sub is down.
    #[serde(default = "default_batch_ms")]
    pub batch_ms: u64,
    /// A slice is sized to this much of the account's recent traffic (and at least a few
    /// requests).
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// A slice not renewed for this long (its instance died) goes back to the account.
    #[serde(default = "default_slice_ttl_ms")]
    pub ttl_ms: u64,
    /// An unused slice is given back after this long.
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Near the end of a balance, how long a request waits for other instances to give their
    /// slices back before it is refused.
    #[serde(default = "default_recall_wait_ms")]
    pub recall_wait_ms: u64,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            enabled: false,
            batch_ms: default_batch_ms(),
            window_ms: default_window_ms(),
            ttl_ms: default_slice_ttl_ms(),
            idle_ms: default_idle_ms(),
            recall_wait_ms: default_recall_wait_ms(),
        }
    }
}

fn default_batch_ms() -> u64 {
    100
}

fn default_window_ms() -> u64 {
    500
}

fn default_slice_ttl_ms() -> u64 {
    5_000
}

fn default_idle_ms() -> u64 {
    2_000
}

fn default_recall_wait_ms() -> u64 {
    300
}

fn default_claim_idle() -> u64 {
    10
}

fn default_reconcile_after() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            token_env: default_admin_token_env(),
        }
    }
}

fn default_admin_token_env() -> String {
    "TOLLGATE_ADMIN_TOKEN".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// How long a resolved API key stays in the in-process cache. Revocations are pushed
    /// (Redis pub/sub), so this only bounds staleness if the push channel is down.
    #[serde(default = "default_key_ttl")]
    pub key_cache_ttl_seconds: u64,
    #[serde(default)]
    pub jwt: Option<Jwt>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            key_cache_ttl_seconds: default_key_ttl(),
            jwt: None,
        }
    }
}

fn default_key_ttl() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub algorithms: Vec<String>,
    /// HS256 shared secret, from this environment variable.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// RS256/ES256 public key (PEM) from this file...
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// ...or from this environment variable.
    #[serde(default)]
    pub public_key_env: Option<String>,
    pub account_claim: String,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// RS256/ES256 keys from the identity provider's JWKS document (instead of
    /// `public_key_file`/`public_key_env`), picked by the token's `kid`, so the provider can
    /// rotate keys without a tollgate restart.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The JWKS is fetched again this often, so removed keys stop working.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_seconds: u64,
    /// A token with an unknown `kid` fetches the JWKS at most once per this many seconds, so
    /// a flood of forged `kid`s cannot hammer the identity provider.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_seconds: u64,
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_jwks_min_refetch() -> u64 {
    10
}

fn default_leeway() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    pub secret_key_env: String,
    pub webhook_secret_env: String,
    #[serde(default = "default_stripe_base")]
    pub api_base: String,
    #[serde(default)]
    pub success_url: Option<String>,
    #[serde(default)]
    pub cancel_url: Option<String>,
    /// A subscription whose invoice failed keeps being served this many days; after that its
    /// allowance is frozen (purchased credits stay usable) until an invoice is paid.
    #[serde(default = "default_grace_days")]
    pub past_due_grace_days: u32,
    /// The tier an account returns to when its subscription ends ("free" when absent).
    #[serde(default)]
    pub default_tier: Option<String>,
    /// Longest wait for one Stripe API call (checkout, subscription changes).
    #[serde(default = "default_stripe_timeout")]
    pub timeout_ms: u64,
    /// Offer a link into Stripe's customer billing portal (payment methods, invoices) on the
    /// portal's Buy page. Off by default: the billing portal must first be set up in the
    /// Stripe dashboard, or Stripe refuses the session.
    #[serde(default)]
    pub billing_portal: bool,
}

fn default_stripe_base() -> String {
    "https://api.stripe.com".into()
}
fn default_grace_days() -> u32 {
    7
}
fn default_stripe_timeout() -> u64 {
    10_000
}

/// The customer portal (`/_tollgate/portal/` on the proxy listener).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Portal {
    /// Origin of the portal links the admin API hands out (`https://billing.example.com`), when
    /// customers reach the proxy through another name than its listen address (a load
    /// balancer, TLS in front). Absent: the proxy listener's own address.
    #[serde(default)]
    pub public_url: Option<String>,
    /// How long a portal link can be opened (it works once).
    #[serde(default = "default_portal_link_ttl")]
    pub link_ttl_seconds: u64,
    /// How long a portal or console session lasts after sign-in.
    #[serde(default = "default_portal_session_ttl")]
    pub session_ttl_seconds: u64,
    /// How often each instance writes its API keys' last-use times to Redis (the portal's
    /// "last used"): requests only note a use in memory, so this bounds both the Redis writes
    /// (one per key used, per interval) and how stale the portal's column can be.
    #[serde(default = "default_key_used_flush")]
    pub key_used_flush_seconds: u64,
}

impl Default for Portal {
    fn default() -> Self {
        Portal {
            public_url: None,
            link_ttl_seconds: default_portal_link_ttl(),
            session_ttl_seconds: default_portal_session_ttl(),
            key_used_flush_seconds: default_key_used_flush(),
        }
    }
}

fn default_portal_link_ttl() -> u64 {
    900
}
fn default_portal_session_ttl() -> u64 {
    3600
}
fn default_key_used_flush() -> u64 {
    60
}

/// Outgoing alerts: low balance and 80 % / 100 % of the allowance, POSTed as signed JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub webhook_url: String,
    /// HMAC-SHA256 key for the `Tollgate-Signature` header, from this environment variable.
    pub secret_env: String,
    /// Deliveries are retried with exponential backoff (1 s, 2 s, 4 s, … capped at 1 h) up to
    /// this many attempts.
    #[serde(default = "default_alert_attempts")]
    pub max_attempts: u32,
}

fn default_alert_attempts() -> u32 {
    10
}

/// `[telemetry]`: where traces go and how logs look. Read once at start (a change needs a
/// restart): the log subscriber and the trace exporter are process-wide.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`; traces are POSTed to
    /// `/v1/traces` under it (a URL with a path is used as is). Unset: no tracing work at all.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces recorded (0 to 1; default 1). A client's `traceparent` decides for
    /// its own requests (parent-based), so one trace is never half recorded.
    pub sample_ratio: Option<Number>,
    /// `service.name` of the exported spans.
    pub service_name: Option<String>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// One log line per request (method, path, status, account, charge, duration, request id).
    #[serde(default)]
    pub access_log: bool,
}

/// A number written as an integer or a decimal (floats reach serde as their literal text).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Number {
    Int(i64),
    Text(String),
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}
