//! A private Redis Cluster for one test: three primaries on loopback ports, each a
//! `redis-server` child process with its own directory (AOF on, `appendfsync always`), joined
//! with `redis-cli --cluster create`; [`RedisCluster::start`] runs no replicas,
//! [`RedisCluster::start_with_replicas`] gives each primary one (`--cluster-replicas 1`, six
//! nodes: primaries are nodes 0..3 at the start, replicas 3..6). A test can kill a node
//! (SIGKILL) and start it again on the same port with the same data, wait for a killed
//! primary's replica to take over its slots ([`RedisCluster::wait_promotion`]), ask which node
//! owns a key, and move a slot to another node the way `redis-cli --cluster reshard` does, in
//! steps (so load can run while the slot is MIGRATING and after it moved).
//!
//! ```ignore
//! let cluster = RedisCluster::start(env.dir()).await;
//! let app = env.config().redis_url(cluster.url()).spawn().await;
//! ```
//!
//! The nodes are killed and their directories removed when the [`RedisCluster`] is dropped,
//! also when the test panics. Each node runs under a small `sh` watchdog that holds a pipe from
//! the test process: if the test process dies without running its destructors (killed, aborted),
//! the pipe closes and the watchdog kills its node, so no `redis-server` outlives the tests.
//!
//! Needs `redis-server` and `redis-cli` (7.x) in `PATH` (`scripts/setup` installs them).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::MultiplexedConnection;

use crate::harness::random_id;

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// Primaries per cluster.
pub const NODES: usize = 3;
/// `cluster-node-timeout` of the nodes (ms): a killed primary is flagged FAIL after this, and
/// its replica (if any) is promoted about a second later.
pub const NODE_TIMEOUT_MS: u64 = 2000;
/// How long a killed primary's replica may take to be promoted and known by every node:
/// FAIL after the node timeout (plus gossip), the election (0.5–1 s delay), the new
/// configuration spreading; generous for a loaded test machine.
pub const PROMOTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting a cluster on fresh ports when a port was taken meanwhile.
const START_ATTEMPTS: usize = 5;
const PING_TIMEOUT: Duration = Duration::from_secs(15);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `redis-server "$@"` in the background, prints its pid, and kills it (SIGKILL) as soon
/// as its stdin (a pipe held by the test process) reaches end of file.
const WATCHDOG: &str = r#"
"$0" "$@" </dev/null >>"$TG_NODE_STDERR" 2>&1 &
pid=$!
echo "$pid"
while read -r _; do :; done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;

/// Ports handed out in this test process and not yet released (parallel tests).
static PORTS_IN_USE: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn ports_in_use() -> std::sync::MutexGuard<'static, Vec<u16>> {
    PORTS_IN_USE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The full path of `program` in `PATH`, or a panic saying how to get it.
fn find_program(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is not installed (not found in PATH): the Redis Cluster tests start \
                 their own 3-node cluster and need redis-server and redis-cli 7.x; run \
                 scripts/setup (it installs the redis-server and redis-tools packages) or \
                 `apt-get install redis-server redis-tools`"
            )
        })
}

/// CRC16 (XMODEM) of the key's hash tag modulo 16384: the slot Redis Cluster gives a key
/// (computed here independently of tollgate; [`RedisCluster::keyslot`] asks Redis).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// A Redis connection to one node (`redis://127.0.0.1:PORT`), generous timeouts.
pub async fn node_connection(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The state letter of a process (`R`, `S`, `Z`, ...) from `/proc/PID/stat`, `None` when it is
/// gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// Alive: exists and is not a zombie (the watchdog reaps its node only when told to stop).
fn process_alive(pid: u32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// A `redis-server` process under its watchdog.
struct NodeProcess {
    watchdog: Child,
    pid: u32,
}

impl NodeProcess {
    fn spawn(redis_server: &Path, port: u16, dir: &Path) -> Result<NodeProcess, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let args = node_args(port, dir);
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(redis_server)
            .args(&args)
            .env("TG_NODE_STDERR", dir.join("stderr.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start sh for redis-server: {e}"))?;
        let mut line = String::new();
        let read = watchdog
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        match (read, line.trim().parse::<u32>()) {
            (Some(Ok(_)), Ok(pid)) => Ok(NodeProcess { watchdog, pid }),
            _ => {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
                Err(format!(
                    "the redis-server watchdog printed no pid ({line:?})"
                ))
            }
        }
    }

    fn alive(&self) -> bool {
        process_alive(self.pid)
    }

    /// SIGKILL to the node, then the watchdog is told to stop (stdin closed) and reaped.
    fn kill(mut self) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
        // The watchdog reaped the node (`wait`), so the pid is gone now.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn node_args(port: u16, dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &NODE_TIMEOUT_MS.to_string(),
        "--cluster-require-full-coverage",
        "no",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
        &dir,
        "--logfile",
        &format!("{dir}/redis.log"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One primary: its port (the cluster bus is port + 10000), directory and node id.
struct Node {
    port: u16,
    dir: PathBuf,
    id: String,
    process: Option<NodeProcess>,
}

/// Which node owns each slot, and the replicas of each primary, from `CLUSTER SLOTS` (which
/// lists a primary with its replicas not flagged as failing).
#[derive(Debug, Clone)]
pub struct SlotMap {
    owners: Vec<Option<usize>>,
    replicas: BTreeMap<usize, BTreeSet<usize>>,
}

impl SlotMap {
    /// The nodes (indexes) serving slots.
    pub fn primaries(&self) -> BTreeSet<usize> {
        self.owners.iter().copied().flatten().collect()
    }

    /// The replicas of primary `i` (indexes), as listed with its slots.
    pub fn replicas_of(&self, i: usize) -> BTreeSet<usize> {
        self.replicas.get(&i).cloned().unwrap_or_default()
    }

    /// The slots node `i` serves.
    pub fn slots_of(&self, i: usize) -> Vec<u16> {
        (0..SLOTS).filter(|&s| self.owner(s) == Some(i)).collect()
    }

    /// The node (index) serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        self.owners.get(usize::from(slot)).copied().flatten()
    }

    /// The node (index) serving `key`; panics when no node does.
    pub fn owner_of_key(&self, key: &str) -> usize {
        let slot = key_slot(key);
        self.owner(slot)
            .unwrap_or_else(|| panic!("no node serves slot {slot} (key {key})"))
    }
}

/// A slot being moved from one node to another (see [`RedisCluster::begin_migration`]).
#[derive(Debug, Clone)]
pub struct SlotMigration {
    pub slot: u16,
    pub from: usize,
    pub to: usize,
    pub keys_moved: usize,
}

/// A running 3-primary Redis Cluster on loopback, with or without a replica per primary.
pub struct RedisCluster {
    root: PathBuf,
    nodes: Vec<Node>,
    redis_server: PathBuf,
    /// Replicas per primary (0 or 1).
    replicas: usize,
}

impl RedisCluster {
    /// Starts three nodes in a new directory under `dir` and joins them into a cluster
    /// (`redis-cli --cluster create`); returns once every node says `cluster_state:ok` and
    /// knows every slot. Retries on fresh ports when a port was taken meanwhile.
    pub async fn start(dir: &Path) -> RedisCluster {
        Self::start_nodes(dir, 0).await
    }

    /// Starts six nodes: three primaries (nodes 0, 1, 2) each with one replica (nodes 3, 4,
    /// 5, in some order: see [`SlotMap::replicas_of`]), as `redis-cli --cluster create
    /// --cluster-replicas 1` pairs them. Returns once every node is healthy as for
    /// [`start`](Self::start), every primary lists its replica, and every replica's link to
    /// its primary is up (its initial sync done), so a killed primary can fail over.
    pub async fn start_with_replicas(dir: &Path) -> RedisCluster {
        Self::start_nodes(dir, 1).await
    }

    async fn start_nodes(dir: &Path, replicas: usize) -> RedisCluster {
        let redis_server = find_program("redis-server");
        let redis_cli = find_program("redis-cli");
        let mut failures = Vec::new();
        for attempt in 0..START_ATTEMPTS {
            let root = dir.join(format!("redis-cluster-{}", random_id(6)));
            let ports = pick_ports(NODES * (1 + replicas));
            let mut cluster = RedisCluster {
                replicas,
                root,
                nodes: ports
                    .iter()
                    .map(|&port| Node {
                        port,
                        dir: PathBuf::new(),
                        id: String::new(),
                        process: None,
                    })
                    .collect(),
                redis_server: redis_server.clone(),
            };
            for (i, node) in cluster.nodes.iter_mut().enumerate() {
                node.dir = cluster.root.join(format!("node{i}-{}", node.port));
            }
            match cluster.boot(&redis_cli).await {
                Ok(()) => return cluster,
                Err(e) => {
                    failures.push(format!("attempt {}: {e}", attempt + 1));
                    // Dropping `cluster` kills its nodes and removes its directory.
                }
            }
        }
        panic!(
            "cannot start a Redis Cluster:\n{}",
            failures.join("\n---\n")
        );
    }

    async fn boot(&mut self, redis_cli: &Path) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.spawn_node(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_serving(i).await?;
        }
        let mut create = tokio::process::Command::new(redis_cli);
        create.arg("--cluster").arg("create");
        for node in &self.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .args([
                "--cluster-replicas",
                &self.replicas.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            create
                .spawn()
                .map_err(|e| e.to_string())?
                .wait_with_output(),
        )
        .await
        .map_err(|_| "redis-cli --cluster create did not finish within 60 s".to_string())?
        .map_err(|e| e.to_string())?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !text.contains("All 16384 slots covered") {
            return Err(format!(
                "redis-cli --cluster create failed ({}):\n{text}\n{}",
                out.status,
                self.logs()
            ));
        }
        for i in 0..self.nodes.len() {
            let mut conn = self.conn(i).await;
            let id: String = redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("CLUSTER MYID: {e}"))?;
            self.nodes[i].id = id;
        }
        // The primaries first (redis-cli makes primaries of the first nodes it is given, but
        // the tests rely on it, so make sure), each group in port order as given.
        let mut primary = Vec::new();
        for i in 0..self.nodes.len() {
            primary.push(self.role(i).await? == "master");
        }
        let primaries = primary.iter().filter(|p| **p).count();
        if primaries != NODES {
            return Err(format!(
                "{primaries} primaries after redis-cli --cluster create, expected {NODES}:\n{text}"
            ));
        }
        let mut nodes: Vec<(bool, Node)> = primary.into_iter().zip(self.nodes.drain(..)).collect();
        nodes.sort_by_key(|(p, _)| !*p);
        self.nodes = nodes.into_iter().map(|(_, n)| n).collect();
        self.wait_healthy_within(HEALTHY_TIMEOUT).await
    }

    /// The first element of node `i`'s `ROLE` reply: `master`, `slave` (or `sentinel`).
    async fn role(&self, i: usize) -> Result<String, String> {
        let mut conn = node_connection(self.port(i))
            .await
            .map_err(|e| format!("node {i}: {e}"))?;
        let reply: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("node {i}: ROLE: {e}"))?;
        match reply.first() {
            Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
            other => Err(format!("node {i}: unexpected ROLE reply {other:?}")),
        }
    }

    fn spawn_node(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let process = NodeProcess::spawn(&self.redis_server, node.port, &node.dir)?;
        node.process = Some(process);
        Ok(())
    }

    /// Waits until node `i` answers PING, and is our process (not another one that took the
    /// port first).
    async fn wait_serving(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let pid = node.process.as_ref().map_or(0, |p| p.pid);
        let deadline = Instant::now() + PING_TIMEOUT;
        loop {
            if !node.process.as_ref().is_some_and(NodeProcess::alive) {
                return Err(format!(
                    "redis-server on port {} exited:\n{}",
                    node.port,
                    self.node_log(i)
                ));
            }
            if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), async {
                let mut conn = node_connection(node.port).await?;
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await
            })
            .await
            {
                if info.contains(&format!("process_id:{pid}\r")) {
                    return Ok(());
                }
                return Err(format!(
                    "port {} is served by another Redis process, not ours (pid {pid})",
                    node.port
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} does not answer after {PING_TIMEOUT:?}:\n{}",
                    node.port,
                    self.node_log(i)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ----- addresses -----

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3` (tollgate's cluster URL).
    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// The cluster URL listing the nodes starting at node `first` (a process subscribes to
    /// pub/sub on the first node it reaches, so two processes can be made to use two nodes).
    pub fn url_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        let nodes: Vec<String> = (0..n)
            .map(|k| format!("127.0.0.1:{}", self.nodes[(first + k) % n].port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    pub fn node_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// `redis://127.0.0.1:PORT` of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The node index of a `host:port` address (as MOVED / CLUSTER SLOTS print it).
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// A plain connection to node `i` (for inspection; it does not follow redirections).
    pub async fn conn(&self, i: usize) -> MultiplexedConnection {
        node_connection(self.nodes[i].port)
            .await
            .unwrap_or_else(|e| panic!("connecting to node {i} (port {}): {e}", self.port(i)))
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i]
            .process
            .as_ref()
            .is_some_and(NodeProcess::alive)
    }

    /// A node that is running (the first one), for cluster-wide questions.
    fn any_running(&self) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.is_running(i))
            .unwrap_or_else(|| panic!("no node of the cluster is running"))
    }

    // ----- slots -----

    /// `CLUSTER KEYSLOT key`, asked of a running node.
    pub async fn keyslot(&self, key: &str) -> u16 {
        let mut conn = self.conn(self.any_running()).await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }

    /// The slot map as node `asked` sees it (`CLUSTER SLOTS`).
    pub async fn slot_map_of(&self, asked: usize) -> redis::RedisResult<SlotMap> {
        let mut conn = node_connection(self.port(asked)).await?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        let mut owners = vec![None; usize::from(SLOTS)];
        let mut replicas: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        // `[start, end, primary, replica, replica, ...]`, each node `[ip, port, id, ...]`.
        let index_of = |node: &redis::Value| match node {
            redis::Value::Array(node) => match node.get(1) {
                Some(redis::Value::Int(p)) => {
                    u16::try_from(*p).ok().and_then(|p| self.index_of_port(p))
                }
                _ => None,
            },
            _ => None,
        };
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            let owner = parts.get(2).and_then(index_of);
            if let Some(owner) = owner {
                let listed = replicas.entry(owner).or_default();
                listed.extend(parts.iter().skip(3).filter_map(index_of));
            }
            for slot in *start..=*end {
                if let Some(o) = usize::try_from(slot).ok().and_then(|s| owners.get_mut(s)) {
                    *o = owner;
                }
            }
        }
        Ok(SlotMap { owners, replicas })
    }

    /// The slot map as a running node sees it.
    pub async fn slot_map(&self) -> SlotMap {
        let i = self.any_running();
        self.slot_map_of(i)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS from node {i}: {e}"))
    }

    /// The node (index) serving `slot`.
    pub async fn owner_of_slot(&self, slot: u16) -> usize {
        self.slot_map()
            .await
            .owner(slot)
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// The node (index) serving `key` (asks Redis for the slot, and checks our CRC16 agrees).
    pub async fn owner_of_key(&self, key: &str) -> usize {
        let slot = self.keyslot(key).await;
        assert_eq!(slot, key_slot(key), "CRC16 of {key:?}");
        self.owner_of_slot(slot).await
    }

    /// Runs `cmd` on the node that owns `key` (a plain connection: no redirections).
    pub async fn on_owner<T: redis::FromRedisValue>(&self, key: &str, cmd: &redis::Cmd) -> T {
        let node = self.owner_of_key(key).await;
        let mut conn = self.conn(node).await;
        cmd.query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{cmd:?} on node {node} (owner of {key}): {e}"))
    }

    /// Keys in `slot` on node `i` (`CLUSTER COUNTKEYSINSLOT`).
    pub async fn count_keys_in_slot(&self, i: usize, slot: u16) -> i64 {
        let mut conn = self.conn(i).await;
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER COUNTKEYSINSLOT on node {i}: {e}"))
    }

    // ----- resharding, as `redis-cli --cluster reshard` does it -----

    /// Opens the move of `slot` from its owner to node `to`: `CLUSTER SETSLOT slot IMPORTING`
    /// on the target, then `MIGRATING` on the source. From here on the source answers ASK for
    /// keys it does not hold.
    pub async fn begin_migration(&self, slot: u16, to: usize) -> SlotMigration {
        let from = self.owner_of_slot(slot).await;
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        self.set_slot(to, slot, "IMPORTING", from).await;
        self.set_slot(from, slot, "MIGRATING", to).await;
        SlotMigration {
            slot,
            from,
            to,
            keys_moved: 0,
        }
    }

    /// `CLUSTER SETSLOT slot <state> <id of node>` on node `on`.
    async fn set_slot(&self, on: usize, slot: u16, state: &str, node: usize) {
        let mut conn = self.conn(on).await;
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(self.node_id(node))
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SETSLOT {slot} {state} {node} on node {on}: {e}"));
    }

    /// Moves up to `max` keys of the slot (`CLUSTER GETKEYSINSLOT` + `MIGRATE … KEYS`, in
    /// batches of at most `batch`); returns how many moved (0: the source holds no more).
    pub async fn migrate_keys(&self, m: &mut SlotMigration, max: usize, batch: usize) -> usize {
        let mut source = self.conn(m.from).await;
        let mut moved = 0;
        while moved < max {
            let want = batch.min(max - moved).max(1);
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(m.slot)
                .arg(want)
                .query_async(&mut source)
                .await
                .unwrap_or_else(|e| panic!("GETKEYSINSLOT {} on node {}: {e}", m.slot, m.from));
            if keys.is_empty() {
                break;
            }
            let reply: String = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.port(m.to))
                .arg("")
                .arg(0)
                .arg(10_000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "MIGRATE {keys:?} from node {} to node {}: {e}",
                        m.from, m.to
                    )
                });
            assert!(reply == "OK" || reply == "NOKEY", "MIGRATE: {reply}");
            moved += keys.len();
        }
        m.keys_moved += moved;
        moved
    }

    /// Closes the move: every key left is migrated, then `CLUSTER SETSLOT slot NODE target`
    /// on the target, the source and every other node. From here on the source answers MOVED.
    pub async fn finish_migration(&self, m: &mut SlotMigration) {
        while self.migrate_keys(m, usize::MAX, 100).await > 0 {}
        let mut order = vec![m.to, m.from];
        order.extend((0..self.nodes.len()).filter(|i| *i != m.to && *i != m.from));
        for i in order {
            self.set_slot(i, m.slot, "NODE", m.to).await;
        }
        // Every node agrees before the test goes on.
        let ok = crate::harness::poll_until(Duration::from_secs(10), || async {
            for i in 0..self.nodes.len() {
                match self.slot_map_of(i).await {
                    Ok(map) if map.owner(m.slot) == Some(m.to) => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        assert!(ok, "slot {} is not on node {} everywhere", m.slot, m.to);
    }

    /// Moves `slot` to node `to` in one go.
    pub async fn migrate_slot(&self, slot: u16, to: usize) -> SlotMigration {
        let mut m = self.begin_migration(slot, to).await;
        self.finish_migration(&mut m).await;
        m
    }

    // ----- faults -----

    /// SIGKILL to node `i` (no shutdown, no last AOF rewrite); returns once it is gone.
    pub fn kill_node(&mut self, i: usize) {
        let process = self.nodes[i]
            .process
            .take()
            .unwrap_or_else(|| panic!("node {i} is not running"));
        process.kill();
    }

    /// Starts node `i` again: same port, directory, `nodes.conf` and AOF. Returns once it
    /// serves its slots again and every node says `cluster_state:ok` with no node flagged
    /// as failing.
    pub async fn restart_node(&mut self, i: usize) {
        assert!(self.nodes[i].process.is_none(), "node {i} is running");
        let mut failures = Vec::new();
        // The port may be taken for a moment by a connection's ephemeral port; try again.
        for _ in 0..5 {
            if let Err(e) = self.spawn_node(i) {
                failures.push(e);
            } else {
                match self.wait_serving(i).await {
                    Ok(()) => break,
                    Err(e) => {
                        failures.push(e);
                        if let Some(p) = self.nodes[i].process.take() {
                            p.kill();
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            self.is_running(i),
            "cannot restart node {i} on port {}:\n{}",
            self.port(i),
            failures.join("\n---\n")
        );
        if let Err(e) = self.wait_healthy_within(HEALTHY_TIMEOUT).await {
            panic!("node {i} restarted, but the cluster is not whole again: {e}");
        }
    }

    /// Waits until every node is running, says `cluster_state:ok`, knows every slot, sees no
    /// node flagged `fail`/`fail?`, and agrees on the slot map.
    pub async fn wait_healthy(&self) {
        if let Err(e) = self.wait_healthy_within(HEALTHY_TIMEOUT).await {
            panic!("{e}");
        }
    }

    async fn wait_healthy_within(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.health().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the cluster is not healthy after {timeout:?}: {last}\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s `CLUSTER NODES`, once its `CLUSTER INFO` says the cluster is ok with every
    /// slot assigned and served (and shows the `extra` line too, when given).
    async fn ok_view_of(&self, i: usize, extra: Option<&str>) -> Result<String, String> {
        let mut conn = node_connection(self.port(i))
            .await
            .map_err(|e| format!("node {i}: {e}"))?;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("node {i}: CLUSTER INFO: {e}"))?;
        let wanted = [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_slots_ok:16384",
        ];
        for want in wanted.into_iter().chain(extra) {
            if !info.lines().any(|l| l.trim() == want) {
                return Err(format!("node {i}: no {want} in CLUSTER INFO"));
            }
        }
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("node {i}: CLUSTER NODES: {e}"))
    }

    async fn health(&self) -> Result<(), String> {
        let mut first_map: Option<Vec<Option<usize>>> = None;
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                return Err(format!("node {i} is not running"));
            }
            let known = format!("cluster_known_nodes:{}", self.nodes.len());
            let nodes = self.ok_view_of(i, Some(&known)).await?;
            if let Some(line) = nodes.lines().find(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|flags| flags.split(',').any(|f| f == "fail" || f == "fail?"))
            }) {
                return Err(format!("node {i} sees a failing node: {line}"));
            }
            let map = self
                .slot_map_of(i)
                .await
                .map_err(|e| format!("node {i}: CLUSTER SLOTS: {e}"))?;
            if map.owners.iter().any(Option::is_none) {
                return Err(format!("node {i}: a slot without a known owner"));
            }
            let primaries = map.primaries();
            if primaries != (0..NODES).collect() {
                return Err(format!(
                    "node {i}: the primaries are nodes {primaries:?}, expected 0..{NODES}"
                ));
            }
            for p in primaries {
                let listed = map.replicas_of(p);
                if listed.len() != self.replicas {
                    return Err(format!(
                        "node {i}: primary {p} has replicas {listed:?}, expected {}",
                        self.replicas
                    ));
                }
            }
            match &first_map {
                None => first_map = Some(map.owners),
                Some(m) if *m != map.owners => {
                    return Err(format!("node {i} disagrees on the slot map"))
                }
                Some(_) => {}
            }
        }
        // Every replica has finished its initial sync and follows its primary.
        for i in NODES..self.nodes.len() {
            self.replica_link_up(i).await?;
        }
        Ok(())
    }

    /// Node `i` is a replica whose link to its primary is up (`INFO replication`).
    async fn replica_link_up(&self, i: usize) -> Result<(), String> {
        let mut conn = node_connection(self.port(i))
            .await
            .map_err(|e| format!("node {i}: {e}"))?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("node {i}: INFO replication: {e}"))?;
        for want in ["role:slave", "master_link_status:up"] {
            if !info.lines().any(|l| l.trim() == want) {
                return Err(format!("node {i}: no {want} in INFO replication"));
            }
        }
        Ok(())
    }

    /// After primary `dead` was killed (and not restarted): waits until one of its replicas
    /// (as `before`, the slot map from before the kill, lists them) serves every slot `dead`
    /// served, and every running node says `cluster_state:ok` with all 16384 slots ok, flags
    /// `dead` as `fail`, and agrees on the slot map (the other slots where they were).
    /// Returns the promoted node; panics with the nodes' logs after [`PROMOTION_TIMEOUT`].
    pub async fn wait_promotion(&self, dead: usize, before: &SlotMap) -> usize {
        assert!(!self.is_running(dead), "node {dead} is running");
        let candidates = before.replicas_of(dead);
        assert!(
            !candidates.is_empty(),
            "node {dead} has no replica to promote ({before:?})"
        );
        let deadline = Instant::now() + PROMOTION_TIMEOUT;
        loop {
            let last = match self.promoted(dead, before).await {
                Ok(new) => return new,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "no replica of node {dead} (candidates {candidates:?}) took over within \
                 {PROMOTION_TIMEOUT:?}: {last}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn promoted(&self, dead: usize, before: &SlotMap) -> Result<usize, String> {
        let dead_id = self.node_id(dead).to_string();
        let mut new_owner = None;
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let nodes = self.ok_view_of(i, None).await?;
            let flagged = nodes.lines().any(|l| {
                let mut fields = l.split_whitespace();
                fields.next() == Some(dead_id.as_str())
                    && fields
                        .nth(1)
                        .is_some_and(|flags| flags.split(',').any(|f| f == "fail"))
            });
            if !flagged {
                return Err(format!("node {i} does not flag node {dead} as fail"));
            }
            let map = self
                .slot_map_of(i)
                .await
                .map_err(|e| format!("node {i}: CLUSTER SLOTS: {e}"))?;
            for slot in 0..SLOTS {
                let (was, is) = (before.owner(slot), map.owner(slot));
                if was == Some(dead) {
                    let Some(is) = is.filter(|n| *n != dead) else {
                        return Err(format!("node {i}: slot {slot} is still on node {dead}"));
                    };
                    if !before.replicas_of(dead).contains(&is) {
                        return Err(format!(
                            "node {i}: slot {slot} of node {dead} went to node {is}, not to \
                             one of its replicas"
                        ));
                    }
                    match new_owner {
                        None => new_owner = Some(is),
                        Some(n) if n != is => {
                            return Err(format!(
                                "node {i}: the slots of node {dead} are on nodes {n} and {is}"
                            ))
                        }
                        Some(_) => {}
                    }
                } else if is != was {
                    return Err(format!(
                        "node {i}: slot {slot} moved from {was:?} to {is:?}"
                    ));
                }
            }
        }
        let new = new_owner.ok_or_else(|| format!("node {dead} served no slot"))?;
        match self.role(new).await? {
            role if role == "master" => Ok(new),
            role => Err(format!("node {new} serves the slots but says ROLE {role}")),
        }
    }

    // ----- logs -----

    /// The last lines of node `i`'s log (and anything it printed before opening it).
    pub fn node_log(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let tail = |name: &str| {
            std::fs::read_to_string(node.dir.join(name))
                .map(|t| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                })
                .unwrap_or_default()
        };
        format!(
            "----- redis node {i} (port {}) -----\n{}{}",
            node.port,
            tail("stderr.log"),
            tail("redis.log")
        )
    }

    pub fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.node_log(i))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for node in &mut self.nodes {
            if let Some(p) = node.process.take() {
                p.kill();
            }
        }
        {
            let mut used = ports_in_use();
            let mine: HashSet<u16> = self.nodes.iter().map(|n| n.port).collect();
            used.retain(|p| !mine.contains(p));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `n` ports P whose cluster bus port P + 10000 is free too, both below the ephemeral range
/// (so no outgoing connection takes one while a node is down), not handed out already in
/// this process.
fn pick_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // P in [12000, ephemeral_low - 10000); fall back to a fixed window if the range is odd.
    let high = ephemeral_low.saturating_sub(10_000).clamp(13_000, 55_535);
    let low = 12_000u32.min(high - 1_000);
    let mut rng = rand::rng();
    let mut used = ports_in_use();
    let mut picked = Vec::new();
    for _ in 0..10_000 {
        if picked.len() == n {
            break;
        }
        let Ok(port) = u16::try_from(rng.random_range(low..high)) else {
            continue;
        };
        if used.contains(&port) || picked.contains(&port) {
            continue;
        }
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            picked.push(port);
        }
    }
    assert_eq!(
        picked.len(),
        n,
        "no free loopback ports for a Redis Cluster"
    );
    used.extend(&picked);
    picked
}
