//! JSON bombs: deep nesting, strings up to the size limit, numbers no double can hold. Answers
//! pinned down where PROTOCOL.md is silent:
//! - a number JSON cannot represent as a double (`1e999`, a 60,000-digit integer) is
//!   `invalid_json`; a representable number of the wrong range for a field is `invalid_message`.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::{expect_error, scene};

#[tokio::test]
async fn deeply_nested_json_gets_invalid_json_and_the_connection_stays_open() {
    let s = scene().await;
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
    s.attack_over().await;
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
    let s = scene().await;
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
    s.attack_over().await;
}

#[tokio::test]
async fn huge_numbers_get_error_frames_and_the_connection_stays_open() {
    let s = scene().await;
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
    s.attack_over().await;
}
