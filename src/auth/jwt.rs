//! JWT callers: HS256 / RS256 / ES256, with `exp`, `nbf`, `iss` and `aud` checked and the
//! account taken from the configured claim. The token's own `alg` must be one the config lists
//! (no `none`, no algorithm confusion: each family has its own key).
//!
//! RS256/ES256 keys come either from the config (one PEM) or from the identity provider's JWKS
//! ([`Jwks`]): fetched in the background, cached, picked by the token's `kid`, fetched again
//! on an unknown `kid` (at most once per `jwks_min_refetch_seconds`) and every
//! `jwks_refresh_seconds`. A JWKS that cannot be reached keeps the cached keys working.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

use crate::config::{JwksConfig, JwtConfig};

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
    #[error("no key in the JWKS for kid {0:?} and {1:?}")]
    UnknownKey(Option<String>, Algorithm),
    /// The JWKS has never been loaded (the identity provider was unreachable since the
    /// start): the token cannot be judged, so it is not called invalid (503, not 401).
    #[error("the JWKS has not been loaded yet")]
    KeysUnavailable,
}

pub struct JwtVerifier {
    cfg: JwtConfig,
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
}

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig) -> Self {
        Self::carried_over(None, cfg)
    }

    /// The verifier for a reloaded config: an unchanged `jwks_url` (and timings) keeps the
    /// keys already fetched, so a reload neither empties the cache nor refetches.
    pub fn carried_over(previous: Option<&JwtVerifier>, cfg: &JwtConfig) -> Self {
        let pem = cfg.public_key_pem.as_deref();
        let jwks = cfg.jwks.as_ref().map(|jc| {
            previous
                .and_then(|p| p.jwks.as_ref())
                .filter(|j| j.cfg == *jc)
                .cloned()
                .unwrap_or_else(|| Arc::new(Jwks::new(jc.clone())))
        });
        JwtVerifier {
            hmac: cfg.secret.as_deref().map(DecodingKey::from_secret),
            rsa: pem.and_then(|p| DecodingKey::from_rsa_pem(p).ok()),
            ec: pem.and_then(|p| DecodingKey::from_ec_pem(p).ok()),
            cfg: cfg.clone(),
            jwks,
        }
    }

    /// The JWKS cache, when the keys come from one (its refresh task is started by
    /// [`Jwks::start`]).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Cheap shape check: three base64url segments.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
    }

    /// Verifies the token and returns the account id it names. Waits for a JWKS fetch only
    /// when the token names a `kid` the cache does not have (and the rate limit allows one).
    pub async fn verify(&self, token: &str) -> Result<String, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if !self.cfg.algorithms.contains(&header.alg) {
            return Err(JwtError::AlgorithmNotAllowed(header.alg));
        }
        let from_jwks;
        let key = match (header.alg, &self.jwks) {
            (Algorithm::HS256, _) => self.hmac.as_ref(),
            (Algorithm::RS256 | Algorithm::ES256, Some(jwks)) => {
                from_jwks = jwks.key(header.kid.as_deref(), header.alg).await?;
                Some(&*from_jwks)
            }
            (Algorithm::RS256, None) => self.rsa.as_ref(),
            (Algorithm::ES256, None) => self.ec.as_ref(),
            (other, _) => return Err(JwtError::AlgorithmNotAllowed(other)),
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

/// How long one JWKS fetch may take (a request waiting on an unknown `kid` waits this long at
/// most).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused (a real one is a few KiB).
const JWKS_MAX_BYTES: usize = 1 << 20;
/// After a failed fetch the background refresh retries this soon (not a full refresh period),
/// but never more often than `min_refetch`.
const JWKS_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The keys of one JWKS document that can verify RS256 or ES256 tokens, by `kid`.
struct KeySet {
    keys: HashMap<Option<String>, (Algorithm, Arc<DecodingKey>)>,
}

/// Why a JWKS fetch failed (logged; cached keys stay in use).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} is larger than {JWKS_MAX_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url} is not a JWKS document: {reason}")]
    Invalid { url: String, reason: String },
}

/// A cached JWKS: the last document that parsed, and when the last fetch was tried.
pub struct Jwks {
    cfg: JwksConfig,
    client: Option<reqwest::Client>,
    /// `None` until the first successful fetch.
    keys: ArcSwapOption<KeySet>,
    /// When the last fetch started; held across the fetch, so concurrent unknown `kid`s wait
    /// for one fetch instead of each starting one.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    started: AtomicBool,
    /// Fetches tried since start (for the log and the tests' reasoning; the tests count hits
    /// on their JWKS server).
    fetches: AtomicU64,
}

impl Jwks {
    fn new(cfg: JwksConfig) -> Self {
        let client = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| tracing::error!(error = %e, "cannot build the JWKS HTTP client"))
            .ok();
        Jwks {
            cfg,
            client,
            keys: ArcSwapOption::empty(),
            last_fetch: tokio::sync::Mutex::new(None),
            started: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
        }
    }

    /// Starts the background refresh (first fetch right away) unless it already runs. The
    /// task holds only a weak reference: it ends once no config uses this JWKS any more.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Jwks> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(jwks) = weak.upgrade() else { return };
                let ok = jwks.refresh(true).await;
                let wait = if ok {
                    jwks.cfg.refresh
                } else {
                    JWKS_RETRY_AFTER_FAILURE
                        .max(jwks.cfg.min_refetch)
                        .min(jwks.cfg.refresh)
                };
                drop(jwks);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// The key for a token's `kid` and algorithm. An unknown `kid` fetches the JWKS again
    /// unless the last fetch is younger than `min_refetch`.
    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<DecodingKey>, JwtError> {
        if let Some(key) = self.lookup(kid, alg) {
            return Ok(key);
        }
        self.refresh(false).await;
        match self.lookup(kid, alg) {
            Some(key) => Ok(key),
            None if self.keys.load().is_none() => Err(JwtError::KeysUnavailable),
            None => Err(JwtError::UnknownKey(kid.map(str::to_string), alg)),
        }
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<DecodingKey>> {
        let set = self.keys.load();
        let set = set.as_ref()?;
        let found = match kid {
            Some(kid) => set.keys.get(&Some(kid.to_string())),
            // No `kid`: only unambiguous when the document has exactly one key.
            None if set.keys.len() == 1 => set.keys.values().next(),
            None => None,
        };
        found
            .filter(|(key_alg, _)| *key_alg == alg)
            .map(|(_, key)| Arc::clone(key))
    }

    /// Fetches the document unless (`periodic` false) the last fetch is too recent. Returns
    /// whether the cache holds a fresh document. A failure keeps the cached keys.
    async fn refresh(&self, periodic: bool) -> bool {
        let mut last = self.last_fetch.lock().await;
        if !periodic && last.is_some_and(|at| at.elapsed() < self.cfg.min_refetch) {
            return false;
        }
        *last = Some(Instant::now());
        let n = self.fetches.fetch_add(1, Ordering::Relaxed) + 1;
        match self.fetch().await {
            Ok(set) => {
                tracing::debug!(url = %self.cfg.url, keys = set.keys.len(), fetch = n, "JWKS loaded");
                self.keys.store(Some(Arc::new(set)));
                true
            }
            Err(e) => {
                if self.keys.load().is_some() {
                    tracing::warn!(error = %e, "JWKS refresh failed; the cached keys stay in use");
                } else {
                    tracing::warn!(error = %e, "JWKS not loaded; RS256/ES256 tokens are answered 503 until it is");
                }
                false
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let url = &self.cfg.url;
        let fail = |reason: String| JwksError::Fetch {
            url: url.clone(),
            reason,
        };
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| fail("no HTTP client".into()))?;
        let mut resp = client
            .get(url)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(JwksError::Status {
                url: url.clone(),
                status: resp.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(JwksError::TooLarge { url: url.clone() });
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body).map_err(|reason| JwksError::Invalid {
            url: url.clone(),
            reason,
        })
    }
}

/// The usable keys of a JWKS document. Keys tollgate cannot or must not use (symmetric `oct`
/// keys, other curves, `use: enc`, unknown types) are skipped, not fatal: providers publish
/// keys for other purposes in the same document.
fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut keys = HashMap::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        // A key that names its algorithm must name this one.
        use jsonwebtoken::jwk::KeyAlgorithm;
        match (jwk.common.key_algorithm, alg) {
            (None, _)
            | (Some(KeyAlgorithm::RS256), Algorithm::RS256)
            | (Some(KeyAlgorithm::ES256), Algorithm::ES256) => {}
            _ => continue,
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.insert(jwk.common.key_id.clone(), (alg, Arc::new(key)));
    }
    Ok(KeySet { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keeps_only_signature_keys_it_can_use() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"h","k":"c2VjcmV0"},
            {"kty":"RSA","kid":"r","use":"sig","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"whatever","kid":"w"}
        ]}"#;
        let set = parse_jwks(doc).unwrap();
        let kids: Vec<_> = set.keys.keys().cloned().collect();
        assert_eq!(kids, vec![Some("r".to_string())]);
        assert_eq!(set.keys[&Some("r".to_string())].0, Algorithm::RS256);
        assert!(parse_jwks(b"{\"nokeys\":1}").is_err());
    }
}
