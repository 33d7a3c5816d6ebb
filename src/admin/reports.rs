//! `GET /v1/reports/revenue?from&to`: revenue figures from what the Stripe webhooks recorded
//! in Postgres (never from Stripe's API), per currency, in integer cents.
//!
//! - `mrr_cents`: monthly recurring revenue of the subscriptions live at `to` (created before
//!   it, not canceled before it, still billing): monthly prices as they are, yearly prices / 12,
//!   by tier;
//! - `subscription_revenue_cents`: subscription invoices paid in `[from, to)`;
//! - `pack_revenue_cents`: credit packs bought in `[from, to)` (gross, refunded so far, net);
//! - `arpu_cents`: (subscription revenue + net pack revenue) / accounts that paid in the window;
//! - `active_subscribers`: accounts with a live subscription at `to`;
//! - `subscribers_over_time`: accounts with a started, not yet canceled subscription at each
//!   of 12 monthly points ending at `to` (the console's chart).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::components::{BadRequest, Internal, StoreUnavailable, TimeParam, Unauthorized};
use super::error::AdminError;
use crate::journal::usage::parse_time;
use crate::state::AppState;
use crate::stripe::catalog::{self, Interval};

#[derive(Deserialize)]
pub struct Window {
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

fn time(given: Option<&str>, field: &str) -> Result<Option<DateTime<Utc>>, AdminError> {
    given
        .map(|s| {
            parse_time(s).ok_or_else(|| {
                AdminError::BadRequest(format!(
                    "{field} {s:?} is not a date (2026-11-01) or an RFC 3339 time"
                ))
            })
        })
        .transpose()
}

/// Integer division rounding half up (amounts are never negative here).
fn div_round(n: i64, d: i64) -> i64 {
    if d == 0 {
        0
    } else {
        (n + d / 2) / d
    }
}

#[derive(Default)]
struct Currency {
    monthly_by_tier: BTreeMap<String, i64>,
    yearly_by_tier: BTreeMap<String, i64>,
    subscribers_by_tier: BTreeMap<String, i64>,
    subscription_revenue: i64,
    pack_gross: i64,
    pack_refunded: i64,
    packs_sold: i64,
    paying_accounts: i64,
}

#[utoipa::path(
    get,
    path = "/v1/reports/revenue",
    tag = "billing",
    operation_id = "getRevenueReport",
    summary = "Revenue figures from what the Stripe webhooks recorded, per currency",
    description = "Computed from Postgres, never from Stripe's API; amounts are integer cents. \
        Unknown query parameters are ignored.",
    params(
        ("from" = Option<TimeParam>, Query, description = "Start of the window (inclusive). \
            Default `to` − 30 days."),
        ("to" = Option<TimeParam>, Query, description = "End of the window (exclusive) and the \
            instant MRR is measured at. Default now."),
    ),
    responses(
        (status = 200, description = "The report.", body = super::schemas::RevenueReport),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = StoreUnavailable),
    )
)]
pub async fn revenue(
    State(state): State<Arc<AppState>>,
    Query(w): Query<Window>,
) -> Result<Json<Value>, AdminError> {
    let to = time(w.to.as_deref(), "to")?.unwrap_or_else(Utc::now);
    let from = time(w.from.as_deref(), "from")?.unwrap_or(to - Duration::days(30));
    if from > to {
        return Err(AdminError::BadRequest("from must not be after to".into()));
    }
    let config = state.config();
    let mut by_currency: BTreeMap<String, Currency> = BTreeMap::new();

    // Subscriptions live at `to`.
    // (tier, interval, currency, amount per interval, subscriptions)
    type Live = (String, String, Option<String>, Option<i64>, i64);
    let live: Vec<Live> = sqlx::query_as(
        "SELECT tier, billing_interval, currency, amount_cents, count(*)
           FROM subscriptions
          WHERE created_at <= $1 AND (canceled_at IS NULL OR canceled_at > $1)
            AND status IN ('active', 'trialing', 'past_due')
          GROUP BY 1, 2, 3, 4",
    )
    .bind(to)
    .fetch_all(&state.pg)
    .await?;
    for (tier, interval, currency, amount, count) in live {
        let interval = Interval::parse(&interval).unwrap_or(Interval::Month);
        let listed = config.tier(&tier).map(|t| catalog::tier_price(t, interval));
        let amount = amount
            .or_else(|| {
                listed
                    .as_ref()
                    .and_then(|p| p.amount_cents)
                    .and_then(|c| i64::try_from(c).ok())
            })
            .unwrap_or(0);
        let currency = currency
            .or_else(|| listed.map(|p| p.currency))
            .unwrap_or_else(|| "usd".into());
        let c = by_currency.entry(currency).or_default();
        let bucket = match interval {
            Interval::Month => &mut c.monthly_by_tier,
            Interval::Year => &mut c.yearly_by_tier,
        };
        *bucket.entry(tier.clone()).or_default() += amount.saturating_mul(count);
        *c.subscribers_by_tier.entry(tier).or_default() += count;
    }
    let active_subscribers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT account_id) FROM subscriptions
          WHERE created_at <= $1 AND (canceled_at IS NULL OR canceled_at > $1)
            AND status IN ('active', 'trialing', 'past_due')",
    )
    .bind(to)
    .fetch_one(&state.pg)
    .await?;

    let subscribers_over_time = subscribers_over_time(&state, to).await?;

    // Money received in the window.
    let invoices: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, COALESCE(sum(amount_cents), 0)::BIGINT FROM invoices
          WHERE outcome = 'paid' AND created_at >= $1 AND created_at < $2 GROUP BY 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&state.pg)
    .await?;
    for (currency, sum) in invoices {
        by_currency
            .entry(currency)
            .or_default()
            .subscription_revenue = sum;
    }
    let packs: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT currency, count(*), COALESCE(sum(amount_cents), 0)::BIGINT,
                COALESCE(sum(LEAST(refunded_cents, amount_cents)), 0)::BIGINT
           FROM purchases WHERE created_at >= $1 AND created_at < $2 GROUP BY 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&state.pg)
    .await?;
    for (currency, sold, gross, refunded) in packs {
        let c = by_currency.entry(currency).or_default();
        c.packs_sold = sold;
        c.pack_gross = gross;
        c.pack_refunded = refunded;
    }
    let payers: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, count(DISTINCT account_id) FROM (
             SELECT currency, account_id FROM invoices
              WHERE outcome = 'paid' AND amount_cents > 0 AND created_at >= $1 AND created_at < $2
             UNION
             SELECT currency, account_id FROM purchases WHERE created_at >= $1 AND created_at < $2
         ) p GROUP BY 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&state.pg)
    .await?;
    for (currency, n) in payers {
        by_currency.entry(currency).or_default().paying_accounts = n;
    }

    let currencies: Vec<Value> = by_currency
        .into_iter()
        .map(|(currency, c)| {
            let tiers: std::collections::BTreeSet<&String> = c
                .monthly_by_tier
                .keys()
                .chain(c.yearly_by_tier.keys())
                .collect();
            let mrr_by_tier: BTreeMap<&String, i64> = tiers
                .into_iter()
                .map(|t| {
                    let monthly = c.monthly_by_tier.get(t).copied().unwrap_or(0);
                    let yearly = c.yearly_by_tier.get(t).copied().unwrap_or(0);
                    (t, monthly + div_round(yearly, 12))
                })
                .collect();
            let mrr: i64 = mrr_by_tier.values().sum();
            let net_packs = c.pack_gross - c.pack_refunded;
            let revenue = c.subscription_revenue + net_packs;
            json!({
                "currency": currency,
                "mrr_cents": mrr,
                "mrr_by_tier": mrr_by_tier,
                "subscribers_by_tier": c.subscribers_by_tier,
                "subscription_revenue_cents": c.subscription_revenue,
                "pack_revenue_cents": {
                    "gross": c.pack_gross,
                    "refunded": c.pack_refunded,
                    "net": net_packs,
                },
                "packs_sold": c.packs_sold,
                "paying_accounts": c.paying_accounts,
                "arpu_cents": div_round(revenue, c.paying_accounts),
            })
        })
        .collect();
    Ok(Json(json!({
        "from": from,
        "to": to,
        "active_subscribers": active_subscribers,
        "subscribers_over_time": subscribers_over_time,
        "currencies": currencies,
    })))
}

/// Points of the subscribers chart: `to` and the 11 month-steps before it.
const SERIES_POINTS: u32 = 12;

/// Accounts subscribed at each point: a subscription created by then and not canceled by then
/// (one that never started — `incomplete*` — does not count). Past points cannot use today's
/// status, so this is what the rows' own dates say.
async fn subscribers_over_time(state: &AppState, to: DateTime<Utc>) -> Result<Value, AdminError> {
    let points: Vec<DateTime<Utc>> = (0..SERIES_POINTS)
        .rev()
        .filter_map(|back| to.checked_sub_months(chrono::Months::new(back)))
        .collect();
    let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT p.at, count(DISTINCT s.account_id)
           FROM unnest($1::timestamptz[]) AS p(at)
           LEFT JOIN subscriptions s
             ON s.created_at <= p.at
            AND s.status NOT IN ('incomplete', 'incomplete_expired')
            AND (s.canceled_at > p.at OR (s.canceled_at IS NULL AND s.status <> 'canceled'))
          GROUP BY p.at ORDER BY p.at",
    )
    .bind(&points)
    .fetch_all(&state.pg)
    .await?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|(at, n)| json!({"at": at, "subscribers": n}))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::div_round;

    #[test]
    fn rounds_half_up() {
        assert_eq!(div_round(4900 * 12, 12), 4900);
        assert_eq!(div_round(10, 12), 1);
        assert_eq!(div_round(5, 12), 0);
        assert_eq!(div_round(6, 12), 1);
        assert_eq!(div_round(7, 0), 0);
    }
}
