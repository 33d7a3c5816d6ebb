//! Logging and tracing: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text
//! or JSON lines; with `[telemetry] otlp_endpoint`, one OpenTelemetry trace per request
//! ([`otel`]); with `access_log`, one line per request ([`access`]).
//!
//! Everything here is process-wide (a global subscriber, a global tracer), so `[telemetry]` is
//! read once at start: a reload does not change it.

pub mod access;
pub mod otel;

use tracing_subscriber::filter::Directive;
use tracing_subscriber::EnvFilter;

use crate::config::raw::LogFormat;
use crate::config::TelemetryConfig;

/// The filter when `RUST_LOG` is unset: Pingora and sqlx only speak up when something is wrong.
const DEFAULT_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn,sqlx=warn";

/// Why telemetry could not start (`serve` refuses to start rather than run untraced).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("telemetry.otlp_endpoint: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Text logs, no tracing: every command but `serve`.
pub fn init() {
    install(LogFormat::Text, false);
}

/// `serve`: the configured log format and access log, and the trace exporter when an OTLP
/// endpoint is set. Call it outside the async runtime (the exporter's blocking HTTP client
/// must be built and dropped on plain threads); keep the guard until the process ends, then
/// [`Guard::shutdown`] it so the last spans are sent.
pub fn init_serve(cfg: &TelemetryConfig) -> Result<Guard, TelemetryError> {
    access::set_enabled(cfg.access_log);
    install(cfg.log_format, cfg.access_log);
    let tracing = match &cfg.otlp_traces_url {
        Some(url) => Some(otel::start(url, cfg.sample_ratio, &cfg.service_name)?),
        None => None,
    };
    Ok(Guard { tracing })
}

/// Holds the trace exporter for the life of the process.
#[must_use = "dropping the guard does not flush the last spans: call shutdown"]
pub struct Guard {
    tracing: Option<otel::Tracing>,
}

impl Guard {
    /// Sends the spans still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(tracing) = self.tracing {
            tracing.shutdown();
        }
    }
}

fn filter(access_log: bool) -> EnvFilter {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    if !access_log {
        return filter;
    }
    // Asked for in the config: the access log shows whatever RUST_LOG says about the rest.
    match format!("{}=info", access::TARGET).parse::<Directive>() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn install(format: LogFormat, access_log: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(access_log))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        // One object per line: the event's fields at the top level beside `timestamp`,
        // `level`, `target` and `message`, the request span's fields under `span`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
