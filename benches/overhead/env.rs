//! What the benchmark owns outside its process — a throwaway Postgres database and a Redis key
//! prefix, removed on drop (also when the benchmark panics) — and the small clients it needs:
//! the admin API, Redis `INFO commandstats`, and tollgate's `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{json, Value};
use sqlx::Connection;

/// Benchmark databases are `tg_bench_<unix seconds>_<random>`; older than this, they are
/// leftovers of a killed run and dropped at the next start.
const DB_PREFIX: &str = "tg_bench_";
const STALE_AGE_SECS: u64 = 2 * 3600;

pub fn pg_admin_url() -> String {
    std::env::var("TOLLGATE_TEST_PG_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

/// `n` random lowercase letters and digits.
pub fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Hides a password in a URL before it is printed.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The throwaway database and Redis prefix.
pub struct Resources {
    pub admin_pg_url: String,
    pub db_name: String,
    pub db_url: String,
    pub redis_url: String,
    pub prefix: String,
}

impl Resources {
    pub async fn create() -> Resources {
        let admin_pg_url = pg_admin_url();
        let redis_url = redis_url();
        let mut conn = sqlx::PgConnection::connect(&admin_pg_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach Postgres at {} (set TOLLGATE_TEST_PG_URL, or run scripts/setup): {e}",
                    redact(&admin_pg_url)
                )
            });
        sweep_stale(&mut conn).await;
        let db_name = format!("{DB_PREFIX}{}_{}", unix_now(), random_id(8));
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create the database {db_name}: {e}"));
        let _ = conn.close().await;
        let mut db_url = url::Url::parse(&admin_pg_url).expect("TOLLGATE_TEST_PG_URL is a URL");
        db_url.set_path(&format!("/{db_name}"));
        let resources = Resources {
            admin_pg_url,
            db_name,
            db_url: db_url.to_string(),
            redis_url,
            prefix: format!("tgbench{}", random_id(10)),
        };
        // Fail early and clearly when Redis is not there.
        if let Err(e) = redis_conn(&resources.redis_url).await {
            panic!(
                "cannot reach Redis at {} (set TOLLGATE_TEST_REDIS_URL, or run scripts/setup): {e}",
                redact(&resources.redis_url)
            );
        }
        resources
    }
}

/// Drops the database and deletes the Redis keys of the prefix.
async fn cleanup(admin_pg_url: &str, db_name: &str, redis_url: &str, prefix: &str) {
    match sqlx::PgConnection::connect(admin_pg_url).await {
        Ok(mut conn) => {
            let dropped = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
            ))
            .execute(&mut conn)
            .await;
            if let Err(e) = dropped {
                eprintln!("overhead: cannot drop the database {db_name}: {e}");
            }
            let _ = conn.close().await;
        }
        Err(e) => eprintln!("overhead: cannot drop the database {db_name}: {e}"),
    }
    if let Err(e) = delete_prefix(redis_url, prefix).await {
        eprintln!("overhead: cannot delete the Redis keys of {prefix}: {e}");
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        let admin = self.admin_pg_url.clone();
        let db = self.db_name.clone();
        let redis = self.redis_url.clone();
        let prefix = self.prefix.clone();
        // Drop may run inside a runtime: clean up on a thread with its own.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let work = cleanup(&admin, &db, &redis, &prefix);
                if tokio::time::timeout(Duration::from_secs(20), work)
                    .await
                    .is_err()
                {
                    eprintln!("overhead: cleanup of {db} / {prefix} timed out");
                }
            });
        });
        let _ = done.join();
    }
}

/// Drops benchmark databases left by killed runs.
async fn sweep_stale(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tg\\_bench\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    let now = unix_now();
    for name in names {
        let created = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|c| now.saturating_sub(c) > STALE_AGE_SECS) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *conn)
                .await;
        }
    }
}

async fn redis_conn(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out after 5 s")))??;
    Ok(conn)
}

/// Whether a key belongs to `prefix`: `<prefix>:…` or, hash-tagged, `{<prefix>:…` /
/// `{<prefix>}…`.
fn key_has_prefix(key: &str, prefix: &str) -> bool {
    let rest = key
        .strip_prefix(prefix)
        .or_else(|| key.strip_prefix('{').and_then(|k| k.strip_prefix(prefix)));
    rest.is_some_and(|r| r.starts_with(':') || r.starts_with('}'))
}

async fn delete_prefix(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let mut conn = redis_conn(url).await?;
    let pattern = format!("*{prefix}*");
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys.extend(batch.into_iter().filter(|k| key_has_prefix(k, prefix)));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    for batch in keys.chunks(500) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redis command statistics

/// Redis's own counters (server-wide).
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisStats {
    /// `EVALSHA` + `EVAL` calls so far (`INFO commandstats`).
    pub script_calls: u64,
    /// Microseconds Redis spent executing them.
    pub script_usec: u64,
    /// CPU seconds of the Redis server, user + system (`INFO cpu`).
    pub cpu_s: f64,
}

impl RedisStats {
    pub async fn fetch(url: &str) -> RedisStats {
        let mut conn = redis_conn(url).await.expect("Redis for INFO");
        let info = |section: &'static str| {
            let mut cmd = redis::cmd("INFO");
            cmd.arg(section);
            cmd
        };
        let commandstats: String = info("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        let cpu: String = info("cpu").query_async(&mut conn).await.expect("INFO cpu");
        let stat = |cmd: &str, field: &str| {
            commandstats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:")))
                .and_then(|rest| {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        let cpu_field = |name: &str| {
            cpu.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        RedisStats {
            script_calls: stat("evalsha", "calls") + stat("eval", "calls"),
            script_usec: stat("evalsha", "usec") + stat("eval", "usec"),
            cpu_s: cpu_field("used_cpu_user") + cpu_field("used_cpu_sys"),
        }
    }
}

/// CPU seconds (user + system) one process has used, from /proc/PID/stat.
fn process_cpu_s_own(pid: u32) -> Option<f64> {
    // The clock tick is 100 Hz on every Linux this runs on (USER_HZ).
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// CPU seconds a process and its child processes (nginx: the master's workers) have used.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let mut total = process_cpu_s_own(pid)?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        total += process_cpu_s_own(child).unwrap_or(0.0);
    }
    Some(total)
}

/// CPU seconds (user + system) of the Postgres processes working for this benchmark: the
/// backends connected to its database and the shared background processes (WAL writer,
/// checkpointer, …), not the backends of other databases (other test runs on the same server).
pub fn postgres_cpu_s(db_name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim_end() != "postgres" {
                return false;
            }
            // A backend's title is "postgres: CLUSTER: USER DB HOST(PORT) STATE".
            let title = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let backend = title.contains('(') || title.contains("[local]");
            !backend || title.contains(db_name)
        })
        .filter_map(process_cpu_s_own)
        .sum()
}

/// CPU seconds the whole machine spent busy (/proc/stat).
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: everything but idle, iowait and steal
    // (a process's system time may include the softirq work of its own sockets).
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    (at(0) + at(1) + at(2) + at(5) + at(6)) / 100.0
}

/// CPU seconds of this process (the stub's thread included) and of its waited-for children (the
/// load generator runs).
pub fn self_and_children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime stime cutime cstime.
    (11..=14)
        .filter_map(|i| f.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

// ---------------------------------------------------------------------------------------------
// The admin API

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .expect("building the HTTP client")
}

/// Creates the account `bench` on `tier` and an API key for it; returns the key.
pub async fn account_with_key(
    http: &reqwest::Client,
    admin: SocketAddr,
    token: &str,
    tier: &str,
) -> String {
    let post = |path: &str, body: Value| {
        http.post(format!("http://{admin}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let r = post("/v1/accounts", json!({"id": "bench", "tier": tier}))
        .await
        .expect("POST /v1/accounts");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "creating the account: {status} {text}");
    let r = post("/v1/accounts/bench/keys", json!({"name": "bench"}))
        .await
        .expect("POST /v1/accounts/bench/keys");
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "creating the key: {status} {body}");
    body["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key in {body}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// tollgate's /metrics

/// One scrape of tollgate's Prometheus text: series (name with sorted labels) → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub async fn fetch(http: &reqwest::Client, metrics: SocketAddr) -> Scrape {
        let text = http
            .get(format!("http://{metrics}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("GET /metrics body");
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    out.insert(series.to_string(), v);
                }
            }
        }
        Scrape(out)
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// What tollgate's own metrics say about the requests of `route` between `self` (before)
    /// and `after`.
    pub fn delta(&self, after: &Scrape, route: &str) -> Value {
        let d =
            |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - self.sum(name, labels);
        let r = [("route", route)];
        let requests = d("tollgate_requests_total", &r);
        let forwarded = d(
            "tollgate_requests_total",
            &[("route", route), ("outcome", "forwarded")],
        );
        let mean_us = |sum: f64, count: f64| {
            if count > 0.0 {
                (sum / count * 1e6 * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        let overhead = mean_us(
            d("tollgate_overhead_seconds_sum", &r),
            d("tollgate_overhead_seconds_count", &r),
        );
        let upstream = mean_us(
            d("tollgate_upstream_duration_seconds_sum", &r),
            d("tollgate_upstream_duration_seconds_count", &r),
        );
        let debit_count = d(
            "tollgate_redis_script_duration_seconds_count",
            &[("script", "debit")],
        );
        let debit = mean_us(
            d(
                "tollgate_redis_script_duration_seconds_sum",
                &[("script", "debit")],
            ),
            debit_count,
        );
        json!({
            "requests": requests,
            "forwarded": forwarded,
            "mean_overhead_us": overhead,
            "mean_upstream_us": upstream,
            "debit_calls": debit_count,
            "mean_debit_rtt_us": debit,
        })
    }
}
