//! `tollgate loadtest`: a small, fast HTTP/1.1 load generator to run against your own deployment.
//!
//! Two modes:
//! - **open loop** (`--rate R`): requests are due on a fixed schedule (`start + i / R`) whatever
//!   the server does. Latency is measured from the time a request was *due*, so when every
//!   connection is busy and a request has to wait for one, that wait counts (no coordinated
//!   omission). The generator's own timer slack (Tokio's timer ticks once a millisecond) is not
//!   charged to the server: a request that had an idle connection waiting for it is timed from
//!   the moment it was actually written, and the slack is reported apart as `schedule_lag`.
//! - **closed loop** (no `--rate`): each connection sends its next request as soon as the
//!   previous answer is read; this measures saturation throughput.
//!
//! The client (`client.rs`) is a minimal HTTP/1.1 keep-alive client on Tokio's `TcpStream`: the
//! request bytes are built once per key, the response parser reads the status line and frames
//! the body by `Content-Length`, chunked encoding or connection close, and a connection the
//! server closed is reopened. `schedule.rs` drives the connections, `report.rs` merges the HDR
//! histograms and renders the summary as text or JSON.

mod client;
mod report;
mod schedule;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;

pub use report::Report;

/// The longest duration any option accepts (a week): keeps every `Instant` sum in range.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_CONNECTIONS: usize = 10_000;
const MAX_THREADS: usize = 256;
const MAX_RATE: f64 = 10_000_000.0;

/// Everything that can go wrong before or around a run (failed requests are counted in the
/// report, not returned as errors).
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("invalid duration {0:?}: expected a number with a unit, e.g. 500ms, 10s, 1.5m, 1h")]
    Duration(String),
    #[error("duration {0:?} is too long (at most 7 days)")]
    DurationTooLong(String),
    #[error("invalid header {0:?}: expected 'Name: value'")]
    Header(String),
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the body file {path}: {source}")]
    BodyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot create a histogram: {0}")]
    Histogram(String),
    #[error("cannot write the report: {0}")]
    Output(String),
}

/// `tollgate loadtest` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The URL to load (plain http://), e.g. http://127.0.0.1:8080/v1/chat/completions.
    pub url: String,
    /// Open loop: requests per second on a fixed schedule, latency measured from each request's
    /// due time. Without it: closed loop, every connection sends as fast as answers come back.
    #[arg(long, short = 'r', value_name = "REQ_PER_S")]
    pub rate: Option<f64>,
    /// Keep-alive connections to open (open loop: requests are spread over them).
    #[arg(long, short = 'c', value_name = "N", default_value_t = 32)]
    pub connections: usize,
    /// How long to measure: 500ms, 10s, 1m, ...
    #[arg(long, short = 'd', default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Duration,
    /// Send load for this long first without measuring it.
    #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = parse_duration)]
    pub warmup: Duration,
    /// The request method.
    #[arg(long, short = 'X', default_value = "GET")]
    pub method: String,
    /// The request body.
    #[arg(long, value_name = "TEXT", conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the request body from this file.
    #[arg(long, value_name = "PATH")]
    pub body_file: Option<PathBuf>,
    /// An extra request header, 'Name: value' (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<Header>,
    /// An API key sent as `Authorization: Bearer KEY` (repeatable: keys rotate per request).
    #[arg(long = "key", short = 'k', value_name = "KEY")]
    pub keys: Vec<String>,
    /// Per-request timeout, counted from the request's due time (open loop) or send (closed loop).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the result as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Worker threads of the load generator's runtime.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
}

/// One `Name: value` request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// `500ms`, `10s`, `1.5m`, `2h`, `250us` (or `µs`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, LoadtestError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || LoadtestError::Duration(text.to_string());
    let value: f64 = number.parse().map_err(|_| bad())?;
    let nanos_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        "m" | "min" | "mins" => 60e9,
        "h" => 3600e9,
        _ => return Err(bad()),
    };
    let nanos = (value * nanos_per_unit).round();
    if !nanos.is_finite() || nanos < 0.0 {
        return Err(bad());
    }
    if nanos > MAX_DURATION.as_nanos() as f64 {
        return Err(LoadtestError::DurationTooLong(text.to_string()));
    }
    // In range: at most a week of nanoseconds.
    Ok(Duration::from_nanos(nanos as u64))
}

/// `Name: value` (the name an HTTP token, the value without control characters).
pub fn parse_header(text: &str) -> Result<Header, LoadtestError> {
    let bad = || LoadtestError::Header(text.to_string());
    let (name, value) = text.split_once(':').ok_or_else(bad)?;
    // No whitespace between the name and the colon (RFC 9110); around the value is fine.
    let name = name.trim_start_matches([' ', '\t']);
    let value = value.trim_matches([' ', '\t']);
    if !is_token(name) || value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(bad());
    }
    Ok(Header {
        name: name.to_string(),
        value: value.to_string(),
    })
}

/// An HTTP token (method or header name): RFC 9110 `tchar`s, at least one.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Open loop at a rate, or closed loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Open { rate: f64 },
    Closed,
}

/// A validated run: the target, the prebuilt request bytes (one per key) and the knobs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The URL as given, for the report.
    pub url: String,
    pub method: String,
    /// `host:port` to resolve.
    pub authority: String,
    pub mode: Mode,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    /// The full request (head and body), one per key, rotated per request.
    pub requests: Vec<Bytes>,
    /// HEAD: responses carry no body whatever their headers say.
    pub head: bool,
}

impl Plan {
    /// Validates the arguments and builds the request bytes.
    pub fn from_args(args: &Args) -> Result<Plan, LoadtestError> {
        let invalid = |msg: String| Err(LoadtestError::Invalid(msg));
        let mode = match args.rate {
            None => Mode::Closed,
            Some(rate) if rate.is_finite() && rate > 0.0 && rate <= MAX_RATE => Mode::Open { rate },
            Some(rate) => {
                return invalid(format!(
                    "--rate {rate}: must be more than 0 and at most {MAX_RATE} requests per second"
                ))
            }
        };
        if args.connections == 0 || args.connections > MAX_CONNECTIONS {
            return invalid(format!(
                "--connections {}: must be between 1 and {MAX_CONNECTIONS}",
                args.connections
            ));
        }
        if args.threads == 0 || args.threads > MAX_THREADS {
            return invalid(format!(
                "--threads {}: must be between 1 and {MAX_THREADS}",
                args.threads
            ));
        }
        if args.duration.is_zero() {
            return invalid("--duration must be more than 0".to_string());
        }
        if args.timeout.is_zero() {
            return invalid("--timeout must be more than 0".to_string());
        }
        if !is_token(&args.method) {
            return invalid(format!(
                "--method {:?} is not a valid HTTP method",
                args.method
            ));
        }
        for key in &args.keys {
            if key.is_empty() || key.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return invalid("--key: a key must be non-empty, without spaces".to_string());
            }
        }
        let mut host_given = false;
        let mut agent_given = false;
        for h in &args.headers {
            let name = h.name.to_ascii_lowercase();
            match name.as_str() {
                "content-length" | "transfer-encoding" => {
                    return invalid(format!(
                        "--header {}: the body framing is set by tollgate loadtest (use --body or --body-file)",
                        h.name
                    ))
                }
                "authorization" if !args.keys.is_empty() => {
                    return invalid(
                        "give either --key or an Authorization --header, not both".to_string(),
                    )
                }
                "host" => host_given = true,
                "user-agent" => agent_given = true,
                _ => {}
            }
        }
        let target = Target::parse(&args.url)?;
        let body =
            match (&args.body, &args.body_file) {
                (Some(b), _) => Bytes::from(b.clone().into_bytes()),
                (None, Some(path)) => std::fs::read(path).map(Bytes::from).map_err(|source| {
                    LoadtestError::BodyFile {
                        path: path.clone(),
                        source,
                    }
                })?,
                (None, None) => Bytes::new(),
            };

        let mut head = format!("{} {} HTTP/1.1\r\n", args.method, target.path);
        if !host_given {
            head.push_str(&format!("Host: {}\r\n", target.host_header));
        }
        if !agent_given {
            head.push_str("User-Agent: tollgate-loadtest\r\n");
        }
        for h in &args.headers {
            head.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        let sends_length = !body.is_empty()
            || matches!(
                args.method.to_ascii_uppercase().as_str(),
                "POST" | "PUT" | "PATCH"
            );
        let build = |key: Option<&str>| {
            let mut req = head.clone();
            if let Some(key) = key {
                req.push_str(&format!("Authorization: Bearer {key}\r\n"));
            }
            if sends_length {
                req.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            req.push_str("\r\n");
            let mut bytes = req.into_bytes();
            bytes.extend_from_slice(&body);
            Bytes::from(bytes)
        };
        let requests = if args.keys.is_empty() {
            vec![build(None)]
        } else {
            args.keys.iter().map(|k| build(Some(k))).collect()
        };
        Ok(Plan {
            url: args.url.clone(),
            method: args.method.clone(),
            authority: target.authority,
            mode,
            connections: args.connections,
            threads: args.threads,
            duration: args.duration,
            warmup: args.warmup,
            timeout: args.timeout,
            requests,
            head: args.method.eq_ignore_ascii_case("HEAD"),
        })
    }
}

/// Where to connect and what to put in the request line and `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    authority: String,
    host_header: String,
    /// Path and query.
    path: String,
}

impl Target {
    fn parse(text: &str) -> Result<Target, LoadtestError> {
        let err = |reason: &str| LoadtestError::Url {
            url: text.to_string(),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(text).map_err(|e| err(&e.to_string()))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(err(
                    "https is not supported: point the load test at the plain-HTTP listener (e.g. on the host itself)",
                ))
            }
            _ => return Err(err("the scheme must be http://")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(err(
                "credentials in the URL are not supported: use --key or --header",
            ));
        }
        let host = url.host_str().ok_or_else(|| err("no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target {
            authority: format!("{host}:{port}"),
            host_header,
            path,
        })
    }
}

async fn resolve(authority: &str) -> Result<SocketAddr, LoadtestError> {
    let err = |reason: String| LoadtestError::Resolve {
        host: authority.to_string(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| err(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| err("no address found".to_string()))
}

/// Runs a validated plan on the current Tokio runtime and returns the report.
pub async fn run(plan: Plan) -> Result<Report, LoadtestError> {
    let addr = resolve(&plan.authority).await?;
    schedule::execute(plan, addr).await
}

/// `tollgate loadtest …`: validates, runs on its own runtime (`--threads` workers), prints the
/// report (text, or JSON with `--json`) and exits non-zero when no request got an answer.
pub fn run_cli(args: Args) -> Result<ExitCode, LoadtestError> {
    let plan = Plan::from_args(&args)?;
    let runtime = if plan.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(plan.threads)
            .enable_all()
            .build()
    }
    .map_err(LoadtestError::Runtime)?;
    let report = runtime.block_on(run(plan))?;
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&report)
            .map_err(|e| LoadtestError::Output(e.to_string()))?;
        s.push('\n');
        s
    } else {
        report.render_text()
    };
    std::io::stdout()
        .lock()
        .write_all(out.as_bytes())
        .map_err(|e| LoadtestError::Output(e.to_string()))?;
    if report.responses == 0 {
        let _ = writeln!(
            std::io::stderr(),
            "error: no request got a response ({} errors); is the server up at {}?",
            report.errors.total,
            report.url
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
