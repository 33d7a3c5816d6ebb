//! The overview: the balance, its burn rate, the plan's limits, and the live JSON `app.js` polls.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use super::signed_in;
use crate::config::MonthlyCredits;
use crate::money::Credits;
use crate::state::AppState;
use crate::web::{render, show_time, WebError};

/// The balance as the overview shows it, also its live JSON.
#[derive(Serialize)]
pub(super) struct Live {
    pub(super) account_id: String,
    pub(super) tier: String,
    pub(super) status: String,
    pub(super) total: String,
    pub(super) allowance: String,
    pub(super) purchased: String,
    pub(super) unlimited: bool,
    pub(super) low_balance: bool,
    pub(super) low_balance_threshold: Option<String>,
    pub(super) period_end: String,
    /// Credits spent per hour over the last 24 hours.
    pub(super) burn_per_hour: String,
    /// How long the balance lasts at that rate.
    pub(super) time_left: String,
}

/// Hours of recent usage the burn rate is measured over.
pub(super) const BURN_WINDOW_HOURS: i64 = 24;

pub(super) async fn live_numbers(state: &AppState, account: &str) -> Result<Live, WebError> {
    let config = state.config();
    let live = crate::domain::accounts::live_state(state, &config, account)
        .await?
        .ok_or_else(|| WebError::NotFound("this account no longer exists".into()))?;
    let tier = config.tier(&live.tier);
    let threshold = tier.and_then(|t| t.low_balance_credits());
    let unlimited = tier.is_some_and(|t| t.monthly_credits() == MonthlyCredits::Unlimited);
    let total = live.total();
    // Spending over the window, from the journal (Postgres); without it the rate is unknown.
    let now = Utc::now();
    let spent = crate::journal::usage::usage(
        &state.pg,
        account,
        now - chrono::Duration::hours(BURN_WINDOW_HOURS),
        now,
        None,
    )
    .await
    .map_err(|e| tracing::warn!(error = %e, "burn rate: the journal is not readable"))
    .ok()
    .map(|rows| {
        rows.into_iter()
            .next()
            .map_or(Credits::ZERO, |(_, t)| t.credits)
    });
    let (burn, left) = match spent {
        None => ("unknown".to_string(), "unknown".to_string()),
        Some(spent) => burn_and_time_left(spent, total, unlimited),
    };
    Ok(Live {
        account_id: account.to_string(),
        tier: live.tier.clone(),
        status: live.status.clone(),
        total: total.to_string(),
        allowance: live.allowance.to_string(),
        purchased: live.purchased.to_string(),
        unlimited,
        low_balance: threshold.is_some_and(|t| total < t),
        low_balance_threshold: threshold.map(|t| t.to_string()),
        period_end: show_time(live.period_end),
        burn_per_hour: burn,
        time_left: left,
    })
}

/// Burn rate per hour (credits, exact to the micro-credit, rounded down) and the time the
/// balance lasts at it, from what was spent over [`BURN_WINDOW_HOURS`].
pub(super) fn burn_and_time_left(
    spent: Credits,
    total: Credits,
    unlimited: bool,
) -> (String, String) {
    let per_hour = Credits::from_micros(spent.micros().max(0) / BURN_WINDOW_HOURS);
    if unlimited {
        return (per_hour.to_string(), "unlimited plan".into());
    }
    if per_hour.micros() == 0 {
        return (per_hour.to_string(), "no recent usage".into());
    }
    let hours = total.micros().max(0) / per_hour.micros();
    let left = if hours >= 48 {
        format!("about {} days", hours / 24)
    } else if hours >= 1 {
        format!("about {hours} hours")
    } else {
        "less than an hour".into()
    };
    (per_hour.to_string(), left)
}

pub(super) async fn overview(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    let live = live_numbers(&state, &account).await?;
    let limits = plan_limits(&state, &account, &live.tier).await?;
    render(
        "portal_overview.html",
        minijinja::context! {
            title => "Overview", surface => "portal", nav => "overview",
            csrf => s.csrf, live => live, limits => limits,
        },
    )
}

/// The live balance as JSON, polled by `app.js` on the overview.
pub(super) async fn live(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let json_error = |e: WebError| {
        (
            e.status(),
            Json(json!({"error": e.code(), "message": e.to_string()})),
        )
            .into_response()
    };
    let (_, account) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(WebError::NotSignedIn(_)) => {
            return Err((
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "not_signed_in", "message": "please sign in"})),
            )
                .into_response())
        }
        Err(e) => return Err(json_error(e)),
    };
    let live = live_numbers(&state, &account).await.map_err(json_error)?;
    Ok(Json(live).into_response())
}

/// One counted plan limit as a progress bar.
#[derive(Serialize)]
pub(super) struct Limit {
    name: String,
    used: i64,
    limit: u64,
    /// 0–100, for the bar's width.
    percent: u64,
}

pub(super) async fn plan_limits(
    state: &AppState,
    account: &str,
    tier: &str,
) -> Result<Vec<Limit>, WebError> {
    let config = state.config();
    let Some(tier) = config.tier(tier) else {
        return Ok(Vec::new());
    };
    let mut conn = state.redis.clone();
    let counters = state.ledger.counters(&mut conn, account).await?;
    let mut out = Vec::new();
    let mut push = |name: String, used: i64, limit: u64| {
        // A limit of 0 is full from the start.
        let percent = u64::try_from(used.max(0))
            .unwrap_or(0)
            .saturating_mul(100)
            .checked_div(limit)
            .map_or(100, |p| p.min(100));
        out.push(Limit {
            name,
            used,
            limit,
            percent,
        });
    };
    if let Some(limit) = tier.requests_per_month() {
        push("Requests this period".into(), counters.requests, limit);
    }
    if let Some(limit) = tier.tokens_per_month() {
        push("Tokens this period".into(), counters.tokens, limit);
    }
    for (resource, limit) in tier.limits() {
        let used = counters.resources.get(resource).copied().unwrap_or(0);
        push(resource.clone(), used, *limit);
    }
    if let Some(limit) = tier.max_keys() {
        let keys = crate::store::keys::list_for_account(&state.pg, account)
            .await
            .map(|k| k.iter().filter(|k| k.revoked_at.is_none()).count())
            .unwrap_or(0);
        push(
            "API keys (seats)".into(),
            i64::try_from(keys).unwrap_or(i64::MAX),
            u64::from(limit),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Credits {
        Credits::parse(s).unwrap_or(Credits::ZERO)
    }

    #[test]
    fn burn_rate_and_time_left() {
        // 48 credits over 24 h: 2/h; 100 credits last 50 h.
        assert_eq!(
            burn_and_time_left(c("48"), c("100"), false),
            ("2".to_string(), "about 2 days".to_string())
        );
        assert_eq!(
            burn_and_time_left(c("48"), c("10"), false),
            ("2".to_string(), "about 5 hours".to_string())
        );
        assert_eq!(
            burn_and_time_left(c("0"), c("10"), false).1,
            "no recent usage"
        );
        assert_eq!(
            burn_and_time_left(c("48"), c("1"), false).1,
            "less than an hour"
        );
        assert_eq!(
            burn_and_time_left(c("48"), c("1"), true).1,
            "unlimited plan"
        );
    }
}
