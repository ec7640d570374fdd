//! Hostile input (issue 4): every attack gets the answer PROTOCOL.md documents, never a panic,
//! and another user's connection on the same server keeps working.
//!
//! Malformed WebSocket frames cannot be sent with a well-behaved client library, so those tests
//! speak raw TCP: a hand-written upgrade request, then hand-built (masked, unless the attack is
//! "unmasked") frames, then read frames until the server's close frame. Every wait is bounded.
//!
//! Each test starts its own server with a bystander (`bob`) connected before the attack, and
//! ends with [`Scene::others_unaffected`]: no panic anywhere in the server, bob still gets a
//! `pong`, and a fresh user completes a whole chat run.
//!
//! Answers these tests pin down where PROTOCOL.md is silent:
//! - a number JSON cannot represent as a double (`1e999`, a 60,000-digit integer) is
//!   `invalid_json`; a representable number of the wrong range for a field is `invalid_message`;
//! - protocol Pings count against the message rate like frames (a flood is closed with 4029);
//!   unsolicited Pongs are ignored and not counted;
//! - a client close frame with a code that may not be sent (1005, 1006, 1015, reserved or out of
//!   range) or a one-byte body is answered with 1002; a close reason that is not UTF-8 with 1007;
//! - a request head over 64 KiB (its request line and `name: value` lines) gets 431, however its
//!   bytes arrive; with the JSON body when the HTTP parser took it in, without one when it
//!   overflowed the parser's buffer first (or had more than 100 headers); a request target
//!   that long may get 414 from the parser instead;
//! - a request to `/ws` that is not a WebSocket handshake (RFC 6455 §4.2.1) gets a JSON
//!   refusal: 426 with `Sec-WebSocket-Version: 13` for another version, 400 otherwise (a key
//!   that is not 16 bytes in base64 included); another method 405, an unknown path 404;
//! - a query string the extractor refuses (a repeated parameter) gets 400 `invalid_request` with
//!   the JSON body; an events path that does not decode gets 403 `forbidden_thread`;
//! - after a close it initiates, the server keeps the socket up to a second (reading and dropping
//!   input) so the client can read the close frame before the socket goes away.

mod common;

use std::sync::{Mutex, Once};
use std::time::Duration;

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tether::client::{Client, ClientError, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Panic watch: the server runs in this process, so a panic in any of its tasks (which tokio
// would swallow) is recorded here. Panics located in `tests/` are the tests' own assertions.

static SERVER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

fn watch_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/") || l.file().starts_with("tests\\"));
            if !in_tests {
                SERVER_PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(info.to_string());
            }
            previous(info);
        }));
    });
}

fn assert_no_server_panic() {
    let panics = SERVER_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(panics.is_empty(), "the server panicked: {panics:#?}");
}

// ---------------------------------------------------------------------------------------------
// A server with a bystander.

struct Scene {
    app: TestApp,
    bob: Client,
}

async fn scene() -> Scene {
    scene_with(|_| {}).await
}

async fn scene_with(f: impl FnOnce(&mut tether::Config)) -> Scene {
    watch_panics();
    let app = spawn_with(f).await;
    let (bob, _) = app.connect("bob").await;
    Scene { app, bob }
}

impl Scene {
    /// Wait until only the bystander is connected: the attacker's slot was released.
    async fn attacker_released(&self) {
        self.app
            .wait_stats("the attacker's connection to be released", |s| {
                s["connections"] == 1
            })
            .await;
    }

    /// No panic, the bystander still answered, and a new user completes a chat run.
    async fn others_unaffected(&mut self) {
        assert_no_server_panic();
        ping_pong(&mut self.bob, "bob-after-attack").await;
        let (mut carol, _) = self.app.connect("carol").await;
        let frames = chat(&mut carol, "carol-1", "hello after the attack").await;
        assert_eq!(frames.last().unwrap()["type"], "agent_completed");
        carol.close().await.unwrap();
        assert_no_server_panic();
    }
}

/// A `ping` frame answered by a `pong` that echoes its id.
async fn ping_pong(c: &mut Client, id: &str) {
    c.send_json(&json!({"type": "ping", "id": id}))
        .await
        .unwrap();
    let frames = c.until("pong", T).await.expect("pong");
    assert_eq!(frames.last().unwrap()["reply_to"], id);
}

/// The next JSON frame must be an `error` with `code`; returns it.
async fn expect_error(c: &mut Client, code: &str) -> Value {
    let f = c.next_json(T).await.expect("an error frame");
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["data"]["code"], code, "{f}");
    f
}

/// An HTTP refusal of the upgrade: status and JSON body.
async fn refused(app: &TestApp, opts: ConnectOptions) -> (u16, Value) {
    match Client::connect(&app.ws_base(), &opts).await {
        Err(ClientError::Ws(tether::client::WsError::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).expect("a JSON error body"))
                .unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connection was accepted"),
    }
}

fn with_token(token: String) -> ConnectOptions {
    ConnectOptions {
        query: Some(format!("token={token}")),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket.

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame with first byte `b0` (FIN, RSV bits, opcode), masked as a client must.
fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    encode(b0, payload, true)
}

fn encode(b0: u8, payload: &[u8], mask: bool) -> Vec<u8> {
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

fn upgrade_request(app: &TestApp, query: &str) -> String {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    )
}

/// Read an HTTP response head (up to the blank line); returns it and the bytes after it.
/// `None` if the server closed the connection before a complete head.
async fn read_head(rd: &mut (impl AsyncReadExt + Unpin)) -> Option<(String, Vec<u8>)> {
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

/// A server frame.
#[derive(Debug)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    /// `(code, reason)` of a close frame (1005 when it has no code).
    fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, CLOSE);
        if self.payload.len() < 2 {
            return (1005, String::new());
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 close reason");
        (code, reason)
    }

    fn json(&self) -> Value {
        assert_eq!(self.opcode, TEXT, "{self:?}");
        serde_json::from_slice(&self.payload).expect("a JSON text frame")
    }
}

/// A raw, upgraded WebSocket connection.
struct Raw {
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrade as `user` (`?token=`) and read `connection_established`.
    async fn connect(app: &TestApp, user: &str) -> Self {
        let io = TcpStream::connect(app.addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        let (mut rd, mut wr) = io.into_split();
        let req = upgrade_request(app, &format!("token={}", app.token(user)));
        wr.write_all(req.as_bytes()).await.unwrap();
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

    /// Write bytes; an error (the server already closed) is ignored: the close frame tells.
    async fn send(&mut self, bytes: &[u8]) {
        let wr = self.wr.as_mut().expect("writer");
        let _ = wr.write_all(bytes).await;
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
    async fn next_frame(&mut self) -> Option<Frame> {
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
    async fn closed(&mut self) -> ((u16, String), Vec<Frame>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame().await {
                Some(f) if f.opcode == CLOSE => return (f.close(), before),
                Some(f) => before.push(f),
                None => panic!("connection ended without a close frame after {before:?}"),
            }
        }
    }

    /// Read frames until a text frame; skips pongs.
    async fn next_json(&mut self) -> Value {
        loop {
            let f = self.next_frame().await.expect("a frame");
            match f.opcode {
                PONG | PING => continue,
                _ => return f.json(),
            }
        }
    }
}

/// Connect a raw attacker, send `bytes` and return the server's close code and reason.
async fn attack(s: &Scene, bytes: &[u8]) -> (u16, String) {
    let mut raw = Raw::connect(&s.app, "mallory").await;
    raw.send(bytes).await;
    raw.closed().await.0
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket frames.

#[tokio::test]
async fn unmasked_client_frames_are_closed_with_1002() {
    let mut s = scene().await;
    let text = br#"{"type":"ping","id":"u"}"#;
    assert_eq!(attack(&s, &encode(FIN | TEXT, text, false)).await.0, 1002);
    // Unmasked control frames too.
    assert_eq!(attack(&s, &encode(FIN | PING, b"hi", false)).await.0, 1002);
    // The same frame masked is fine: the test can tell the difference.
    let mut raw = Raw::connect(&s.app, "mallory").await;
    raw.send(&masked(FIN | TEXT, text)).await;
    assert_eq!(raw.next_json().await["type"], "pong");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn reserved_bits_are_closed_with_1002() {
    let mut s = scene().await;
    let text = br#"{"type":"ping"}"#;
    for rsv in [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3] {
        let (code, _) = attack(&s, &masked(FIN | rsv | TEXT, text)).await;
        assert_eq!(code, 1002, "rsv bits {rsv:#x}");
    }
    // On a control frame as well.
    assert_eq!(attack(&s, &masked(FIN | RSV1 | PING, b"")).await.0, 1002);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    let mut s = scene().await;
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        let (code, _) = attack(&s, &masked(FIN | opcode, b"x")).await;
        assert_eq!(code, 1002, "opcode {opcode:#x}");
    }
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn malformed_fragmentation_and_control_frames_are_closed_with_1002() {
    let mut s = scene().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "continuation without a first fragment",
            masked(FIN | CONT, b"x"),
        ),
        ("a new text frame inside a fragmented message", {
            let mut b = masked(TEXT, b"{");
            b.extend(masked(FIN | TEXT, b"{}"));
            b
        }),
        ("a fragmented ping", masked(PING, b"x")),
        ("a ping of 126 bytes", masked(FIN | PING, &[b'p'; 126])),
        (
            "a close frame with a one-byte body",
            masked(FIN | CLOSE, &[3]),
        ),
    ];
    for (what, bytes) in cases {
        assert_eq!(attack(&s, &bytes).await.0, 1002, "{what}");
    }
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let mut s = scene().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a stray byte",
            masked(FIN | TEXT, b"{\"type\":\"ping\xff\"}"),
        ),
        ("an overlong encoding", masked(FIN | TEXT, b"\xc0\xaf")),
        ("a UTF-16 surrogate", masked(FIN | TEXT, b"\xed\xa0\x80")),
        (
            "a sequence cut at the end",
            masked(FIN | TEXT, b"abc\xe2\x82"),
        ),
        ("invalid across fragments", {
            let mut b = masked(TEXT, b"ab\xe2");
            b.extend(masked(FIN | CONT, b"\x28\xa1"));
            b
        }),
        ("a close reason that is not UTF-8", {
            masked(FIN | CLOSE, b"\x03\xe8\xff\xfe")
        }),
    ];
    for (what, bytes) in cases {
        assert_eq!(attack(&s, &bytes).await.0, 1007, "{what}");
    }
    // Valid multi-byte UTF-8 split across fragments is fine.
    let mut raw = Raw::connect(&s.app, "mallory").await;
    let text = "{\"type\":\"ping\",\"id\":\"h\u{e9}\u{1f600}\"}".as_bytes();
    let cut = text.iter().position(|&b| b == 0xf0).unwrap() + 2; // inside the emoji
    raw.send(&masked(TEXT, &text[..cut])).await;
    raw.send(&masked(FIN | CONT, &text[cut..])).await;
    let pong = raw.next_json().await;
    assert_eq!(pong["reply_to"], "h\u{e9}\u{1f600}");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_length_header_far_over_the_limit_is_closed_with_1009_before_any_payload() {
    let mut s = scene().await;
    for len in [65_537u64, 1 << 40, i64::MAX as u64] {
        // Only the header: the server must refuse on the length alone (it would wait for the
        // payload forever, or abort trying to allocate it, otherwise).
        let mut header = vec![FIN | TEXT, 0x80 | 127];
        header.extend(len.to_be_bytes());
        header.extend(MASK);
        let started = Instant::now();
        let (code, reason) = attack(&s, &header).await;
        assert_eq!(code, 1009, "length {len}");
        assert!(reason.contains("65536"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn endless_continuation_fragments_are_closed_with_1009() {
    let mut s = scene().await;
    let mut raw = Raw::connect(&s.app, "mallory").await;
    let mut wr = raw.wr.take().unwrap();
    // A message that never ends: 4 KiB fragments, each under the limit, until the server stops
    // reading (bounded at 16 MiB, so a server that never closes fails the test).
    const CAP: usize = 16 << 20;
    let writer = tokio::spawn(async move {
        let chunk = [b'a'; 4096];
        let mut sent = 0;
        let mut first = true;
        while sent < CAP {
            let b0 = if first { TEXT } else { CONT };
            first = false;
            if wr.write_all(&masked(b0, &chunk)).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let ((code, reason), _) = raw.closed().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("65536"), "{reason}");
    let sent = timeout(T, writer)
        .await
        .expect("the server stops reading the fragments")
        .unwrap();
    assert!(sent < CAP, "the server read {sent} bytes of fragments");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn protocol_pings_within_the_rate_are_answered_and_pongs_are_ignored() {
    let mut s = scene().await;
    let mut raw = Raw::connect(&s.app, "mallory").await;
    for i in 0..15 {
        let payload = format!("n{i}");
        raw.send(&masked(FIN | PING, payload.as_bytes())).await;
        let f = raw.next_frame().await.expect("a pong");
        assert_eq!((f.opcode, f.payload), (PONG, payload.into_bytes()));
    }
    // Unsolicited pongs need no answer and are not counted against the message rate.
    let mut pongs = Vec::new();
    for _ in 0..200 {
        pongs.extend(masked(FIN | PONG, b"unsolicited"));
    }
    raw.send(&pongs).await;
    raw.send(&masked(FIN | TEXT, br#"{"type":"ping","id":"after"}"#))
        .await;
    let pong = raw.next_json().await;
    assert_eq!(
        (&pong["type"], &pong["reply_to"]),
        (&json!("pong"), &json!("after"))
    );
    assert_eq!(s.app.stats().await["connections"], 2, "still connected");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_ping_flood_beyond_the_message_rate_is_closed_with_4029() {
    let mut s =
        scene_with(|c| c.limits.message_rate = std::num::NonZeroU32::new(20).unwrap()).await;
    let mut raw = Raw::connect(&s.app, "mallory").await;
    let mut flood = Vec::new();
    for i in 0..500 {
        flood.extend(masked(FIN | PING, format!("{i}").as_bytes()));
    }
    raw.send(&flood).await;
    let ((code, reason), before) = raw.closed().await;
    assert_eq!(code, 4029);
    assert!(reason.contains("20/s"), "{reason}");
    // Pings were answered until the limit hit.
    assert!(before.iter().any(|f| f.opcode == PONG), "{before:?}");
    assert!(before.iter().all(|f| f.opcode == PONG), "{before:?}");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn bad_close_codes_from_the_client_are_answered_with_1002() {
    let mut s = scene().await;
    // 0-999 are unused, 1004/1016-2999 reserved, 1005/1006/1015 must never be sent, >= 5000 invalid.
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let mut body = bad.to_be_bytes().to_vec();
        body.extend(b"bye");
        let (code, _) = attack(&s, &masked(FIN | CLOSE, &body)).await;
        assert_eq!(code, 1002, "client close code {bad}");
    }
    // Allowed codes are echoed: the test can tell the difference.
    for good in [1000u16, 3000, 4999] {
        let (code, _) = attack(&s, &masked(FIN | CLOSE, &good.to_be_bytes())).await;
        assert_eq!(code, good);
    }
    s.attacker_released().await;
    s.others_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// JSON bombs.

#[tokio::test]
async fn deeply_nested_json_gets_invalid_json_and_the_connection_stays_open() {
    let mut s = scene().await;
    let (mut c, _) = s.app.connect("mallory").await;
    let arrays = "[".repeat(60_000);
    let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let in_envelope = format!(
        r#"{{"type":"ping","id":"deep","data":{{"x":{}{}}}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    for bomb in [arrays, objects, in_envelope] {
        assert!(bomb.len() <= 65_536);
        c.send_raw(Message::Text(bomb.into())).await.unwrap();
        let e = expect_error(&mut c, "invalid_json").await;
        assert!(e.get("reply_to").is_none(), "{e}");
    }
    // Nesting a legitimate client might send is fine.
    let ok = format!(
        r#"{{"type":"ping","id":"shallow","data":{{"x":{}{}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    c.send_raw(Message::Text(ok.into())).await.unwrap();
    assert_eq!(c.next_json(T).await.unwrap()["reply_to"], "shallow");
    ping_pong(&mut c, "still-open").await;
    drop(c);
    s.attacker_released().await;
    s.others_unaffected().await;
}

/// `{"type":"ping","id":"big","pad":"xxx…"}` of exactly `len` bytes.
fn padded_ping(len: usize) -> String {
    let empty = r#"{"type":"ping","id":"big","pad":""}"#;
    let mut s = empty[..empty.len() - 2].to_string();
    s.push_str(&"x".repeat(len - empty.len()));
    s.push_str("\"}");
    assert_eq!(s.len(), len);
    s
}

#[tokio::test]
async fn huge_strings_up_to_the_size_limit_are_served_and_one_byte_more_is_1009() {
    let mut s = scene().await;
    let (mut c, _) = s.app.connect("mallory").await;
    // Exactly at the limit: served.
    c.send_raw(Message::Text(padded_ping(65_536).into()))
        .await
        .unwrap();
    assert_eq!(c.next_json(T).await.unwrap()["reply_to"], "big");
    // A user message with a content near the limit (multi-byte and escaped characters, which
    // grow when echoed) is stored and runs to completion.
    let content = "é\"😀\n".repeat(6_000);
    let msg = json!({"type": "user_message", "id": "huge", "data": {"content": content}});
    assert!(msg.to_string().len() > 60_000 && msg.to_string().len() <= 65_536);
    c.send_json(&msg).await.unwrap();
    let frames = c
        .until("agent_completed", T)
        .await
        .expect("a completed run");
    assert_eq!(frames[0]["type"], "ack");
    let tool = frames
        .iter()
        .find(|f| f["type"] == "tool_executing")
        .unwrap();
    assert_eq!(tool["data"]["input"]["text"], content.as_str());
    // One byte over: 1009.
    c.send_raw(Message::Text(padded_ping(65_537).into()))
        .await
        .unwrap();
    let (code, reason) = c.closed(T).await.unwrap();
    assert_eq!(code, 1009);
    assert!(reason.contains("65536"), "{reason}");
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn huge_numbers_get_error_frames_and_the_connection_stays_open() {
    let mut s = scene().await;
    let (mut c, _) = s.app.connect("mallory").await;
    let digits = "9".repeat(60_000);
    let cases = [
        // Beyond what a JSON parser can represent: not acceptable JSON.
        (
            format!(r#"{{"type":"ping","pad":1{digits}}}"#),
            "invalid_json",
        ),
        (r#"{"type":"ping","pad":1e999}"#.to_string(), "invalid_json"),
        (
            r#"{"type":"ping","pad":-1e400}"#.to_string(),
            "invalid_json",
        ),
        // Representable, but not what the field allows.
        (
            r#"{"type":"get_history","data":{"since":18446744073709551616}}"#.to_string(),
            "invalid_message",
        ),
        (
            r#"{"type":"get_history","data":{"since":1e300}}"#.to_string(),
            "invalid_message",
        ),
        (
            r#"{"type":"get_history","data":{"limit":4294967297}}"#.to_string(),
            "invalid_message",
        ),
        (
            r#"{"type":"get_history","data":{"since":-9223372036854775808}}"#.to_string(),
            "invalid_message",
        ),
    ];
    for (text, code) in cases {
        c.send_raw(Message::Text(text.clone().into()))
            .await
            .unwrap();
        let f = c.next_json(T).await.unwrap();
        assert_eq!(
            (&f["type"], &f["data"]["code"]),
            (&json!("error"), &json!(code)),
            "{}",
            &text[..text.len().min(80)]
        );
    }
    // Numbers that only lose precision are accepted where the field does not care.
    let tiny = format!(
        r#"{{"type":"ping","id":"tiny","pad":0.{}1}}"#,
        "0".repeat(60_000)
    );
    c.send_raw(Message::Text(tiny.into())).await.unwrap();
    assert_eq!(c.next_json(T).await.unwrap()["reply_to"], "tiny");
    ping_pong(&mut c, "still-open").await;
    drop(c);
    s.attacker_released().await;
    s.others_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP.

#[tokio::test]
async fn huge_request_headers_get_431_and_others_are_unaffected() {
    let mut s = scene().await;
    let token = s.app.token("mallory");
    let base = upgrade_request(&s.app, &format!("token={token}"));
    let (start, end) = base.split_at(base.len() - 2);

    // One header of 1 MiB.
    let mut one_huge = start.as_bytes().to_vec();
    one_huge.extend(b"X-Junk: ");
    one_huge.extend(vec![b'a'; 1 << 20]);
    one_huge.extend(b"\r\n");
    one_huge.extend(end.as_bytes());
    // Ten thousand small headers.
    let mut many = start.as_bytes().to_vec();
    for i in 0..10_000 {
        many.extend(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend(end.as_bytes());
    // A request line (URL) of 1 MiB.
    let long_url = format!(
        "GET /ws?token={token}&pad={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(1 << 20)
    )
    .into_bytes();

    for (what, req) in [
        ("one huge header", one_huge),
        ("many headers", many),
        ("a huge URL", long_url),
    ] {
        let (status, _) = http_answer(&s.app, req, usize::MAX)
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an answer"));
        // Over 64 KiB: hyper refuses a head that overflows its buffer (64 KiB too) or has more
        // than 100 headers before any of it reaches the application; the gateway refuses one
        // the parser took in (`gateway::MAX_HEAD_BYTES`).
        assert!(status.starts_with("HTTP/1.1 431"), "{what}: {status}");
        ping_pong(&mut s.bob, what).await;
    }
    s.others_unaffected().await;
}

/// Send `request` in pieces of `piece` bytes (ignoring write errors: the server may answer and
/// close before it has read everything) and return the answer's head and its body (up to its
/// `content-length`, or EOF); `None` if the server closed without an answer.
async fn http_answer(app: &TestApp, request: Vec<u8>, piece: usize) -> Option<(String, Vec<u8>)> {
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
    let _ = timeout(T, writer).await;
    answer
}

/// The status code and the JSON error code of an answer.
fn refusal(head: &str, body: &[u8]) -> (u16, String) {
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

#[tokio::test]
async fn request_heads_over_64_kib_get_431_with_a_json_body_however_they_arrive() {
    const LIMIT: usize = 64 * 1024;
    let mut s = scene().await;
    let token = s.app.token("mallory");
    let base = upgrade_request(&s.app, &format!("token={token}"));
    let (start, end) = base.split_at(base.len() - 2);
    // A head of exactly `len` bytes: the upgrade request with one padding header.
    let head_of = |len: usize| {
        let fixed = start.len() + "X-Pad: \r\n".len() + end.len();
        let mut req = start.as_bytes().to_vec();
        req.extend(b"X-Pad: ");
        req.extend(vec![b'a'; len - fixed]);
        req.extend(b"\r\n");
        req.extend(end.as_bytes());
        assert_eq!(req.len(), len);
        req
    };
    // The parser takes a head in as it arrives: in one write it let heads far over its buffer
    // through, in small pieces it refused them a few KiB over. The limit is exact either way.
    for piece in [usize::MAX, 4096, 1000] {
        let (head, _) = http_answer(&s.app, head_of(LIMIT), piece).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{piece}: {head}");
        let (head, body) = http_answer(&s.app, head_of(LIMIT + 1), piece)
            .await
            .unwrap();
        assert_eq!(
            refusal(&head, &body),
            (431, "invalid_request".to_string()),
            "{piece}: {head}"
        );
    }
    // Far over: refused whichever layer sees it first (the parser's own 431 has no body).
    for piece in [usize::MAX, 4096] {
        let (head, _) = http_answer(&s.app, head_of(100 * 1024), piece)
            .await
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 431"), "{piece}: {head}");
    }
    ping_pong(&mut s.bob, "after the heads").await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn requests_that_are_not_websocket_handshakes_get_json_refusals() {
    let mut s = scene().await;
    let token = s.app.token("mallory");
    let good = upgrade_request(&s.app, &format!("token={token}"));
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let cases = [
        ("no key", good.replace(key, ""), 400, "invalid_request"),
        (
            "a key that is not base64",
            good.replace(key, "Sec-WebSocket-Key: abc\r\n"),
            400,
            "invalid_request",
        ),
        (
            "a key of 32 bytes",
            good.replace(
                key,
                "Sec-WebSocket-Key: a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=\r\n",
            ),
            400,
            "invalid_request",
        ),
        (
            "no version",
            good.replace(version, ""),
            426,
            "invalid_request",
        ),
        (
            "version 8",
            good.replace(version, "Sec-WebSocket-Version: 8\r\n"),
            426,
            "invalid_request",
        ),
        (
            "no upgrade headers",
            good.replace("Upgrade: websocket\r\nConnection: Upgrade\r\n", ""),
            400,
            "invalid_request",
        ),
        (
            "POST",
            good.replacen("GET", "POST", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            405,
            "method_not_allowed",
        ),
        (
            "an unknown path",
            good.replacen("/ws?", "/nowhere?", 1),
            404,
            "not_found",
        ),
    ];
    for (what, req, status, code) in cases {
        assert_ne!(req, good, "{what}: the case changes the request");
        let (head, body) = http_answer(&s.app, req.into_bytes(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            refusal(&head, &body),
            (status, code.to_string()),
            "{what}: {head}"
        );
        let lower = head.to_ascii_lowercase();
        if status == 426 {
            assert!(
                lower.contains("\r\nsec-websocket-version: 13"),
                "{what}: {head}"
            );
        }
        if status == 405 {
            assert!(lower.contains("\r\nallow: get"), "{what}: {head}");
        }
    }
    // The unchanged request is upgraded.
    let (head, _) = http_answer(&s.app, good.into_bytes(), usize::MAX)
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ping_pong(&mut s.bob, "after the handshakes").await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_handshake_trickled_byte_by_byte_does_not_hold_up_others() {
    let mut s = scene().await;
    let req = upgrade_request(&s.app, &format!("token={}", s.app.token("mallory"))).into_bytes();
    // Ten slow clients at once, one byte every 50 ms for 40 bytes (2 s). The sleep paces the
    // attack; it synchronises nothing.
    let mut slow = Vec::new();
    for _ in 0..10 {
        let io = TcpStream::connect(s.app.addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        slow.push(io);
    }
    for (i, b) in req.iter().take(40).enumerate() {
        for io in &mut slow {
            io.write_all(&[*b]).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i % 10 == 9 {
            // Meanwhile the bystander is served promptly.
            let t0 = Instant::now();
            ping_pong(&mut s.bob, &format!("during-{i}")).await;
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        }
    }
    // Nine give up half way; one finishes and gets a working connection.
    let mut io = slow.pop().unwrap();
    drop(slow);
    io.write_all(&req[40..]).await.unwrap();
    let (mut rd, wr) = io.into_split();
    let (head, rest) = read_head(&mut rd).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut raw = Raw {
        rd,
        wr: Some(wr),
        buf: rest,
    };
    assert_eq!(
        raw.next_frame().await.unwrap().json()["type"],
        "connection_established"
    );
    raw.send(&masked(FIN | TEXT, br#"{"type":"ping","id":"slow"}"#))
        .await;
    assert_eq!(raw.next_json().await["reply_to"], "slow");
    drop(raw);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_handshake_that_stalls_is_dropped_after_the_header_read_timeout() {
    let app =
        spawn_with(|c| c.listen.header_read_timeout = std::time::Duration::from_millis(300)).await;
    let mut io = TcpStream::connect(app.addr).await.unwrap();
    io.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")
        .await
        .unwrap();
    // The server answers (408 or a bare close) and closes; a read then reaches EOF.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled handshake was kept open");
    let (_c, est) = app.connect("bob").await;
    assert_eq!(est["data"]["user_id"], "bob");
}

// ---------------------------------------------------------------------------------------------
// Tokens.

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn now_s() -> u64 {
    tether::ids::unix_ms() / 1000
}

/// A token with `claims`, signed with `alg` and `key`.
fn sign(alg: Algorithm, key: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
}

fn secret(app: &TestApp) -> Vec<u8> {
    app.config
        .auth
        .jwt_secret
        .as_ref()
        .unwrap()
        .expose()
        .as_bytes()
        .to_vec()
}

#[tokio::test]
async fn forged_expired_and_tampered_tokens_get_401() {
    let mut s = scene().await;
    let key = secret(&s.app);
    let exp = now_s() + 600;
    let valid = s.app.token("alice");
    let parts: Vec<&str> = valid.split('.').collect();
    let forged: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"alice","exp":{exp}}}"#))
            ),
        ),
        (
            "alg none with the original signature",
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                parts[1],
                parts[2]
            ),
        ),
        (
            "wrong key",
            sign(
                Algorithm::HS256,
                b"another-secret-another-secret-xx",
                &json!({"sub": "alice", "exp": exp}),
            ),
        ),
        (
            "right key, another algorithm (HS512)",
            sign(Algorithm::HS512, &key, &json!({"sub": "alice", "exp": exp})),
        ),
        (
            "expired",
            sign(
                Algorithm::HS256,
                &key,
                &json!({"sub": "alice", "exp": now_s() - 5}),
            ),
        ),
        (
            "no exp",
            sign(Algorithm::HS256, &key, &json!({"sub": "alice"})),
        ),
        (
            "tampered sub",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&format!(r#"{{"sub":"mallory","exp":{exp}}}"#)),
                parts[2]
            ),
        ),
        ("truncated signature", valid[..valid.len() - 4].to_string()),
        ("garbage", "a.b.c".to_string()),
    ];
    for (what, token) in forged {
        for opts in [
            with_token(token.clone()),
            ConnectOptions {
                token: Some(token.clone()),
                ..Default::default()
            },
        ] {
            let (status, body) = refused(&s.app, opts).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{what}"
            );
        }
    }
    // The untouched token works: the test can tell the difference.
    let (_alice, est) = s.app.connect_opts(with_token(valid)).await;
    assert_eq!(est["data"]["user_id"], "alice");
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_valid_token_for_another_users_thread_gets_403_forbidden_thread() {
    let mut s = scene().await;
    let (mut alice, est) = s.app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut alice, "a-1", "private words").await;
    let opts = ConnectOptions {
        thread_id: Some(thread.clone()),
        since: Some(0),
        query: Some(format!("token={}", s.app.token("mallory"))),
        ..Default::default()
    };
    let (status, body) = refused(&s.app, opts).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden_thread"))
    );
    assert!(!body.to_string().contains("private"), "{body}");
    // The events API gives the same answer.
    let resp = reqwest::Client::new()
        .get(s.app.http(&format!("/api/threads/{thread}/events")))
        .bearer_auth(s.app.token("mallory"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // Alice is unaffected.
    ping_pong(&mut alice, "alice-ok").await;
    s.others_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// Ids at and over their size limits; non-ASCII user ids.

#[tokio::test]
async fn thread_ids_at_and_over_the_size_limit_get_403_not_500() {
    let mut s = scene().await;
    // Well formed, exactly 256 bytes (the id limit), but no such thread.
    let tail = "_1_1_00000000";
    let at_limit = format!("thread_{}{tail}", "o".repeat(256 - 7 - tail.len()));
    assert_eq!(at_limit.len(), 256);
    assert!(tether::ids::parse(&at_limit).is_ok());
    let over_limit = format!("thread_{}{tail}", "o".repeat(257 - 7 - tail.len()));
    let cases = [
        at_limit,
        over_limit,
        format!("thread_{}", "x".repeat(10_000)),
        "%00%FF%FE".to_string(),
        "thread_%C3%BC%F0%9F%91%A9_1_1_00000000".to_string(),
        "..%2F..%2Fetc%2Fpasswd".to_string(),
        "thread_websocket_session_1_1_00000000%27%20OR%201%3D1--".to_string(),
    ];
    for thread in cases {
        let opts = ConnectOptions {
            token: Some(s.app.token("mallory")),
            thread_id: Some(thread.clone()),
            ..Default::default()
        };
        let (status, body) = refused(&s.app, opts).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden_thread")),
            "{} bytes: {body}",
            thread.len()
        );
        // And on the events API.
        let resp = reqwest::Client::new()
            .get(s.app.http(&format!("/api/threads/{thread}/events")))
            .bearer_auth(s.app.token("mallory"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{} bytes", thread.len());
    }
    s.others_unaffected().await;
}

#[tokio::test]
async fn client_ids_at_the_limit_are_echoed_and_over_it_get_invalid_message() {
    let mut s = scene().await;
    let (mut c, _) = s.app.connect("mallory").await;
    let ascii = "i".repeat(128);
    let emoji = "😀".repeat(32); // 128 bytes, 32 characters
    for id in [&ascii, &emoji] {
        assert_eq!(id.len(), 128);
        ping_pong(&mut c, id).await;
    }
    // 129 bytes, including 127 + a two-byte character: refused, and not echoed.
    for id in ["i".repeat(129), format!("{}é", "i".repeat(127))] {
        assert_eq!(id.len(), 129);
        c.send_json(&json!({"type": "ping", "id": id}))
            .await
            .unwrap();
        let e = expect_error(&mut c, "invalid_message").await;
        assert!(e.get("reply_to").is_none(), "{e}");
    }
    // An id of 10,000 bytes is refused the same way; the connection stays open.
    c.send_json(&json!({"type": "ping", "id": "i".repeat(10_000)}))
        .await
        .unwrap();
    expect_error(&mut c, "invalid_message").await;
    ping_pong(&mut c, "still-open").await;
    drop(c);
    s.attacker_released().await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn user_ids_at_the_limit_are_accepted_and_over_it_get_401() {
    let mut s = scene().await;
    let key = secret(&s.app);
    let token = |sub: &str| {
        sign(
            Algorithm::HS256,
            &key,
            &json!({"sub": sub, "exp": now_s() + 600}),
        )
    };
    for sub in ["u".repeat(256), "😀".repeat(64)] {
        assert_eq!(sub.len(), 256);
        let (mut c, est) = s.app.connect_opts(with_token(token(&sub))).await;
        assert_eq!(est["data"]["user_id"], sub.as_str());
        let frames = chat(&mut c, "long-user", "hi").await;
        assert_eq!(frames.last().unwrap()["type"], "agent_completed");
        c.close().await.unwrap();
    }
    for sub in [
        "u".repeat(257),
        format!("{}é", "u".repeat(255)),
        "u".repeat(10_000),
        "a\u{0}b".to_string(),
        "line\nbreak".to_string(),
        "\u{7f}".to_string(),
        String::new(),
    ] {
        let (status, body) = refused(&s.app, with_token(token(&sub))).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "sub of {} bytes",
            sub.len()
        );
    }
    s.app
        .wait_stats("long-id users to be released", |st| st["connections"] == 1)
        .await;
    s.others_unaffected().await;
}

#[tokio::test]
async fn non_ascii_user_ids_are_accepted_and_echoed_exactly() {
    let mut s = scene().await;
    let users = [
        "Jürgen 👩‍💻",
        "مستخدم",
        "用户",
        "e\u{301}", // a combining accent: not normalised
        "\u{e9}",   // the precomposed form is another user
        "zero\u{200b}width",
    ];
    let mut threads = Vec::new();
    for user in users {
        let (mut c, est) = s.app.connect(user).await;
        assert_eq!(est["data"]["user_id"], user);
        threads.push(est["data"]["thread_id"].as_str().unwrap().to_string());
        // The second tab gets the user's message echoed with the exact user id.
        let (mut tab, _) = s
            .app
            .connect_thread(user, &threads[threads.len() - 1], None)
            .await;
        chat(&mut c, "hi", "hello").await;
        let echoed = tab.until("user_message", T).await.unwrap();
        assert_eq!(echoed.last().unwrap()["data"]["user_id"], user);
    }
    // Two spellings of "é" are two users: neither may open the other's thread.
    let opts = ConnectOptions {
        token: Some(s.app.token("\u{e9}")),
        thread_id: Some(threads[3].clone()),
        ..Default::default()
    };
    assert_eq!(refused(&s.app, opts).await.0, 403);
    s.others_unaffected().await;
}

// ---------------------------------------------------------------------------------------------
// Malformed query strings.

#[tokio::test]
async fn repeated_and_malformed_query_parameters_get_a_json_error_not_a_crash() {
    let mut s = scene().await;
    let token = s.app.token("mallory");
    for query in [
        format!("token={token}&token={token}"),
        format!("token={token}&thread_id=a&thread_id=b"),
        format!("token={token}&since=1&since=2"),
        // `u64`'s parser takes a leading `+`; a `seq` is digits only.
        format!("token={token}&since=%2B5"),
    ] {
        let (status, body) = refused(
            &s.app,
            ConnectOptions {
                query: Some(query.clone()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{query}"
        );
    }
    s.others_unaffected().await;
}
