//! What a run measured: per-shard stats merged into one HDR histogram summary, rendered as text
//! or serialized as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::Failure;
use super::{LoadtestError, Mode, Plan};

/// Latencies are recorded in microseconds, from 1 µs to 60 s at 3 significant digits; longer
/// ones count as 60 s (the per-request timeout normally ends them first).
const HIST_MAX_US: u64 = 60_000_000;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    Failed(Failure),
    Timeout,
}

/// Errors by cause (requests that got no HTTP response).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Errors {
    pub total: u64,
    /// The TCP connection could not be opened.
    pub connect: u64,
    /// No complete response within `--timeout`.
    pub timeout: u64,
    /// The connection failed or was closed mid-response.
    pub io: u64,
    /// The response was not valid HTTP/1.x.
    pub protocol: u64,
}

impl Errors {
    fn add(&mut self, o: &Errors) {
        self.total += o.total;
        self.connect += o.connect;
        self.timeout += o.timeout;
        self.io += o.io;
        self.protocol += o.protocol;
    }
}

/// Counters for the measured window (one per shard, merged at the end).
#[derive(Debug)]
pub struct Stats {
    /// Response latency in µs.
    pub latency: Histogram<u64>,
    /// Open loop: how late the generator itself sent requests that had an idle connection.
    pub lag: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub errors: Errors,
    /// Requests written to the wire inside the measured window.
    pub sent: u64,
    pub last_done: Option<Instant>,
}

fn histogram() -> Result<Histogram<u64>, LoadtestError> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
        .map_err(|e| LoadtestError::Histogram(e.to_string()))
}

/// Whole microseconds, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    pub fn new() -> Result<Stats, LoadtestError> {
        Ok(Stats {
            latency: histogram()?,
            lag: histogram()?,
            status: BTreeMap::new(),
            errors: Errors::default(),
            sent: 0,
            last_done: None,
        })
    }

    /// Counts one finished request of the measured window.
    pub fn record(&mut self, outcome: Outcome, latency: Duration, done: Instant) {
        match outcome {
            Outcome::Status(code) => {
                self.latency.saturating_record(micros(latency));
                *self.status.entry(code).or_default() += 1;
            }
            Outcome::Timeout => {
                self.errors.total += 1;
                self.errors.timeout += 1;
            }
            Outcome::Failed(f) => {
                self.errors.total += 1;
                match f {
                    Failure::Connect => self.errors.connect += 1,
                    Failure::Io => self.errors.io += 1,
                    Failure::Protocol => self.errors.protocol += 1,
                }
            }
        }
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    pub fn merge(&mut self, other: &Stats) -> Result<(), LoadtestError> {
        let err = |e: hdrhistogram::AdditionError| LoadtestError::Histogram(e.to_string());
        self.latency.add(&other.latency).map_err(err)?;
        self.lag.add(&other.lag).map_err(err)?;
        for (code, n) in &other.status {
            *self.status.entry(*code).or_default() += n;
        }
        self.errors.add(&other.errors);
        self.sent += other.sent;
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            min: h.min(),
            mean: round1(h.mean()),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

fn round1(x: f64) -> f64 {
    if x.is_finite() {
        (x * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// The result of a run (the JSON shape of `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub method: String,
    /// `open` (fixed rate) or `closed` (saturation).
    pub mode: &'static str,
    pub connections: usize,
    pub threads: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// From the end of the warmup to the last response (the drain of requests still in flight
    /// at the end of `duration` included).
    pub elapsed_s: f64,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
    /// Open loop: `--rate`.
    pub target_rate: Option<f64>,
    /// Open loop: requests actually sent per second during the measured window.
    pub achieved_rate: Option<f64>,
    /// Open loop: requests the schedule had due in the measured window.
    pub scheduled: Option<u64>,
    /// Measured requests: responses + errors.
    pub requests: u64,
    /// Requests that got an HTTP response (any status).
    pub responses: u64,
    pub errors: Errors,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Responses per second over `elapsed_s`.
    pub throughput_rps: f64,
    /// Latency of the responses, µs (open loop: from the time each request was due).
    pub latency_us: Option<Percentiles>,
    /// Open loop: how late the generator sent requests that had an idle connection, µs (its own
    /// timer slack or CPU shortage; not in `latency_us`).
    pub schedule_lag_us: Option<Percentiles>,
}

/// The measured window: from the end of the warmup to the end of the duration (or Ctrl-C).
pub struct Window {
    pub start: Instant,
    pub end: Instant,
    pub interrupted: bool,
    /// Open loop: requests due in the window.
    pub scheduled: Option<u64>,
}

impl Report {
    pub fn build(plan: &Plan, stats: &Stats, window: &Window) -> Report {
        let responses: u64 = stats.status.values().sum();
        let measured = window.end.saturating_duration_since(window.start);
        let elapsed = stats
            .last_done
            .map_or(window.end, |d| d.max(window.end))
            .saturating_duration_since(window.start);
        let per_second = |n: u64, d: Duration| {
            if d.is_zero() {
                0.0
            } else {
                round1(n as f64 / d.as_secs_f64())
            }
        };
        let (mode, target_rate, achieved_rate) = match plan.mode {
            Mode::Open { rate } => ("open", Some(rate), Some(per_second(stats.sent, measured))),
            Mode::Closed => ("closed", None, None),
        };
        Report {
            url: plan.url.clone(),
            method: plan.method.clone(),
            mode,
            connections: plan.connections,
            threads: plan.threads,
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            interrupted: window.interrupted,
            target_rate,
            achieved_rate,
            scheduled: window.scheduled,
            requests: responses + stats.errors.total,
            responses,
            errors: stats.errors,
            status: stats
                .status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            throughput_rps: per_second(responses, elapsed),
            latency_us: Percentiles::of(&stats.latency),
            schedule_lag_us: match plan.mode {
                Mode::Open { .. } => Percentiles::of(&stats.lag),
                Mode::Closed => None,
            },
        }
    }

    /// The human-readable summary.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let mode = match self.target_rate {
            Some(rate) => format!("open loop at {} req/s", trim_float(rate)),
            None => "closed loop".to_string(),
        };
        let warmup = if self.warmup_s > 0.0 {
            format!(" after {}s warmup", trim_float(self.warmup_s))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{} {}: {mode}, {} connections, {} thread{}, {}s{warmup}{}",
            self.method,
            self.url,
            self.connections,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            trim_float(self.duration_s),
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "  requests     {} ({} responses, {} errors: {} connect, {} timeout, {} io, {} protocol)",
            self.requests,
            self.responses,
            self.errors.total,
            self.errors.connect,
            self.errors.timeout,
            self.errors.io,
            self.errors.protocol
        );
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        let _ = writeln!(
            s,
            "  status       {}",
            if status.is_empty() {
                "-".to_string()
            } else {
                status.join("  ")
            }
        );
        let _ = writeln!(
            s,
            "  throughput   {:.1} req/s over {:.2}s",
            self.throughput_rps, self.elapsed_s
        );
        if let (Some(target), Some(achieved)) = (self.target_rate, self.achieved_rate) {
            let _ = writeln!(
                s,
                "  rate         {:.1} req/s sent of {} targeted ({:.1}%)",
                achieved,
                trim_float(target),
                if target > 0.0 {
                    achieved / target * 100.0
                } else {
                    0.0
                }
            );
        }
        match &self.latency_us {
            Some(p) => {
                let _ = writeln!(
                    s,
                    "  latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
                    fmt_us(p.p50),
                    fmt_us(p.p90),
                    fmt_us(p.p99),
                    fmt_us(p.p99_9),
                    fmt_us(p.max),
                    fmt_us(p.mean.round() as u64)
                );
            }
            None => {
                let _ = writeln!(s, "  latency      - (no responses)");
            }
        }
        if let Some(lag) = &self.schedule_lag_us {
            let _ = writeln!(
                s,
                "  send lag     p50 {}  p99 {}  max {}  (the generator's own timer slack, not in latency)",
                fmt_us(lag.p50),
                fmt_us(lag.p99),
                fmt_us(lag.max)
            );
        }
        if let (Some(target), Some(achieved)) = (self.target_rate, self.achieved_rate) {
            if achieved < target * 0.95 && !self.interrupted {
                let _ = writeln!(
                    s,
                    "note: fewer requests were sent than scheduled: every connection was busy, so requests \
                     queued (that wait is in the latencies); the server is saturated at this rate, or try \
                     more --connections"
                );
            }
        }
        if self
            .schedule_lag_us
            .is_some_and(|l| l.p99 > SEND_LAG_NOTE_ABOVE_US)
        {
            let _ = writeln!(s, "{SEND_LAG_NOTE}");
        }
        s
    }
}

/// Send lag p99 (µs) past which the report says the generator was starved.
const SEND_LAG_NOTE_ABOVE_US: u64 = 5_000;

/// Send lag this large is not a bug in the generator or the server: the generator's threads
/// did not get the CPU when a request fell due (seen while the same machine was compiling).
/// Sends are timed from when they are written, but responses are read late too, so the
/// latencies of such a run are inflated by the same wait.
const SEND_LAG_NOTE: &str =
    "note: the load generator fell behind its schedule (send lag p99 above 5 ms): \
     the machine running the load generator was short of CPU (other processes busy?); latencies \
     include that wait, as responses were read late too. Rerun on a quieter machine, with more \
     --threads if it has idle cores, or at a lower --rate";

/// `412µs`, `1.23ms`, `2.50s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// `100`, `0.5`: no trailing `.0`.
fn trim_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_us(412), "412µs");
        assert_eq!(fmt_us(1_234), "1.23ms");
        assert_eq!(fmt_us(2_500_000), "2.50s");
        assert_eq!(trim_float(100.0), "100");
        assert_eq!(trim_float(0.5), "0.5");
    }

    fn open_loop_report(lag_p99_us: u64) -> Report {
        let lag = Percentiles {
            min: 0,
            mean: 100.0,
            p50: 100,
            p90: 200,
            p99: lag_p99_us,
            p99_9: lag_p99_us,
            max: lag_p99_us,
        };
        Report {
            url: "http://127.0.0.1:8080/v1/echo".into(),
            method: "GET".into(),
            mode: "open",
            connections: 32,
            threads: 1,
            duration_s: 10.0,
            warmup_s: 0.0,
            elapsed_s: 10.0,
            interrupted: false,
            target_rate: Some(20.0),
            achieved_rate: Some(20.0),
            scheduled: Some(200),
            requests: 200,
            responses: 200,
            errors: Errors::default(),
            status: BTreeMap::from([("200".to_string(), 200)]),
            throughput_rps: 20.0,
            latency_us: None,
            schedule_lag_us: Some(lag),
        }
    }

    #[test]
    fn send_lag_note_blames_a_busy_machine_not_a_bug() {
        let text = open_loop_report(12_000).render_text();
        let note = text
            .lines()
            .find(|l| l.starts_with("note: the load generator"))
            .unwrap_or_else(|| panic!("no send lag note in:\n{text}"));
        assert!(
            note.contains("the machine running the load generator was short of CPU"),
            "{note}"
        );
        assert!(note.contains("latencies include that wait"), "{note}");
        assert!(!text.contains("give it more --threads"), "{text}");
        // Below the threshold: no note at all.
        let quiet = open_loop_report(1_000).render_text();
        assert!(!quiet.contains("note: the load generator"), "{quiet}");
    }

    #[test]
    fn stats_merge_and_percentiles() {
        let now = Instant::now();
        let mut a = Stats::new().unwrap();
        let mut b = Stats::new().unwrap();
        for us in 1..=1000u64 {
            let s = if us % 2 == 0 { &mut a } else { &mut b };
            s.record(Outcome::Status(200), Duration::from_micros(us), now);
        }
        b.record(Outcome::Status(503), Duration::from_micros(5), now);
        b.record(Outcome::Timeout, Duration::ZERO, now);
        b.record(Outcome::Failed(Failure::Connect), Duration::ZERO, now);
        a.merge(&b).unwrap();
        assert_eq!(a.status.get(&200), Some(&1000));
        assert_eq!(a.status.get(&503), Some(&1));
        assert_eq!(a.errors.total, 2);
        assert_eq!(a.errors.timeout, 1);
        assert_eq!(a.errors.connect, 1);
        let p = Percentiles::of(&a.latency).unwrap();
        assert_eq!(p.min, 1);
        assert!((499..=501).contains(&p.p50), "{p:?}");
        assert!((899..=901).contains(&p.p90), "{p:?}");
        assert!((989..=991).contains(&p.p99), "{p:?}");
        assert_eq!(p.max, 1000);
        assert!(Percentiles::of(&Stats::new().unwrap().latency).is_none());
    }
}
