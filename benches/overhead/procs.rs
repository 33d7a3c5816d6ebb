//! The processes the benchmark starts: `tollgate serve` and nginx. Their output is kept (the
//! last lines are shown when something fails); both are stopped with SIGTERM (tollgate drains
//! and flushes its journal, nginx shuts down), then SIGKILL after a grace period, also when the
//! benchmark panics.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEEP_LINES: usize = 200;

/// A child process with its output captured.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    grace: Duration,
    stopped: bool,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured; every line also goes to the returned
    /// receiver (for readiness lines).
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        grace: Duration,
    ) -> std::io::Result<(Proc, mpsc::Receiver<String>)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            drain(out, Arc::clone(&log), tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, Arc::clone(&log), tx);
        }
        Ok((
            Proc {
                name,
                child,
                log,
                grace,
                stopped: false,
            },
            rx,
        ))
    }

    /// The last lines the process printed.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        log.into_iter().collect::<Vec<_>>().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL. Returns whether it exited on its own.
    pub fn stop(&mut self) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        if !self.running() {
            return true;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "overhead: {} did not stop within {:?} of SIGTERM; killing it",
            self.name, self.grace
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn drain<R: Read + Send + 'static>(
    stream: R,
    log: Arc<Mutex<VecDeque<String>>>,
    tx: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut log) = log.lock() {
                if log.len() == KEEP_LINES {
                    log.pop_front();
                }
                log.push_back(line.clone());
            }
            let _ = tx.send(line);
        }
    });
}

/// A free port on 127.0.0.1 (bound, then released: good enough for a process started next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// Waits until `addr` accepts TCP connections or `proc` exits.
fn wait_listening(proc: &mut Proc, addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if !proc.running() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

// ---------------------------------------------------------------------------------------------
// tollgate

/// `tollgate serve` and the addresses it printed.
pub struct Tollgate {
    pub proc: Proc,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

/// Starts `tollgate serve --config CONFIG` and waits for its `listening proxy=… admin=…
/// metrics=…` line.
pub fn start_tollgate(bin: &Path, config: &Path, env: &[(&str, &str)]) -> Tollgate {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--config").arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (mut proc, lines) = Proc::spawn("tollgate", cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if let Some(addrs) = parse_listening(&line) {
                    let [proxy, admin, metrics] = addrs;
                    // Keep draining into the log only.
                    std::thread::spawn(move || for _ in lines {});
                    return Tollgate {
                        proc,
                        proxy,
                        admin,
                        metrics,
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                proc.stop();
                panic!(
                    "tollgate serve exited before listening:\n{}",
                    proc.log_tail()
                );
            }
        }
        if Instant::now() >= deadline {
            proc.stop();
            panic!(
                "tollgate serve did not print its listening line within 60 s:\n{}",
                proc.log_tail()
            );
        }
    }
}

/// `listening proxy=A admin=B metrics=C` → the three addresses.
pub fn parse_listening(line: &str) -> Option<[SocketAddr; 3]> {
    let rest = line.trim().strip_prefix("listening ")?;
    let mut out = [None; 3];
    for part in rest.split_whitespace() {
        let (k, v) = part.split_once('=')?;
        let slot = match k {
            "proxy" => 0,
            "admin" => 1,
            "metrics" => 2,
            _ => continue,
        };
        out[slot] = v.parse().ok();
    }
    Some([out[0]?, out[1]?, out[2]?])
}

// ---------------------------------------------------------------------------------------------
// nginx

/// `TOLLGATE_BENCH_NGINX` (a path, or `none` to skip the row), else `nginx` on PATH or in the
/// sbin directories a non-root PATH often lacks.
pub fn find_nginx() -> Option<PathBuf> {
    if let Some(chosen) = std::env::var_os("TOLLGATE_BENCH_NGINX").filter(|v| !v.is_empty()) {
        return (chosen != "none").then(|| PathBuf::from(chosen));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// `nginx -v` (it prints to stderr).
pub fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

/// The nginx configuration: a plain keep-alive reverse proxy, as a user would deploy in front of
/// an AI backend.
fn nginx_config(dir: &Path, listen: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"# Generated by benches/overhead: Debian's nginx as a plain keep-alive reverse proxy to the
# upstream stub, the peer tollgate is compared with.
#
# One worker process: this machine's cores are shared by the load generator, the stub,
# tollgate, Redis and Postgres; more workers would only contend for the same cores (and with
# one worker nginx runs the way its per-core model intends on a dedicated box).
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # Keep client connections open for the whole run, as tollgate does (nginx's default closes
    # them every 1000 requests, which would measure reconnects rather than proxying).
    keepalive_requests 1000000;

    upstream stub {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

/// Starts nginx in `dir` in front of `upstream`; `None` (with the reason printed) when it
/// cannot start.
pub fn start_nginx(bin: &Path, dir: &Path, upstream: SocketAddr) -> Option<(Proc, SocketAddr)> {
    let listen = free_port();
    let config = dir.join("nginx.conf");
    if let Err(e) = std::fs::write(&config, nginx_config(dir, listen, upstream)) {
        eprintln!(
            "overhead: cannot write {}: {e}; skipping the nginx row",
            config.display()
        );
        return None;
    }
    let mut cmd = Command::new(bin);
    // -e: the startup error log (before the config's error_log applies); the default path under
    // /var/log is not writable for a normal user.
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg("stderr");
    let (mut proc, _lines) = match Proc::spawn("nginx", cmd, Duration::from_secs(5)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("overhead: cannot start nginx: {e}; skipping the nginx row");
            return None;
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    if !wait_listening(&mut proc, addr, Duration::from_secs(10)) {
        proc.stop();
        eprintln!(
            "overhead: nginx did not start; skipping the nginx row:\n{}",
            proc.log_tail()
        );
        return None;
    }
    Some((proc, addr))
}
