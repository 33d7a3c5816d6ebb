//! Single-use links into the customer portal (issued by the admin API and the console, used
//! up by the portal). Kept in Redis as a SHA-256 of the token, so a read of Redis does not
//! yield a usable link; each expires by itself.

use base64::Engine;
use chrono::Utc;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use super::DomainError;
use crate::state::AppState;

/// Where the customer portal is served on the proxy listener.
pub const PREFIX: &str = "/_tollgate/portal";

/// 32 random bytes, URL-safe: session ids, CSRF tokens and link tokens.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored in place of a secret token.
pub fn hashed(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn link_key(state: &AppState, token: &str) -> String {
    format!(
        "{}:web:portal:link:{}",
        state.config().redis.key_prefix,
        hashed(token)
    )
}

/// Makes a single-use portal link for an account, valid `[portal] link_ttl_seconds`.
/// Returns the URL and when it expires.
pub async fn issue(
    state: &AppState,
    account_id: &str,
) -> Result<(String, chrono::DateTime<Utc>), DomainError> {
    let config = state.config();
    let ttl = config.portal.link_ttl_seconds;
    let token = random_token();
    let mut conn = state.redis.clone();
    let () = conn
        .set_ex(link_key(state, &token), account_id, ttl)
        .await?;
    let origin = match &config.portal.public_url {
        Some(u) => u.clone(),
        None => state
            .web
            .proxy_origin
            .get()
            .cloned()
            .unwrap_or_else(|| format!("http://{}", config.server.listen)),
    };
    let expires = Utc::now() + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(900));
    Ok((format!("{origin}{PREFIX}/enter?token={token}"), expires))
}

/// Uses up a link: the account it was made for, once (GETDEL: two browsers opening the same
/// link race on one atomic command and only one wins). `None`: unknown, used or expired.
pub async fn consume(state: &AppState, token: &str) -> Result<Option<String>, DomainError> {
    if token.is_empty() || token.len() > 100 {
        return Ok(None);
    }
    let mut conn = state.redis.clone();
    let account: Option<String> = redis::cmd("GETDEL")
        .arg(link_key(state, token))
        .query_async(&mut conn)
        .await?;
    Ok(account)
}
