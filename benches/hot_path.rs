//! Micro-benchmarks of the pure hot-path pieces: exact money parse/format, route matching over
//! 100 routes, the key-cache hit, JWT verification, the SSE/JSON usage parser on a realistic
//! stream, pricing a request, and reading a chat request's body. `cargo bench --bench hot_path`.

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

fn jwt(c: &mut Criterion) {
    let secret = b"bench-secret-0123456789-0123456789".to_vec();
    let verifier = tollgate::auth::jwt::JwtVerifier::new(&tollgate::config::JwtConfig {
        algorithms: vec![jsonwebtoken::Algorithm::HS256],
        secret: Some(secret.clone()),
        public_key_pem: None,
        account_claim: "org".into(),
        issuer: Some("https://auth.example.com".into()),
        audience: Some("tollgate".into()),
        leeway_seconds: 30,
        jwks: None,
    });
    let claims = serde_json::json!({
        "org": "acme", "sub": "user-1", "iss": "https://auth.example.com", "aud": "tollgate",
        "exp": chrono::Utc::now().timestamp() + 3600,
    });
    let token = match jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    ) {
        Ok(t) => t,
        Err(e) => panic!("bench token: {e}"),
    };
    // With configured keys `verify` never waits (only a JWKS fetch would), so the future is
    // ready on its first poll: the bench measures the verification, not an executor.
    use futures_util::FutureExt;
    if !matches!(verifier.verify(&token).now_or_never(), Some(Ok(_))) {
        panic!("the bench token does not verify");
    }
    c.bench_function("auth/jwt HS256 verify", |b| {
        b.iter(|| verifier.verify(std::hint::black_box(&token)).now_or_never())
    });
}

/// A 200-event OpenAI chat stream with its usage chunk, as an upstream sends it.
fn openai_stream() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..200 {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":812,\"completion_tokens\":200,\"total_tokens\":1012}}\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

fn usage_meter(c: &mut Criterion) {
    use tollgate::proxy::meter::UsageMeter;
    let stream = openai_stream();
    // Cut into network-sized chunks that split events anywhere.
    let chunks: Vec<&[u8]> = stream.chunks(1371).collect();
    c.bench_function("meter/SSE 200 events (usage at the end)", |b| {
        b.iter(|| {
            let mut m = UsageMeter::for_content_type(Some("text/event-stream"));
            for chunk in &chunks {
                m.feed(std::hint::black_box(chunk));
            }
            m.finish()
        })
    });
    let json = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today? This is a typical short answer of a chat model."},"finish_reason":"stop"}],"usage":{"prompt_tokens":812,"completion_tokens":24,"total_tokens":836}}"#;
    c.bench_function("meter/JSON completion", |b| {
        b.iter(|| {
            let mut m = UsageMeter::for_content_type(Some("application/json"));
            m.feed(std::hint::black_box(json));
            m.finish()
        })
    });
}

fn pricing(c: &mut Criterion) {
    let config = match Config::from_toml(
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
[[routes]]
name = "chat"
path_prefix = "/v1"
upstream = "u"
pricing = { per_request = 0.01, input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5, reserve = 5, models = { "gpt-4o" = { input_per_1k_tokens = 2.5, output_per_1k_tokens = 10 }, "gpt-4o-mini*" = { input_per_1k_tokens = 0.15, output_per_1k_tokens = 0.6 } } }
"#,
        Path::new("bench.toml"),
        &|_| None,
    ) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    };
    let Some(tollgate::config::Price::Metered(p)) = config.routes[0].price.clone() else {
        panic!("no pricing");
    };
    c.bench_function("pricing/resolve model + cost", |b| {
        b.iter(|| {
            let rates = tollgate::pricing::Rates::resolve(
                &p,
                Some(std::hint::black_box("gpt-4o-mini-2024-07-18")),
            )
            .ok()?;
            rates
                .cost(&tollgate::pricing::Measured {
                    input_tokens: 812,
                    output_tokens: 200,
                    request_body_bytes: 3000,
                    ticks: 0,
                })
                .ok()
        })
    });
    let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":512,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Explain how a metering proxy settles a streamed response, in three sentences."}]}"#;
    c.bench_function("body/inspect + rewrite a chat request", |b| {
        b.iter(|| {
            let mut r = tollgate::proxy::body::AiRequest::inspect(std::hint::black_box(body));
            r.rewrite(Some(256), true)
        })
    });
}

criterion_group!(
    benches,
    money,
    routing,
    key_cache,
    jwt,
    usage_meter,
    pricing
);
criterion_main!(benches);
