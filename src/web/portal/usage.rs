//! Usage (per day, per route) and the activity list (the account's ledger).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::Utc;
use serde_json::{json, Value};

use super::overview::{live_numbers, plan_limits};
use super::signed_in;
use crate::state::AppState;
use crate::web::{render, show_money, WebError};

pub(super) async fn usage_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    let today = Utc::now().date_naive();
    let from = q
        .get("from")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| (today - chrono::Duration::days(29)).to_string());
    let to_day = q
        .get("to")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| today.to_string());
    // `to` is a day the range includes: the query's end is the next midnight.
    let to = chrono::NaiveDate::parse_from_str(&to_day, "%Y-%m-%d")
        .map_err(|_| WebError::BadRequest("to must be a date (YYYY-MM-DD)".into()))?
        .succ_opt()
        .map(|d| d.to_string())
        .unwrap_or_else(|| to_day.clone());
    let mut params: HashMap<String, String> = HashMap::new();
    params.insert("from".into(), from.clone());
    params.insert("to".into(), to);
    params.insert("group_by".into(), "day".into());
    let by_day = crate::domain::usage::account_usage(&state, &account, &params).await?;
    params.insert("group_by".into(), "route".into());
    let by_route = crate::domain::usage::account_usage(&state, &account, &params).await?;
    params.remove("group_by");
    let totals = crate::domain::usage::account_usage(&state, &account, &params).await?;

    let groups = |v: &Value| -> Vec<Value> {
        v.get("groups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let points: Vec<(String, f64, String)> = groups(&by_day)
        .iter()
        .map(|g| {
            let credits = g.get("credits").cloned().unwrap_or(Value::Null);
            (
                g.get("key")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                credits.as_f64().unwrap_or(0.0),
                show_money(&credits),
            )
        })
        .collect();
    let rows: Vec<Value> = groups(&by_route)
        .iter()
        .map(|g| {
            json!({
                "route": g.get("key").and_then(Value::as_str).filter(|k| !k.is_empty()).unwrap_or("(other)"),
                "requests": g.get("requests").cloned().unwrap_or(json!(0)),
                "credits": show_money(g.get("credits").unwrap_or(&Value::Null)),
                "tokens_in": g.get("tokens_in").cloned().unwrap_or(json!(0)),
                "tokens_out": g.get("tokens_out").cloned().unwrap_or(json!(0)),
            })
        })
        .collect();
    let live = live_numbers(&state, &account).await?;
    let limits = plan_limits(&state, &account, &live.tier).await?;
    render(
        "portal_usage.html",
        minijinja::context! {
            title => "Usage", surface => "portal", nav => "usage", csrf => s.csrf,
            from => from, to => to_day,
            bars => crate::web::svg::bars(&points),
            chart_width => crate::web::svg::WIDTH, chart_height => crate::web::svg::HEIGHT,
            rows => rows,
            total_requests => totals.get("requests").cloned().unwrap_or(json!(0)),
            total_credits => show_money(totals.get("credits").unwrap_or(&Value::Null)),
            limits => limits,
        },
    )
}

/// Ledger entries as the activity tables show them.
pub fn entries_for_page(ledger: &Value) -> Vec<Value> {
    ledger
        .get("entries")
        .and_then(Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    let at = text("created_at");
                    json!({
                        "kind": text("kind"),
                        "amount": show_money(e.get("amount").unwrap_or(&Value::Null)),
                        "balance_after": show_money(e.pointer("/balance_after/total").unwrap_or(&Value::Null)),
                        "request_id": text("request_id"),
                        "route": text("route"),
                        "reason": text("reason"),
                        "at": chrono::DateTime::parse_from_rfc3339(&at)
                            .map(|t| t.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S UTC").to_string())
                            .unwrap_or(at),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(super) async fn activity(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(mut q): Query<HashMap<String, String>>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    q.retain(|k, _| k == "cursor");
    q.insert("limit".into(), "25".into());
    let ledger = crate::domain::usage::history(&state, &account, &q).await?;
    render(
        "portal_activity.html",
        minijinja::context! {
            title => "Activity", surface => "portal", nav => "activity", csrf => s.csrf,
            entries => entries_for_page(&ledger),
            next_cursor => ledger.get("next_cursor").and_then(Value::as_str),
        },
    )
}
