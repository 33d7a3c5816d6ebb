//! Checks every field and every reference of a parsed config, collecting all problems: one
//! module per section, composed by [`validate`] in file order (the order problems are reported).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::raw;
use super::*;

mod alerts;
mod auth;
mod leases;
mod packs;
mod portal;
mod postgres;
mod redis;
mod routes;
mod server;
mod stripe;
mod telemetry;
mod tiers;
mod upstreams;

/// Collects problems as `field: reason` lines.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: impl std::fmt::Display, reason: impl std::fmt::Display) {
        self.0.push(format!("{field}: {reason}"));
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Replaces `${VAR}` from the environment; a missing variable is reported once per use.
fn substitute(
    value: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
    problems: &mut Problems,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    problems.add(
                        field,
                        format!("${{{name}}} is not a valid variable reference"),
                    );
                } else {
                    match env(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            missing.push(format!("{field}: environment variable {name} is not set"))
                        }
                    }
                }
                rest = &after[end + 1..];
            }
            None => {
                problems.add(field, "unterminated ${ in value");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `${VAR}` names in `value` that the environment does not set.
fn unset_vars(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if !name.is_empty() && env(name).is_none() && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        rest = &after[end + 1..];
    }
    names
}

fn secret(
    env_name: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) -> Option<String> {
    match env(env_name) {
        Some(v) if !v.is_empty() => Some(v),
        _ => {
            missing.push(format!(
                "{field}: environment variable {env_name} is not set"
            ));
            None
        }
    }
}

fn addr(field: &str, value: &str, p: &mut Problems) -> SocketAddr {
    match value.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            p.add(field, format!("{value:?} is not an address (ip:port)"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    }
}

pub(super) fn validate(
    raw: raw::Config,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<String>> {
    let mut p = Problems(Vec::new());
    let mut missing = Vec::new();
    let p = &mut p;
    let m = &mut missing;

    let server = server::server(&raw, path, p);
    let redis = redis::redis(&raw, env, m, p);
    let postgres = postgres::postgres(&raw, env, m, p);
    let admin_token = server::admin(&raw, env, m, p);
    let journal = redis::journal(&raw, p);
    let leases = leases::leases(&raw, p);
    let auth = auth::auth(&raw, path, env, m, p);
    let stripe = stripe::stripe(&raw, env, m, p);
    let alerts = alerts::alerts(&raw, env, m, p);
    let telemetry = telemetry::validate_telemetry(&raw.telemetry, p);
    let portal = portal::portal(&raw, p);
    let upstreams = upstreams::upstreams(&raw, path, env, m, p);
    let tiers = tiers::tiers(&raw, p);
    let routes = routes::routes(&raw, &upstreams, p);
    let credit_packs = packs::packs(&raw, p);

    if !p.0.is_empty() {
        return Err(std::mem::take(&mut p.0));
    }
    Ok(Config {
        source: path.to_path_buf(),
        server,
        redis,
        postgres,
        admin_token,
        admin_token_env: raw.admin.token_env.clone(),
        journal,
        leases,
        auth,
        stripe,
        alerts,
        portal,
        upstreams,
        routes,
        tiers,
        credit_packs,
        telemetry,
        missing_secrets: missing,
    })
}

fn is_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase())
}
