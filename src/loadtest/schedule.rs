//! The drivers: one task per connection, in open loop (a fixed schedule of due times shared by
//! all connections) or closed loop (send again as soon as the answer is read), plus the progress
//! line on stderr and Ctrl-C.
//!
//! Open loop without a dispatcher: request `i` is due at `start + i / rate`; a connection that is
//! free claims the next index from a shared counter, sleeps until it is due and sends it. So a
//! request waits only when every connection is busy (or holds an earlier request), and then it is
//! sent by the first connection to come free; its latency runs from its due time, which is what
//! the user would have seen (no coordinated omission).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::client::{Conn, Failure};
use super::report::{micros, Outcome, Report, Stats, Window};
use super::{LoadtestError, Mode, Plan};

/// The open-loop schedule: request `i` is due `i / rate` seconds after the start.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    rate: f64,
}

impl Schedule {
    /// `rate` requests per second (validated positive and finite by the plan).
    pub fn new(rate: f64) -> Schedule {
        Schedule { rate }
    }

    /// When request `i` is due, after the start; `None` past any representable time.
    pub fn offset(&self, i: u64) -> Option<Duration> {
        let nanos = (i as f64 * 1e9 / self.rate).round();
        // `u64::MAX as f64` rounds up to 2^64, so `<` keeps the cast exact and in range.
        (nanos.is_finite() && nanos >= 0.0 && nanos < u64::MAX as f64)
            .then(|| Duration::from_nanos(nanos as u64))
    }

    /// How many requests are due in the first `d`: indices `i` with `offset(i) < d`.
    pub fn due_within(&self, d: Duration) -> u64 {
        let n = (d.as_secs_f64() * self.rate).ceil();
        // Guard the float edge: count exactly with `offset`.
        let mut n = if n.is_finite() && n > 0.0 {
            n as u64
        } else {
            0
        };
        while n > 0 && self.offset(n - 1).is_none_or(|o| o >= d) {
            n -= 1;
        }
        while self.offset(n).is_some_and(|o| o < d) {
            n += 1;
        }
        n
    }
}

/// The resolution of Tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// How long a closed-loop connection waits after a connect failure, so that an absent server
/// is not hammered with connection attempts.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

struct Shared {
    plan: Plan,
    addr: SocketAddr,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    next: AtomicU64,
    /// All requests finished (warmup included), and those that failed: for the progress line.
    finished: AtomicU64,
    failed: AtomicU64,
    stop: CancellationToken,
    stopped_at: Mutex<Option<Instant>>,
    shards: Vec<Mutex<Stats>>,
}

impl Shared {
    fn request(&self, i: u64) -> &[u8] {
        let n = self.plan.requests.len() as u64;
        match usize::try_from(i % n.max(1)) {
            Ok(k) => self.plan.requests.get(k).map_or(&[][..], |r| &r[..]),
            Err(_) => &[],
        }
    }

    fn shard(&self, id: usize) -> &Mutex<Stats> {
        // `shards` is never empty (see `execute`); index 0 is the fallback.
        &self.shards[id % self.shards.len().max(1)]
    }

    fn deadline(&self, from: Instant) -> Instant {
        from.checked_add(self.plan.timeout).unwrap_or(self.end)
    }

    fn interrupt(&self) {
        let mut at = self.stopped_at.lock();
        if at.is_none() {
            *at = Some(Instant::now());
        }
        self.stop.cancel();
    }

    /// Counts a finished request; `latency_from` is when its clock started, `sent` when it was
    /// written (`None`: never sent), `measured` whether it belongs to the measured window.
    fn record(
        &self,
        shard: &Mutex<Stats>,
        measured: bool,
        sent: Option<Instant>,
        latency_from: Instant,
        outcome: Outcome,
        lag: Option<Duration>,
    ) {
        let done = Instant::now();
        self.finished.fetch_add(1, Ordering::Relaxed);
        if !matches!(outcome, Outcome::Status(_)) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if !measured {
            return;
        }
        let mut stats = shard.lock();
        // Measured requests sent before the end (open loop: not those left to the drain).
        if sent.is_some_and(|t| t < self.end) {
            stats.sent += 1;
        }
        if let Some(lag) = lag {
            stats.lag.saturating_record(micros(lag));
        }
        stats.record(outcome, done.saturating_duration_since(latency_from), done);
    }
}

/// Sends one request, bounded by `deadline` and by Ctrl-C (`None`: interrupted, not counted).
async fn send(sh: &Shared, conn: &mut Conn, request: &[u8], deadline: Instant) -> Option<Outcome> {
    let result = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), conn.send(request, sh.plan.head)) => r,
        _ = sh.stop.cancelled() => {
            conn.reset();
            return None;
        }
    };
    Some(match result {
        Ok(Ok(status)) => Outcome::Status(status),
        Ok(Err(f)) => Outcome::Failed(f),
        Err(_) => {
            conn.reset();
            Outcome::Timeout
        }
    })
}

async fn open_loop(sh: Arc<Shared>, id: usize, schedule: Schedule) {
    let mut conn = Conn::new(sh.addr);
    let shard = sh.shard(id);
    while !sh.stop.is_cancelled() {
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        let Some(due) = schedule.offset(i).and_then(|o| sh.start.checked_add(o)) else {
            break;
        };
        if due >= sh.end {
            break;
        }
        let claimed = Instant::now();
        let (latency_from, lag) = if claimed < due {
            // An idle connection was waiting for this request: time it from when it is
            // actually written, so the timer's own slack is not charged to the server.
            // Tokio's timer rounds up to its next millisecond tick: aim a tick early so sends
            // land within about a millisecond either side of their due time, not always late.
            let wake = due.checked_sub(TIMER_TICK).unwrap_or(due);
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = sh.stop.cancelled() => break,
            }
            let now = Instant::now();
            (now, Some(now.saturating_duration_since(due)))
        } else {
            // Every connection was busy when it fell due: the wait counts.
            (due, None)
        };
        let measured = due >= sh.measure_start;
        let deadline = sh.deadline(latency_from);
        let now = Instant::now();
        if now >= deadline {
            // It waited for a connection longer than the timeout: a timeout, never sent.
            sh.record(shard, measured, None, latency_from, Outcome::Timeout, lag);
            continue;
        }
        let Some(outcome) = send(&sh, &mut conn, sh.request(i), deadline).await else {
            break;
        };
        sh.record(shard, measured, Some(now), latency_from, outcome, lag);
    }
}

async fn closed_loop(sh: Arc<Shared>, id: usize) {
    let mut conn = Conn::new(sh.addr);
    let shard = sh.shard(id);
    while !sh.stop.is_cancelled() {
        let now = Instant::now();
        if now >= sh.end {
            break;
        }
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        let Some(outcome) = send(&sh, &mut conn, sh.request(i), sh.deadline(now)).await else {
            break;
        };
        sh.record(
            shard,
            now >= sh.measure_start,
            Some(now),
            now,
            outcome,
            None,
        );
        if outcome == Outcome::Failed(Failure::Connect) {
            tokio::select! {
                _ = tokio::time::sleep(CONNECT_BACKOFF) => {}
                _ = sh.stop.cancelled() => break,
            }
        }
    }
}

/// Once a second on stderr: requests so far, the last second's rate, errors.
async fn progress(sh: Arc<Shared>, tty: bool) {
    let second = Duration::from_secs(1);
    let first = sh.start.checked_add(second).unwrap_or(sh.start);
    let mut ticker = tokio::time::interval_at(first.into(), second);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut last_n, mut last_at) = (0u64, sh.start);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let n = sh.finished.load(Ordering::Relaxed);
        let failed = sh.failed.load(Ordering::Relaxed);
        let dt = now.saturating_duration_since(last_at).as_secs_f64();
        let rps = if dt > 0.0 {
            (n - last_n.min(n)) as f64 / dt
        } else {
            0.0
        };
        (last_n, last_at) = (n, now);
        let phase = if now < sh.measure_start {
            "  (warmup)"
        } else if now >= sh.end {
            "  (finishing in-flight requests)"
        } else {
            ""
        };
        let line = format!(
            "{:>6.1}s  {n} requests  {rps:.0} req/s  {failed} errors{phase}",
            now.saturating_duration_since(sh.start).as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Runs the plan against `addr` and merges what every connection measured.
pub async fn execute(plan: Plan, addr: SocketAddr) -> Result<Report, LoadtestError> {
    let too_long = || LoadtestError::Invalid("--warmup plus --duration is too long".to_string());
    let shard_count = (plan.threads * 2).clamp(1, plan.connections.max(1));
    let shards = (0..shard_count)
        .map(|_| Stats::new().map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let measure_start = start.checked_add(plan.warmup).ok_or_else(too_long)?;
    let end = measure_start
        .checked_add(plan.duration)
        .ok_or_else(too_long)?;
    let mode = plan.mode;
    let connections = plan.connections;
    let sh = Arc::new(Shared {
        plan,
        addr,
        start,
        measure_start,
        end,
        next: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: CancellationToken::new(),
        stopped_at: Mutex::new(None),
        shards,
    });

    let ctrl_c = {
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                sh.interrupt();
            }
        })
    };
    let tty = std::io::stderr().is_terminal();
    let progress = tokio::spawn(progress(Arc::clone(&sh), tty));

    let tasks: Vec<_> = (0..connections)
        .map(|id| {
            let sh = Arc::clone(&sh);
            match mode {
                Mode::Open { rate } => tokio::spawn(open_loop(sh, id, Schedule::new(rate))),
                Mode::Closed => tokio::spawn(closed_loop(sh, id)),
            }
        })
        .collect();
    for task in tasks {
        // A task that failed to join left its counts in the shards already.
        let _ = task.await;
    }
    progress.abort();
    ctrl_c.abort();
    if tty {
        let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
    }

    let mut total = Stats::new()?;
    for shard in &sh.shards {
        total.merge(&shard.lock())?;
    }
    let stopped_at = *sh.stopped_at.lock();
    let window_end = stopped_at.map_or(end, |s| s.clamp(measure_start, end));
    let scheduled = match mode {
        Mode::Open { rate } => {
            let s = Schedule::new(rate);
            let due = |t: Instant| s.due_within(t.saturating_duration_since(start));
            Some(due(window_end) - due(measure_start).min(due(window_end)))
        }
        Mode::Closed => None,
    };
    let window = Window {
        start: measure_start,
        end: window_end,
        interrupted: stopped_at.is_some(),
        scheduled,
    };
    Ok(Report::build(&sh.plan, &total, &window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_offsets() {
        let s = Schedule::new(1000.0);
        assert_eq!(s.offset(0), Some(Duration::ZERO));
        assert_eq!(s.offset(1), Some(Duration::from_millis(1)));
        assert_eq!(s.offset(2500), Some(Duration::from_millis(2500)));
        let s = Schedule::new(3.0);
        assert_eq!(s.offset(3), Some(Duration::from_secs(1)));
        let third = s.offset(1).unwrap();
        assert!(third.abs_diff(Duration::from_nanos(333_333_333)) <= Duration::from_nanos(1));
        // Fractional rates: one every two seconds.
        assert_eq!(Schedule::new(0.5).offset(3), Some(Duration::from_secs(6)));
        // Evenly spaced and increasing.
        let s = Schedule::new(7919.0);
        let mut prev = s.offset(0).unwrap();
        for i in 1..20_000 {
            let o = s.offset(i).unwrap();
            let gap = o - prev;
            assert!(
                gap.abs_diff(Duration::from_secs_f64(1.0 / 7919.0)) <= Duration::from_nanos(2),
                "{i}: {gap:?}"
            );
            prev = o;
        }
    }

    #[test]
    fn schedule_counts() {
        let s = Schedule::new(1000.0);
        assert_eq!(s.due_within(Duration::from_secs(1)), 1000);
        assert_eq!(s.due_within(Duration::from_micros(1)), 1);
        assert_eq!(s.due_within(Duration::ZERO), 0);
        assert_eq!(s.due_within(Duration::from_micros(1_000_001)), 1001);
        assert_eq!(Schedule::new(3.0).due_within(Duration::from_secs(10)), 30);
        assert_eq!(Schedule::new(0.5).due_within(Duration::from_secs(3)), 2);
        assert_eq!(
            Schedule::new(200.0).due_within(Duration::from_millis(1500)),
            300
        );
        // The rate over any full window is the target.
        for rate in [1.0, 37.5, 999.0, 12_345.0] {
            let n = Schedule::new(rate).due_within(Duration::from_secs(4));
            assert!((n as f64 - rate * 4.0).abs() <= 1.0, "{rate}: {n}");
        }
    }

    #[test]
    fn requests_rotate() {
        let plan = Plan {
            url: "http://h/".into(),
            method: "GET".into(),
            authority: "h:80".into(),
            mode: Mode::Closed,
            connections: 1,
            threads: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(1),
            requests: vec![
                bytes::Bytes::from_static(b"a"),
                bytes::Bytes::from_static(b"b"),
            ],
            head: false,
        };
        let now = Instant::now();
        let sh = Shared {
            plan,
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            start: now,
            measure_start: now,
            end: now,
            next: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stop: CancellationToken::new(),
            stopped_at: Mutex::new(None),
            shards: vec![Mutex::new(Stats::new().unwrap())],
        };
        let got: Vec<&[u8]> = (0..4).map(|i| sh.request(i)).collect();
        assert_eq!(got, [&b"a"[..], b"b", b"a", b"b"]);
    }
}
