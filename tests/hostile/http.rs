//! HTTP below the WebSocket: huge, trickled and stalled request heads, and requests to `/ws`
//! that are not handshakes. Answers pinned down where PROTOCOL.md is silent:
//! - a request head over 64 KiB (its request line and `name: value` lines) gets 431, however its
//!   bytes arrive; with the JSON body when the HTTP parser took it in, without one when it
//!   overflowed the parser's buffer first (or had more than 100 headers); a request target
//!   that long may get 414 from the parser instead;
//! - a request to `/ws` that is not a WebSocket handshake (RFC 6455 §4.2.1) gets a JSON
//!   refusal: 426 with `Sec-WebSocket-Version: 13` for another version, 400 otherwise (a key
//!   that is not 16 bytes in base64 included); another method 405, an unknown path 404.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::raw::*;
use crate::common::*;
use crate::scene;

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
    let (rd, wr) = io.into_split();
    let mut raw = Raw::upgraded(rd, wr).await;
    raw.send(&masked(FIN | TEXT, br#"{"type":"ping","id":"slow"}"#))
        .await;
    assert_eq!(raw.next_json().await["reply_to"], "slow");
    drop(raw);
    s.attack_over().await;
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
