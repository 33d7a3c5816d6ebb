//! A minimal HTTP/1.1 keep-alive client: one request at a time on one `TcpStream`, the response
//! framed by `Content-Length`, chunked encoding or connection close, the body discarded as it
//! arrives. A kept-alive connection the server closed in between is reopened once, transparently.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod parse;

use parse::{Response, ResponseParser};

const READ_CHUNK: usize = 16 * 1024;

/// Why a request got no response (timeouts are the caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connection could not be opened.
    Connect,
    /// Writing or reading failed, or the server closed the connection mid-response.
    Io,
    /// The response was not valid HTTP/1.x.
    Protocol,
}

/// One keep-alive connection to the target, opened on first use and reopened after a close.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: BytesMut,
}

/// How one attempt on the current stream ended badly.
enum Attempt {
    /// Nothing came back on a connection that was reused: the server probably closed it while
    /// it was idle; worth one retry on a fresh connection.
    Stale,
    Failed(Failure),
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Drops the connection (after an error, a timeout or `Connection: close`).
    pub fn reset(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    async fn connect(&mut self) -> Result<(), Failure> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| Failure::Connect)?;
        // Latency matters more than packets here.
        let _ = stream.set_nodelay(true);
        self.stream = Some(stream);
        self.buf.clear();
        Ok(())
    }

    /// Sends one request and reads the whole response; returns its status.
    pub async fn send(&mut self, request: &[u8], head: bool) -> Result<u16, Failure> {
        if self.stream.is_some() {
            match self.attempt(request, head).await {
                Ok(status) => return Ok(status),
                Err(Attempt::Failed(f)) => {
                    self.reset();
                    return Err(f);
                }
                Err(Attempt::Stale) => self.reset(),
            }
        }
        self.connect().await?;
        match self.attempt(request, head).await {
            Ok(status) => Ok(status),
            Err(Attempt::Stale) => {
                self.reset();
                Err(Failure::Io)
            }
            Err(Attempt::Failed(f)) => {
                self.reset();
                Err(f)
            }
        }
    }

    async fn attempt(&mut self, request: &[u8], head: bool) -> Result<u16, Attempt> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Attempt::Stale);
        };
        let response = exchange(stream, &mut self.buf, request, head).await?;
        if !response.keep_alive || !self.buf.is_empty() {
            // Closed by the server, or bytes we did not ask for: start clean next time.
            self.reset();
        }
        Ok(response.status)
    }
}

async fn exchange(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    request: &[u8],
    head: bool,
) -> Result<Response, Attempt> {
    if stream.write_all(request).await.is_err() {
        return Err(Attempt::Stale);
    }
    let mut parser = ResponseParser::new(head);
    let mut received = !buf.is_empty();
    loop {
        match parser.parse(buf) {
            Ok(Some(response)) => return Ok(response),
            Ok(None) => {}
            Err(_) => return Err(Attempt::Failed(Failure::Protocol)),
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match stream.read_buf(buf).await {
            Ok(0) => {
                if let Some(response) = parser.eof() {
                    return Ok(response);
                }
                return Err(if received {
                    Attempt::Failed(Failure::Io)
                } else {
                    Attempt::Stale
                });
            }
            Ok(_) => received = true,
            Err(_) if !received => return Err(Attempt::Stale),
            Err(_) => return Err(Attempt::Failed(Failure::Io)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// A real socket: keep-alive reuse, a server that closes after each answer, and a stale
    /// keep-alive connection closed by the server while idle (reopened transparently).
    #[tokio::test]
    async fn reconnects_when_the_server_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut buf = vec![0u8; 4096];
                // First connection: two keep-alive answers, then close while idle.
                // Later connections: one answer with `Connection: close`.
                let answers = if accepted == 1 { 2 } else { 1 };
                for i in 0..answers {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return accepted;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let close = if accepted == 1 {
                        ""
                    } else {
                        "Connection: close\r\n"
                    };
                    let body = format!("{accepted}-{i}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\n{close}Content-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(resp.as_bytes()).await.unwrap();
                }
                drop(s);
                if accepted == 3 {
                    return accepted;
                }
            }
        });
        let mut conn = Conn::new(addr);
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(conn.send(req, false).await, Ok(200));
        assert_eq!(conn.send(req, false).await, Ok(200));
        assert!(conn.stream.is_some());
        // The server closed the first connection: the next send reopens it.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(conn.send(req, false).await, Ok(200));
        assert!(conn.stream.is_none(), "Connection: close drops the stream");
        assert_eq!(conn.send(req, false).await, Ok(200));
        assert_eq!(server.await.unwrap(), 3);
        // Nothing listens any more: a connect failure.
        assert_eq!(conn.send(req, false).await, Err(Failure::Connect));
    }
}
