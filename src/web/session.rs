//! Browser sessions and single-use portal links, kept in Redis (the proxy serves the portal
//! without Postgres, like the rest of its data plane). Only a SHA-256 of a session id or link
//! token is stored, so a read of Redis does not yield a usable cookie or link. Each record is
//! one key (Cluster-safe) and expires by itself.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::WebError;
use crate::domain::portal_links::hashed;
pub use crate::domain::portal_links::random_token;
use crate::state::AppState;

/// Which browser surface a session belongs to; their cookies, keys and sign-in pages differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Portal,
    Console,
}

impl Surface {
    fn name(self) -> &'static str {
        match self {
            Surface::Portal => "portal",
            Surface::Console => "console",
        }
    }

    pub fn cookie_name(self) -> &'static str {
        match self {
            Surface::Portal => "tg_portal",
            Surface::Console => "tg_console",
        }
    }

    fn cookie_path(self) -> &'static str {
        match self {
            Surface::Portal => "/_tollgate/portal/",
            Surface::Console => "/console",
        }
    }

    pub fn signin_path(self) -> &'static str {
        match self {
            Surface::Portal => "/_tollgate/portal/signin",
            Surface::Console => "/console/signin",
        }
    }
}

/// One signed-in browser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The one account a portal session may see; `None` for a console session.
    pub account_id: Option<String>,
    /// Sent back in every state-changing form.
    pub csrf: String,
    #[serde(skip)]
    key: String,
}

impl Session {
    /// Refuses a form whose CSRF token is not this session's (compared in constant time).
    pub fn check_csrf(&self, given: &str) -> Result<(), WebError> {
        if !given.is_empty() && bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(WebError::Csrf)
        }
    }

    /// The portal session's account (a console session has none).
    pub fn account(&self) -> Result<&str, WebError> {
        self.account_id
            .as_deref()
            .ok_or(WebError::NotSignedIn(Surface::Portal))
    }
}

fn session_key(state: &AppState, surface: Surface, sid: &str) -> String {
    format!(
        "{}:web:{}:s:{}",
        state.config().redis.key_prefix,
        surface.name(),
        hashed(sid)
    )
}

/// Starts a session with a fresh id (a sign-in always gets a new id, so an id planted before
/// sign-in is worthless after it). Returns the id for the cookie.
pub async fn start(
    state: &AppState,
    surface: Surface,
    account_id: Option<&str>,
    ttl_seconds: u64,
) -> Result<String, WebError> {
    let sid = random_token();
    let session = Session {
        account_id: account_id.map(str::to_string),
        csrf: random_token(),
        key: String::new(),
    };
    let body = serde_json::to_string(&session).map_err(|e| WebError::Template(e.to_string()))?;
    let mut conn = state.redis.clone();
    let () = conn
        .set_ex(session_key(state, surface, &sid), body, ttl_seconds)
        .await?;
    Ok(sid)
}

/// The session named by the request's cookie, if it exists and has not expired.
pub async fn load(
    state: &AppState,
    surface: Surface,
    headers: &axum::http::HeaderMap,
) -> Result<Option<Session>, WebError> {
    let Some(sid) = cookie(headers, surface.cookie_name()) else {
        return Ok(None);
    };
    let key = session_key(state, surface, &sid);
    let mut conn = state.redis.clone();
    let body: Option<String> = conn.get(&key).await?;
    Ok(body
        .and_then(|b| serde_json::from_str::<Session>(&b).ok())
        .map(|mut s| {
            s.key = key;
            s
        }))
}

/// The signed-in session, or a redirect to sign-in.
pub async fn require(
    state: &AppState,
    surface: Surface,
    headers: &axum::http::HeaderMap,
) -> Result<Session, WebError> {
    load(state, surface, headers)
        .await?
        .ok_or(WebError::NotSignedIn(surface))
}

/// Ends a session (sign-out): its record is deleted, so the cookie stops working everywhere.
pub async fn end(state: &AppState, session: &Session) -> Result<(), WebError> {
    let mut conn = state.redis.clone();
    let () = conn.del(&session.key).await?;
    Ok(())
}

/// `Set-Cookie` for a new session: HttpOnly, SameSite=Lax, `Secure` when served over TLS.
pub fn set_cookie(surface: Surface, sid: &str, ttl_seconds: u64, secure: bool) -> String {
    format!(
        "{}={sid}; Path={}; Max-Age={ttl_seconds}; HttpOnly; SameSite=Lax{}",
        surface.cookie_name(),
        surface.cookie_path(),
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_cookie(surface: Surface, secure: bool) -> String {
    set_cookie(surface, "", 0, secure)
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// Sign-in attempts per client and minute before [`WebError::RateLimited`].
pub const SIGNIN_ATTEMPTS_PER_MINUTE: i64 = 10;

/// Counts a sign-in attempt from `client` (an IP, or one bucket for the admin listener) and
/// refuses beyond [`SIGNIN_ATTEMPTS_PER_MINUTE`]: guessing keys or the admin token through the
/// form is as slow as through the API.
pub async fn count_signin(
    state: &AppState,
    surface: Surface,
    client: &str,
) -> Result<(), WebError> {
    let key = format!(
        "{}:web:{}:signin:{}",
        state.config().redis.key_prefix,
        surface.name(),
        client
    );
    let mut conn = state.redis.clone();
    let (count,): (i64,) = redis::pipe()
        .atomic()
        .incr(&key, 1)
        .expire(&key, 60)
        .ignore()
        .query_async(&mut conn)
        .await?;
    if count > SIGNIN_ATTEMPTS_PER_MINUTE {
        Err(WebError::RateLimited)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_and_flagged() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            axum::http::HeaderValue::from_static("a=1; tg_portal=abc; b=2"),
        );
        assert_eq!(cookie(&h, "tg_portal").as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "tg_console"), None);
        let c = set_cookie(Surface::Portal, "x", 3600, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.ends_with("Secure"));
        assert!(!set_cookie(Surface::Portal, "x", 3600, false).contains("Secure"));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hashed(&a).len(), 64);
        assert_ne!(hashed(&a), a);
    }
}
