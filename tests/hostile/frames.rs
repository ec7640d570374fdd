//! Raw WebSocket frames: unmasked, reserved bits and opcodes, malformed fragmentation and
//! control frames, invalid UTF-8, lengths over the limit, endless fragments, ping floods, bad
//! close codes. Answers pinned down where PROTOCOL.md is silent:
//! - protocol Pings count against the message rate like frames (a flood is closed with 4029);
//!   unsolicited Pongs are ignored and not counted;
//! - a client close frame with a code that may not be sent (1005, 1006, 1015, reserved or out of
//!   range) or a one-byte body is answered with 1002; a close reason that is not UTF-8 with 1007;
//! - after a close it initiates, the server keeps the socket up to a second (reading and dropping
//!   input) so the client can read the close frame before the socket goes away.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use crate::common::raw::*;
use crate::common::*;
use crate::{scene, scene_with, Scene};

/// Connect a raw attacker, send `bytes` and return the server's close code and reason.
async fn attack(s: &Scene, bytes: &[u8]) -> (u16, String) {
    let mut raw = Raw::connect(&s.app, "mallory").await;
    raw.send(bytes).await;
    raw.closed().await.0
}

#[tokio::test]
async fn unmasked_client_frames_are_closed_with_1002() {
    let s = scene().await;
    let text = br#"{"type":"ping","id":"u"}"#;
    assert_eq!(attack(&s, &encode(FIN | TEXT, text, false)).await.0, 1002);
    // Unmasked control frames too.
    assert_eq!(attack(&s, &encode(FIN | PING, b"hi", false)).await.0, 1002);
    // The same frame masked is fine: the test can tell the difference.
    let mut raw = Raw::connect(&s.app, "mallory").await;
    raw.send(&masked(FIN | TEXT, text)).await;
    assert_eq!(raw.next_json().await["type"], "pong");
    drop(raw);
    s.attack_over().await;
}

#[tokio::test]
async fn reserved_bits_are_closed_with_1002() {
    let s = scene().await;
    let text = br#"{"type":"ping"}"#;
    for rsv in [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3] {
        let (code, _) = attack(&s, &masked(FIN | rsv | TEXT, text)).await;
        assert_eq!(code, 1002, "rsv bits {rsv:#x}");
    }
    // On a control frame as well.
    assert_eq!(attack(&s, &masked(FIN | RSV1 | PING, b"")).await.0, 1002);
    s.attack_over().await;
}

#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    let s = scene().await;
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        let (code, _) = attack(&s, &masked(FIN | opcode, b"x")).await;
        assert_eq!(code, 1002, "opcode {opcode:#x}");
    }
    s.attack_over().await;
}

#[tokio::test]
async fn malformed_fragmentation_and_control_frames_are_closed_with_1002() {
    let s = scene().await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let s = scene().await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn a_length_header_far_over_the_limit_is_closed_with_1009_before_any_payload() {
    let s = scene().await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn endless_continuation_fragments_are_closed_with_1009() {
    let s = scene().await;
    let mut raw = Raw::connect(&s.app, "mallory").await;
    let mut wr = raw.take_writer();
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
    s.attack_over().await;
}

#[tokio::test]
async fn protocol_pings_within_the_rate_are_answered_and_pongs_are_ignored() {
    let s = scene().await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn a_ping_flood_beyond_the_message_rate_is_closed_with_4029() {
    let s = scene_with(|c| c.limits.message_rate = std::num::NonZeroU32::new(20).unwrap()).await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn bad_close_codes_from_the_client_are_answered_with_1002() {
    let s = scene().await;
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
    s.attack_over().await;
}
