//! Below the client library: WebSocket frames and HTTP written and read by hand, for the tests
//! that must misbehave (malformed or unmasked frames, never answering pings, never reading,
//! leaving with a bare FIN, huge or trickled request heads). Every read is bounded by [`T`].

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use super::{TestApp, T};

pub(crate) const FIN: u8 = 0x80;
pub(crate) const RSV1: u8 = 0x40;
pub(crate) const RSV2: u8 = 0x20;
pub(crate) const RSV3: u8 = 0x10;
pub(crate) const CONT: u8 = 0x0;
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

pub(crate) const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame with first byte `b0` (FIN, RSV bits, opcode), masked as a client must.
pub(crate) fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    encode(b0, payload, true)
}

pub(crate) fn encode(b0: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![b0];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    if mask {
        out.extend(MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend(payload);
    }
    out
}

/// The WebSocket upgrade request for `/ws?{query}`, e.g. `token=…`.
pub(crate) fn upgrade_request(app: &TestApp, query: &str) -> String {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    )
}

/// Read an HTTP response head (up to the blank line); returns it and the bytes after it.
/// `None` if the server closed the connection before a complete head.
pub(crate) async fn read_head(rd: &mut (impl AsyncReadExt + Unpin)) -> Option<(String, Vec<u8>)> {
    let deadline = Instant::now() + T;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        assert!(buf.len() < 64 * 1024, "response head too long");
        match timeout_at(deadline, rd.read(&mut chunk))
            .await
            .expect("an HTTP response in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Send `request` in pieces of `piece` bytes (ignoring write errors: the server may answer and
/// close before it has read everything) and return the answer's head and its body (up to its
/// `content-length`, or EOF); `None` if the server closed without an answer.
pub(crate) async fn http_answer(
    app: &TestApp,
    request: Vec<u8>,
    piece: usize,
) -> Option<(String, Vec<u8>)> {
    let io = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = io.into_split();
    let writer = tokio::spawn(async move {
        for chunk in request.chunks(piece) {
            if wr.write_all(chunk).await.is_err() {
                break;
            }
        }
        wr
    });
    let answer = read_head(&mut rd).await;
    let answer = match answer {
        // Upgraded: what follows is WebSocket frames, not a body.
        Some((head, mut body)) if !head.starts_with("HTTP/1.1 101") => {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(usize::MAX);
            let deadline = Instant::now() + T;
            let mut chunk = [0u8; 4096];
            while body.len() < length {
                match timeout_at(deadline, rd.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            Some((head, body))
        }
        other => other,
    };
    // The writer stops at the end of the request or at the first refused write: nothing to check.
    timeout(T, writer).await.ok();
    answer
}

/// The status code and the JSON error code of an answer.
pub(crate) fn refusal(head: &str, body: &[u8]) -> (u16, String) {
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("a JSON body ({e}): {:?}", String::from_utf8_lossy(body)));
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// A server frame.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) opcode: u8,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// `(code, reason)` of a close frame (1005 when it has no code).
    pub(crate) fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, CLOSE);
        if self.payload.len() < 2 {
            return (1005, String::new());
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 close reason");
        (code, reason)
    }

    pub(crate) fn json(&self) -> Value {
        assert_eq!(self.opcode, TEXT, "{self:?}");
        serde_json::from_slice(&self.payload).expect("a JSON text frame")
    }
}

/// A raw, upgraded WebSocket connection.
pub(crate) struct Raw {
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrade as `user` (`?token=`) and read `connection_established`.
    pub(crate) async fn connect(app: &TestApp, user: &str) -> Self {
        let io = TcpStream::connect(app.addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        let (rd, mut wr) = io.into_split();
        let req = upgrade_request(app, &format!("token={}", app.token(user)));
        wr.write_all(req.as_bytes()).await.unwrap();
        Self::upgraded(rd, wr).await
    }

    /// The connection whose upgrade request was written to `wr`: read the `101` and
    /// `connection_established`.
    pub(crate) async fn upgraded(mut rd: OwnedReadHalf, wr: OwnedWriteHalf) -> Self {
        let (head, rest) = read_head(&mut rd).await.expect("a response to the upgrade");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut raw = Raw {
            rd,
            wr: Some(wr),
            buf: rest,
        };
        let est = raw.next_frame().await.expect("connection_established");
        assert_eq!(est.json()["type"], "connection_established");
        raw
    }

    /// The writing half, for a test that writes from another task.
    pub(crate) fn take_writer(&mut self) -> OwnedWriteHalf {
        self.wr.take().expect("writer")
    }

    /// Write bytes; an error (the server already closed) is ignored: the close frame tells.
    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let wr = self.wr.as_mut().expect("writer");
        wr.write_all(bytes).await.ok();
    }

    /// Go away with a bare FIN, no close frame (a killed tab), then read until the server closes
    /// the socket; returns every byte it sent after `connection_established`.
    pub(crate) async fn fin_then_read_to_end(mut self) -> Vec<u8> {
        self.take_writer().shutdown().await.unwrap();
        let mut rest = std::mem::take(&mut self.buf);
        timeout(T, self.rd.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    }

    /// Make sure `n` bytes are buffered; `false` at EOF or reset.
    async fn fill(&mut self, n: usize, deadline: Instant) -> bool {
        let mut chunk = [0u8; 8192];
        while self.buf.len() < n {
            match timeout_at(deadline, self.rd.read(&mut chunk))
                .await
                .expect("a frame from the server in time")
            {
                Ok(0) | Err(_) => return false,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    /// The next server frame; `None` if the connection ended first.
    pub(crate) async fn next_frame(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + T;
        if !self.fill(2, deadline).await {
            return None;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, head) = match b1 & 0x7f {
            126 => {
                if !self.fill(4, deadline).await {
                    return None;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.fill(10, deadline).await {
                    return None;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        assert!(len <= 1 << 20, "a server frame of {len} bytes");
        if !self.fill(head + len, deadline).await {
            return None;
        }
        let payload = self.buf[head..head + len].to_vec();
        self.buf.drain(..head + len);
        assert_eq!(b0 & 0x70, 0, "server frames have no reserved bits");
        Some(Frame {
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// Read frames until the server's close frame; returns its code and reason and the frames
    /// before it. Fails if the connection ends without one.
    pub(crate) async fn closed(&mut self) -> ((u16, String), Vec<Frame>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame().await {
                Some(f) if f.opcode == CLOSE => return (f.close(), before),
                Some(f) => before.push(f),
                None => panic!("connection ended without a close frame after {before:?}"),
            }
        }
    }

    /// Read frames until a text frame; skips pings and pongs.
    pub(crate) async fn next_json(&mut self) -> Value {
        loop {
            let f = self.next_frame().await.expect("a frame");
            match f.opcode {
                PONG | PING => continue,
                _ => return f.json(),
            }
        }
    }
}
