//! A small WebSocket client for the tests (tokio-tungstenite): connect with extra headers (an
//! `Authorization: Bearer …`), send, receive the next message with a timeout, and observe the
//! close frame (code and reason) or the connection's end.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// `ws://ADDR/PATH` (`path` with or without its leading slash; it may carry a query).
pub fn ws_url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}/{}", path.trim_start_matches('/'))
}

/// What the server sent next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame; `code` is `None` for a close frame without a payload.
    Close {
        code: Option<u16>,
        reason: String,
    },
    /// The connection ended without a close frame (EOF or an error, described).
    Gone(String),
}

/// Why the handshake failed.
#[derive(Debug)]
pub enum WsConnectError {
    /// The server answered the upgrade with an HTTP response other than 101 (a 401, a 402…).
    Rejected {
        status: u16,
        headers: HeaderMap,
        body: String,
    },
    /// Anything else (connection refused, a bad URL, a protocol error).
    Other(String),
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The headers of the server's 101 response.
    pub response_headers: HeaderMap,
}

impl WsClient {
    /// Connects to `url` (`ws://…`) sending `headers` too; panics if the handshake fails.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> WsClient {
        match WsClient::try_connect(url, headers).await {
            Ok(client) => client,
            Err(e) => panic!("WebSocket handshake with {url} failed: {e:?}"),
        }
    }

    /// Connects with `Authorization: Bearer <token>`; panics if the handshake fails.
    pub async fn connect_bearer(url: &str, token: &str) -> WsClient {
        let auth = format!("Bearer {token}");
        WsClient::connect(url, &[("authorization", auth.as_str())]).await
    }

    /// Connects to `url` sending `headers` too (10 s timeout).
    pub async fn try_connect(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, WsConnectError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| WsConnectError::Other(format!("bad request for {url}: {e}")))?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| WsConnectError::Other(format!("bad header name {name}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| WsConnectError::Other(format!("bad header value {value}: {e}")))?;
            request.headers_mut().append(name, value);
        }
        let connecting = tokio_tungstenite::connect_async(request);
        match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Err(_) => Err(WsConnectError::Other(format!(
                "no handshake answer from {url} within 10 s"
            ))),
            Ok(Ok((stream, response))) => Ok(WsClient {
                stream,
                response_headers: response.headers().clone(),
            }),
            Ok(Err(WsError::Http(response))) => Err(WsConnectError::Rejected {
                status: response.status().as_u16(),
                headers: response.headers().clone(),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => Err(WsConnectError::Other(e.to_string())),
        }
    }

    /// Expects the handshake to be refused and returns the HTTP status and body; panics if it
    /// succeeds or fails some other way.
    pub async fn expect_rejected(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
        match WsClient::try_connect(url, headers).await {
            Ok(_) => panic!("the WebSocket handshake with {url} succeeded; expected a refusal"),
            Err(WsConnectError::Rejected { status, body, .. }) => (status, body),
            Err(WsConnectError::Other(e)) => {
                panic!("the WebSocket handshake with {url} failed without an HTTP answer: {e}")
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("sending the text message {text:?}: {e}"));
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.stream
            .send(Message::binary(bytes.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("sending a binary message: {e}"));
    }

    /// Sends a text message; `Err` (instead of a panic) when the connection is already gone.
    pub async fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        self.stream
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    /// Starts the closing handshake with `code` and `reason` (see [`WsClient::wait_close`] for
    /// the answer).
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        // An already closed connection is fine here.
        let _ = self.stream.send(Message::Close(Some(frame))).await;
    }

    /// The next text, binary, close or end of the connection (pings and pongs are skipped);
    /// `None` when nothing came within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<WsEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            let event = match next {
                Err(_) => return None,
                Ok(None) => WsEvent::Gone("the stream ended".to_string()),
                Ok(Some(Err(e))) => WsEvent::Gone(e.to_string()),
                Ok(Some(Ok(message))) => match message {
                    Message::Text(text) => WsEvent::Text(text.to_string()),
                    Message::Binary(bytes) => WsEvent::Binary(bytes.to_vec()),
                    Message::Close(frame) => WsEvent::Close {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    },
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                },
            };
            return Some(event);
        }
    }

    /// The next event; panics if nothing came within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> WsEvent {
        match self.next_event(timeout).await {
            Some(event) => event,
            None => panic!("no WebSocket message within {timeout:?}"),
        }
    }

    /// The next message, which must be text; panics otherwise or after `timeout`.
    pub async fn recv_text(&mut self, timeout: Duration) -> String {
        match self.recv(timeout).await {
            WsEvent::Text(text) => text,
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next message, which must be binary; panics otherwise or after `timeout`.
    pub async fn recv_binary(&mut self, timeout: Duration) -> Vec<u8> {
        match self.recv(timeout).await {
            WsEvent::Binary(bytes) => bytes,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }

    /// Reads until the close frame or the connection's end (data messages before it are
    /// returned too), then lets the closing handshake finish. Returns the data messages and the
    /// final event ([`WsEvent::Close`] or [`WsEvent::Gone`]); panics after `timeout`.
    pub async fn wait_close(&mut self, timeout: Duration) -> (Vec<WsEvent>, WsEvent) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut data = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                None => panic!(
                    "the WebSocket was not closed within {timeout:?} (received before: {data:?})"
                ),
                Some(end @ (WsEvent::Close { .. } | WsEvent::Gone(_))) => {
                    if matches!(end, WsEvent::Close { .. }) {
                        self.drain(Duration::from_secs(2)).await;
                    }
                    return (data, end);
                }
                Some(message) => data.push(message),
            }
        }
    }

    /// The close frame's code and reason; panics when the connection ended without one or
    /// nothing came within `timeout`. Data messages before it are ignored.
    pub async fn expect_close(&mut self, timeout: Duration) -> (Option<u16>, String) {
        match self.wait_close(timeout).await {
            (_, WsEvent::Close { code, reason }) => (code, reason),
            (data, other) => {
                panic!("expected a close frame, got {other:?} (received before: {data:?})")
            }
        }
    }

    /// Reads (and drops) whatever comes until the connection ends, at most `timeout`: this
    /// flushes tungstenite's reply to a close frame.
    async fn drain(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}
