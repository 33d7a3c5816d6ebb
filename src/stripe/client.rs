//! Calls to the Stripe API, through async-stripe: customers (one per account, remembered in
//! `stripe_customers`), Checkout Sessions for packs and subscriptions, subscription changes and
//! their proration previews.
//! Every create or change carries an idempotency key, so a retried call never makes a second
//! object; every failure becomes a clear `502 stripe_error`.

use std::collections::HashMap;
use std::sync::LazyLock;

use ::stripe::{
    Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use stripe_billing::invoice::{
    CreatePreviewInvoice, CreatePreviewInvoiceSubscriptionDetails,
    CreatePreviewInvoiceSubscriptionDetailsItems,
    CreatePreviewInvoiceSubscriptionDetailsProrationBehavior,
};
use stripe_billing::subscription::{
    CancelSubscription, RetrieveSubscription, UpdateSubscription, UpdateSubscriptionItems,
    UpdateSubscriptionProrationBehavior,
};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionPaymentIntentData,
    CreateCheckoutSessionSubscriptionData,
};
use stripe_checkout::CheckoutSessionMode;
use stripe_core::customer::CreateCustomer;

use super::error::StripeCallError;
use crate::config::StripeConfig;

/// The client of the current `[stripe]` settings (rebuilt when a reload changes them).
static CLIENT: LazyLock<Mutex<Option<(String, Client)>>> = LazyLock::new(|| Mutex::new(None));

/// A Stripe client for `cfg` (base URL, secret key, per-call timeout).
pub fn client(cfg: &StripeConfig) -> Result<Client, StripeCallError> {
    let secret = cfg
        .secret_key
        .as_deref()
        .ok_or_else(|| StripeCallError::NotConfigured("the Stripe secret key is not set".into()))?;
    let fingerprint = format!(
        "{}|{}|{}",
        cfg.api_base,
        hex::encode(Sha256::digest(secret.as_bytes())),
        cfg.timeout.as_millis()
    );
    let mut cached = CLIENT.lock();
    if let Some((f, c)) = cached.as_ref() {
        if *f == fingerprint {
            return Ok(c.clone());
        }
    }
    let built = ClientBuilder::new(secret)
        // async-stripe appends `v1/...` to the base, which must end with a slash.
        .url(format!("{}/", cfg.api_base.trim_end_matches('/')))
        .timeout(cfg.timeout)
        .app_info("tollgate", Some(env!("CARGO_PKG_VERSION").into()), None)
        .build()
        .map_err(|e| StripeCallError::Call(format!("cannot configure the Stripe client: {e}")))?;
    *cached = Some((fingerprint, built.clone()));
    Ok(built)
}

/// Turns a Stripe failure into a [`StripeCallError::Call`] saying what was tried (the admin
/// API answers it as a 502).
pub fn stripe_error(cfg: &StripeConfig, what: &str, e: StripeError) -> StripeCallError {
    StripeCallError::Call(match e {
        StripeError::Stripe(err, status) => {
            let code = err
                .code
                .as_ref()
                .map(|c| format!(" {}", c.as_str()))
                .unwrap_or_default();
            format!(
                "Stripe refused to {what} ({status} {}{code}): {}",
                err.type_.as_str(),
                err.message.as_deref().unwrap_or("no message")
            )
        }
        StripeError::Timeout => format!(
            "Stripe did not answer within {} ms while trying to {what}",
            cfg.timeout.as_millis()
        ),
        StripeError::ClientError(m) => format!("cannot reach Stripe to {what}: {m}"),
        StripeError::JSONDeserialize(m) => {
            format!("Stripe's answer to {what} could not be read: {m}")
        }
        StripeError::ConfigError(m) => format!("the Stripe client is misconfigured: {m}"),
    })
}

fn key(text: String) -> Result<RequestStrategy, StripeCallError> {
    IdempotencyKey::new(text)
        .map(RequestStrategy::Idempotent)
        .map_err(|e| StripeCallError::Invalid(format!("idempotency key: {e}")))
}

/// The account's Stripe customer: the remembered one, or a new one (created once: the
/// idempotency key is the account id, and concurrent first checkouts agree on one row).
pub async fn ensure_customer(
    pg: &PgPool,
    cfg: &StripeConfig,
    client: &Client,
    account_id: &str,
) -> Result<String, StripeCallError> {
    let known: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(pg)
            .await?;
    if let Some(id) = known {
        return Ok(id);
    }
    let customer = CreateCustomer::new()
        .description(format!("tollgate account {account_id}"))
        .metadata(HashMap::from([(
            "account_id".to_string(),
            account_id.to_string(),
        )]))
        .customize()
        .request_strategy(key(format!("tollgate-customer-{account_id}"))?)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "create the customer", e))?;
    sqlx::query(
        // No conflict target: two concurrent first checkouts get the same customer back from
        // Stripe (same idempotency key) and collide on both unique columns at once.
        "INSERT INTO stripe_customers (account_id, customer_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(account_id)
    .bind(customer.id.as_str())
    .execute(pg)
    .await?;
    let id: String =
        sqlx::query_scalar("SELECT customer_id FROM stripe_customers WHERE account_id = $1")
            .bind(account_id)
            .fetch_one(pg)
            .await?;
    Ok(id)
}

/// A Stripe billing portal session for `customer` (payment methods, invoices), returning to
/// `return_url`; its URL, to redirect to.
pub async fn billing_portal_session(
    cfg: &StripeConfig,
    client: &Client,
    customer: &str,
    return_url: &str,
) -> Result<String, StripeCallError> {
    let session = stripe_billing::billing_portal_session::CreateBillingPortalSession::new()
        .customer(customer)
        .return_url(return_url)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "open the billing portal", e))?;
    Ok(session.url)
}

/// A Checkout Session to open: who, what, where to return.
pub struct SessionRequest<'a> {
    pub account_id: &'a str,
    pub customer_id: &'a str,
    pub price_id: &'a str,
    /// A one-time price added to the first subscription (the tier's setup fee).
    pub setup_price_id: Option<&'a str>,
    /// Copied to the session and to the payment intent / subscription.
    pub metadata: HashMap<String, String>,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub idempotency_key: String,
}

/// `{session_id, url}` of a new Checkout Session.
pub struct Session {
    pub id: String,
    pub url: Option<String>,
}

/// A payment-mode session for a credit pack.
pub async fn pack_session(
    cfg: &StripeConfig,
    client: &Client,
    r: SessionRequest<'_>,
) -> Result<Session, StripeCallError> {
    let mut intent = CreateCheckoutSessionPaymentIntentData::new();
    intent.metadata = Some(r.metadata.clone());
    let request = base_session(&r, CheckoutSessionMode::Payment).payment_intent_data(intent);
    send_session(cfg, client, request, r.idempotency_key).await
}

/// A subscription-mode session for a tier.
pub async fn subscription_session(
    cfg: &StripeConfig,
    client: &Client,
    r: SessionRequest<'_>,
) -> Result<Session, StripeCallError> {
    let mut data = CreateCheckoutSessionSubscriptionData::new();
    data.metadata = Some(r.metadata.clone());
    let request = base_session(&r, CheckoutSessionMode::Subscription).subscription_data(data);
    send_session(cfg, client, request, r.idempotency_key).await
}

fn base_session(r: &SessionRequest<'_>, mode: CheckoutSessionMode) -> CreateCheckoutSession {
    let line = |price: &str| {
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price = Some(price.to_string());
        item.quantity = Some(1);
        item
    };
    let mut items = vec![line(r.price_id)];
    items.extend(r.setup_price_id.map(line));
    CreateCheckoutSession::new()
        .mode(mode)
        .customer(r.customer_id)
        .client_reference_id(r.account_id)
        .line_items(items)
        .metadata(r.metadata.clone())
        .success_url(r.success_url)
        .cancel_url(r.cancel_url)
}

async fn send_session(
    cfg: &StripeConfig,
    client: &Client,
    request: CreateCheckoutSession,
    idempotency_key: String,
) -> Result<Session, StripeCallError> {
    let session = request
        .customize()
        .request_strategy(key(idempotency_key)?)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "create the Checkout Session", e))?;
    Ok(Session {
        id: session.id.as_str().to_string(),
        url: session.url,
    })
}

/// What tollgate reads back from a subscription it changed.
#[derive(Debug, Clone)]
pub struct SubscriptionState {
    pub id: String,
    pub status: String,
    pub cancel_at_period_end: bool,
    pub price_id: Option<String>,
}

fn state_of(s: &stripe_billing::Subscription) -> SubscriptionState {
    SubscriptionState {
        id: s.id.as_str().to_string(),
        status: s.status.as_str().to_string(),
        cancel_at_period_end: s.cancel_at_period_end,
        price_id: s
            .items
            .data
            .first()
            .map(|item| item.price.id.as_str().to_string()),
    }
}

/// The subscription's (first and only) item: the one a tier change moves to another price.
fn first_item(
    subscription_id: &str,
    s: &stripe_billing::Subscription,
) -> Result<String, StripeCallError> {
    s.items
        .data
        .first()
        .map(|item| item.id.as_str().to_string())
        .ok_or_else(|| {
            StripeCallError::Call(format!(
                "subscription {subscription_id} has no item to change"
            ))
        })
}

/// Moves a subscription to another price, with proration (Stripe invoices or credits the
/// difference); the `customer.subscription.updated` webhook then moves the account's tier.
/// `proration_date` is the one a [`preview_change`] used, so Stripe charges what was shown.
pub async fn change_price(
    cfg: &StripeConfig,
    client: &Client,
    subscription_id: &str,
    price_id: &str,
    proration_date: Option<i64>,
    metadata: HashMap<String, String>,
    idempotency_key: String,
) -> Result<SubscriptionState, StripeCallError> {
    let current = RetrieveSubscription::new(subscription_id)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "read the subscription", e))?;
    let mut item = UpdateSubscriptionItems::new();
    item.id = Some(first_item(subscription_id, &current)?);
    item.price = Some(price_id.to_string());
    let mut update = UpdateSubscription::new(subscription_id)
        .items(vec![item])
        .proration_behavior(UpdateSubscriptionProrationBehavior::CreateProrations)
        .metadata(metadata);
    if let Some(at) = proration_date {
        update = update.proration_date(at);
    }
    let updated = update
        .customize()
        .request_strategy(key(idempotency_key)?)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "change the subscription", e))?;
    Ok(state_of(&updated))
}

/// What moving a subscription to another price costs, as Stripe's invoice preview computes
/// it. Amounts are integers in the currency's minor units (cents), exactly as Stripe gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePreview {
    /// Lowercase ISO code, e.g. `usd`.
    pub currency: String,
    /// The proration lines' sum: positive is charged, negative is credited.
    pub proration_minor: i64,
    /// What the previewed invoice asks for (prorations and the next period, less any credit).
    pub amount_due_minor: i64,
    /// The instant the proration is computed at (unix seconds); the change must pass it back.
    pub proration_date: i64,
}

/// Stripe's preview (`POST /v1/invoices/create_preview`) of the subscription moved to
/// `price_id` at `proration_date`, with prorations created as [`change_price`] creates them.
pub async fn preview_change(
    cfg: &StripeConfig,
    client: &Client,
    subscription_id: &str,
    price_id: &str,
    proration_date: i64,
) -> Result<ChangePreview, StripeCallError> {
    let current = RetrieveSubscription::new(subscription_id)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "read the subscription", e))?;
    let mut item = CreatePreviewInvoiceSubscriptionDetailsItems::new();
    item.id = Some(first_item(subscription_id, &current)?);
    item.price = Some(price_id.to_string());
    let mut details = CreatePreviewInvoiceSubscriptionDetails::new();
    details.items = Some(vec![item]);
    details.proration_behavior =
        Some(CreatePreviewInvoiceSubscriptionDetailsProrationBehavior::CreateProrations);
    details.proration_date = Some(proration_date);
    let invoice = CreatePreviewInvoice::new()
        .customer(current.customer.id().as_str())
        .subscription(subscription_id)
        .subscription_details(details)
        .send(client)
        .await
        .map_err(|e| stripe_error(cfg, "preview the subscription change", e))?;
    // A one-item change has a handful of lines, all on the first page.
    let proration_minor = invoice
        .lines
        .data
        .iter()
        .filter(|line| is_proration(line))
        .map(|line| line.amount)
        .sum();
    Ok(ChangePreview {
        currency: invoice.currency.to_string(),
        proration_minor,
        amount_due_minor: invoice.amount_due,
        proration_date,
    })
}

/// Whether an invoice line is a proration (Stripe marks it on the line's parent).
fn is_proration(line: &stripe_billing::InvoiceLineItem) -> bool {
    line.parent.as_ref().is_some_and(|p| {
        p.subscription_item_details
            .as_ref()
            .is_some_and(|d| d.proration)
            || p.invoice_item_details.as_ref().is_some_and(|d| d.proration)
    })
}

/// Cancels at the end of the paid period (the default), or at once.
pub async fn cancel(
    cfg: &StripeConfig,
    client: &Client,
    subscription_id: &str,
    at_period_end: bool,
    idempotency_key: String,
) -> Result<SubscriptionState, StripeCallError> {
    let strategy = key(idempotency_key)?;
    let result = if at_period_end {
        UpdateSubscription::new(subscription_id)
            .cancel_at_period_end(true)
            .customize()
            .request_strategy(strategy)
            .send(client)
            .await
    } else {
        CancelSubscription::new(subscription_id)
            .customize()
            .request_strategy(strategy)
            .send(client)
            .await
    };
    result
        .map(|s| state_of(&s))
        .map_err(|e| stripe_error(cfg, "cancel the subscription", e))
}
