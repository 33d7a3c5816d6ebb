//! The TOML file as serde sees it. Unknown fields are errors everywhere; defaults live here so
//! the reference config and the code cannot disagree about them.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::money::Credits;

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
    pub auth: Auth,
    #[serde(default)]
    pub stripe: Option<Stripe>,
    #[serde(default)]
    pub alerts: Option<Alerts>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub tiers: BTreeMap<String, Tier>,
    #[serde(default)]
    pub credit_packs: Vec<CreditPack>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    pub url: String,
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

/// `monthly_credits = 20` or `monthly_credits = "unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonthlyCredits {
    Limited(Credits),
    Unlimited,
}

impl<'de> Deserialize<'de> for MonthlyCredits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Credits(Credits),
            Text(String),
        }
        // Floats arrive as their literal text (see config::load), so strings are tried as
        // "unlimited" first and then as decimals.
        let value = serde_json::Value::deserialize(d)?;
        if value.as_str() == Some("unlimited") {
            return Ok(MonthlyCredits::Unlimited);
        }
        match serde_json::from_value::<Either>(value.clone()) {
            Ok(Either::Credits(c)) => Ok(MonthlyCredits::Limited(c)),
            Ok(Either::Text(t)) => Err(serde::de::Error::custom(format!(
                "{t:?} is neither a decimal number nor \"unlimited\""
            ))),
            Err(_) => Err(serde::de::Error::custom(format!(
                "{value} is neither a decimal number nor \"unlimited\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionQuota {
    #[serde(default)]
    pub per_hour: Option<u64>,
    #[serde(default)]
    pub per_month: Option<u64>,
    /// Requests of this action in flight per account (e.g. 1 open sandbox session), apart
    /// from the tier-wide `max_concurrent`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub monthly_credits: MonthlyCredits,
    #[serde(default)]
    pub requests_per_hour: Option<u64>,
    #[serde(default)]
    pub requests_per_month: Option<u64>,
    #[serde(default)]
    pub action_quotas: BTreeMap<String, ActionQuota>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub max_request_mb: Option<u64>,
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    #[serde(default)]
    pub low_balance_credits: Option<Credits>,
    /// Tokens (in + out, as settled on token-priced routes) per billing period.
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// Seats: active API keys an account of this tier may have (team members sharing one
    /// balance).
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Caps on resources the routes count (`counts`), e.g. `{ agents = 3 }`; a resource not
    /// listed is unlimited.
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// One-time setup fee added to the first subscription checkout (needs
    /// `stripe_setup_price_id` when Stripe is configured).
    #[serde(default)]
    pub setup_fee_cents: Option<u64>,
    #[serde(default)]
    pub stripe_setup_price_id: Option<String>,
    #[serde(default)]
    pub features: Vec<String>,
    /// Monthly list price, used to name "the cheapest tier that has it" and for reports.
    #[serde(default)]
    pub price_cents_monthly: Option<u64>,
    #[serde(default)]
    pub price_cents_yearly: Option<u64>,
    #[serde(default)]
    pub stripe_price_id_monthly: Option<String>,
    #[serde(default)]
    pub stripe_price_id_yearly: Option<String>,
    /// Currency of the list prices above.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Days of journal history the usage and history API show accounts of this tier; absent:
    /// all of it. When every tier has one, journal months older than the longest are rolled
    /// up and dropped (README: "Postgres at volume").
    #[serde(default)]
    pub history_days: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPack {
    pub id: String,
    pub credits: Credits,
    #[serde(default)]
    pub bonus_credits: Credits,
    pub price_cents: u64,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub stripe_price_id: Option<String>,
}

fn default_currency() -> String {
    "usd".into()
}
