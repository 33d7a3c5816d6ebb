//! The test harness: a fresh Postgres database and Redis key prefix per test ([`TestEnv`]), a
//! config writer ([`ConfigBuilder`]), and the real `tollgate serve` process ([`App`]).
//!
//! Environment:
//! - `TOLLGATE_TEST_PG_URL`: a Postgres URL allowed to CREATE/DROP DATABASE
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! - `TOLLGATE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//!
//! Typical use:
//! ```ignore
//! let env = TestEnv::new().await;
//! let up = FakeUpstream::start().await;
//! let app = env.config().toml(&passthrough_toml(&up.url())).spawn().await;
//! let (_account, key) = app.account_with_key("default").await;
//! ```
//! Everything a test creates is removed when the last of its `TestEnv`, `ConfigBuilder` and
//! `App` values is dropped (processes killed, database dropped WITH (FORCE), Redis keys
//! `<prefix>:*` and `{<prefix>:*` deleted), also when the test panics. A failing test prints the captured logs of
//! every tollgate process it started.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
/// The environment variable the generated configs name for the admin token.
pub const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";
/// How long `serve` may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Test databases older than this are leftovers of a killed run and are dropped.
const STALE_DB_AGE: Duration = Duration::from_secs(2 * 3600);
const DB_PREFIX: &str = "tg_t_";

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

/// `base` with its path (the database name) replaced.
fn with_database(base: &str, db: &str) -> String {
    let mut url = url::Url::parse(base).expect("TOLLGATE_TEST_PG_URL is not a URL");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

/// How long a test waits for a revoked key to be refused everywhere: the README's 2 s, plus a
/// margin for a slow, loaded 2-core machine (the test waits on the refusal, not this long).
pub const REVOKED_WITHIN: Duration = Duration::from_secs(5);

/// Polls `check` every 50 ms until it returns true or `timeout` passes; returns the last result.
pub async fn poll_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reqwest client for talking to tollgate: short timeout, no proxy from the environment.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .expect("building the HTTP client")
}

/// Like [`http_client`], but every request opens a new connection.
pub fn http_client_no_pool() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .expect("building the HTTP client")
}

// ---------------------------------------------------------------------------------------------
// Per-test resources

/// What a test owns outside its process: removed when the last holder drops it.
struct Resources {
    admin_pg_url: String,
    db_name: String,
    db_url: String,
    redis_url: String,
    prefix: String,
    admin_token: String,
    dir: tempfile::TempDir,
    config_seq: AtomicUsize,
}

impl Drop for Resources {
    fn drop(&mut self) {
        let admin = self.admin_pg_url.clone();
        let db = self.db_name.clone();
        let redis = self.redis_url.clone();
        let prefix = self.prefix.clone();
        // Drop may run inside a test's runtime: do the async cleanup on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let work = async {
                    if let Err(e) = drop_database(&admin, &db).await {
                        eprintln!("e2e cleanup: cannot drop database {db}: {e}");
                    }
                    if let Err(e) = delete_redis_prefix(&redis, &prefix).await {
                        eprintln!("e2e cleanup: cannot delete Redis keys of {prefix}: {e}");
                    }
                };
                if tokio::time::timeout(Duration::from_secs(20), work)
                    .await
                    .is_err()
                {
                    eprintln!("e2e cleanup: timed out cleaning {db} / {prefix}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn drop_database(admin_url: &str, db: &str) -> Result<(), sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

/// Whether a Redis key belongs to `prefix`: `<prefix>:…` or, inside a hash tag, `{<prefix>:…`
/// / `{<prefix>}…`.
pub fn key_has_prefix(key: &str, prefix: &str) -> bool {
    let rest = key
        .strip_prefix(prefix)
        .or_else(|| key.strip_prefix('{').and_then(|k| k.strip_prefix(prefix)));
    rest.is_some_and(|r| r.starts_with(':') || r.starts_with('}'))
}

/// Every key of `prefix` (see [`key_has_prefix`]), by SCAN.
pub async fn scan_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<String>> {
    let pattern = format!("*{prefix}*");
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        out.extend(keys.into_iter().filter(|k| key_has_prefix(k, prefix)));
        if next == 0 {
            out.sort();
            out.dedup();
            return Ok(out);
        }
        cursor = next;
    }
}

/// Deletes every key of `prefix` (SCAN + UNLINK).
pub async fn delete_redis_prefix(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys = scan_prefix(&mut conn, prefix).await?;
    for batch in keys.chunks(500) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(batch)
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// Drops test databases left by runs that were killed before their cleanup (once per process).
async fn sweep_stale_databases(admin_url: &str) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await else {
        return;
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tg\\_t\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    let now = unix_now();
    for name in names {
        let created = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|c| now.saturating_sub(c) > STALE_DB_AGE.as_secs()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
    let _ = conn.close().await;
}

async fn create_database(admin_url: &str, db: &str) {
    let mut last_error = String::new();
    // CREATE DATABASE fails while another session uses the template; retry a few times.
    for attempt in 0..10u64 {
        match sqlx::PgConnection::connect(admin_url).await {
            Ok(mut conn) => {
                let created = sqlx::query(&format!("CREATE DATABASE \"{db}\""))
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
                match created {
                    Ok(_) => return,
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    panic!(
        "cannot create test database {db} via {admin_url} (set TOLLGATE_TEST_PG_URL): {last_error}"
    );
}

// ---------------------------------------------------------------------------------------------
// TestEnv

/// One test's isolated environment: its own database, Redis prefix, temp dir and admin token.
#[derive(Clone)]
pub struct TestEnv {
    res: Arc<Resources>,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let admin_pg_url = pg_admin_url();
        sweep_stale_databases(&admin_pg_url).await;
        let db_name = format!("{DB_PREFIX}{}_{}", unix_now(), random_id(10));
        create_database(&admin_pg_url, &db_name).await;
        let db_url = with_database(&admin_pg_url, &db_name);
        let dir = tempfile::Builder::new()
            .prefix("tollgate-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        TestEnv {
            res: Arc::new(Resources {
                admin_pg_url,
                db_name,
                db_url,
                redis_url: redis_url(),
                prefix: format!("t{}", random_id(12)),
                admin_token: format!("admin-{}", random_id(32)),
                dir,
                config_seq: AtomicUsize::new(0),
            }),
        }
    }

    /// A config with this environment's defaults; add upstreams/routes/tiers with `.toml(...)`.
    pub fn config(&self) -> ConfigBuilder {
        ConfigBuilder {
            res: Arc::clone(&self.res),
            redis_url: self.res.redis_url.clone(),
            pg_url: self.res.db_url.clone(),
            server: vec!["threads = 2".into(), "shutdown_grace_seconds = 10".into()],
            redis: Vec::new(),
            postgres: vec!["max_connections = 4".into()],
            fragments: Vec::new(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    pub fn db_name(&self) -> &str {
        &self.res.db_name
    }

    /// URL of this test's own database.
    pub fn db_url(&self) -> &str {
        &self.res.db_url
    }

    pub fn redis_url(&self) -> &str {
        &self.res.redis_url
    }

    /// The Redis key prefix of this test (`t<random>`).
    pub fn prefix(&self) -> &str {
        &self.res.prefix
    }

    pub fn admin_token(&self) -> &str {
        &self.res.admin_token
    }

    pub fn dir(&self) -> &Path {
        self.res.dir.path()
    }

    /// Writes a file into this test's temp dir and returns its path.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::write(&path, contents).expect("writing a test file");
        path
    }

    /// A pool on this test's database (for assertions on what tollgate stored).
    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.res.db_url)
            .await
            .expect("connecting to the test database")
    }

    /// A Redis connection (keys of this test start with `prefix()` + `:`).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.res.redis_url.as_str())
            .expect("TOLLGATE_TEST_REDIS_URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to Redis")
    }

    /// The Redis keys this test's processes created (`<prefix>:…` and `{<prefix>:…`).
    pub async fn redis_keys(&self) -> Vec<String> {
        let mut conn = self.redis().await;
        scan_prefix(&mut conn, self.prefix()).await.expect("SCAN")
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// Upstream `up` at `upstream_url`, a catch-all route `all` (cost 0) and an unlimited tier
/// `default`: the smallest config that proxies every request of an authenticated caller.
pub fn passthrough_toml(upstream_url: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream_url}"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
cost = 0

[tiers.default]
monthly_credits = "unlimited"
"#
    )
}

/// Builds a TOML config in the test's temp dir and starts processes with it.
///
/// Sections written: `[server]` (three listeners on 127.0.0.1:0), `[redis]` (url + this test's
/// prefix), `[postgres]` (this test's database), `[admin]`, then every `.toml(...)` fragment in
/// order. Clone it to start a second process with the same config.
#[derive(Clone)]
pub struct ConfigBuilder {
    res: Arc<Resources>,
    redis_url: String,
    pg_url: String,
    server: Vec<String>,
    redis: Vec<String>,
    postgres: Vec<String>,
    fragments: Vec<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl ConfigBuilder {
    /// Appends raw TOML (upstreams, routes, tiers, `[auth]`, ...).
    pub fn toml(mut self, fragment: impl Into<String>) -> Self {
        self.fragments.push(fragment.into());
        self
    }

    /// Adds a `key = value` line to `[server]` (replacing a default with the same key).
    pub fn server(mut self, line: impl Into<String>) -> Self {
        set_line(&mut self.server, line.into());
        self
    }

    /// Adds a `key = value` line to `[redis]`.
    pub fn redis(mut self, line: impl Into<String>) -> Self {
        set_line(&mut self.redis, line.into());
        self
    }

    /// Adds a `key = value` line to `[postgres]`.
    pub fn postgres(mut self, line: impl Into<String>) -> Self {
        set_line(&mut self.postgres, line.into());
        self
    }

    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = url.into();
        self
    }

    pub fn postgres_url(mut self, url: impl Into<String>) -> Self {
        self.pg_url = url.into();
        self
    }

    /// An environment variable for the tollgate process.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// An extra argument after `serve --config FILE` (e.g. `--no-migrate`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn admin_token(&self) -> &str {
        &self.res.admin_token
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        );
        for line in &self.server {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!(
            "\n[redis]\nurl = {}\nkey_prefix = {}\n",
            toml_str(&self.redis_url),
            toml_str(&self.res.prefix)
        ));
        for line in &self.redis {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!("\n[postgres]\nurl = {}\n", toml_str(&self.pg_url)));
        for line in &self.postgres {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!("\n[admin]\ntoken_env = \"{ADMIN_TOKEN_ENV}\"\n"));
        for fragment in &self.fragments {
            out.push('\n');
            out.push_str(fragment);
            out.push('\n');
        }
        // A development knob: run any test's tollgate on credit slices (the slice path must
        // keep every money rule the exact path keeps; a crash's hold is the one difference).
        if std::env::var_os("TOLLGATE_TEST_FORCE_LEASES").is_some() && !out.contains("[leases]") {
            out.push_str("\n[leases]\nenabled = true\n");
        }
        out
    }

    /// Writes the config to a new file in the test's temp dir.
    pub fn write(&self) -> PathBuf {
        let n = self.res.config_seq.fetch_add(1, Ordering::SeqCst);
        let path = self.res.dir.path().join(format!("tollgate-{n}.toml"));
        std::fs::write(&path, self.render()).expect("writing the config");
        path
    }

    /// The environment the process gets: the admin token, then the test's variables.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let mut env = vec![(ADMIN_TOKEN_ENV.to_string(), self.res.admin_token.clone())];
        env.extend(self.env.iter().cloned());
        env
    }

    /// Starts `tollgate serve` and waits for its `listening` line; panics with the log if it
    /// does not come.
    pub async fn spawn(&self) -> App {
        match self.try_spawn().await {
            Ok(app) => app,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`spawn`](Self::spawn), but returns the reason and the log instead of panicking.
    pub async fn try_spawn(&self) -> Result<App, String> {
        let path = self.write();
        let mut args = vec![
            "serve".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        App::start(
            &args,
            &self.process_env(),
            Arc::clone(&self.res),
            self.res.admin_token.clone(),
            path,
        )
        .await
    }

    /// Runs `tollgate serve` expecting it to exit by itself (a start-up failure); returns its
    /// exit status and everything it printed. Panics if it is still running after `timeout`.
    pub async fn serve_until_exit(&self, timeout: Duration) -> ProcessOutput {
        let path = self.write();
        let mut args = vec![
            "serve".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        run_tollgate(&args, &self.process_env(), timeout).await
    }

    /// Runs another subcommand (`check-config`, `migrate`) on this config.
    pub async fn run_subcommand(&self, subcommand: &str, timeout: Duration) -> ProcessOutput {
        let path = self.write();
        let args = vec![
            subcommand.to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        run_tollgate(&args, &self.process_env(), timeout).await
    }
}

fn set_line(lines: &mut Vec<String>, line: String) {
    let key = line
        .split('=')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    lines.retain(|l| l.split('=').next().unwrap_or_default().trim() != key);
    lines.push(line);
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

// ---------------------------------------------------------------------------------------------
// One-shot runs

/// What a finished tollgate process printed.
#[derive(Debug)]
pub struct ProcessOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ProcessOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl std::fmt::Display for ProcessOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the tollgate binary to completion (killed and a panic after `timeout`).
pub async fn run_tollgate(
    args: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> ProcessOutput {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove(ADMIN_TOKEN_ENV)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("starting tollgate");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => ProcessOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for tollgate {args:?}: {e}"),
        Err(_) => panic!("tollgate {args:?} still running after {timeout:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// App: a running `tollgate serve`

/// The addresses from the `listening proxy=… admin=… metrics=…` line.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

fn parse_listening(line: &str) -> Option<Listening> {
    let rest = line.trim().strip_prefix("listening ")?;
    let mut proxy = None;
    let mut admin = None;
    let mut metrics = None;
    for part in rest.split_whitespace() {
        let (k, v) = part.split_once('=')?;
        let addr = v.parse::<SocketAddr>().ok()?;
        match k {
            "proxy" => proxy = Some(addr),
            "admin" => admin = Some(addr),
            "metrics" => metrics = Some(addr),
            _ => {}
        }
    }
    Some(Listening {
        proxy: proxy?,
        admin: admin?,
        metrics: metrics?,
    })
}

type Logs = Arc<Mutex<Vec<String>>>;

fn read_lines(
    stream: impl Read + Send + 'static,
    logs: Logs,
    tag: &'static str,
    mut on_line: impl FnMut(&str) + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    on_line(line);
                    logs.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{tag}{line}"));
                }
            }
        }
    });
}

/// A running `tollgate serve`. Dropping it kills the process (SIGKILL); when the test is
/// panicking, the captured output is printed first.
pub struct App {
    child: Child,
    exit: Option<ExitStatus>,
    pub pid: u32,
    pub addrs: Listening,
    pub config_path: PathBuf,
    admin_token: String,
    logs: Logs,
    client: reqwest::Client,
    _res: Arc<Resources>,
}

impl App {
    async fn start(
        args: &[String],
        env: &[(String, String)],
        res: Arc<Resources>,
        admin_token: String,
        config_path: PathBuf,
    ) -> Result<App, String> {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove(ADMIN_TOKEN_ENV)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {BIN}: {e}"))?;
        let pid = child.id();
        let logs: Logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<Listening>();
        let mut tx = Some(tx);
        if let Some(stderr) = child.stderr.take() {
            read_lines(stderr, Arc::clone(&logs), "", move |line| {
                if let Some(addrs) = parse_listening(line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addrs);
                    }
                }
            });
        }
        if let Some(stdout) = child.stdout.take() {
            read_lines(stdout, Arc::clone(&logs), "[stdout] ", |_| {});
        }
        let dump = |logs: &Logs| logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
        match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(addrs)) => Ok(App {
                child,
                exit: None,
                pid,
                addrs,
                config_path,
                admin_token,
                logs,
                client: http_client(),
                _res: res,
            }),
            Ok(Err(_)) => {
                // stderr closed without the line: the process is exiting.
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut status = None;
                while Instant::now() < deadline {
                    if let Ok(Some(s)) = child.try_wait() {
                        status = Some(s);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(format!(
                    "tollgate {args:?} exited before listening ({status:?}); its output:\n{}",
                    dump(&logs)
                ))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "tollgate {args:?} printed no `listening` line within {START_TIMEOUT:?}; its output:\n{}",
                    dump(&logs)
                ))
            }
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.addrs.proxy
    }

    /// `http://PROXY` + `path` (path starts with '/').
    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.admin)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addrs.metrics)
    }

    /// A shared client (connection pool) for this app.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Everything the process printed so far (stderr; stdout lines tagged `[stdout]`).
    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    pub fn print_logs(&self) {
        eprintln!(
            "----- tollgate pid {} ({}) -----\n{}\n----- end of pid {} -----",
            self.pid,
            self.config_path.display(),
            self.logs(),
            self.pid
        );
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exit {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exit = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ----- admin API -----

    /// Any admin call with the admin token; the body parsed as JSON (`Null` when empty, a JSON
    /// string when it is not JSON).
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, self.admin_url(path))
            .bearer_auth(&self.admin_token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status();
        let text = resp.text().await.expect("admin response body");
        (status, parse_body(&text))
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        self.admin(Method::GET, path, None).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.admin(Method::POST, path, Some(body)).await
    }

    pub async fn admin_put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.admin(Method::PUT, path, Some(body)).await
    }

    pub async fn admin_delete(&self, path: &str) -> (StatusCode, Value) {
        self.admin(Method::DELETE, path, None).await
    }

    /// `POST /v1/accounts`; asserts 201 and returns the account.
    pub async fn create_account(&self, id: &str, tier: &str) -> Value {
        let (status, body) = self
            .admin_post("/v1/accounts", json!({"id": id, "tier": tier}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "create account {id}: {body}");
        body
    }

    /// `POST /v1/accounts/{id}/keys`; asserts 201 and returns (key id, plaintext key).
    pub async fn create_key(&self, account: &str) -> (String, String) {
        let (status, body) = self
            .admin_post(
                &format!("/v1/accounts/{account}/keys"),
                json!({"name": "e2e"}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "create key for {account}: {body}"
        );
        let id = body["id"].as_str().expect("key id").to_string();
        let key = body["key"].as_str().expect("key").to_string();
        (id, key)
    }

    /// `DELETE /v1/keys/{id}`; asserts 204.
    pub async fn revoke_key(&self, key_id: &str) {
        let (status, body) = self.admin_delete(&format!("/v1/keys/{key_id}")).await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "revoke key {key_id}: {body}"
        );
    }

    /// A new account (random id) on `tier` with one key: (account id, key).
    pub async fn account_with_key(&self, tier: &str) -> (String, String) {
        let account = format!("acct_{}", random_id(10));
        self.create_account(&account, tier).await;
        let (_, key) = self.create_key(&account).await;
        (account, key)
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let resp = self
            .client
            .get(self.metrics_url())
            .send()
            .await
            .expect("GET /metrics");
        assert!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        resp.text().await.expect("metrics body")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        self.kill();
    }
}

/// Parses a response body: JSON, `Null` when empty, else the text as a JSON string.
pub fn parse_body(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
    }
}

/// Reads a response: status, headers and JSON body.
pub async fn json_response(
    resp: reqwest::Response,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("response body");
    (status, headers, parse_body(&text))
}

/// Asserts a tollgate error answer: status, JSON content type, `error` code and a message.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    let (got, headers, body) = json_response(resp).await;
    assert_eq!(
        got.as_u16(),
        status,
        "expected {status} {code}, got {got}: {body}"
    );
    let content_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?} for {body}"
    );
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message in {body}"
    );
    body
}

/// A value from the Prometheus text: the sample of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            if all {
                value.parse().ok()
            } else {
                None
            }
        })
}
