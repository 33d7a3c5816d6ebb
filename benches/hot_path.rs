//! Micro-benchmarks of the pure hot-path pieces: exact money parse/format, route matching over
//! 100 routes, the key-cache hit. `cargo bench --bench hot_path`.

// A benchmark with a broken fixture should stop loudly.
#![allow(clippy::panic)]

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use tollgate::auth::cache::TtlCache;
use tollgate::config::Config;
use tollgate::money::Credits;
use tollgate::proxy::route::Router;

fn config_with_routes(n: usize) -> Config {
    let mut text = String::from(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[redis]
url = "redis://127.0.0.1"
[postgres]
url = "postgres://x@127.0.0.1/db"
[[upstreams]]
name = "u"
url = "http://127.0.0.1:1"
"#,
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmethod = \"POST\"\npath_prefix = \"/v1/service{i}/endpoint\"\nupstream = \"u\"\ncost = 0.{i:02}\n"
        ));
    }
    match Config::from_toml(&text, Path::new("bench.toml"), &|_| {
        Some("bench-secret-0123456789".into())
    }) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    }
}

fn money(c: &mut Criterion) {
    c.bench_function("money/parse 12.345678", |b| {
        b.iter(|| Credits::parse(std::hint::black_box("12.345678")))
    });
    let x = Credits::from_micros(12_345_678);
    c.bench_function("money/format", |b| {
        b.iter(|| std::hint::black_box(x).to_string())
    });
}

fn routing(c: &mut Criterion) {
    let config = config_with_routes(100);
    let router = Router::new(&config.routes);
    c.bench_function("route/match among 100 (last)", |b| {
        b.iter(|| {
            router.find(
                &Method::POST,
                std::hint::black_box("/v1/service99/endpoint/x"),
            )
        })
    });
    c.bench_function("route/no match among 100", |b| {
        b.iter(|| router.find(&Method::POST, std::hint::black_box("/nothing/here")))
    });
}

fn key_cache(c: &mut Criterion) {
    let cache: TtlCache<[u8; 32], Option<String>> =
        TtlCache::new(Duration::from_secs(60), Duration::from_secs(1), 100_000);
    cache.set_push_healthy(true);
    for i in 0..10_000u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        cache.insert(k, Some(format!("acct{i}")));
    }
    let key = tollgate::auth::keys::hash("tg_0123456789abcdefghijABCDEFGHIJKL");
    cache.insert(key, Some("acme".into()));
    c.bench_function("auth/key hash + cache hit", |b| {
        b.iter(|| {
            cache.get(&tollgate::auth::keys::hash(std::hint::black_box(
                "tg_0123456789abcdefghijABCDEFGHIJKL",
            )))
        })
    });
}

criterion_group!(benches, money, routing, key_cache);
criterion_main!(benches);
