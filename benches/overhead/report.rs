//! Medians over rounds, the markdown table and the JSON summary.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::{Plan, Target, Via, TARGETS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Saturation,
    Rate,
}

/// One load-generator run.
pub struct Run {
    pub phase: Phase,
    pub round: usize,
    pub target: &'static str,
    pub rate: Option<f64>,
    /// `tollgate loadtest --json`, as printed.
    pub report: Value,
    /// Requests the stub answered over the run (the warmup and the drain included).
    pub upstream_requests: u64,
    /// What Redis counted over the run (server-wide): script calls, their execution time, CPU.
    pub redis: crate::env::RedisStats,
    /// CPU seconds tollgate used over the run (whatever the target: it idles for the others).
    pub tollgate_cpu_s: Option<f64>,
    /// CPU seconds nginx (master and worker) used over the run.
    pub nginx_cpu_s: Option<f64>,
    /// CPU seconds the bare Pingora proxy used over the run.
    pub bare_cpu_s: Option<f64>,
    /// CPU seconds of the benchmark process (the stub's thread) and the load generator over the
    /// run.
    pub bench_cpu_s: f64,
    /// CPU seconds all Postgres processes used over the run (the journal's inserts).
    pub postgres_cpu_s: f64,
    /// Seconds waited before the run for the previous one's leftovers to drain.
    pub settle_s: f64,
    /// CPU seconds used during the run by processes that are not the benchmark's (other work on
    /// the machine; also kernel threads): a noise indicator.
    pub foreign_cpu_s: f64,
    /// Wall-clock seconds of the run (the load generator's whole life).
    pub wall_s: f64,
    /// tollgate targets: what its own metrics counted over the run (see `Scrape::delta`).
    pub metrics: Option<Value>,
}

impl Run {
    pub fn throughput(&self) -> f64 {
        self.report["throughput_rps"].as_f64().unwrap_or(0.0)
    }

    pub fn latency(&self, p: &str) -> Option<f64> {
        self.report["latency_us"][p].as_f64()
    }

    pub fn failed(&self) -> u64 {
        crate::load::failed(&self.report)
    }

    pub fn requests(&self) -> u64 {
        self.report["requests"].as_u64().unwrap_or(0)
    }

    pub fn describe(&self) -> String {
        let phase = match self.rate {
            None => "saturation".to_string(),
            Some(r) => format!("{r:.0} rps"),
        };
        let lat = |p| self.latency(p).map_or("-".into(), us);
        format!(
            "round {} {phase:>10} {:<13} {:>9} rps  p50 {:>8}  p99 {:>8}  p99.9 {:>8}{}",
            self.round + 1,
            self.target,
            thousands(self.throughput()),
            lat("p50"),
            lat("p99"),
            lat("p99_9"),
            match self.failed() {
                0 => String::new(),
                n => format!("  ({n} failed)"),
            }
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "phase": match self.phase { Phase::Saturation => "saturation", Phase::Rate => "rate" },
            "round": self.round + 1,
            "target": self.target,
            "rate": self.rate,
            "upstream_requests": self.upstream_requests,
            "redis": {
                "script_calls": self.redis.script_calls,
                "script_usec": self.redis.script_usec,
                "cpu_s": round3(self.redis.cpu_s),
            },
            "tollgate_cpu_s": self.tollgate_cpu_s.map(round3),
            "nginx_cpu_s": self.nginx_cpu_s.map(round3),
            "bare_pingora_cpu_s": self.bare_cpu_s.map(round3),
            "stub_and_loadgen_cpu_s": round3(self.bench_cpu_s),
            "postgres_cpu_s": round3(self.postgres_cpu_s),
            "settle_s": round3(self.settle_s),
            "wall_s": round3(self.wall_s),
            "foreign_cpu_s": round3(self.foreign_cpu_s),
            "tollgate_metrics": self.metrics,
            "loadtest": self.report,
        })
    }
}

/// The median (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '−');
    }
    out
}

/// Microseconds, as µs below 10 ms and ms above.
fn us(x: f64) -> String {
    if x.abs() >= 10_000.0 {
        format!("{:.1} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn signed_us(x: f64) -> String {
    if x >= 0.0 {
        format!("+{}", us(x))
    } else {
        format!("−{}", us(-x))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// CPU microseconds per upstream request over a set of runs (medians of per-run values).
fn cpu_per_request(runs: &[&Run], cpu: fn(&Run) -> Option<f64>) -> Option<f64> {
    median(
        &runs
            .iter()
            .filter(|r| r.upstream_requests > 0)
            .filter_map(|r| Some(cpu(r)? * 1e6 / r.upstream_requests as f64))
            .collect::<Vec<_>>(),
    )
}

/// CPU µs per request of each process over a set of runs (medians over rounds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The proxy in front: tollgate, nginx or the bare Pingora proxy (`None` for the stub).
    pub proxy: Option<f64>,
    pub redis: Option<f64>,
    /// Of `redis`: executing scripts (`INFO commandstats`).
    pub redis_scripts: Option<f64>,
    pub postgres: Option<f64>,
    /// The stub (a thread of the benchmark) and the load generator.
    pub bench: Option<f64>,
}

impl Cpu {
    fn of(runs: &[&Run], proxy: fn(&Run) -> Option<f64>) -> Cpu {
        Cpu {
            proxy: cpu_per_request(runs, proxy),
            redis: cpu_per_request(runs, |r| Some(r.redis.cpu_s)),
            redis_scripts: cpu_per_request(runs, |r| Some(r.redis.script_usec as f64 / 1e6)),
            postgres: cpu_per_request(runs, |r| Some(r.postgres_cpu_s)),
            bench: cpu_per_request(runs, |r| Some(r.bench_cpu_s)),
        }
    }

    /// Every process together: what one request costs the machine.
    pub fn total(&self) -> Option<f64> {
        let parts = [self.proxy, self.redis, self.postgres, self.bench];
        parts
            .iter()
            .any(Option::is_some)
            .then(|| parts.iter().flatten().map(|x| x.max(0.0)).sum())
    }

    fn json(&self) -> Value {
        json!({
            "proxy": self.proxy.map(round1),
            "redis": self.redis.map(round1),
            "redis_scripts": self.redis_scripts.map(round1),
            "postgres": self.postgres.map(round1),
            "stub_and_loadgen": self.bench.map(round1),
            "total": self.total().map(round1),
        })
    }
}

/// CPU µs with one decimal, `–` when not measured.
fn cpu_cell(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}", v.max(0.0)))
}

/// Latency percentiles (µs) at one fixed rate, medians over rounds.
#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub mean: f64,
    pub achieved: f64,
}

/// Why a row has no numbers.
#[derive(Debug, Clone)]
enum Missing {
    Pending(&'static str),
    Skipped(&'static str),
}

struct Row {
    target: &'static Target,
    missing: Option<Missing>,
    saturation: Option<f64>,
    saturation_runs: Vec<f64>,
    /// One per rate.
    at_rate: Vec<Option<Lat>>,
    requests: u64,
    failed: u64,
    /// Medians over the runs at the lowest rate: tollgate's own accounting.
    mean_overhead_us: Option<f64>,
    mean_debit_rtt_us: Option<f64>,
    /// CPU µs per request of each process at the lowest rate and at saturation.
    cpu_light: Cpu,
    cpu_saturation: Cpu,
}

pub struct Summary {
    mode: &'static str,
    plan: Plan,
    passthrough: f64,
    rates: Vec<f64>,
    /// Index of the 50 % rate (or the middle one) in `rates`.
    mid: usize,
    rows: Vec<Row>,
    /// Redis script calls / metered requests, over the metered saturation runs.
    calls_per_metered: Option<f64>,
    metered_calls: u64,
    metered_requests: f64,
    /// Share of the machine's CPU that other processes used during the runs (0..1).
    foreign_share: f64,
}

impl Summary {
    pub fn build(
        plan: &Plan,
        runs: &[Run],
        passthrough: f64,
        rates: &[f64],
        // Why there is no nginx row, if there is none.
        nginx_missing: Option<&'static str>,
        // Likewise for the bare Pingora row.
        bare_missing: Option<&'static str>,
    ) -> Summary {
        let mid = plan
            .fractions
            .iter()
            .position(|f| (f - 0.5).abs() < 1e-9)
            .unwrap_or(plan.fractions.len() / 2);
        let rows = TARGETS
            .iter()
            .map(|t| {
                let excluded = plan
                    .only
                    .as_ref()
                    .is_some_and(|only| !only.iter().any(|n| n == t.name));
                let missing = match (t.pending, t.via) {
                    (Some(why), _) => Some(Missing::Pending(why)),
                    _ if excluded => Some(Missing::Skipped("not in --only")),
                    (None, Via::Nginx) => nginx_missing.map(Missing::Skipped),
                    (None, Via::Bare) => bare_missing.map(Missing::Skipped),
                    _ => None,
                };
                let mine: Vec<&Run> = runs.iter().filter(|r| r.target == t.name).collect();
                let saturation_runs: Vec<f64> = mine
                    .iter()
                    .filter(|r| r.phase == Phase::Saturation)
                    .map(|r| r.throughput())
                    .collect();
                let at = |rate: f64| -> Vec<&&Run> {
                    mine.iter()
                        .filter(|r| r.rate.is_some_and(|x| (x - rate).abs() < 1e-9))
                        .collect()
                };
                let at_rate = rates
                    .iter()
                    .map(|&rate| {
                        let rs = at(rate);
                        let m = |p: &str| {
                            median(&rs.iter().filter_map(|r| r.latency(p)).collect::<Vec<_>>())
                        };
                        Some(Lat {
                            p50: m("p50")?,
                            p90: m("p90")?,
                            p99: m("p99")?,
                            p99_9: m("p99_9")?,
                            mean: m("mean")?,
                            achieved: median(
                                &rs.iter()
                                    .filter_map(|r| r.report["achieved_rate"].as_f64())
                                    .collect::<Vec<_>>(),
                            )?,
                        })
                    })
                    .collect();
                // tollgate's own accounting and the CPU shares at the lowest rate, where no row
                // is overloaded (queueing would swamp them).
                let light_runs: Vec<&Run> = rates
                    .first()
                    .map(|&rate| at(rate).into_iter().copied().collect())
                    .unwrap_or_default();
                let proxy_cpu: fn(&Run) -> Option<f64> = match t.via {
                    Via::Tollgate => |r| r.tollgate_cpu_s,
                    Via::Nginx => |r| r.nginx_cpu_s,
                    Via::Bare => |r| r.bare_cpu_s,
                    Via::Direct => |_| None,
                };
                let metric = |name: &str| {
                    let rs = &light_runs;
                    median(
                        &rs.iter()
                            .filter_map(|r| r.metrics.as_ref()?[name].as_f64())
                            .filter(|x| *x > 0.0)
                            .collect::<Vec<_>>(),
                    )
                };
                Row {
                    target: t,
                    missing,
                    saturation: median(&saturation_runs),
                    saturation_runs,
                    at_rate,
                    requests: mine.iter().map(|r| r.requests()).sum(),
                    failed: mine.iter().map(|r| r.failed()).sum(),
                    mean_overhead_us: metric("mean_overhead_us"),
                    mean_debit_rtt_us: metric("mean_debit_rtt_us"),
                    cpu_light: Cpu::of(&light_runs, proxy_cpu),
                    cpu_saturation: Cpu::of(
                        &mine
                            .iter()
                            .filter(|r| r.phase == Phase::Saturation)
                            .copied()
                            .collect::<Vec<_>>(),
                        proxy_cpu,
                    ),
                }
            })
            .collect();
        let metered: Vec<&Run> = runs
            .iter()
            .filter(|r| r.phase == Phase::Saturation && r.target == "metered")
            .collect();
        let metered_calls: u64 = metered.iter().map(|r| r.redis.script_calls).sum();
        let metered_requests: f64 = metered
            .iter()
            .filter_map(|r| r.metrics.as_ref()?["requests"].as_f64())
            .sum();
        Summary {
            mode: if plan.quick { "quick" } else { "full" },
            plan: plan.clone(),
            passthrough,
            rates: rates.to_vec(),
            mid,
            rows,
            calls_per_metered: (metered_requests > 0.0)
                .then(|| metered_calls as f64 / metered_requests),
            metered_calls,
            metered_requests,
            foreign_share: {
                let wall: f64 = runs.iter().map(|r| r.wall_s).sum();
                let foreign: f64 = runs.iter().map(|r| r.foreign_cpu_s.max(0.0)).sum();
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                if wall > 0.0 {
                    foreign / (wall * cores)
                } else {
                    0.0
                }
            },
        }
    }

    /// "‡" when rate `i` is above the row's own saturation throughput.
    fn over(&self, row: &Row, i: usize) -> &'static str {
        match (row.saturation, self.rates.get(i)) {
            (Some(sat), Some(rate)) if *rate > sat => " ‡",
            _ => "",
        }
    }

    fn row(&self, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.target.name == name && r.missing.is_none())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let pct = |f: f64| format!("{:.0} %", f * 100.0);
        let mid_pct = self
            .plan
            .fractions
            .get(self.mid)
            .map_or("-".into(), |f| pct(*f));
        let _ = writeln!(
            s,
            "\n### tollgate overhead ({} mode: {} round{} × {} s at saturation, then {} s at each of {} of the pass-through saturation)\n",
            self.mode,
            self.plan.rounds,
            if self.plan.rounds == 1 { "" } else { "s" },
            self.plan.saturation.as_secs_f64(),
            self.plan.at_rate.as_secs_f64(),
            self.plan
                .fractions
                .iter()
                .map(|f| pct(*f))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if cfg!(debug_assertions) {
            let _ = writeln!(
                s,
                "**Unoptimized build** (`--profile dev`): a smoke test of the setup; these numbers mean nothing.\n"
            );
        }
        let _ = writeln!(
            s,
            "| target | rps at saturation | vs public | vs bare pingora | vs nginx | p50 @ {mid_pct} | p99 @ {mid_pct} | p99.9 @ {mid_pct} | added p50 vs public | added p99 vs public |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        let public = self.row("public");
        let nginx = self.row("nginx");
        let public_sat = public.and_then(|r| r.saturation);
        let nginx_sat = nginx.and_then(|r| r.saturation);
        let bare_sat = self.row("bare").and_then(|r| r.saturation);
        let public_lat = public.and_then(|r| r.at_rate.get(self.mid).copied().flatten());
        for row in &self.rows {
            let label = row.target.label;
            if let Some(m) = &row.missing {
                let why = match m {
                    Missing::Pending(why) | Missing::Skipped(why) => why,
                };
                let _ = writeln!(
                    s,
                    "| {label} | n/a ({why}) | – | – | – | – | – | – | – | – |"
                );
                continue;
            }
            let ratio = |base: Option<f64>| match (row.saturation, base) {
                (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
                _ => "–".into(),
            };
            let lat = row.at_rate.get(self.mid).copied().flatten();
            let mark = self.over(row, self.mid);
            let cell = |f: fn(&Lat) -> f64| {
                lat.as_ref()
                    .map_or("–".into(), |l| format!("{}{mark}", us(f(l))))
            };
            let added = |f: fn(&Lat) -> f64| match (&lat, &public_lat) {
                _ if row.target.name == "public" => "–".into(),
                (Some(l), Some(p)) => signed_us(f(l) - f(p)),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.saturation.map_or("–".into(), thousands),
                ratio(public_sat),
                ratio(bare_sat),
                ratio(nginx_sat),
                cell(|l| l.p50),
                cell(|l| l.p99),
                cell(|l| l.p99_9),
                added(|l| l.p50),
                added(|l| l.p99),
            );
        }

        // Every rate.
        let _ = writeln!(
            s,
            "\nLatency at fixed rates, p50 / p99 (open loop, from each request's due time):\n"
        );
        let mut head = String::from("| target |");
        let mut rule = String::from("|---|");
        for (f, r) in self.plan.fractions.iter().zip(&self.rates) {
            let _ = write!(head, " {} ({} rps) |", pct(*f), thousands(*r));
            rule.push_str("--:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for row in self.rows.iter().filter(|r| r.missing.is_none()) {
            let _ = write!(s, "| {} |", row.target.label);
            for (i, lat) in row.at_rate.iter().enumerate() {
                match lat {
                    Some(l) => {
                        let mark = self.over(row, i);
                        let _ = write!(s, " {} / {}{mark} |", us(l.p50), us(l.p99));
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }

        // CPU per request, every process.
        let light_pct = self.plan.fractions.first().map_or("-".into(), |f| pct(*f));
        let _ = writeln!(
            s,
            "\nCPU µs per request of each process (/proc, Redis `INFO cpu`; medians over rounds), at {light_pct} of the pass-through saturation and at saturation (the proxy column is tollgate, nginx or the bare Pingora proxy; Redis and Postgres are server-wide):\n"
        );
        let _ = writeln!(
            s,
            "| target | proxy @ {light_pct} | Redis @ {light_pct} | Postgres @ {light_pct} | stub + load generator @ {light_pct} | total µs/request @ {light_pct} | proxy @ saturation | Redis @ saturation | Postgres @ saturation | stub + load generator @ saturation | total µs/request @ saturation |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for row in self.rows.iter().filter(|r| r.missing.is_none()) {
            let _ = write!(s, "| {} |", row.target.label);
            for c in [&row.cpu_light, &row.cpu_saturation] {
                let _ = write!(
                    s,
                    " {} | {} | {} | {} | **{}** |",
                    cpu_cell(c.proxy),
                    cpu_cell(c.redis),
                    cpu_cell(c.postgres),
                    cpu_cell(c.bench),
                    cpu_cell(c.total()),
                );
            }
            s.push('\n');
        }

        // Notes.
        let _ = writeln!(s);
        if self
            .rows
            .iter()
            .any(|r| (0..self.rates.len()).any(|i| !self.over(r, i).is_empty()))
        {
            let _ = writeln!(
                s,
                "- ‡ the rate is above that row's own saturation throughput: requests queue, and the latency measures the backlog."
            );
        }
        let _ = writeln!(
            s,
            "- Pass-through saturation (median of the `public` route): {} rps; fixed rates: {}.",
            thousands(self.passthrough),
            self.rates
                .iter()
                .map(|r| format!("{} rps", thousands(*r)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match self.calls_per_metered {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "- Redis calls per metered request: {c:.2} ({} EVALSHA/EVAL calls in `INFO commandstats` over {} metered requests counted by tollgate, saturation runs).",
                    self.metered_calls, self.metered_requests as u64
                );
            }
            None => {
                let _ = writeln!(s, "- Redis calls per metered request: n/a");
            }
        }
        let own = |name: &str| {
            self.row(name)
                .and_then(|r| r.mean_overhead_us)
                .map_or("–".into(), us)
        };
        let debit = self
            .row("metered")
            .and_then(|r| r.mean_debit_rtt_us)
            .map_or("–".into(), us);
        let light = match (self.plan.fractions.first(), self.rates.first()) {
            (Some(f), Some(r)) => format!("{} ({} rps)", pct(*f), thousands(*r)),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "- Time inside tollgate per request at {light}, mean of its `tollgate_overhead_seconds`: public {}, metered {} (of which the Redis debit round trip: {debit}), SSE {}.",
            own("public"),
            own("metered"),
            own("sse"),
        );
        let cpu = |name: &str, f: fn(&Row) -> Option<f64>| {
            self.row(name).and_then(f).map_or("–".into(), us)
        };
        let _ = writeln!(
            s,
            "- CPU time per request at {light}, from /proc and Redis `INFO cpu`: bare pingora {}, nginx {}; tollgate public {}, metered {} + Redis {} (of which {} running the debit script) + Postgres {} (the journal), SSE {} + Redis {} + Postgres {}.",
            cpu("bare", |r| r.cpu_light.proxy),
            cpu("nginx", |r| r.cpu_light.proxy),
            cpu("public", |r| r.cpu_light.proxy),
            cpu("metered", |r| r.cpu_light.proxy),
            cpu("metered", |r| r.cpu_light.redis),
            cpu("metered", |r| r.cpu_light.redis_scripts),
            cpu("metered", |r| r.cpu_light.postgres),
            cpu("sse", |r| r.cpu_light.proxy),
            cpu("sse", |r| r.cpu_light.redis),
            cpu("sse", |r| r.cpu_light.postgres),
        );
        if let (Some(sse), Some(direct)) = (self.row("sse"), self.row("direct-sse")) {
            if let (Some(a), Some(b)) = (sse.saturation, direct.saturation) {
                let _ = writeln!(
                    s,
                    "- SSE through the metered route vs the stub's SSE directly: {:.2}× the throughput.",
                    a / b.max(1.0)
                );
            }
        }
        let _ = writeln!(
            s,
            "- Other work on the machine during the runs: {:.0} % of its CPU{}.",
            self.foreign_share * 100.0,
            if self.foreign_share > 0.1 {
                " — the numbers are noisy; rerun on a quiet machine"
            } else {
                ""
            }
        );
        let failed: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.failed > 0)
            .map(|r| format!("{} {} of {}", r.target.name, r.failed, r.requests))
            .collect();
        let _ = writeln!(
            s,
            "- Requests without a 200: {}.",
            if failed.is_empty() {
                "none".to_string()
            } else {
                failed.join(", ")
            }
        );
        s
    }

    pub fn json(&self) -> Value {
        let public = self.row("public");
        let nginx = self.row("nginx");
        let public_sat = public.and_then(|r| r.saturation);
        let nginx_sat = nginx.and_then(|r| r.saturation);
        let bare_sat = self.row("bare").and_then(|r| r.saturation);
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let status = match &row.missing {
                    None => json!("measured"),
                    Some(Missing::Pending(why)) => json!(format!("pending: {why}")),
                    Some(Missing::Skipped(why)) => json!(format!("skipped: {why}")),
                };
                let ratio = |base: Option<f64>| match (row.saturation, base) {
                    (Some(x), Some(b)) if b > 0.0 => Some(round2(x / b)),
                    _ => None,
                };
                let at_rate: Vec<Value> = self
                    .plan
                    .fractions
                    .iter()
                    .zip(&self.rates)
                    .enumerate()
                    .map(|(i, (f, rate))| {
                        let lat = row.at_rate.get(i).copied().flatten();
                        let base = public.and_then(|p| p.at_rate.get(i).copied().flatten());
                        let added = |g: fn(&Lat) -> f64| match (&lat, &base) {
                            (Some(l), Some(b)) => Some(g(l) - g(b)),
                            _ => None,
                        };
                        json!({
                            "fraction": f,
                            "rate": rate,
                            "achieved_rate": lat.map(|l| l.achieved),
                            "latency_us": lat.map(|l| json!({
                                "p50": l.p50, "p90": l.p90, "p99": l.p99, "p99_9": l.p99_9, "mean": l.mean,
                            })),
                            "added_vs_public_us": {
                                "p50": added(|l| l.p50),
                                "p99": added(|l| l.p99),
                                "p99_9": added(|l| l.p99_9),
                            },
                        })
                    })
                    .collect();
                json!({
                    "target": row.target.name,
                    "label": row.target.label,
                    "path": row.target.path,
                    "status": status,
                    "saturation_rps": row.saturation,
                    "saturation_rps_per_round": row.saturation_runs,
                    "ratio_vs_public": ratio(public_sat),
                    "ratio_vs_nginx": ratio(nginx_sat),
                    "ratio_vs_bare_pingora": ratio(bare_sat),
                    "at_rates": at_rate,
                    "requests": row.requests,
                    "requests_without_200": row.failed,
                    "tollgate_mean_overhead_us": row.mean_overhead_us,
                    "tollgate_mean_debit_rtt_us": row.mean_debit_rtt_us,
                    "cpu_us_per_request": row.cpu_light.json(),
                    "cpu_us_per_request_saturation": row.cpu_saturation.json(),
                })
            })
            .collect();
        json!({
            "passthrough_saturation_rps": self.passthrough,
            "foreign_cpu_share": round3(self.foreign_share),
            // tollgate_mean_*_us and cpu_us_per_request are measured at this fraction.
            "light_load_fraction": self.plan.fractions.first(),
            "rates": self.rates,
            "redis_calls_per_metered_request": self.calls_per_metered.map(round2),
            "redis_script_calls_metered_saturation": self.metered_calls,
            "metered_requests_saturation": self.metered_requests,
            "rows": rows,
        })
    }
}

/// What the numbers were measured on.
pub fn machine(nginx: Option<&Path>) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string());
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "os": os,
        "nginx": nginx.map(crate::procs::nginx_version),
        "git_rev": git,
    })
}
