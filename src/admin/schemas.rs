//! The admin API's response bodies, as the handlers serialize them and as `docs/openapi.yaml`
//! describes them. A few answers are built elsewhere and shared with the portal and console
//! (usage, the journal, the catalogue) or by the proxy (self-service balance); their structs
//! here only describe that JSON (marked "Documentation only").

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::ToSchema;

use crate::money::Credits;

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(inline)]
    pub status: HealthStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    #[schema(inline)]
    pub status: ReadinessStatus,
    pub redis: bool,
    pub postgres: bool,
    /// Each dependency that is down while the instance still serves, with since when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessStatus {
    Ok,
    Degraded,
    Unavailable,
}

/// An account's live balance.
#[derive(Serialize, ToSchema)]
pub struct Balance {
    /// What is left of this period's monthly credits (reset at each period boundary).
    pub allowance: Credits,
    /// Grants and packs; never expire. Debits take allowance first, then purchased.
    pub purchased: Credits,
    /// allowance + purchased.
    pub total: Credits,
    /// Part of the balance reserved by instances' credit slices (in account answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leased: Option<Credits>,
}

/// An account. `balance`, `unlimited` and `period_usage` are present when Redis answered
/// (always on reads and tier changes; on creation the stored row is answered alone if Redis
/// did not answer: Redis loads the account on first use).
#[derive(Serialize, ToSchema)]
pub struct Account {
    pub id: String,
    pub tier: String,
    /// `active`, `suspended`, or e.g. `past_due` while a subscription payment is failing.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// The tier's `monthly_credits` is `"unlimited"` (no balance check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlimited: Option<bool>,
    #[schema(value_type = DateTime<Utc>)]
    pub period_start: Option<DateTime<Utc>>,
    #[schema(value_type = DateTime<Utc>)]
    pub period_end: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_usage: Option<PeriodUsage>,
    pub created_at: DateTime<Utc>,
}

/// Plan counters this billing period: requests, tokens (in + out, settled on token-priced
/// routes; the tier's `tokens_per_month`), and the counts of resources routes count (`counts`
/// / the tier's `limits`).
#[derive(Serialize, ToSchema)]
pub struct PeriodUsage {
    pub requests: i64,
    pub tokens: i64,
    pub resources: BTreeMap<String, i64>,
}

/// The status now in force.
#[derive(Serialize, ToSchema)]
pub struct StatusChanged {
    pub id: String,
    /// `active` or `suspended`.
    pub status: String,
}

/// A grant, whether this call credited it or not.
#[derive(Serialize, ToSchema)]
pub struct GrantResult {
    pub account_id: String,
    pub credits: Credits,
    /// The reason, trimmed.
    pub reason: String,
    /// The key, trimmed.
    pub idempotency_key: String,
    /// `true` when this grant had already been credited and nothing was added now.
    pub duplicate: bool,
    /// The balance after the grant; `null` if Redis does not hold the account.
    pub balance: Option<Balance>,
}

// Documentation only: built by `journal::usage::usage_json` (shared with the portal).
/// Usage in `[from, to)`: totals without `group_by` (`requests`, `credits`, `tokens_in`,
/// `tokens_out`), `groups` with it.
#[derive(ToSchema)]
pub struct Usage {
    /// The range's start (later than asked when the tier's `history_days` cuts it).
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Metered requests (refunded ones included). Without `group_by`.
    pub requests: Option<i64>,
    /// Credits charged, net of refunds. Without `group_by`.
    pub credits: Option<Credits>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    /// With `group_by`: ordered by key; only keys with entries appear.
    pub groups: Option<Vec<UsageGroup>>,
}

/// One group of a grouped usage answer.
#[derive(ToSchema)]
pub struct UsageGroup {
    /// The route name, the action (empty when none), or the UTC day `YYYY-MM-DD`.
    pub key: String,
    pub requests: i64,
    pub credits: Credits,
    pub tokens_in: i64,
    pub tokens_out: i64,
}

/// One journal entry.
#[derive(ToSchema)]
pub struct LedgerEntry {
    /// The entry id (unique).
    pub id: String,
    /// What moved the balance: `debit`, `refund`, `settle`, `reset`, `grant`, `purchase`,
    /// `adjustment`, `subscription`, `carry_forward`.
    pub kind: String,
    pub amount: Credits,
    pub allowance_delta: Credits,
    pub purchased_delta: Credits,
    pub balance_after: Balance,
    pub request_id: Option<String>,
    pub route: Option<String>,
    pub action: Option<String>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub upstream_status: Option<i32>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

// Documentation only: built by `domain::usage::history` (shared with the portal).
/// A page of the journal, newest first.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A tier's price for one interval.
#[derive(ToSchema)]
pub struct TierPrice {
    pub amount_cents: Option<i64>,
    pub currency: String,
    pub stripe_price_id: Option<String>,
    /// A Stripe price is configured, so checkout can sell it.
    pub purchasable: bool,
}

/// Per interval; `null` when the tier has neither a Stripe price nor a list price for it.
#[derive(ToSchema)]
pub struct TierPrices {
    pub month: Option<TierPrice>,
    pub year: Option<TierPrice>,
}

/// A tier as the config defines it.
#[derive(ToSchema)]
pub struct CatalogTier {
    pub id: String,
    #[schema(schema_with = monthly_credits)]
    pub monthly_credits: String,
    pub features: Vec<String>,
    pub low_balance_credits: Option<Credits>,
    pub prices: TierPrices,
    /// The `[stripe] default_tier` (where a canceled subscription lands).
    pub default: bool,
}

/// A number of credits, or `"unlimited"`.
fn monthly_credits() -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(Ref::from_schema_name("Credits"))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["unlimited"])),
        )
        .into()
}

/// A credit pack as the config defines it.
#[derive(ToSchema)]
pub struct CatalogPack {
    pub id: String,
    pub credits: Credits,
    pub bonus_credits: Credits,
    /// credits + bonus_credits, what the pack puts into `purchased`.
    pub total_credits: Credits,
    pub price_cents: i64,
    pub currency: String,
    pub stripe_price_id: Option<String>,
}

// Documentation only: built by `stripe::catalog::catalog_json` (shared with the console).
/// `GET /v1/catalog`.
#[derive(ToSchema)]
pub struct Catalog {
    pub tiers: Vec<CatalogTier>,
    pub credit_packs: Vec<CatalogPack>,
    /// `[stripe]` is configured.
    pub checkout_enabled: bool,
}

// Documentation only: `admin::billing::checkout_pack` answers `json!` (the portal reads it).
/// A payment-mode Checkout Session.
#[derive(ToSchema)]
pub struct PackCheckoutSession {
    pub session_id: String,
    /// Redirect the customer here.
    pub url: Option<String>,
    pub account_id: String,
    pub pack_id: String,
    /// The account's Stripe customer.
    pub customer_id: String,
}

// Documentation only: `admin::billing::checkout_subscription` answers `json!` (the portal
// reads it).
/// A subscription-mode Checkout Session.
#[derive(ToSchema)]
pub struct SubscriptionCheckoutSession {
    pub session_id: String,
    /// Redirect the customer here.
    pub url: Option<String>,
    pub account_id: String,
    pub tier: String,
    /// `month` or `year`.
    pub interval: String,
    pub customer_id: String,
    /// The tier's setup fee, charged on this first subscription to it; `null` otherwise.
    pub setup_fee_cents: Option<i64>,
}

/// The account's current subscription, as the Stripe webhooks recorded it.
#[derive(Serialize, ToSchema)]
pub struct Subscription {
    pub account_id: String,
    pub subscription_id: String,
    pub customer_id: Option<String>,
    pub tier: String,
    /// `month` or `year`.
    pub interval: String,
    /// Stripe's status: `active`, `trialing`, `past_due`, `incomplete`, `unpaid`, `canceled`, …
    pub status: String,
    pub cancel_at_period_end: bool,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub price_id: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    /// While a payment is failing, the account keeps its tier until then.
    pub grace_until: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// What was asked of Stripe.
#[derive(Serialize, ToSchema)]
pub struct SubscriptionChangeResult {
    pub account_id: String,
    pub subscription_id: String,
    pub tier: String,
    /// `month` or `year`.
    pub interval: String,
    /// Stripe's subscription status.
    pub status: String,
    /// `false`: the subscription already had this price; nothing was asked of Stripe
    /// (`price_id` and `applies` are then absent).
    pub changed: bool,
    /// The subscription's price as Stripe answered (when `changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub price_id: Option<Option<String>>,
    /// When the change reaches the account (when `changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applies: Option<&'static str>,
}

/// What Stripe answered to a cancellation.
#[derive(Serialize, ToSchema)]
pub struct CancelResult {
    pub account_id: String,
    pub subscription_id: String,
    /// Stripe's subscription status after the call.
    pub status: String,
    pub cancel_at_period_end: bool,
    /// When the cancellation reaches the account.
    pub applies: &'static str,
}

/// Revenue of one currency.
#[derive(ToSchema)]
pub struct CurrencyRevenue {
    pub currency: String,
    /// Monthly recurring revenue of the subscriptions live at `to` (monthly prices as they
    /// are, yearly prices / 12).
    pub mrr_cents: i64,
    pub mrr_by_tier: BTreeMap<String, i64>,
    pub subscribers_by_tier: BTreeMap<String, i64>,
    /// Subscription invoices paid in `[from, to)`.
    pub subscription_revenue_cents: i64,
    pub pack_revenue_cents: PackRevenue,
    pub packs_sold: i64,
    /// Accounts that paid (an invoice or a pack) in the window.
    pub paying_accounts: i64,
    /// (subscription revenue + net pack revenue) / paying accounts, rounded half up; 0
    /// without payers.
    pub arpu_cents: i64,
}

/// Credit packs bought in the window.
#[derive(ToSchema)]
pub struct PackRevenue {
    pub gross: i64,
    pub refunded: i64,
    pub net: i64,
}

// Documentation only (with `CurrencyRevenue`, `PackRevenue`): `admin::reports::revenue`
// answers `json!` (the console reads it).
/// `GET /v1/reports/revenue`.
#[derive(ToSchema)]
pub struct RevenueReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Accounts with a live subscription (`active`, `trialing`, `past_due`) at `to`.
    pub active_subscribers: i64,
    /// Accounts with a started, not yet canceled subscription at each of 12 monthly points
    /// ending at `to`, oldest first.
    pub subscribers_over_time: Vec<SubscribersAt>,
    /// One entry per currency seen, ordered by currency code.
    pub currencies: Vec<CurrencyRevenue>,
}

/// One point of `subscribers_over_time`.
#[derive(ToSchema)]
pub struct SubscribersAt {
    pub at: DateTime<Utc>,
    pub subscribers: i64,
}

// Documentation only: built by `admin::config::reload` from a `ReloadError`.
/// A reload that changed nothing; the old config keeps serving.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRefused {
    /// `config_invalid` or `restart_required`.
    pub error: String,
    pub message: String,
    /// `config_invalid`: every problem, as the lines `tollgate check-config` prints
    /// (`FILE: field: reason (line N)`).
    pub problems: Option<Vec<String>>,
    /// `restart_required`: the fields whose change needs a restart.
    pub fields: Option<Vec<String>>,
}

// Documentation only: the request body, read leniently by `stripe::webhook::parse_event`.
/// A Stripe event envelope; only these fields are required, everything else is ignored unless
/// used.
#[derive(ToSchema)]
pub struct StripeEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds; orders events about one subscription.
    pub created: i64,
    pub livemode: Option<bool>,
    pub data: StripeEventData,
}

#[derive(ToSchema)]
pub struct StripeEventData {
    pub object: serde_json::Value,
}

/// A processed (or recorded and ignored) Stripe event.
#[derive(Serialize, ToSchema)]
pub struct WebhookAck {
    /// Always `true`.
    pub received: bool,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `applied` now; `duplicate`: this event id was processed before; `already_applied`:
    /// another event applied the same object; `stale`: older than what was applied, recorded
    /// only; `ignored`: not an event tollgate acts on; `unknown_account`: names no account.
    pub outcome: &'static str,
    /// Why it was ignored, or the unknown account id.
    pub detail: Option<String>,
}

/// A single-use link into the customer portal.
#[derive(Serialize, ToSchema)]
pub struct PortalSession {
    /// `…/_tollgate/portal/enter?token=…`; works once.
    pub url: String,
    /// RFC 3339, seconds.
    #[schema(value_type = DateTime<Utc>)]
    pub expires_at: String,
}

// Documentation only: built by `proxy::selfservice` (the proxy listener, not axum).
/// `GET /_tollgate/v1/balance` on the proxy listener.
#[derive(ToSchema)]
pub struct SelfBalance {
    pub account_id: String,
    pub tier: String,
    pub status: String,
    pub balance: Balance,
    pub unlimited: bool,
    /// The total is below the tier's `low_balance_credits`.
    pub low_balance: bool,
    /// When the allowance resets.
    pub period_end: DateTime<Utc>,
    /// Always `credits`.
    pub currency_unit: String,
    /// Always 1000000.
    pub micro_credits_per_credit: i64,
}
