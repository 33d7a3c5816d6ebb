//! The incremental HTTP/1.x response parser: framing by `Content-Length`, chunked encoding or
//! connection close; body bytes dropped as they are parsed.

use bytes::{Buf, BytesMut};

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

/// What the parser learned from a complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Whether the connection may carry the next request.
    pub keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    HeadTooLarge,
    StatusLine,
    Header,
    ContentLength,
    ChunkSize,
    ChunkEnd,
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the head; bytes before `scanned` hold no `\r\n\r\n`.
    Head {
        scanned: usize,
    },
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// An incremental response parser: feed it the read buffer after every read; it consumes what
/// it has parsed (body bytes are dropped) and says when the response is complete.
#[derive(Debug)]
pub struct ResponseParser {
    head_request: bool,
    state: State,
    status: u16,
    keep_alive: bool,
}

impl ResponseParser {
    /// `head_request`: the request was HEAD, so the response has no body.
    pub fn new(head_request: bool) -> ResponseParser {
        ResponseParser {
            head_request,
            state: State::Head { scanned: 0 },
            status: 0,
            keep_alive: false,
        }
    }

    fn done(&self) -> Result<Option<Response>, ParseError> {
        Ok(Some(Response {
            status: self.status,
            keep_alive: self.keep_alive,
        }))
    }

    /// Consumes what it can from `buf`; `Some` once the whole response has been read.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Response>, ParseError> {
        loop {
            match self.state {
                State::Head { scanned } => {
                    let Some(end) = find(buf, b"\r\n\r\n", scanned) else {
                        if buf.len() > MAX_HEAD {
                            return Err(ParseError::HeadTooLarge);
                        }
                        self.state = State::Head {
                            scanned: buf.len().saturating_sub(3),
                        };
                        return Ok(None);
                    };
                    let head = parse_head(&buf[..end])?;
                    buf.advance(end + 4);
                    self.state = State::Head { scanned: 0 };
                    // Interim responses (100 Continue, 103 Early Hints): the real one follows.
                    if (100..200).contains(&head.status) && head.status != 101 {
                        continue;
                    }
                    self.status = head.status;
                    self.keep_alive = head.keep_alive && head.status != 101;
                    if self.head_request || matches!(head.status, 101 | 204 | 304) {
                        return self.done();
                    }
                    match head.framing {
                        Framing::Chunked => self.state = State::Chunked(Chunk::Size),
                        Framing::Length(0) => return self.done(),
                        Framing::Length(n) => self.state = State::Length(n),
                        Framing::Close => {
                            self.keep_alive = false;
                            self.state = State::UntilClose;
                        }
                    }
                }
                State::Length(remaining) => {
                    let left = skip(buf, remaining);
                    if left > 0 {
                        self.state = State::Length(left);
                        return Ok(None);
                    }
                    return self.done();
                }
                State::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.state = State::Chunked(if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    });
                }
                State::Chunked(Chunk::Data(remaining)) => {
                    let left = skip(buf, remaining);
                    if left > 0 {
                        self.state = State::Chunked(Chunk::Data(left));
                        return Ok(None);
                    }
                    self.state = State::Chunked(Chunk::DataEnd);
                }
                State::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ParseError::ChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::Chunked(Chunk::Size);
                }
                State::Chunked(Chunk::Trailer) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        return self.done();
                    }
                }
                State::UntilClose => {
                    buf.clear();
                    return Ok(None);
                }
            }
        }
    }

    /// The server closed the connection: complete for a body delimited by the close.
    pub fn eof(&self) -> Option<Response> {
        match self.state {
            State::UntilClose => Some(Response {
                status: self.status,
                keep_alive: false,
            }),
            _ => None,
        }
    }
}

/// Drops up to `n` bytes from the front of `buf`; returns how many are still to come.
fn skip(buf: &mut BytesMut, n: u64) -> u64 {
    let take = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
    buf.advance(take);
    n - take as u64
}

/// The next `\r\n`-terminated line (without it), consumed; `None` until it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ParseError> {
    match find(buf, b"\r\n", 0) {
        Some(end) => {
            let line = buf.split_to(end);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(ParseError::LineTooLong),
        None => Ok(None),
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let size = line
        .iter()
        .position(|&b| b == b';')
        .map_or(line, |i| &line[..i]);
    let size = std::str::from_utf8(size)
        .map_err(|_| ParseError::ChunkSize)?
        .trim_matches([' ', '\t']);
    if size.is_empty() || size.len() > 15 {
        return Err(ParseError::ChunkSize);
    }
    u64::from_str_radix(size, 16).map_err(|_| ParseError::ChunkSize)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(u64),
    Close,
}

#[derive(Debug)]
struct Head {
    status: u16,
    keep_alive: bool,
    framing: Framing,
}

/// The status line and the headers that matter for framing and keep-alive.
fn parse_head(head: &[u8]) -> Result<Head, ParseError> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| match l {
        [rest @ .., b'\r'] => rest,
        l => l,
    });
    let status_line = lines.next().ok_or(ParseError::StatusLine)?;
    // "HTTP/1.1 200 OK"
    let minor = match status_line.get(..9) {
        Some(b"HTTP/1.1 ") => 1,
        Some(b"HTTP/1.0 ") => 0,
        _ => return Err(ParseError::StatusLine),
    };
    let code = status_line.get(9..12).ok_or(ParseError::StatusLine)?;
    if !code.iter().all(u8::is_ascii_digit) || !matches!(status_line.get(12), None | Some(b' ')) {
        return Err(ParseError::StatusLine);
    }
    let status = code
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));

    let mut keep_alive = minor == 1;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut length: Option<u64> = None;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(ParseError::Header)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(ParseError::Header);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(ParseError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ParseError::ContentLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Chunked only when it is the last coding.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    keep_alive = true;
                }
            }
        }
    }
    let framing = match (transfer_encoding, chunked, length) {
        (true, true, _) => Framing::Chunked,
        (true, false, _) => Framing::Close,
        (false, _, Some(n)) => Framing::Length(n),
        (false, _, None) => Framing::Close,
    };
    Ok(Head {
        status,
        keep_alive,
        framing,
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the response and what is left over.
    fn parse_in_steps(input: &[u8], step: usize, head: bool) -> (Option<Response>, BytesMut) {
        let mut parser = ResponseParser::new(head);
        let mut buf = BytesMut::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            if let Some(r) = parser.parse(&mut buf).unwrap() {
                return (Some(r), buf);
            }
        }
        (parser.eof(), buf)
    }

    fn parse_all(input: &[u8]) -> Response {
        for step in [1, 2, 3, 7, input.len()] {
            let (r, rest) = parse_in_steps(input, step, false);
            assert!(rest.is_empty(), "step {step}: left {rest:?}");
            let r = r.unwrap_or_else(|| panic!("step {step}: incomplete"));
            assert_eq!(r, parse_in_steps(input, input.len(), false).0.unwrap());
        }
        parse_in_steps(input, input.len(), false).0.unwrap()
    }

    #[test]
    fn content_length_keep_alive() {
        let r = parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello");
        assert_eq!(
            r,
            Response {
                status: 200,
                keep_alive: true
            }
        );
        let r = parse_all(b"HTTP/1.1 404 Not Found\r\ncontent-length:0\r\n\r\n");
        assert_eq!(r.status, 404);
        assert!(r.keep_alive);
    }

    #[test]
    fn incomplete_body_is_not_done() {
        let (r, _) = parse_in_steps(
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello",
            1,
            false,
        );
        assert_eq!(r, None);
        let (r, _) = parse_in_steps(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n", 100, false);
        assert_eq!(r, None);
    }

    #[test]
    fn connection_close_and_http10() {
        let r = parse_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
        assert!(!r.keep_alive);
        let r = parse_all(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(!r.keep_alive);
        let r = parse_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert!(!r.keep_alive);
        let r =
            parse_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok");
        assert!(r.keep_alive);
    }

    #[test]
    fn body_until_close() {
        let input =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body runs to the close";
        for step in [1, 5, input.len()] {
            let (r, _) = parse_in_steps(input, step, false);
            assert_eq!(
                r,
                Some(Response {
                    status: 200,
                    keep_alive: false
                })
            );
        }
    }

    #[test]
    fn chunked() {
        let input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        let r = parse_all(input);
        assert_eq!(
            r,
            Response {
                status: 200,
                keep_alive: true
            }
        );
        // Trailers, and Transfer-Encoding wins over Content-Length.
        let r = parse_all(
            b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              3\r\nabc\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
        );
        assert_eq!(r.status, 201);
        // The last chunk not yet there: not done.
        let (r, _) = parse_in_steps(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            100,
            false,
        );
        assert_eq!(r, None);
    }

    #[test]
    fn leftover_bytes_stay_in_the_buffer() {
        let (r, rest) = parse_in_steps(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1",
            1000,
            false,
        );
        assert_eq!(r.map(|r| r.status), Some(200));
        assert_eq!(&rest[..], b"HTTP/1.1");
    }

    #[test]
    fn no_body_statuses_and_head() {
        let r = parse_all(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(r.status, 204);
        assert!(r.keep_alive);
        let r = parse_all(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(r.status, 304);
        let (r, rest) = parse_in_steps(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 1, true);
        assert_eq!(r.map(|r| r.status), Some(200));
        assert!(rest.is_empty());
    }

    #[test]
    fn interim_responses_are_skipped() {
        let r = parse_all(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        );
        assert_eq!(r.status, 200);
    }

    #[test]
    fn malformed() {
        for bad in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
        ] {
            let mut parser = ResponseParser::new(false);
            let mut buf = BytesMut::from(bad);
            assert!(
                parser.parse(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut parser = ResponseParser::new(false);
        let mut buf = BytesMut::from(&vec![b'a'; MAX_HEAD + 1][..]);
        assert_eq!(parser.parse(&mut buf), Err(ParseError::HeadTooLarge));
    }
}
