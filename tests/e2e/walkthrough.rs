//! A newcomer's first hour: the README's walkthrough, run as written by `scripts/walkthrough`
//! (which checks the documented answers and that the walkthrough's clean-up leaves nothing),
//! and `tollgate demo --clean` removing exactly what the demo leaves behind.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{http_client, pg_admin_url, random_id, redis_url, TestEnv, BIN};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/walkthrough` against the binary under test, on the given README.
async fn walkthrough(readme: &Path) -> Output {
    let run = tokio::process::Command::new("bash")
        .arg(root().join("scripts/walkthrough"))
        .env("TOLLGATE_BIN", BIN)
        .env("TOLLGATE_TEST_PG_URL", pg_admin_url())
        .env("TOLLGATE_TEST_REDIS_URL", redis_url())
        .env("TOLLGATE_WALKTHROUGH_README", readme)
        .env_remove("TOLLGATE_WALKTHROUGH_KEEP")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(400), run)
        .await
        .expect("scripts/walkthrough did not finish in 400 s")
        .expect("running scripts/walkthrough")
}

fn text(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_works_as_written() {
    let out = walkthrough(&root().join("README.md")).await;
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    // The documented answers were checked, not just run.
    for check in [
        "ok: the proxied chat call answered 200",
        "ok: it carries X-Credits-Charged",
        "ok: the balance",
        "ok: the grant",
        "ok: the usage",
        "ok: the revoked key is refused with 401",
        "X-Credits-Charged: 0.2",
        "ok: the clean-up dropped the database",
        "ok: the clean-up deleted the Redis keys",
    ] {
        assert!(report.contains(check), "no {check:?} in:\n{report}");
    }
}

/// The script must be able to fail: the walkthrough without the demo upstream (the bug a
/// newcomer hit) answers 502 through the proxy, and the script says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_test_fails_without_the_demo_upstream() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let upstream_line = readme
        .lines()
        .find(|l| l.starts_with("target/debug/tollgate demo-upstream"))
        .expect("the walkthrough starts the demo upstream");
    let broken = readme.replacen(&format!("{upstream_line}\n"), "", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("README.md");
    std::fs::write(&path, broken).unwrap();

    let out = walkthrough(&path).await;
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains("FAIL: the proxied chat call answered: HTTP/1.1 502"),
        "{report}"
    );
    assert!(report.contains("upstream_unavailable"), "{report}");
    // It still cleaned up after itself.
    assert!(
        report.contains("ok: the clean-up dropped the database"),
        "{report}"
    );
}

/// `tollgate demo` keeps its database and Redis keys between runs; `tollgate demo --clean`
/// removes exactly those (its own prefix only) and says what it removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_clean_removes_the_demo_database_and_redis_keys() {
    let env = TestEnv::new().await;
    let db = env.db_name().to_string();
    let prefix = env.prefix().to_string();
    // The demo creates its database itself.
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        sqlx::query(&format!("DROP DATABASE \"{db}\""))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let demo_env = [
        ("TOLLGATE_DEMO_PG_URL", pg_admin_url()),
        ("TOLLGATE_DEMO_REDIS_URL", redis_url()),
        ("TOLLGATE_DEMO_DB", db.clone()),
        ("TOLLGATE_DEMO_PREFIX", prefix.clone()),
    ];

    let mut demo = tokio::process::Command::new(BIN)
        .arg("demo")
        .envs(demo_env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting tollgate demo");
    let mut stdout = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(demo.stderr.take().unwrap()).lines();
    let (proxy, key) = tokio::time::timeout(Duration::from_secs(60), async {
        let (mut proxy, mut key) = (None, None);
        while let Some(line) = stdout.next_line().await.unwrap() {
            let line = line.trim();
            if let Some(p) = line.strip_prefix("proxy") {
                proxy = Some(p.trim().to_string());
            }
            if let Some(k) = line.strip_prefix("export KEY=") {
                key = Some(k.to_string());
            }
            if line.starts_with("Stop with Ctrl-C.") {
                assert!(line.contains(&db), "{line}");
                break;
            }
        }
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("listening proxy=") {
                return (proxy.unwrap(), key.unwrap());
            }
        }
        panic!("tollgate demo exited before listening");
    })
    .await
    .expect("tollgate demo did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    // One metered call, so the demo has written its usual keys and journal.
    let answer = http_client()
        .post(format!("{proxy}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "demo-1", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(!env.redis_keys().await.is_empty());

    // Keys of another deployment whose prefix merely starts the same way must survive.
    let mut redis = env.redis().await;
    let neighbours = [
        format!("{prefix}x:keep"),
        format!("{{{prefix}x:s0}}:keep"),
        format!("other:{prefix}:keep"),
    ];
    for k in &neighbours {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("1")
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    // Stop the demo (as Ctrl-C would), then clean.
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(demo.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), demo.wait())
        .await
        .expect("tollgate demo did not stop on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");

    let clean = || {
        tokio::process::Command::new(BIN)
            .args(["demo", "--clean"])
            .envs(demo_env.iter().cloned())
            .stdin(Stdio::null())
            .output()
    };
    let out = clean().await.unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("dropped the Postgres database {db}")),
        "{report}"
    );
    let deleted: usize = stdout
        .split_once("deleted ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no key count in:\n{report}"));
    assert!(deleted > 0, "{report}");

    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&db)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(!exists, "the demo database {db} is still there");
    }
    assert_eq!(env.redis_keys().await, Vec::<String>::new());
    for k in &neighbours {
        let n: i64 = redis::cmd("EXISTS")
            .arg(k)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(n, 1, "--clean deleted {k}, not the demo's");
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&neighbours[..])
        .query_async(&mut redis)
        .await
        .unwrap();

    // A second clean finds nothing and says so.
    let out = clean().await.unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("no Postgres database {db}")),
        "{report}"
    );
    assert!(report.contains("deleted 0 Redis keys"), "{report}");

    // Names that are not plain identifiers are refused before anything is touched.
    let out = tokio::process::Command::new(BIN)
        .args(["demo", "--clean"])
        .envs(demo_env.iter().cloned())
        .env("TOLLGATE_DEMO_PREFIX", format!("*{}", random_id(4)))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TOLLGATE_DEMO_PREFIX"),
        "{}",
        text(&out)
    );
}
