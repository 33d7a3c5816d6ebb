//! Phase 2 — who is calling. Reads `Authorization: Bearer …` or `X-Api-Key: …`; a `tg_` key is
//! resolved through the in-process cache, then Redis, then Postgres, anything JWT-shaped is verified when JWT is enabled.
//! The reason for a refusal is logged, never the credential.

use pingora::proxy::Session;

use crate::auth::jwt::JwtVerifier;
use crate::auth::{AuthError, Identity};
use crate::error::GatewayError;
use crate::state::{AppState, Snapshot};

/// Which header carried the credential, so it can be removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    Authorization,
    ApiKey,
}

impl CredentialHeader {
    pub fn name(self) -> &'static str {
        match self {
            CredentialHeader::Authorization => "authorization",
            CredentialHeader::ApiKey => "x-api-key",
        }
    }
}

/// The presented credential, if any.
pub fn credential(session: &Session) -> Option<(CredentialHeader, String)> {
    let req = session.req_header();
    if let Some(v) = req.headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some((CredentialHeader::ApiKey, v.to_string()));
        }
    }
    let auth = req.headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then(|| (CredentialHeader::Authorization, token.to_string()))
}

/// Resolves the caller or says which 401/503 to answer.
pub async fn authenticate(
    state: &AppState,
    snap: &Snapshot,
    session: &Session,
) -> Result<(Identity, CredentialHeader), GatewayError> {
    let Some((header, token)) = credential(session) else {
        state
            .metrics
            .auth_failures
            .with_label_values(&["missing"])
            .inc();
        return Err(GatewayError::MissingCredentials);
    };
    let index = crate::auth::redis_keys::KeyIndex::new(
        &snap.config.redis.key_prefix,
        snap.config.redis.shards,
    );
    let result = if crate::auth::keys::looks_like_key(&token) {
        let mut redis = state.redis.clone();
        state
            .caches
            .resolve_key(&state.pg, &mut redis, &index, &token)
            .await
    } else if let (Some(jwt), true) = (&snap.jwt, JwtVerifier::looks_like_jwt(&token)) {
        match jwt.verify(&token).await {
            Ok(account) => {
                let mut redis = state.redis.clone();
                state
                    .caches
                    .resolve_account(&state.pg, &mut redis, &index, &account)
                    .await
            }
            Err(crate::auth::jwt::JwtError::KeysUnavailable) => {
                state
                    .metrics
                    .auth_failures
                    .with_label_values(&["store_unavailable"])
                    .inc();
                return Err(GatewayError::AuthKeysUnavailable);
            }
            Err(e) => Err(AuthError::Invalid(e.to_string())),
        }
    } else {
        Err(AuthError::Invalid(
            "credential is neither a tollgate key nor an accepted JWT".into(),
        ))
    };
    match result {
        Ok(identity) => {
            if let Some(key_id) = &identity.key_id {
                state.web.key_usage.record(&identity.account_id, key_id);
            }
            Ok((identity, header))
        }
        Err(AuthError::Store(e)) => {
            tracing::error!(error = %e, "credential lookup failed");
            state
                .metrics
                .auth_failures
                .with_label_values(&["store_unavailable"])
                .inc();
            Err(GatewayError::MeteringUnavailable)
        }
        Err(e) => {
            tracing::info!(reason = %e, "authentication refused");
            state
                .metrics
                .auth_failures
                .with_label_values(&["invalid"])
                .inc();
            Err(GatewayError::InvalidCredentials)
        }
    }
}
