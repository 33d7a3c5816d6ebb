//! Ending a response that ran out of credits, in the response's own protocol: an SSE stream
//! gets a final typed error event (the shape both OpenAI's and Anthropic's clients raise as an
//! API error), a WebSocket gets a close frame (placed between frames, never inside one).

use crate::money::Credits;

/// WebSocket close code sent when the balance runs out (4000-4999: application codes).
pub const WS_CLOSE_INSUFFICIENT_CREDITS: u16 = 4002;

/// How long a client may stay connected after the cut before tollgate hangs up.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The final SSE event of a stream cut for lack of credits.
pub fn sse_error_event(held: Credits) -> Vec<u8> {
    let message = format!(
        "stream ended by tollgate: the account's credits ran out ({held} credits used); top up to continue"
    );
    let body = serde_json::json!({
        "type": "error",
        "error": {
            "type": "insufficient_credits",
            "code": "insufficient_credits",
            "message": message,
        },
    });
    format!("event: error\ndata: {body}\n\n").into_bytes()
}

/// A server-to-client close frame (unmasked) with a status code and a short reason.
pub fn ws_close_frame(code: u16, reason: &str) -> Vec<u8> {
    // Control frame payloads are at most 125 bytes: 2 for the code, the rest for the reason.
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88); // FIN + opcode 8 (close)
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// Follows server-to-client WebSocket frame boundaries across chunks, so a close frame can
/// be inserted where a frame ends.
#[derive(Debug, Default)]
pub struct WsFrames {
    /// Bytes of the current frame's header seen so far (while the header is incomplete).
    header: Vec<u8>,
    /// Payload bytes left in the current frame.
    payload_left: u64,
}

impl WsFrames {
    /// Whether the stream is between two frames now.
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// Feeds a chunk; returns the offset just after the first frame that ends in it (or 0
    /// when the chunk starts at a boundary), `None` when no frame ends in it.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut first_boundary = self.at_boundary().then_some(0);
        let mut i = 0;
        while i < chunk.len() {
            if self.payload_left > 0 {
                let n =
                    (chunk.len() - i).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                i += n;
            } else {
                self.header.push(chunk[i]);
                i += 1;
                if let Some(len) = header_payload_len(&self.header) {
                    self.header.clear();
                    self.payload_left = len;
                }
            }
            if self.at_boundary() && first_boundary.is_none() {
                first_boundary = Some(i);
            }
        }
        first_boundary
    }
}

/// The payload length once `h` holds a whole frame header (`None` while incomplete).
fn header_payload_len(h: &[u8]) -> Option<u64> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let mask_len = if masked { 4 } else { 0 };
    let (len, ext) = match h[1] & 0x7f {
        126 => (None, 2),
        127 => (None, 8),
        n => (Some(u64::from(n)), 0),
    };
    if h.len() < 2 + ext + mask_len {
        return None;
    }
    Some(len.unwrap_or_else(|| {
        h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x81];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn boundaries_across_chunks() {
        let mut stream = frame(b"hello");
        stream.extend(frame(&[b'x'; 300]));
        stream.extend(frame(b"bye"));
        let ends = [7usize, 7 + 304, 7 + 304 + 5];
        for split in 1..stream.len() {
            let mut w = WsFrames::default();
            // A fresh stream starts between frames.
            assert_eq!(w.feed(&stream[..split]), Some(0), "split {split}");
            let next = ends.iter().find(|&&e| e >= split).unwrap();
            assert_eq!(
                w.feed(&stream[split..]),
                Some(next - split),
                "split {split}"
            );
            assert!(w.at_boundary(), "split {split}");
        }
    }

    #[test]
    fn close_frame_and_sse_event() {
        let f = ws_close_frame(WS_CLOSE_INSUFFICIENT_CREDITS, "insufficient_credits");
        assert_eq!(f[0], 0x88);
        assert_eq!(usize::from(f[1]), f.len() - 2);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4002);
        let e = String::from_utf8(sse_error_event(Credits::parse("1.5").unwrap())).unwrap();
        assert!(e.starts_with("event: error\ndata: {"));
        assert!(e.ends_with("\n\n"));
        assert!(e.contains("\"insufficient_credits\""));
    }
}
