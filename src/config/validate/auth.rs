//! `[auth]`: key cache TTL and JWT verification (HS256 secret, PEM key or JWKS).

use super::*;

/// `[auth]`: the key cache TTL and `[auth.jwt]`.
pub(super) fn auth(
    raw: &raw::Config,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> AuthConfig {
    // [auth]
    if !(1..=3600).contains(&raw.auth.key_cache_ttl_seconds) {
        p.add("auth.key_cache_ttl_seconds", "must be between 1 and 3600");
    }
    let jwt = raw
        .auth
        .jwt
        .as_ref()
        .map(|j| validate_jwt(j, path, env, missing, p));
    AuthConfig {
        key_cache_ttl: Duration::from_secs(raw.auth.key_cache_ttl_seconds),
        jwt,
    }
}

fn validate_jwt(
    j: &raw::Jwt,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    p: &mut Problems,
) -> JwtConfig {
    use jsonwebtoken::Algorithm;
    let mut algorithms = Vec::new();
    for (i, a) in j.algorithms.iter().enumerate() {
        match a.as_str() {
            "HS256" => algorithms.push(Algorithm::HS256),
            "RS256" => algorithms.push(Algorithm::RS256),
            "ES256" => algorithms.push(Algorithm::ES256),
            other => p.add(
                format!("auth.jwt.algorithms[{i}]"),
                format!("{other:?} is not supported (HS256, RS256, ES256)"),
            ),
        }
    }
    if j.algorithms.is_empty() {
        p.add("auth.jwt.algorithms", "list at least one algorithm");
    }
    let wants_hmac = algorithms.contains(&Algorithm::HS256);
    let wants_public = algorithms
        .iter()
        .any(|a| matches!(a, Algorithm::RS256 | Algorithm::ES256));
    let hmac_secret = match (&j.secret_env, wants_hmac) {
        (Some(name), true) => {
            secret(name, "auth.jwt.secret_env", env, missing).map(String::into_bytes)
        }
        (None, true) => {
            p.add("auth.jwt.secret_env", "HS256 needs a secret");
            None
        }
        (Some(_), false) => {
            p.add("auth.jwt.secret_env", "only used with HS256");
            None
        }
        (None, false) => None,
    };
    let jwks = validate_jwks(j, wants_public, p);
    let public_key_pem = match (&j.public_key_file, &j.public_key_env, wants_public) {
        (None, None, true) if jwks.is_some() => None,
        (Some(_), _, true) | (_, Some(_), true) if j.jwks_url.is_some() => {
            p.add(
                "auth.jwt.jwks_url",
                "set either jwks_url or a public key (public_key_file / public_key_env), not both",
            );
            None
        }
        (Some(file), None, true) => {
            let file_path = path.parent().unwrap_or(Path::new(".")).join(file);
            match std::fs::read(&file_path) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    p.add(
                        "auth.jwt.public_key_file",
                        format!("cannot read {}: {e}", file_path.display()),
                    );
                    None
                }
            }
        }
        (None, Some(name), true) => {
            secret(name, "auth.jwt.public_key_env", env, missing).map(String::into_bytes)
        }
        (Some(_), Some(_), _) => {
            p.add(
                "auth.jwt",
                "set either public_key_file or public_key_env, not both",
            );
            None
        }
        (None, None, true) => {
            p.add(
                "auth.jwt.public_key_file",
                "RS256/ES256 need a public key (file or env)",
            );
            None
        }
        (_, _, false) => {
            if j.public_key_file.is_some() || j.public_key_env.is_some() {
                p.add("auth.jwt", "a public key is only used with RS256/ES256");
            }
            None
        }
    };
    if let Some(pem) = &public_key_pem {
        for alg in &algorithms {
            let ok = match alg {
                Algorithm::RS256 => jsonwebtoken::DecodingKey::from_rsa_pem(pem).is_ok(),
                Algorithm::ES256 => jsonwebtoken::DecodingKey::from_ec_pem(pem).is_ok(),
                _ => true,
            };
            if !ok {
                p.add(
                    "auth.jwt",
                    format!("the public key is not a valid PEM key for {alg:?}"),
                );
            }
        }
    }
    if j.account_claim.is_empty() {
        p.add("auth.jwt.account_claim", "must not be empty");
    }
    JwtConfig {
        algorithms,
        secret: hmac_secret,
        public_key_pem,
        account_claim: j.account_claim.clone(),
        issuer: j.issuer.clone(),
        audience: j.audience.clone(),
        leeway_seconds: j.leeway_seconds,
        jwks,
    }
}

/// `jwks_url` and its timings: an http(s) URL, only with RS256/ES256.
fn validate_jwks(j: &raw::Jwt, wants_public: bool, p: &mut Problems) -> Option<JwksConfig> {
    let url = j.jwks_url.as_ref()?;
    let mut ok = true;
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
        Ok(_) => {
            p.add("auth.jwt.jwks_url", "must be an http:// or https:// URL");
            ok = false;
        }
        Err(e) => {
            p.add("auth.jwt.jwks_url", format!("not a URL: {e}"));
            ok = false;
        }
    }
    if !wants_public {
        p.add(
            "auth.jwt.jwks_url",
            "a JWKS only serves RS256/ES256 keys: list one of them in algorithms",
        );
        ok = false;
    }
    if !(1..=86_400).contains(&j.jwks_refresh_seconds) {
        p.add(
            "auth.jwt.jwks_refresh_seconds",
            "must be 1 to 86400 seconds",
        );
        ok = false;
    }
    if !(1..=3_600).contains(&j.jwks_min_refetch_seconds) {
        p.add(
            "auth.jwt.jwks_min_refetch_seconds",
            "must be 1 to 3600 seconds",
        );
        ok = false;
    }
    ok.then(|| JwksConfig {
        url: url.clone(),
        refresh: Duration::from_secs(j.jwks_refresh_seconds),
        min_refetch: Duration::from_secs(j.jwks_min_refetch_seconds),
    })
}
