//! The console's revenue page: the admin API's revenue report (MRR, pack revenue, ARPU per
//! currency) with a bar chart of MRR by tier.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};

use super::signed_in;
use crate::state::AppState;
use crate::web::{render, WebError};

pub(super) async fn revenue(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let s = signed_in(&state, &headers).await?;
    let Json(report) = crate::admin::reports::revenue(
        State(Arc::clone(&state)),
        Query(crate::admin::reports::Window {
            from: None,
            to: None,
        }),
    )
    .await?;
    let cents = |v: Option<&Value>| {
        let c = v.and_then(Value::as_i64).unwrap_or(0);
        format!("{}.{:02}", c / 100, (c % 100).abs())
    };
    let currencies: Vec<Value> = report
        .get("currencies")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let by_tier: Vec<(String, f64, String)> = c
                .get("mrr_by_tier")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(t, v)| {
                            let cents = v.as_i64().unwrap_or(0);
                            (t.clone(), cents as f64, cents.to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "currency": c.get("currency"),
                "figures": [
                    {"name": "MRR", "value": cents(c.get("mrr_cents"))},
                    {"name": "Subscription revenue", "value": cents(c.get("subscription_revenue_cents"))},
                    {"name": "Pack revenue (net)", "value": cents(c.pointer("/pack_revenue_cents/net"))},
                    {"name": "Packs sold", "value": c.get("packs_sold")},
                    {"name": "Paying accounts", "value": c.get("paying_accounts")},
                    {"name": "ARPU", "value": cents(c.get("arpu_cents"))},
                    {"name": "Subscribers by tier", "value": c.get("subscribers_by_tier").map(Value::to_string)},
                ],
                "bars": crate::web::svg::bars(&by_tier),
            })
        })
        .collect();
    let subscribers: Vec<(String, f64, String)> = report
        .get("subscribers_over_time")
        .and_then(Value::as_array)
        .map(|points| {
            points
                .iter()
                .map(|p| {
                    let month = p
                        .get("at")
                        .and_then(Value::as_str)
                        .and_then(|at| at.get(..7))
                        .unwrap_or_default()
                        .to_string();
                    let n = p.get("subscribers").and_then(Value::as_i64).unwrap_or(0);
                    (month, n as f64, n.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    render(
        "console_revenue.html",
        minijinja::context! {
            title => "Revenue", surface => "console", nav => "revenue", csrf => s.csrf,
            currencies => currencies,
            subscriber_bars => crate::web::svg::bars(&subscribers),
            chart_width => crate::web::svg::WIDTH, chart_height => crate::web::svg::HEIGHT,
        },
    )
}
