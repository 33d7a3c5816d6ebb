//! The access log (`[telemetry] access_log = true`): one line per request, written when the
//! request ends (Pingora's `logging` phase), in the configured log format.
//!
//! It is a `tracing` event with its own target, [`TARGET`], so it goes where the other logs
//! go (stderr, text or JSON), a log pipeline can pick it out by target, and it is enabled by
//! the config whatever `RUST_LOG` says about the rest.

use std::sync::atomic::{AtomicBool, Ordering};

/// The `target` of access-log events.
pub const TARGET: &str = "tollgate::access";

static ENABLED: AtomicBool = AtomicBool::new(false);

pub(super) fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether `serve` was started with `access_log = true`; off, a request pays one atomic load.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One finished request, as the access log reports it.
#[derive(Debug)]
pub struct AccessRecord<'a> {
    pub method: &'a str,
    /// The path without the query string (a query may carry secrets).
    pub path: &'a str,
    /// Status sent to the client; 0 when none was (the client went away first).
    pub status: u16,
    /// Empty on public routes and on refusals before the caller was known.
    pub account: &'a str,
    /// What the request cost in the end, in micro-credits (0 when refunded or free).
    pub charged_micros: i64,
    pub duration_us: u64,
    pub request_id: &'a str,
    pub route: &'a str,
    pub outcome: &'a str,
}

/// Writes the line.
pub fn log(r: &AccessRecord<'_>) {
    tracing::info!(
        target: TARGET,
        method = r.method,
        path = r.path,
        status = r.status,
        account = r.account,
        charged = r.charged_micros,
        duration_ms = r.duration_us as f64 / 1000.0,
        request_id = r.request_id,
        route = r.route,
        outcome = r.outcome,
        "access"
    );
}
