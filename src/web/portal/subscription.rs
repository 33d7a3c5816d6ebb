//! Subscribe, change tier (after a confirm page showing Stripe's proration), cancel.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::buy::checkout_redirect;
use super::{origin, signed_in, PREFIX};
use crate::admin::extract::JsonBody;
use crate::state::AppState;
use crate::web::bridge::ClientInfo;
use crate::web::{render, WebError};

#[derive(Deserialize)]
pub(super) struct SubscriptionForm {
    #[serde(default)]
    csrf: String,
    /// `subscribe`, `change` (shows the confirm page), `confirm_change`, `keep` (the confirm
    /// page's Cancel) or `cancel`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    tier: String,
    /// The previewed instant a confirmed change is prorated at.
    #[serde(default)]
    proration_date: Option<i64>,
}

/// Subscribe (Stripe Checkout), change tier (a confirm page with Stripe's proration first) or
/// cancel at period end.
pub(super) async fn subscription(
    State(state): State<Arc<AppState>>,
    info: Option<Extension<ClientInfo>>,
    headers: HeaderMap,
    Form(form): Form<SubscriptionForm>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let message = match form.action.as_str() {
        "subscribe" => {
            let origin = origin(&state.config(), &headers, info.as_deref());
            let Json(session) = crate::admin::billing::checkout_subscription(
                State(Arc::clone(&state)),
                JsonBody(crate::admin::billing::SubscriptionCheckout {
                    account_id: account,
                    tier: form.tier,
                    interval: None,
                    idempotency_key: None,
                    success_url: Some(format!("{origin}{PREFIX}/buy/success")),
                    cancel_url: Some(format!("{origin}{PREFIX}/buy/cancel")),
                }),
            )
            .await?;
            return checkout_redirect(&session);
        }
        "change" => {
            let p = crate::admin::subscription_preview::preview(&state, &account, &form.tier, None)
                .await?;
            return render(
                "portal_change.html",
                minijinja::context! {
                    title => "Change plan", surface => "portal", nav => "buy", csrf => s.csrf,
                    change => confirm_text(&p), tier => p.tier, proration_date => p.proration_date,
                },
            );
        }
        "keep" => return Ok(Redirect::to("/_tollgate/portal/buy").into_response()),
        "confirm_change" => {
            let proration_date = form.proration_date.ok_or_else(|| {
                WebError::BadRequest("this change was not previewed; choose the plan again".into())
            })?;
            let Json(_) = crate::admin::subscription::change_subscription(
                State(Arc::clone(&state)),
                Path(account),
                JsonBody(crate::admin::subscription::SubscriptionChange {
                    tier: form.tier.clone(),
                    interval: None,
                    idempotency_key: None,
                    proration_date: Some(proration_date),
                }),
            )
            .await?;
            format!(
                "Your plan change to {} was sent to Stripe, prorated as shown; it applies as soon as Stripe confirms it.",
                form.tier
            )
        }
        "cancel" => {
            let Json(_) = crate::admin::subscription::cancel_subscription(
                State(Arc::clone(&state)),
                Path(account),
                axum::body::Bytes::new(),
            )
            .await?;
            "Your subscription will end at the end of the current period.".to_string()
        }
        _ => return Err(WebError::BadRequest("unknown subscription action".into())),
    };
    render(
        "message.html",
        minijinja::context! {
            title => "Subscription", surface => "portal", nav => "buy", csrf => s.csrf,
            message => message, back => "/_tollgate/portal/buy",
        },
    )
}

/// The confirm page's sentences, from Stripe's integer amounts.
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub(super) struct ConfirmText {
    /// "you will be charged $X.XX" / "you will be credited $X.XX" / "nothing is prorated".
    proration: String,
    /// What the next invoice asks for.
    next_invoice: String,
}

pub(super) fn confirm_text(p: &crate::admin::subscription_preview::Preview) -> ConfirmText {
    let amount = crate::web::currency::show_minor(p.proration_minor, &p.currency);
    let proration = match p.proration_minor.signum() {
        1 => format!("you will be charged {amount} for the rest of this period (proration)"),
        -1 => {
            format!("you will be credited {amount} for the unused part of this period (proration)")
        }
        _ => "nothing is prorated for this period".to_string(),
    };
    ConfirmText {
        proration,
        next_invoice: crate::web::currency::show_minor(p.amount_due_minor, &p.currency),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::subscription_preview::Preview;

    fn preview(proration_minor: i64, amount_due_minor: i64) -> Preview {
        Preview {
            tier: "team".into(),
            currency: "usd".into(),
            proration_minor,
            amount_due_minor,
            proration_date: 1_800_000_000,
        }
    }

    #[test]
    fn the_confirm_page_words_a_charge_and_a_credit() {
        let up = confirm_text(&preview(10_000, 29_900));
        assert_eq!(
            up.proration,
            "you will be charged $100.00 for the rest of this period (proration)"
        );
        assert_eq!(up.next_invoice, "$299.00");
        let down = confirm_text(&preview(-9_950, 0));
        assert_eq!(
            down.proration,
            "you will be credited $99.50 for the unused part of this period (proration)"
        );
        assert_eq!(down.next_invoice, "$0.00");
        assert_eq!(
            confirm_text(&preview(0, 4_900)).proration,
            "nothing is prorated for this period"
        );
    }
}
