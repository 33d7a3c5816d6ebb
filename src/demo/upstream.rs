//! The bundled demo upstream: an OpenAI-style chat completion endpoint and a model list.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

/// The bundled upstream: an OpenAI-compatible chat completion endpoint (JSON, or SSE when the
/// request says `"stream": true`) and a model list.
pub fn upstream_router() -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/tokens/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "demo-1", "object": "model", "owned_by": "tollgate"}]}),
    )
}

async fn chat(body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prompt = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let model = request["model"].as_str().unwrap_or("demo-1").to_string();
    let words: Vec<String> = format!("You said: {prompt}. This answer was metered by tollgate.")
        .split(' ')
        .map(str::to_string)
        .collect();
    let prompt_tokens = (prompt.len() / 4).max(1) as u64;
    let completion_tokens = words.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        let stream = async_stream(words, model, usage, include_usage);
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    Json(json!({
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")}, "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

fn async_stream(
    words: Vec<String>,
    model: String,
    usage: Value,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(8);
    tokio::spawn(async move {
        let event = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        for word in words {
            let chunk = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("{word} ")}, "finish_reason": null}]});
            if tx.send(event(chunk)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let _ = tx.send(event(done)).await;
        if include_usage {
            let u = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            let _ = tx.send(event(u)).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// `tollgate demo-upstream`: only the demo model, until SIGTERM or Ctrl-C.
pub async fn serve_upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    eprintln!("listening upstream={addr}");
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    axum::serve(listener, upstream_router())
        .with_graceful_shutdown(stop)
        .await
        .context("the demo upstream stopped")?;
    Ok(())
}
