//! Hot reload (`kill -HUP` and `POST /v1/config/reload`): a valid file is swapped in without a
//! restart, an invalid one or one that changes a restart-only field changes nothing, and under
//! load every request is answered and charged once, at the price of the config it started with.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{http_client_no_pool, metric_value, poll_until, App, ConfigBuilder, TestEnv};
use crate::ledger_util::{call_with, get_ok, total};
use crate::upstream::FakeUpstream;

/// Upstream `up`, a route `paid` at `cost` credits, and a tier `metered` with plenty of
/// credits; `extra` is appended (more routes or tiers).
fn config(env: &TestEnv, upstream: &str, cost: &str, extra: &str) -> ConfigBuilder {
    env.config().toml(format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = {cost}

[tiers.metered]
monthly_credits = 100000
{extra}
"#
    ))
}

/// Writes `builder`'s config over the file `app` was started with.
fn rewrite(app: &App, builder: &ConfigBuilder) {
    std::fs::write(&app.config_path, builder.render()).unwrap();
}

async fn reload(app: &App) -> (StatusCode, Value) {
    app.admin_post("/v1/config/reload", json!({})).await
}

async fn metric(app: &App, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(&app.metrics_text().await, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_price_without_a_restart() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = config(&env, &up.url(), "1", "").spawn().await;
    let (account, key) = app.account_with_key("metered").await;
    assert_eq!(
        metric(&app, "tollgate_config_version", &[]).await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &app,
            "tollgate_config_reloads_total",
            &[("outcome", "applied")]
        )
        .await,
        Some(0.0),
        "the reload series exist at 0 from the start"
    );
    let a = get_ok(&app, &key, "/v1/a").await;
    assert_eq!(a.charged().as_deref(), Some("1"));

    rewrite(&app, &config(&env, &up.url(), "2.5", ""));
    app.signal("HUP");
    let reloaded = poll_until(Duration::from_secs(10), || async {
        metric(&app, "tollgate_config_version", &[]).await == Some(2.0)
    })
    .await;
    assert!(reloaded, "no reload after SIGHUP:\n{}", app.logs());
    let b = get_ok(&app, &key, "/v1/b").await;
    assert_eq!(b.charged().as_deref(), Some("2.5"));
    assert_eq!(total(&app, &account).await, "99996.5");
    assert_eq!(
        metric(
            &app,
            "tollgate_config_reloads_total",
            &[("outcome", "applied")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(app.pid, app.pid, "same process");
    assert!(app.logs().contains("SIGHUP: config reloaded"));

    // A broken file on SIGHUP: logged with check-config's message, nothing changes, the
    // process keeps serving.
    std::fs::write(&app.config_path, "[server]\nlisten = 12\n").unwrap();
    app.signal("HUP");
    let refused = poll_until(Duration::from_secs(10), || async {
        metric(
            &app,
            "tollgate_config_reloads_total",
            &[("outcome", "invalid")],
        )
        .await
            == Some(1.0)
    })
    .await;
    assert!(refused, "{}", app.logs());
    assert!(app.logs().contains("server.listen"), "{}", app.logs());
    let c = get_ok(&app, &key, "/v1/c").await;
    assert_eq!(c.charged().as_deref(), Some("2.5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_applies_prices_routes_and_tiers() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = config(&env, &up.url(), "1", "").spawn().await;
    let (_, key) = app.account_with_key("metered").await;
    let missing = call_with(app.client(), &app, &key, Method::GET, "/extra/x").await;
    missing.assert_error(404, "route_not_found");

    // Without the admin token: refused like every admin call.
    let resp = app
        .client()
        .post(app.admin_url("/v1/config/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let extra = r#"
[[routes]]
name = "extra"
path_prefix = "/extra"
upstream = "up"
cost = 0.25

[tiers.pro]
monthly_credits = 5
"#;
    rewrite(&app, &config(&env, &up.url(), "3", extra));
    let (status, body) = reload(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    assert_eq!(
        body["changed"],
        json!(["routes.extra", "routes.paid", "tiers.pro"]),
        "{body}"
    );
    assert_eq!(
        get_ok(&app, &key, "/v1/a").await.charged().as_deref(),
        Some("3")
    );
    assert_eq!(
        get_ok(&app, &key, "/extra/x").await.charged().as_deref(),
        Some("0.25")
    );
    // The new tier exists for the admin API, the new route has its metric series.
    app.create_account("acct_on_pro_tier", "pro").await;
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "tollgate_requests_total",
            &[("route", "extra"), ("outcome", "forwarded")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "tollgate_config_version", &[]),
        Some(2.0)
    );

    // The same file again: a new version, nothing changed.
    let (status, body) = reload(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"version": 3, "changed": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let good = config(&env, &up.url(), "1", "");
    let app = good.spawn().await;
    let (account, key) = app.account_with_key("metered").await;

    // Two problems: an unknown field and a route naming an upstream that does not exist,
    // besides a price change that must not be applied.
    let broken = config(
        &env,
        &up.url(),
        "7",
        "[[routes]]\nname = \"bad\"\npath_prefix = \"/bad\"\nupstream = \"nowhere\"\ncost = 1\ncolour = \"red\"\n",
    );
    rewrite(&app, &broken);
    let (status, body) = reload(&app).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "config_invalid", "{body}");
    let problems: Vec<String> = body["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems in {body}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    // The same lines `tollgate check-config` prints for the file.
    let check = broken
        .run_subcommand("check-config", Duration::from_secs(20))
        .await;
    assert!(!check.success());
    let file = format!("{}: ", app.config_path.display());
    for problem in &problems {
        // The same text after the file's name (check-config ran on a copy).
        let problem = problem.strip_prefix(&file).unwrap_or(problem);
        assert!(
            check.stderr.contains(problem),
            "{problem:?} is not in check-config's output:\n{}",
            check.stderr
        );
    }
    assert!(
        problems.iter().any(|p| p.contains("colour")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("nowhere")),
        "{problems:?}"
    );

    // Nothing changed: old price, old version.
    assert_eq!(
        get_ok(&app, &key, "/v1/a").await.charged().as_deref(),
        Some("1")
    );
    assert_eq!(total(&app, &account).await, "99999");
    assert_eq!(
        metric(&app, "tollgate_config_version", &[]).await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &app,
            "tollgate_config_reloads_total",
            &[("outcome", "invalid")]
        )
        .await,
        Some(1.0)
    );

    // A file that cannot be read at all.
    std::fs::remove_file(&app.config_path).unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "config_invalid", "{body}");
    assert_eq!(
        get_ok(&app, &key, "/v1/b").await.charged().as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_fields_are_refused_by_name() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = config(&env, &up.url(), "1", "").spawn().await;
    let (_, key) = app.account_with_key("metered").await;

    let changed = config(&env, &up.url(), "2", "")
        .redis("shards = 16")
        .server("threads = 3")
        .postgres("max_connections = 5");
    rewrite(&app, &changed);
    let (status, body) = reload(&app).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "restart_required", "{body}");
    assert_eq!(
        body["fields"],
        json!(["server.threads", "redis.shards", "postgres.max_connections"]),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("redis.shards"), "{message}");
    // The price change in the same file was not applied either.
    assert_eq!(
        get_ok(&app, &key, "/v1/a").await.charged().as_deref(),
        Some("1")
    );
    assert_eq!(
        metric(
            &app,
            "tollgate_config_reloads_total",
            &[("outcome", "restart_required")]
        )
        .await,
        Some(1.0)
    );
}

/// One request of the load: when it was sent and answered, and what it was charged (µc).
struct Sent {
    sent: Instant,
    answered: Instant,
    charged_micros: i64,
}

fn micros(credits: &str) -> i64 {
    let (whole, frac) = credits.split_once('.').unwrap_or((credits, ""));
    let frac = format!("{frac:0<6}");
    whole.parse::<i64>().unwrap() * 1_000_000 + frac[..6].parse::<i64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_charges_each_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let prices = ["1", "2", "3", "0.5", "4", "1.25"];
    let app = config(&env, &up.url(), prices[0], "").spawn().await;
    let (account, key) = app.account_with_key("metered").await;
    let start_micros = micros(&total(&app, &account).await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, log, key) = (Arc::clone(&stop), Arc::clone(&log), key.clone());
        let url = app.proxy_url("/v1/load");
        clients.push(tokio::spawn(async move {
            let client = http_client_no_pool();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let sent = Instant::now();
                let resp = client
                    .post(&url)
                    .bearer_auth(&key)
                    .body("x")
                    .send()
                    .await
                    .expect("a request failed during reloads");
                let status = resp.status();
                let charged = resp
                    .headers()
                    .get("x-credits-charged")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = resp
                    .text()
                    .await
                    .expect("a response body failed during reloads");
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "a request failed during reloads: {body}"
                );
                let charged = charged.expect("X-Credits-Charged");
                log.lock().unwrap().push(Sent {
                    sent,
                    answered: Instant::now(),
                    charged_micros: micros(&charged),
                });
            }
        }));
    }

    // Reload through the remaining prices, alternating admin API and SIGHUP; each reload's
    // window is from just before the file is written to the moment it is known applied.
    let mut windows = Vec::new();
    for (i, price) in prices.iter().enumerate().skip(1) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let began = Instant::now();
        rewrite(&app, &config(&env, &up.url(), price, ""));
        if i % 2 == 1 {
            let (status, body) = reload(&app).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        } else {
            app.signal("HUP");
            let want = (i + 1) as f64;
            let applied = poll_until(Duration::from_secs(10), || async {
                metric(&app, "tollgate_config_version", &[]).await == Some(want)
            })
            .await;
            assert!(applied, "SIGHUP reload {i} not applied:\n{}", app.logs());
        }
        windows.push((began, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.expect("a load client failed");
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    eprintln!(
        "reload under load: {} requests over {} reloads",
        log.len(),
        windows.len()
    );
    assert!(log.len() >= 20, "too little load: {} requests", log.len());
    // Each request was charged a price of some config; one sent after reload k was applied
    // and answered before reload k+1 began was charged exactly price k.
    let price_micros: Vec<i64> = prices.iter().map(|p| micros(p)).collect();
    let mut checked = 0;
    for s in log.iter() {
        assert!(
            price_micros.contains(&s.charged_micros),
            "charged {} µc, not a configured price",
            s.charged_micros
        );
        // Which config was serving for the whole life of the request, if one was.
        let mut version = 0;
        for (k, (began, applied)) in windows.iter().enumerate() {
            if s.sent >= *applied {
                version = k + 1;
            } else if s.answered > *began {
                version = usize::MAX; // overlaps reload k: either price is right
                break;
            }
        }
        if version != usize::MAX {
            assert_eq!(
                s.charged_micros,
                price_micros[version],
                "a request served wholly under config {} was charged another price",
                version + 1
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} requests fell between reloads"
    );

    // Charged exactly once: the balance moved by the sum of the charges, and the journal has
    // one entry per request with the same sum.
    let charged: i64 = log.iter().map(|s| s.charged_micros).sum();
    let end_micros = micros(&total(&app, &account).await);
    assert_eq!(
        start_micros - end_micros,
        charged,
        "balance != sum of charges"
    );
    let requests = log.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let (status, body) = app
            .admin_get(&format!("/v1/accounts/{account}/usage"))
            .await;
        if status == StatusCode::OK && body["requests"].as_u64() == Some(requests) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "journal has not {requests} requests: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let journal_credits = last["credits"].to_string();
    assert_eq!(
        micros(journal_credits.trim_matches('"')),
        charged,
        "journal sum != sum of charges: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_jwt_public_key() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // The key file sits beside the config (a relative path), and is replaced in place.
    env.write_file("jwt.pem", fixture("rs256-public.pem"));
    let jwt = "[auth.jwt]\nalgorithms = [\"RS256\"]\naccount_claim = \"org\"\npublic_key_file = \"jwt.pem\"\n";
    let builder = config(&env, &up.url(), "1", jwt);
    let app = builder.spawn().await;
    let org = format!("org_{}", crate::harness::random_id(8));
    app.create_account(&org, "metered").await;
    let token = |private: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        encode(
            &Header::new(Algorithm::RS256),
            &json!({"org": org, "exp": exp}),
            &EncodingKey::from_rsa_pem(&fixture(private)).unwrap(),
        )
        .unwrap()
    };
    let (old, new) = (token("rs256-private.pem"), token("rs256-b-private.pem"));
    let status = |t: String| {
        let app = &app;
        async move {
            app.client()
                .get(app.proxy_url("/v1/x"))
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(old.clone()).await, StatusCode::OK);
    assert_eq!(status(new.clone()).await, StatusCode::UNAUTHORIZED);

    env.write_file("jwt.pem", fixture("rs256-b-public.pem"));
    let (code, body) = reload(&app).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], json!(["auth.jwt"]), "{body}");
    assert_eq!(status(new).await, StatusCode::OK);
    assert_eq!(status(old).await, StatusCode::UNAUTHORIZED);
}
