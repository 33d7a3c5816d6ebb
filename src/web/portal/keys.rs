//! The account's API keys: list (with last use), create within the seats, revoke.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::entry::CsrfOnly;
use super::signed_in;
use crate::state::AppState;
use crate::web::session::Session;
use crate::web::WebError;

pub(super) async fn keys_view(
    state: &AppState,
    s: &Session,
    account: &str,
    created: Option<Value>,
    error: Option<String>,
) -> Result<Response, WebError> {
    let config = state.config();
    let keys = crate::store::keys::list_for_account(&state.pg, account).await?;
    let used = crate::web::keys_last_used(state, account).await;
    let live: Vec<Value> = keys
        .iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| {
            json!({
                "id": k.id, "name": k.name, "prefix": k.prefix,
                "created": k.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
                "last_used": used.get(&k.id).map(|at| crate::web::show_time(*at)),
            })
        })
        .collect();
    let tier = crate::store::accounts::get(&state.pg, account)
        .await?
        .map(|a| a.tier)
        .unwrap_or_default();
    let seats = config.tier(&tier).and_then(|t| t.max_keys());
    let status = if error.is_some() {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    crate::web::render_status(
        status,
        "portal_keys.html",
        minijinja::context! {
            title => "API keys", surface => "portal", nav => "keys", csrf => s.csrf,
            keys => live, seats => seats, created => created, error => error,
        },
    )
}

pub(super) async fn keys_page(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    keys_view(&state, &s, &account, None, None).await
}

#[derive(Deserialize)]
pub(super) struct NewKeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// Creates a key (within the tier's seats) and shows it once, on this response only.
pub(super) async fn create_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<NewKeyForm>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    let name = form.name.trim();
    let name = (!name.is_empty()).then(|| name.to_string());
    match crate::domain::keys::create(&state, &account, name).await {
        Ok(created) => {
            let created = serde_json::to_value(&created)
                .map_err(|e| WebError::Template(format!("the new key: {e}")))?;
            keys_view(&state, &s, &account, Some(created), None).await
        }
        Err(e @ crate::domain::DomainError::SeatLimit { .. })
        | Err(e @ crate::domain::DomainError::Invalid(_)) => {
            keys_view(&state, &s, &account, None, Some(e.to_string())).await
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn revoke_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, WebError> {
    let (s, account) = signed_in(&state, &headers).await?;
    s.check_csrf(&form.csrf)?;
    // Only this account's keys: another account's key id is "not found" here.
    let owned = crate::store::keys::find_by_id(&state.pg, &key_id)
        .await?
        .is_some_and(|(owner, _, _)| owner == account);
    if !owned {
        return Err(WebError::NotFound("no such key on this account".into()));
    }
    crate::domain::keys::revoke(&state, &key_id).await?;
    Ok(Redirect::to("/_tollgate/portal/keys").into_response())
}
