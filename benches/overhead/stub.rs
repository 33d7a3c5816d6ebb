//! The upstream stub: a hand-written HTTP/1.1 keep-alive responder on its own thread and
//! single-threaded Tokio runtime, so it never shares a scheduler with anything it is measured
//! through. Every request gets a fixed ~1 KiB OpenAI-style JSON body, except paths ending in
//! `/sse`, which get a short Server-Sent-Events stream (chunked, 10 events, one write per event,
//! no delays). Request bodies are framed by `Content-Length` (what the load generator, nginx and
//! tollgate send); anything else closes the connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The size of the JSON body, in bytes.
pub const JSON_BODY_BYTES: usize = 1024;
/// Events in one SSE response.
pub const SSE_EVENTS: usize = 10;
/// A request head larger than this closes the connection.
const MAX_HEAD: usize = 64 * 1024;

/// The stub's canned responses, built once.
struct Canned {
    json: Vec<u8>,
    /// The head plus the first event, the other events, the last event plus the final chunk.
    sse: Vec<Vec<u8>>,
}

/// A chat completion padded to exactly [`JSON_BODY_BYTES`], with an OpenAI `usage` object (so a
/// token-priced route can read it).
pub fn json_body() -> String {
    let frame = |content: &str| {
        format!(
            r#"{{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-1","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":12,"completion_tokens":180,"total_tokens":192}}}}"#
        )
    };
    let fixed = frame("").len();
    let filler = "lorem ipsum dolor sit amet ";
    let content: String = filler
        .chars()
        .cycle()
        .take(JSON_BODY_BYTES.saturating_sub(fixed))
        .collect();
    frame(&content)
}

fn sse_events() -> Vec<String> {
    let mut events = Vec::with_capacity(SSE_EVENTS);
    for i in 0..SSE_EVENTS - 2 {
        events.push(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"bench-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    events.push(
        "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"bench-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":8,\"total_tokens\":20}}\n\n"
            .to_string(),
    );
    events.push("data: [DONE]\n\n".to_string());
    events
}

impl Canned {
    fn new() -> Canned {
        let body = json_body();
        let json = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        let chunk = |e: &str| format!("{:x}\r\n{e}\r\n", e.len());
        let events = sse_events();
        let mut sse = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let mut part = String::new();
            if i == 0 {
                part.push_str(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
                );
            }
            part.push_str(&chunk(e));
            if i + 1 == events.len() {
                part.push_str("0\r\n\r\n");
            }
            sse.push(part.into_bytes());
        }
        Canned { json, sse }
    }
}

/// Starts the stub on 127.0.0.1 (a free port) in a thread of its own; it runs until the process
/// exits. The counter counts the requests it answered (whatever they came through).
pub fn start() -> (SocketAddr, Arc<AtomicU64>) {
    let served = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&served);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("stub: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("stub: local address");
    listener
        .set_nonblocking(true)
        .expect("stub: non-blocking listener");
    std::thread::Builder::new()
        .name("upstream-stub".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("stub: runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("stub: tokio listener");
                let canned: &'static Canned = Box::leak(Box::new(Canned::new()));
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(serve(stream, canned, Arc::clone(&counter)));
                        }
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        })
        .expect("stub: thread");
    (addr, served)
}

/// Where the request head ends (the index after `\r\n\r\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

struct Head {
    sse: bool,
    body_len: usize,
    close: bool,
}

/// Parses what the stub needs from a request head; `None` for what it does not support.
fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target);
    let mut out = Head {
        sse: path.ends_with("/sse"),
        body_len: 0,
        close: request_line.ends_with("HTTP/1.0"),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            out.body_len = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            out.close = value.eq_ignore_ascii_case("close");
        }
    }
    Some(out)
}

async fn serve(mut stream: TcpStream, canned: &'static Canned, served: Arc<AtomicU64>) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let end = loop {
            if let Some(end) = head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let Some(head) = parse_head(&buf[..end]) else {
            return;
        };
        while buf.len() < end + head.body_len {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        buf.advance(end + head.body_len);
        served.fetch_add(1, Ordering::Relaxed);
        let written = if head.sse {
            write_parts(&mut stream, &canned.sse).await
        } else {
            stream.write_all(&canned.json).await
        };
        if written.is_err() || head.close {
            return;
        }
    }
}

async fn write_parts(stream: &mut TcpStream, parts: &[Vec<u8>]) -> std::io::Result<()> {
    for part in parts {
        stream.write_all(part).await?;
    }
    Ok(())
}
