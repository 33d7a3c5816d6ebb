//! `[[upstreams]]` and `[[routes]]` (with their pricing) as serde sees them.

use super::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    /// The upstream's one address; exactly one of `url` and `urls`.
    #[serde(default)]
    pub url: Option<String>,
    /// Several backends of one service (same scheme and path), load-balanced by `lb`, taken out
    /// of rotation by `health_check` and by connect failures (`eject_ms`).
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    /// How a request picks one of `urls`.
    #[serde(default)]
    pub lb: Option<LbPolicy>,
    /// Active health checks of each of `urls`.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// How long a backend of `urls` whose connection failed gets no traffic (passive health
    /// check); 0 turns it off.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// PEM file of the CA certificate(s) that sign this https upstream's certificate (a
    /// private CA), trusted instead of the system's roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Replaces these request headers (the client's credential is always removed).
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the next byte from the upstream (AI calls think for a while).
    #[serde(default = "default_read_timeout")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Send the client's Host header instead of the upstream's own host.
    #[serde(default)]
    pub preserve_host: bool,
    /// Verify the upstream's TLS certificate (https only).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
}

/// How a request picks a backend among an upstream's `urls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight from this instance.
    LeastConn,
    /// Consistent hashing on the account id: an account sticks to one backend (agent backends
    /// that keep session state) while it is healthy.
    HashAccount,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path probed with GET on every backend; any 2xx is healthy.
    pub path: String,
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
}

fn default_hc_interval() -> u64 {
    2_000
}
fn default_hc_timeout() -> u64 {
    500
}
fn default_eject_ms() -> u64 {
    10_000
}

fn default_connect_timeout() -> u64 {
    5_000
}
fn default_read_timeout() -> u64 {
    300_000
}
fn default_write_timeout() -> u64 {
    60_000
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundOn {
    ConnectError,
    #[serde(rename = "5xx")]
    Status5xx,
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Redis unreachable → 503 metering_unavailable.
    #[default]
    Closed,
    /// Redis unreachable → forward unmetered, counted in a metric and the log.
    Open,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default)]
    pub method: Option<String>,
    pub path_prefix: String,
    pub upstream: String,
    /// Name for quotas and usage stats; the route name when absent.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub cost: Option<Credits>,
    #[serde(default)]
    pub pricing: Option<Pricing>,
    #[serde(default)]
    pub feature: Option<String>,
    #[serde(default = "default_refund_on")]
    pub refund_on: Vec<RefundOn>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Lower the request's `max_tokens` to what the caller's balance can pay for.
    #[serde(default)]
    pub cap_max_tokens: bool,
    /// Resources a successful request adds or removes, e.g. `{ agents = 1 }` on "create agent"
    /// and `{ agents = -1 }` on "delete agent"; capped by the tier's `limits`.
    #[serde(default)]
    pub counts: BTreeMap<String, i64>,
}

fn default_refund_on() -> Vec<RefundOn> {
    vec![RefundOn::ConnectError, RefundOn::Status5xx]
}

/// A metered route's prices (instead of a fixed `cost`). See README "Pricing AI routes".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    #[serde(default)]
    pub per_request: Option<Credits>,
    #[serde(default)]
    pub input_per_1k_tokens: Option<Credits>,
    #[serde(default)]
    pub output_per_1k_tokens: Option<Credits>,
    #[serde(default)]
    pub per_mb_request_body: Option<Credits>,
    #[serde(default)]
    pub per_minute: Option<Credits>,
    /// Credits held when the request is admitted, until the response says what it cost.
    #[serde(default)]
    pub reserve: Option<Credits>,
    /// Hold the estimate for the request's `max_tokens` when it is larger than `reserve`.
    #[serde(default)]
    pub reserve_from_max_tokens: bool,
    /// Ask OpenAI-style upstreams for usage on streams (`stream_options.include_usage`).
    #[serde(default = "yes")]
    pub include_usage: bool,
    /// Length of a billed duration step: `per_minute` is charged per started step, prorated
    /// (`per_minute × tick_seconds / 60`). Default 60: per started minute.
    #[serde(default)]
    pub tick_seconds: Option<u64>,
    /// Prices per model (the request's JSON `model`); a name ending in `*` is a prefix. An
    /// entry overrides the route's prices it sets.
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
}

fn yes() -> bool {
    true
}

/// One model's prices in a route's `pricing.models`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    #[serde(default)]
    pub per_request: Option<Credits>,
    #[serde(default)]
    pub input_per_1k_tokens: Option<Credits>,
    #[serde(default)]
    pub output_per_1k_tokens: Option<Credits>,
    #[serde(default)]
    pub reserve: Option<Credits>,
}
