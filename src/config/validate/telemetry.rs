//! `[telemetry]`: OTLP endpoint, sample ratio, service name, log format.

use super::*;

/// `[telemetry]`: the collector URL (traces go to its `/v1/traces` unless it names a path)
/// and a sample ratio between 0 and 1.
pub(super) fn validate_telemetry(t: &raw::Telemetry, p: &mut Problems) -> TelemetryConfig {
    let otlp_traces_url = t
        .otlp_endpoint
        .as_ref()
        .and_then(|e| match url::Url::parse(e) {
            Ok(mut u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                if u.path() == "/" {
                    u.set_path("/v1/traces");
                }
                Some(u.to_string())
            }
            _ => {
                p.add(
                    "telemetry.otlp_endpoint",
                    format!("{e:?} must be an http:// or https:// URL (OTLP over HTTP)"),
                );
                None
            }
        });
    let sample_ratio = match &t.sample_ratio {
        None => Some(1.0),
        Some(raw::Number::Int(i)) => Some(*i as f64),
        Some(raw::Number::Text(s)) => s.trim().parse::<f64>().ok(),
    };
    let sample_ratio = match sample_ratio {
        Some(r) if (0.0..=1.0).contains(&r) => r,
        _ => {
            p.add("telemetry.sample_ratio", "must be a number from 0 to 1");
            1.0
        }
    };
    let service_name = t.service_name.clone().unwrap_or_else(|| "tollgate".into());
    if service_name.trim().is_empty() {
        p.add("telemetry.service_name", "must not be empty");
    }
    TelemetryConfig {
        otlp_traces_url,
        sample_ratio,
        service_name,
        log_format: t.log_format,
        access_log: t.access_log,
    }
}
