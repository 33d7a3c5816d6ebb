//! `cargo bench --bench overhead [-- --quick]`: what tollgate costs on top of a plain reverse
//! proxy, measured end to end on this machine.
//!
//! One run starts a fast upstream stub (`stub.rs`: a fixed ~1 KiB JSON body, and an SSE
//! variant), `tollgate serve` (the binary of this build, on a throwaway Postgres database and
//! Redis key prefix) and Debian's nginx as a plain keep-alive reverse proxy to the same stub,
//! then drives each target with the real load generator (`tollgate loadtest --json`, a
//! subprocess):
//!
//! - **direct**: the stub itself (what the load generator and the stub cost);
//! - **nginx**: the peer users would otherwise deploy;
//! - **bare pingora**: the floor — the smallest Pingora proxy, run like tollgate's (`bare.rs`);
//! - **public**: tollgate's `public = true` route (pass-through: routing and proxying only);
//! - **metered**: a fixed-price route (auth from the key cache, one Redis debit, journal);
//! - **token-priced**: a `pricing = {…}` route: the request body read, a hold, the usage read
//!   from the response, the settle (two ledger scripts per request);
//! - **SSE**: a 10-event stream through the metered route (and **direct SSE** as its baseline).
//!
//! Targets run in interleaved rounds (each round visits every target once, in an order rotated
//! per round, so drift hits all of them alike), first closed-loop at saturation, then open-loop
//! at 25/50/75 % of the pass-through (`public`) saturation. Medians over rounds go to a markdown
//! table on stdout and, with every raw report, to `target/overhead.json`. Every run also records
//! the CPU time of each process (the proxy in front, Redis, Postgres, the stub and the load
//! generator): the tables give it per request.
//!
//! `--only public,bare,…` measures only the named rows (and always `public`, the reference of
//! the rates): for profiling one path with `perf record -g -- cargo bench …`.
//!
//! `--quick` (one short round, one rate; under a minute) is CI's smoke test: it checks that the
//! whole setup works and prints the table, and asserts nothing about timings.
//!
//! Environment: `TOLLGATE_TEST_PG_URL` (a Postgres URL allowed to CREATE/DROP DATABASE; default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `TOLLGATE_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`); `nginx` on PATH (or in /usr/sbin), else its row is skipped
//! (`TOLLGATE_BENCH_NGINX` names another binary, or `none` to skip it).

// A benchmark harness should stop loudly: a broken setup is a panic with the reason, not a number.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bare;
mod env;
mod load;
mod procs;
mod report;
mod stub;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use report::{Phase, Run};

/// How a target is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Nginx,
    /// The bare Pingora proxy (`bare.rs`).
    Bare,
    Tollgate,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Key in the JSON output.
    pub name: &'static str,
    /// The row's label in the table.
    pub label: &'static str,
    pub via: Via,
    /// The request path (tollgate's routes are told apart by their prefix).
    pub path: &'static str,
    /// Sends the API key (metered routes).
    pub keyed: bool,
    /// Listed but not measured, and why.
    pub pending: Option<&'static str>,
}

/// The rows, in table order.
pub const TARGETS: &[Target] = &[
    Target {
        name: "direct",
        label: "direct (stub)",
        via: Via::Direct,
        path: "/v1/chat/completions",
        keyed: false,
        pending: None,
    },
    Target {
        name: "nginx",
        label: "nginx (keep-alive proxy)",
        via: Via::Nginx,
        path: "/v1/chat/completions",
        keyed: false,
        pending: None,
    },
    Target {
        name: "bare",
        label: "bare pingora (the floor)",
        via: Via::Bare,
        path: "/v1/chat/completions",
        keyed: false,
        pending: None,
    },
    Target {
        name: "public",
        label: "tollgate `public` route",
        via: Via::Tollgate,
        path: "/public/v1/chat/completions",
        keyed: false,
        pending: None,
    },
    Target {
        name: "metered",
        label: "tollgate metered, fixed price",
        via: Via::Tollgate,
        path: "/metered/v1/chat/completions",
        keyed: true,
        pending: None,
    },
    Target {
        name: "token-priced",
        label: "tollgate metered, token-priced",
        via: Via::Tollgate,
        path: "/tokens/v1/chat/completions",
        keyed: true,
        pending: None,
    },
    Target {
        name: "sse",
        label: "tollgate metered, SSE (10 events)",
        via: Via::Tollgate,
        path: "/metered/v1/sse",
        keyed: true,
        pending: None,
    },
    Target {
        name: "direct-sse",
        label: "direct SSE (stub, reference)",
        via: Via::Direct,
        path: "/v1/sse",
        keyed: false,
        pending: None,
    },
];

/// tollgate's routes, one inline table per line.
const ROUTES: &str = r#"routes = [
    { name = "public", path_prefix = "/public", upstream = "stub", public = true },
    { name = "metered", path_prefix = "/metered", upstream = "stub", cost = 0.001 },
    { name = "tokens", path_prefix = "/tokens", upstream = "stub", pricing = { input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5, reserve = 1 } },
]
"#;

/// The tier of the benchmark account: an allowance no run can exhaust, no quotas, no limits.
const TIER: &str = "bench";

/// How long and how often.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub saturation: Duration,
    pub at_rate: Duration,
    pub warmup: Duration,
    /// Fixed rates as fractions of the pass-through saturation.
    pub fractions: Vec<f64>,
    /// Keep-alive connections of the load generator.
    pub connections: usize,
    /// `--only`: the rows to measure (`None`: all).
    pub only: Option<Vec<String>>,
}

impl Plan {
    fn from_args() -> Plan {
        let mut quick = false;
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--only" => {
                    let names = args.next().expect("--only takes a list of row names");
                    let mut names: Vec<String> = names.split(',').map(str::to_string).collect();
                    for n in &names {
                        assert!(
                            TARGETS.iter().any(|t| t.name == n),
                            "--only: no row {n:?} (rows: {})",
                            TARGETS
                                .iter()
                                .map(|t| t.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                    names.push("public".into());
                    only = Some(names);
                }
                // `cargo bench` passes --bench to every benchmark binary.
                "--bench" => {}
                other => eprintln!(
                    "overhead: ignoring the argument {other:?} (known: --quick, --only ROWS)"
                ),
            }
        }
        let plan = if quick {
            Plan {
                quick,
                rounds: 1,
                saturation: Duration::from_secs(1),
                at_rate: Duration::from_secs(1),
                warmup: Duration::from_millis(250),
                fractions: vec![0.5],
                connections: 32,
                only: None,
            }
        } else {
            Plan {
                quick,
                rounds: 3,
                saturation: Duration::from_secs(5),
                at_rate: Duration::from_secs(5),
                warmup: Duration::from_millis(500),
                fractions: vec![0.25, 0.5, 0.75],
                connections: 32,
                only: None,
            }
        };
        Plan { only, ..plan }
    }
}

/// tollgate's config; `redacted` hides passwords in the URLs (for the JSON output).
fn tollgate_config(res: &env::Resources, stub: SocketAddr, redacted: bool) -> String {
    let url = |u: &str| {
        if redacted {
            env::redact(u)
        } else {
            u.to_string()
        }
    };
    format!(
        r#"# Generated by benches/overhead.
{ROUTES}
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_grace_seconds = 5

[redis]
url = "{redis}"
key_prefix = "{prefix}"
group_commit = {group_commit}

[postgres]
url = "{pg}"

[admin]
token_env = "TOLLGATE_BENCH_ADMIN_TOKEN"
{leases}
[[upstreams]]
name = "stub"
url = "http://{stub}"

[tiers.{TIER}]
monthly_credits = 1000000000
"#,
        redis = url(&res.redis_url),
        prefix = res.prefix,
        pg = url(&res.db_url),
        group_commit = group_commit(),
        leases = if slices() {
            "\n[leases]\nenabled = true\n"
        } else {
            ""
        },
    )
}

/// `TOLLGATE_BENCH_SLICES=1`: tollgate serves the metered rows (fixed price, token-priced and
/// SSE holds) from credit slices (`[leases] enabled = true`); run once with and once without
/// to compare the two paths.
fn slices() -> bool {
    std::env::var("TOLLGATE_BENCH_SLICES").is_ok_and(|v| v == "1")
}

/// `TOLLGATE_BENCH_GROUP_COMMIT=0`: one debit script call per exact debit (`[redis]
/// group_commit = false`); grouped by default, as in production.
fn group_commit() -> bool {
    std::env::var("TOLLGATE_BENCH_GROUP_COMMIT").map_or(true, |v| v != "0")
}

/// The tollgate binary of this build (cargo builds it for benchmarks).
fn tollgate_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tollgate"));
    if !bin.is_file() {
        panic!(
            "the tollgate binary is missing at {} (run through `cargo bench --bench overhead`, which builds it)",
            bin.display()
        );
    }
    bin
}

/// Where `overhead.json` goes: the target directory this benchmark was built in.
fn target_dir() -> PathBuf {
    // target/<profile>/deps/overhead-HASH
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.join("CACHEDIR.TAG").exists() || dir.ends_with("target"))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// One request per target before measuring: the expected status and shape, the key cached and
/// the account hydrated.
async fn smoke_check(http: &reqwest::Client, target: &Target, url: &str, key: Option<&str>) {
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(load::REQUEST_BODY);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: POST {url}: {e}", target.name));
    let status = resp.status();
    let charged = resp
        .headers()
        .get("x-credits-charged")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        status, 200,
        "{}: POST {url} answered {status}: {body}",
        target.name
    );
    if target.keyed {
        assert!(
            charged.is_some(),
            "{}: no X-Credits-Charged on a metered response",
            target.name
        );
    }
    if target.path.ends_with("/sse") {
        let events = body.matches("data: ").count();
        assert!(
            events == stub::SSE_EVENTS && body.ends_with("data: [DONE]\n\n"),
            "{}: expected {} SSE events, got {body:?}",
            target.name,
            stub::SSE_EVENTS
        );
    } else {
        assert_eq!(
            body.len(),
            stub::JSON_BODY_BYTES,
            "{}: unexpected body {body:?}",
            target.name
        );
    }
}

/// The order of round `round`: every target once, rotated by one per round.
fn rotated_refs(items: &[(Target, String)], round: usize) -> Vec<(&Target, &str)> {
    let n = items.len().max(1);
    items
        .iter()
        .cycle()
        .skip(round % n)
        .take(items.len())
        .map(|(t, u)| (t, u.as_str()))
        .collect()
}

/// What every measurement needs.
struct Bench<'a> {
    rt: &'a tokio::runtime::Runtime,
    http: &'a reqwest::Client,
    bin: &'a std::path::Path,
    plan: &'a Plan,
    key: &'a str,
    redis_url: &'a str,
    db_name: &'a str,
    /// tollgate's metrics listener.
    metrics: SocketAddr,
    /// Requests the stub answered so far.
    served: &'a AtomicU64,
    tollgate_pid: u32,
    nginx_pid: Option<u32>,
    bare_pid: Option<u32>,
}

/// Counters read before and after each run.
struct Snapshot {
    upstream: u64,
    tollgate_cpu: Option<f64>,
    nginx_cpu: Option<f64>,
    bare_cpu: Option<f64>,
    postgres_cpu: f64,
    machine: f64,
    ours: f64,
    redis: env::RedisStats,
    metrics: Option<env::Scrape>,
}

impl Bench<'_> {
    /// CPU seconds used so far by everything a run leaves work for: tollgate, nginx, Redis and
    /// Postgres.
    fn busy_cpu_s(&self) -> f64 {
        env::process_cpu_s(self.tollgate_pid).unwrap_or(0.0)
            + self.nginx_pid.and_then(env::process_cpu_s).unwrap_or(0.0)
            + self.bare_pid.and_then(env::process_cpu_s).unwrap_or(0.0)
            + env::postgres_cpu_s(self.db_name)
            + self
                .rt
                .block_on(env::RedisStats::fetch(self.redis_url))
                .cpu_s
    }

    /// Waits (up to 20 s) until the previous run's leftovers are gone — requests an overloaded
    /// run queued, the journal backlog on its way to Postgres — i.e. until tollgate, nginx, Redis
    /// and Postgres together use less than 10 % of a core. Returns the seconds waited.
    fn settle(&self) -> f64 {
        const WINDOW: Duration = Duration::from_millis(250);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let before = self.busy_cpu_s();
            std::thread::sleep(WINDOW);
            if self.busy_cpu_s() - before < 0.1 * WINDOW.as_secs_f64() {
                break;
            }
        }
        started.elapsed().as_secs_f64()
    }

    /// One load-generator run against `url`; for tollgate targets, also the Redis script calls
    /// and tollgate's own metrics over the run.
    fn measure(&self, phase: Phase, round: usize, t: &Target, url: &str, rate: Option<f64>) -> Run {
        let spec = load::Spec {
            url: url.to_string(),
            key: t.keyed.then_some(self.key),
            rate,
            connections: self.plan.connections,
            duration: if rate.is_some() {
                self.plan.at_rate
            } else {
                self.plan.saturation
            },
            warmup: self.plan.warmup,
        };
        let via_tollgate = t.via == Via::Tollgate;
        let settle_s = self.settle();
        let snapshot = || Snapshot {
            upstream: self.served.load(Ordering::Relaxed),
            tollgate_cpu: env::process_cpu_s(self.tollgate_pid),
            nginx_cpu: self.nginx_pid.and_then(env::process_cpu_s),
            bare_cpu: self.bare_pid.and_then(env::process_cpu_s),
            postgres_cpu: env::postgres_cpu_s(self.db_name),
            machine: env::machine_busy_s(),
            ours: env::self_and_children_cpu_s(),
            redis: self.rt.block_on(env::RedisStats::fetch(self.redis_url)),
            metrics: via_tollgate.then(|| {
                self.rt
                    .block_on(env::Scrape::fetch(self.http, self.metrics))
            }),
        };
        let before = snapshot();
        let wall = Instant::now();
        let report = load::run(self.bin, &spec);
        let wall_s = wall.elapsed().as_secs_f64();
        let after = snapshot();
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        // The route is the path's first segment (`/metered/…` → `metered`).
        let route = t
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        let run = Run {
            phase,
            round,
            target: t.name,
            rate,
            report,
            upstream_requests: after.upstream.saturating_sub(before.upstream),
            redis: env::RedisStats {
                script_calls: after
                    .redis
                    .script_calls
                    .saturating_sub(before.redis.script_calls),
                script_usec: after
                    .redis
                    .script_usec
                    .saturating_sub(before.redis.script_usec),
                cpu_s: after.redis.cpu_s - before.redis.cpu_s,
            },
            tollgate_cpu_s: delta(before.tollgate_cpu, after.tollgate_cpu),
            nginx_cpu_s: delta(before.nginx_cpu, after.nginx_cpu),
            bare_cpu_s: delta(before.bare_cpu, after.bare_cpu),
            bench_cpu_s: after.ours - before.ours,
            postgres_cpu_s: after.postgres_cpu - before.postgres_cpu,
            // What else ran: the machine's busy time minus every process of the benchmark.
            foreign_cpu_s: (after.machine - before.machine)
                - (after.ours - before.ours)
                - delta(before.tollgate_cpu, after.tollgate_cpu).unwrap_or(0.0)
                - delta(before.nginx_cpu, after.nginx_cpu).unwrap_or(0.0)
                - delta(before.bare_cpu, after.bare_cpu).unwrap_or(0.0)
                - (after.postgres_cpu - before.postgres_cpu)
                - (after.redis.cpu_s - before.redis.cpu_s),
            settle_s,
            wall_s,
            metrics: match (&before.metrics, &after.metrics) {
                (Some(b), Some(a)) => Some(b.delta(a, route)),
                _ => None,
            },
        };
        eprintln!("overhead: {}", run.describe());
        run
    }
}

fn main() {
    // Started again as the bare Pingora proxy (`bare::start`).
    if let Ok(upstream) = std::env::var(bare::ENV) {
        bare::serve(&upstream);
    }
    let started = Instant::now();
    let plan = Plan::from_args();
    let bin = tollgate_bin();
    let body = stub::json_body();
    assert!(
        body.len() == stub::JSON_BODY_BYTES && serde_json::from_str::<Value>(&body).is_ok(),
        "the stub's body is not {} bytes of JSON",
        stub::JSON_BODY_BYTES
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the benchmark's runtime");
    let http = env::http_client();

    let (stub_addr, served) = stub::start();
    // Declared before the processes: dropped (database and keys removed) after they stopped.
    let resources = rt.block_on(env::Resources::create());
    let dir = tempfile::Builder::new()
        .prefix("tollgate-overhead-")
        .tempdir()
        .expect("a temp dir");
    {
        use std::os::unix::fs::PermissionsExt;
        // nginx's workers may run as another user when the benchmark runs as root.
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }

    let nginx_bin = procs::find_nginx();
    let nginx = match &nginx_bin {
        Some(nginx_bin) => procs::start_nginx(nginx_bin, dir.path(), stub_addr),
        None => {
            println!("nginx not found: skipping the nginx row");
            None
        }
    };
    let nginx_addr = nginx.as_ref().map(|(_, addr)| *addr);
    let bare = bare::start(stub_addr);
    let bare_addr = bare.as_ref().map(|(_, addr)| *addr);

    let admin_token = format!("bench-admin-{}", env::random_id(24));
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, tollgate_config(&resources, stub_addr, false))
        .expect("writing the config");
    let mut tollgate = procs::start_tollgate(
        &bin,
        &config_path,
        &[("TOLLGATE_BENCH_ADMIN_TOKEN", admin_token.as_str())],
    );
    let key = rt.block_on(env::account_with_key(
        &http,
        tollgate.admin,
        &admin_token,
        TIER,
    ));
    eprintln!(
        "overhead: stub http://{stub_addr}, tollgate http://{}, nginx {}; setup took {:.1} s",
        tollgate.proxy,
        nginx_addr.map_or("-".to_string(), |a| format!("http://{a}")),
        started.elapsed().as_secs_f64()
    );

    // What gets measured.
    let url_of = |t: &Target| -> Option<String> {
        let base = match t.via {
            Via::Direct => stub_addr,
            Via::Nginx => nginx_addr?,
            Via::Bare => bare_addr?,
            Via::Tollgate => tollgate.proxy,
        };
        Some(format!("http://{base}{}", t.path))
    };
    let active: Vec<(Target, String)> = TARGETS
        .iter()
        .filter(|t| t.pending.is_none())
        .filter(|t| {
            plan.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|n| n == t.name))
        })
        .filter_map(|t| url_of(t).map(|u| (*t, u)))
        .collect();
    for (t, url) in &active {
        let key = t.keyed.then_some(key.as_str());
        rt.block_on(smoke_check(&http, t, url, key));
    }

    let bench = Bench {
        rt: &rt,
        http: &http,
        bin: &bin,
        plan: &plan,
        key: &key,
        redis_url: &resources.redis_url,
        db_name: &resources.db_name,
        metrics: tollgate.metrics,
        served: &served,
        tollgate_pid: tollgate.proc.pid(),
        nginx_pid: nginx.as_ref().map(|(p, _)| p.pid()),
        bare_pid: bare.as_ref().map(|(p, _)| p.pid()),
    };
    let mut runs: Vec<Run> = Vec::new();

    // 1. Saturation, interleaved rounds.
    for round in 0..plan.rounds {
        for (t, url) in rotated_refs(&active, round) {
            runs.push(bench.measure(Phase::Saturation, round, t, url, None));
        }
    }
    let passthrough = report::median(
        &runs
            .iter()
            .filter(|r| r.phase == Phase::Saturation && r.target == "public")
            .map(|r| r.throughput())
            .collect::<Vec<_>>(),
    )
    .expect("the public route's saturation throughput");
    let rates: Vec<f64> = plan
        .fractions
        .iter()
        .map(|f| (f * passthrough).max(1.0))
        .collect();

    // 2. Fixed rates, interleaved rounds.
    for round in 0..plan.rounds {
        for &rate in &rates {
            for (t, url) in rotated_refs(&active, round) {
                runs.push(bench.measure(Phase::Rate, round, t, url, Some(rate)));
            }
        }
    }
    // Stop tollgate first (SIGTERM: drains and flushes the journal), then nginx; the database
    // and Redis keys go when `resources` drops at the end.
    let clean_exit = tollgate.proc.stop();
    if !clean_exit {
        eprintln!("overhead: tollgate log tail:\n{}", tollgate.proc.log_tail());
    }
    drop(nginx);
    drop(bare);

    let nginx_missing = match (&nginx_bin, nginx_addr) {
        (None, _) => Some("nginx not found"),
        (Some(_), None) => Some("nginx did not start"),
        (Some(_), Some(_)) => None,
    };
    let bare_missing = bare_addr
        .is_none()
        .then_some("the bare proxy did not start");
    let summary = report::Summary::build(
        &plan,
        &runs,
        passthrough,
        &rates,
        nginx_missing,
        bare_missing,
    );
    print!("{}", summary.markdown());
    let machine = report::machine(nginx_bin.as_deref());
    let out = json!({
        "benchmark": "overhead",
        "mode": if plan.quick { "quick" } else { "full" },
        "optimized": !cfg!(debug_assertions),
        "generated_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": machine,
        "plan": {
            "rounds": plan.rounds,
            "saturation_s": plan.saturation.as_secs_f64(),
            "at_rate_s": plan.at_rate.as_secs_f64(),
            "warmup_s": plan.warmup.as_secs_f64(),
            "rate_fractions": plan.fractions,
            "connections": plan.connections,
            "loadtest_threads": 1,
            "request_body": load::REQUEST_BODY,
            "json_body_bytes": stub::JSON_BODY_BYTES,
            "sse_events": stub::SSE_EVENTS,
        },
        "tollgate_config": tollgate_config(&resources, stub_addr, true),
        "tollgate_clean_exit": clean_exit,
        "tollgate_log_tail": tollgate.proc.log_tail().lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>(),
        "summary": summary.json(),
        "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    let path = target_dir().join("overhead.json");
    match serde_json::to_string_pretty(&out).map(|s| std::fs::write(&path, s + "\n")) {
        Ok(Ok(())) => println!("\nRaw numbers: {}", path.display()),
        Ok(Err(e)) => eprintln!("overhead: cannot write {}: {e}", path.display()),
        Err(e) => eprintln!("overhead: cannot serialize the results: {e}"),
    }
    eprintln!("overhead: done in {:.1} s", started.elapsed().as_secs_f64());
}
