//! The process: graceful shutdown on SIGTERM, clear start-up failures, `migrate`.

use std::time::{Duration, Instant};

use crate::harness::{passthrough_toml, run_tollgate, App, TestEnv};
use crate::upstream::{closed_addr, FakeUpstream};

/// A running app with one slow request (1.5 s) in flight at the upstream; SIGTERM is sent
/// once the upstream has it. Returns the app, the request's task and when the signal was sent.
async fn sigterm_during_a_slow_request(
    env: &TestEnv,
    up: &FakeUpstream,
) -> (
    App,
    tokio::task::JoinHandle<Result<(reqwest::StatusCode, String, Instant), reqwest::Error>>,
    Instant,
) {
    let app = env
        .config()
        .toml(passthrough_toml(&up.url()))
        .server("shutdown_grace_seconds = 20")
        .spawn()
        .await;
    let (_account, key) = app.account_with_key("default").await;
    let client = app.client().clone();
    let url = app.proxy_url("/v1/slow?ms=1500");
    let in_flight = tokio::spawn(async move {
        let resp = client.get(url).bearer_auth(key).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((status, text, Instant::now()))
    });
    up.wait_for_requests(1, Duration::from_secs(5)).await;
    let signalled = Instant::now();
    app.terminate();
    (app, in_flight, signalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let (mut app, in_flight, signalled) = sigterm_during_a_slow_request(&env, &up).await;

    let (status, text, finished) = in_flight
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed: {e}\n{}", app.logs()));
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, "slow:1500");
    assert!(finished > signalled);

    let exit = app.wait_exit(Duration::from_secs(10)).await;
    let exit =
        exit.unwrap_or_else(|| panic!("still running 10 s after the in-flight request finished"));
    assert!(exit.success(), "exit status {exit}\n{}", app.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_while_draining() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let (mut app, in_flight, signalled) = sigterm_during_a_slow_request(&env, &up).await;
    let proxy = app.proxy_addr();

    // While the slow request is still running (the drain), connecting fails: waited for on
    // the refusal itself and checked against the in-flight request's end (an order, not a
    // speed).
    let mut refused_at = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused_at.is_none() && !in_flight.is_finished() && Instant::now() < deadline {
        match tokio::net::TcpStream::connect(proxy).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused_at = Some(Instant::now());
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // If not refused, find out what happens to such a connection, for the failure message.
    let fate = if refused_at.is_some() {
        String::new()
    } else {
        probe_new_connection(proxy).await
    };
    let finished = in_flight
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed: {e}\n{}", app.logs()))
        .2;
    let _ = app.wait_exit(Duration::from_secs(10)).await;
    assert!(
        refused_at.is_some_and(|r| r < finished),
        "new connections were still accepted while the in-flight request ran ({:?} after \
         SIGTERM); such a connection: {fate}",
        finished - signalled
    );
}

/// Connects, sends a request and reports what came back within 300 ms.
async fn probe_new_connection(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return format!("connect failed: {e}"),
    };
    let request = format!("GET /v1/x HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return format!("connected; writing failed: {e}");
    }
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
        Err(_) => "connected (the kernel accepted it) but no answer within 300 ms".into(),
        Ok(Ok(0)) => "connected, then closed without an answer".into(),
        Ok(Ok(n)) => format!(
            "connected and answered: {:?}",
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
        ),
        Ok(Err(e)) => format!("connected; reading failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_with_a_clear_error_without_redis() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let dead = closed_addr();
    let out = env
        .config()
        .toml(passthrough_toml(&up.url()))
        .redis_url(format!("redis://{dead}"))
        // Fails rather than retrying forever: a process still running after 30 s fails the test.
        .serve_until_exit(Duration::from_secs(30))
        .await;
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("cannot reach Redis"), "{out}");
    assert!(
        out.stderr.contains(&dead.to_string()),
        "the address is named: {out}"
    );
    assert!(!out.stderr.contains("listening proxy="), "{out}");
}

/// Postgres is not the data plane: `serve` starts without it (unlike Redis, above), says so
/// once with the reason and without the password, and reports itself ready but degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_degraded_without_postgres() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let dead = closed_addr();
    let mut app = env
        .config()
        .toml(passthrough_toml(&up.url()))
        .postgres_url(format!("postgres://postgres:secret-pw@{dead}/nothing"))
        .spawn()
        .await;
    let warned = crate::harness::poll_until(Duration::from_secs(30), || async {
        app.logs().contains("Postgres unavailable")
    })
    .await;
    let logs = app.logs();
    assert!(warned, "{logs}");
    assert!(
        logs.contains(&dead.to_string()),
        "the address is named: {logs}"
    );
    assert!(
        !logs.contains("secret-pw"),
        "the password is printed: {logs}"
    );
    let (status, body) = app.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["postgres"], false, "{body}");
    let (status, body) = app.admin_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    // Still one warning, not one per retry, and it stops cleanly on SIGTERM.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.logs().matches("Postgres unavailable").count(), 1);
    app.terminate();
    let exit = app.wait_exit(Duration::from_secs(30)).await;
    assert!(
        exit.is_some_and(|e| e.success()),
        "{exit:?}: {}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_without_its_secrets() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(passthrough_toml(&up.url()).replace(
        "name = \"up\"\n",
        "name = \"up\"\nset_headers = { authorization = \"Bearer ${E2E_MISSING_UPSTREAM_KEY}\" }\n",
    ));
    let path = config.write();
    // Neither the admin token nor the upstream key is set.
    let out = run_tollgate(
        &[
            "serve".into(),
            "--config".into(),
            path.display().to_string(),
        ],
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("TOLLGATE_ADMIN_TOKEN"), "{out}");
    assert!(out.stderr.contains("E2E_MISSING_UPSTREAM_KEY"), "{out}");
    assert!(!out.stderr.contains("listening proxy="), "{out}");

    // check-config only warns about them.
    let out = run_tollgate(
        &[
            "check-config".into(),
            "--config".into(),
            path.display().to_string(),
        ],
        &[],
        Duration::from_secs(30),
    )
    .await;
    assert!(out.success(), "{out}");
    assert!(out.stderr.contains("E2E_MISSING_UPSTREAM_KEY"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_serve_can_skip_it() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(passthrough_toml(&up.url()));
    for _ in 0..2 {
        let out = config
            .run_subcommand("migrate", Duration::from_secs(30))
            .await;
        assert!(out.success(), "{out}");
    }
    let app = config.clone().arg("--no-migrate").spawn().await;
    let (_account, key) = app.account_with_key("default").await;
    let resp = app
        .client()
        .get(app.proxy_url("/v1/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// The harness itself: dropping the environment removes the database and the Redis keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_leaves_nothing_behind() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(passthrough_toml(&up.url())).spawn().await;
    let (_account, key) = app.account_with_key("default").await;
    let resp = app
        .client()
        .get(app.proxy_url("/v1/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let db = env.db_name().to_string();
    let prefix = env.prefix().to_string();
    let redis_url = env.redis_url().to_string();
    // Whatever keys tollgate made for this test are found by the prefix scan.
    let keys = env.redis_keys().await;
    let pid = app.pid;

    drop(app);
    drop(env);

    let mut conn = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left = crate::harness::scan_prefix(&mut conn, &prefix)
        .await
        .unwrap();
    assert!(left.is_empty(), "Redis keys left: {left:?} (had {keys:?})");
    let mut pg = <sqlx::PgConnection as sqlx::Connection>::connect(&crate::harness::pg_admin_url())
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db)
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert!(!exists, "database {db} left behind");
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!alive, "tollgate pid {pid} still running");
}
