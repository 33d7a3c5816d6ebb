//! The browser surfaces: the customer portal (on the proxy listener, under
//! `/_tollgate/portal/`) and the operator console (on the admin listener, under `/console/`).
//!
//! Both are server-rendered: templates compiled into the binary (`include_str!`) and rendered
//! by minijinja with HTML auto-escaping, one stylesheet and one small script embedded as
//! assets, nothing fetched from elsewhere at run time. Every core action is a plain form, so
//! the pages work without JavaScript; the script only refreshes the live balance. Handlers
//! call the same functions as the admin and self-service APIs (no second implementation of a
//! rule): they translate forms to those calls and their answers to pages.

pub mod assets;
pub mod bridge;
pub mod console;
pub mod currency;
pub mod portal;
pub mod session;
pub mod svg;

use std::sync::{Arc, LazyLock};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Serialize;

use crate::admin::error::AdminError;
use crate::state::AppState;

/// Lives beside `AppState` (which holds it), so the state does not depend on the web layer.
pub use crate::state::WebState;

/// The templates, parsed once. A template that does not parse is a build defect, caught by
/// the unit test below; at run time it is logged and its pages answer 500.
static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    for (name, source) in TEMPLATE_SOURCES {
        if let Err(e) = env.add_template(name, source) {
            tracing::error!(template = name, error = %e, "template does not parse");
        }
    }
    env
});

const TEMPLATE_SOURCES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("message.html", include_str!("templates/message.html")),
    (
        "portal_limits.html",
        include_str!("templates/portal_limits.html"),
    ),
    (
        "portal_signin.html",
        include_str!("templates/portal_signin.html"),
    ),
    (
        "portal_overview.html",
        include_str!("templates/portal_overview.html"),
    ),
    (
        "portal_usage.html",
        include_str!("templates/portal_usage.html"),
    ),
    (
        "portal_activity.html",
        include_str!("templates/portal_activity.html"),
    ),
    (
        "portal_keys.html",
        include_str!("templates/portal_keys.html"),
    ),
    ("portal_buy.html", include_str!("templates/portal_buy.html")),
    (
        "portal_change.html",
        include_str!("templates/portal_change.html"),
    ),
    (
        "console_signin.html",
        include_str!("templates/console_signin.html"),
    ),
    (
        "console_accounts.html",
        include_str!("templates/console_accounts.html"),
    ),
    (
        "console_account.html",
        include_str!("templates/console_account.html"),
    ),
    (
        "console_revenue.html",
        include_str!("templates/console_revenue.html"),
    ),
    (
        "console_traffic.html",
        include_str!("templates/console_traffic.html"),
    ),
];

/// Why a page could not be shown. Each variant has one status and one stable code, shown on
/// the error page (and used by tests), never a panic or a stack trace.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// No (or an expired) session: the browser is sent to the surface's sign-in page.
    #[error("please sign in")]
    NotSignedIn(session::Surface),
    /// A state-changing form without this session's CSRF token, or from another origin.
    #[error("this form has expired or did not come from this site; reload the page and try again")]
    Csrf,
    #[error("{0}")]
    Forbidden(String),
    #[error("too many sign-in attempts; wait a minute and try again")]
    RateLimited,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("a backing store is unavailable; try again shortly")]
    Unavailable(String),
    #[error("this page could not be rendered")]
    Template(String),
    /// An error from the admin API's domain functions, shown with its own code and message.
    #[error("{0}")]
    Admin(#[from] AdminError),
}

impl WebError {
    pub fn status(&self) -> StatusCode {
        match self {
            WebError::NotSignedIn(_) => StatusCode::SEE_OTHER,
            WebError::Csrf | WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Template(_) => StatusCode::INTERNAL_SERVER_ERROR,
            WebError::Admin(e) => e.status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            WebError::NotSignedIn(_) => "not_signed_in",
            WebError::Csrf => "csrf_failed",
            WebError::Forbidden(_) => "forbidden",
            WebError::RateLimited => "rate_limited",
            WebError::NotFound(_) => "not_found",
            WebError::BadRequest(_) => "invalid_request",
            WebError::Unavailable(_) => "store_unavailable",
            WebError::Template(_) => "internal_error",
            WebError::Admin(e) => e.code(),
        }
    }
}

impl From<redis::RedisError> for WebError {
    fn from(e: redis::RedisError) -> Self {
        WebError::Unavailable(e.to_string())
    }
}

impl From<sqlx::Error> for WebError {
    fn from(e: sqlx::Error) -> Self {
        WebError::Admin(AdminError::from(e))
    }
}

impl From<crate::domain::DomainError> for WebError {
    fn from(e: crate::domain::DomainError) -> Self {
        WebError::Admin(AdminError::from(e))
    }
}

impl From<crate::stripe::error::StripeCallError> for WebError {
    fn from(e: crate::stripe::error::StripeCallError) -> Self {
        WebError::Admin(AdminError::from(e))
    }
}

impl From<crate::ledger::LedgerError> for WebError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        WebError::Admin(AdminError::from(e))
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if let WebError::NotSignedIn(surface) = self {
            return Redirect::to(surface.signin_path()).into_response();
        }
        match &self {
            WebError::Unavailable(detail) | WebError::Template(detail) => {
                tracing::error!(code = self.code(), %detail, "page failed");
            }
            _ => {}
        }
        let page = ErrorPage {
            status: self.status(),
            code: self.code(),
            message: self.to_string(),
        };
        let mut response = page.render("portal");
        response.extensions_mut().insert(page);
        response
    }
}

/// An error page, kept on the response so [`security_headers`] can re-render it for the
/// console (its stylesheet lives under `/console/`).
#[derive(Debug, Clone)]
struct ErrorPage {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ErrorPage {
    fn render(&self, surface: &str) -> Response {
        let ctx = minijinja::context! {
            title => "Something went wrong",
            surface => surface,
            code => self.code,
            message => &self.message,
        };
        let html = TEMPLATES
            .get_template("message.html")
            .and_then(|t| t.render(ctx))
            .unwrap_or_else(|_| format!("error: {}", self.code));
        let mut response = (self.status, axum::response::Html(html)).into_response();
        if let Ok(code) = HeaderValue::from_str(self.code) {
            response.headers_mut().insert("x-tollgate-error", code);
        }
        response
    }
}

/// Renders a template to a 200 page.
pub fn render(name: &str, ctx: impl Serialize) -> Result<Response, WebError> {
    render_status(StatusCode::OK, name, ctx)
}

pub fn render_status(
    status: StatusCode,
    name: &str,
    ctx: impl Serialize,
) -> Result<Response, WebError> {
    let html = TEMPLATES
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| WebError::Template(format!("{name}: {e}")))?;
    Ok((status, axum::response::Html(html)).into_response())
}

/// Adds the security headers to every page, asset and redirect of both surfaces: a strict
/// Content-Security-Policy (own script and style only, no inline script, no framing), no
/// referrer to other sites (a portal link carries its token in the URL), no caching of
/// account data.
pub async fn security_headers(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let console = req.uri().path().starts_with("/console");
    let mut response = next.run(req).await;
    if console {
        if let Some(page) = response.extensions().get::<ErrorPage>().cloned() {
            response = page.render("console");
        }
    }
    let form_action = form_action(&state);
    let headers = response.headers_mut();
    set(
        headers,
        "content-security-policy",
        &format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
        ),
    );
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "x-frame-options", "DENY");
    // Never a referrer to another site (a portal link carries its token); same-origin keeps
    // the `Origin` header of form posts meaningful (with `no-referrer` Chrome sends "null").
    set(headers, "referrer-policy", "same-origin");
    if !headers.contains_key("cache-control") {
        set(headers, "cache-control", "no-store");
    }
    response
}

/// Forms may go to this site and, through its redirects, to Stripe's Checkout and billing
/// portal (Chrome applies `form-action` to a form's redirects too). With a Stripe stand-in
/// configured (`api_base`), its origin is allowed as well.
fn form_action(state: &AppState) -> String {
    let mut sources = String::from("'self' https://checkout.stripe.com https://billing.stripe.com");
    if let Some(stripe) = state.config().stripe.as_ref() {
        if let Ok(url) = url::Url::parse(&stripe.api_base) {
            let origin = url.origin().ascii_serialization();
            if origin != "https://api.stripe.com" && origin != "null" {
                sources.push(' ');
                sources.push_str(&origin);
            }
        }
    }
    sources
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Refuses a state-changing request whose `Origin` (sent by every current browser on a form
/// POST) names another site: a second line of defence next to the CSRF token, and the only one
/// on the sign-in forms, which have no session yet.
pub fn same_origin(headers: &HeaderMap) -> Result<(), WebError> {
    let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .unwrap_or_default();
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(WebError::Csrf)
    }
}

/// When each of the account's keys was last used (unix seconds; a key never used is absent):
/// what the instances flushed to Redis, raised by this instance's unflushed uses. The portal's
/// and the console's key lists both show it. Redis down: only the unflushed uses.
pub async fn keys_last_used(
    state: &crate::state::AppState,
    account: &str,
) -> std::collections::HashMap<String, i64> {
    let config = state.config();
    let mut conn = state.redis.clone();
    let mut used = crate::auth::last_used::read(
        &mut conn,
        &config.redis.key_prefix,
        config.redis.shards,
        account,
    )
    .await
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "key last-use times not read from redis");
        std::collections::HashMap::new()
    });
    for (key_id, at) in state.web.key_usage.pending_for(account) {
        let e = used.entry(key_id).or_insert(at);
        *e = (*e).max(at);
    }
    used
}

/// A timestamp (Unix seconds) as shown on pages: `2026-12-03 14:05 UTC`.
pub fn show_time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// A JSON money value (a decimal number from the admin functions) as page text.
pub fn show_money(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.clone(),
        _ => "0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let mut env = minijinja::Environment::new();
        for (name, source) in TEMPLATE_SOURCES {
            if let Err(e) = env.add_template(name, source) {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn output_is_escaped() {
        let html = TEMPLATES
            .get_template("message.html")
            .and_then(|t| {
                t.render(minijinja::context! {
                    title => "t", code => "c", message => "<script>alert(1)</script>",
                })
            })
            .unwrap_or_default();
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>alert"), "{html}");
    }

    #[test]
    fn origin_check() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h).is_ok());
        h.insert("origin", HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(same_origin(&h).is_ok());
        h.insert("origin", HeaderValue::from_static("https://evil.example"));
        assert!(matches!(same_origin(&h), Err(WebError::Csrf)));
    }
}
