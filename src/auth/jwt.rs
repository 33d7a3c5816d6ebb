//! JWT callers: HS256 / RS256 / ES256, with `exp`, `nbf`, `iss` and `aud` checked and the
//! account taken from the configured claim. The token's own `alg` must be one the config lists
//! (no `none`, no algorithm confusion: each family has its own key).

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

use crate::config::JwtConfig;

/// Why a token was refused (logged; the client only sees `invalid_credentials`).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    AlgorithmNotAllowed(Algorithm),
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("claim {0:?} is missing or not a valid account id")]
    NoAccount(String),
}

pub struct JwtVerifier {
    cfg: JwtConfig,
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
}

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig) -> Self {
        let pem = cfg.public_key_pem.as_deref();
        JwtVerifier {
            hmac: cfg.secret.as_deref().map(DecodingKey::from_secret),
            rsa: pem.and_then(|p| DecodingKey::from_rsa_pem(p).ok()),
            ec: pem.and_then(|p| DecodingKey::from_ec_pem(p).ok()),
            cfg: cfg.clone(),
        }
    }

    /// Cheap shape check: three base64url segments.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
    }

    /// Verifies the token and returns the account id it names.
    pub fn verify(&self, token: &str) -> Result<String, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if !self.cfg.algorithms.contains(&header.alg) {
            return Err(JwtError::AlgorithmNotAllowed(header.alg));
        }
        let key = match header.alg {
            Algorithm::HS256 => self.hmac.as_ref(),
            Algorithm::RS256 => self.rsa.as_ref(),
            Algorithm::ES256 => self.ec.as_ref(),
            other => return Err(JwtError::AlgorithmNotAllowed(other)),
        }
        .ok_or(JwtError::AlgorithmNotAllowed(header.alg))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.cfg.leeway_seconds;
        validation.validate_nbf = true;
        // A configured issuer/audience must be present, not merely "not wrong when present":
        // otherwise a token minted for another service with the same key would pass.
        let mut required = vec!["exp"];
        if self.cfg.issuer.is_some() {
            required.push("iss");
        }
        if self.cfg.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match &self.cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = decode::<serde_json::Value>(token, key, &validation)
            .map_err(|e| JwtError::Rejected(e.to_string()))?;
        let claim = &self.cfg.account_claim;
        let account = match data.claims.get(claim) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(JwtError::NoAccount(claim.clone())),
        };
        if !crate::store::accounts::valid_id(&account) {
            return Err(JwtError::NoAccount(claim.clone()));
        }
        Ok(account)
    }
}
