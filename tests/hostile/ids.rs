//! Ids at and over their size limits; non-ASCII user ids. Answers pinned down where PROTOCOL.md
//! is silent: an events path that does not decode gets 403 `forbidden_thread`.

use jsonwebtoken::Algorithm;
use serde_json::json;
use tether::client::ConnectOptions;

use crate::common::*;
use crate::tokens::{now_s, secret, sign};
use crate::{expect_error, scene};

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
            thread_id: Some(thread.clone()),
            ..s.app.as_user("mallory")
        };
        let (status, body) = s.app.refused(opts).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden_thread")),
            "{} bytes: {body}",
            thread.len()
        );
        // And on the events API.
        let resp = get(
            &s.app.http(&format!("/api/threads/{thread}/events")),
            &s.app.token("mallory"),
        )
        .await;
        assert_eq!(resp.status().as_u16(), 403, "{} bytes", thread.len());
    }
    s.others_unaffected().await;
}

#[tokio::test]
async fn client_ids_at_the_limit_are_echoed_and_over_it_get_invalid_message() {
    let s = scene().await;
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
    s.attack_over().await;
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
        let (mut c, est) = s.app.connect_opts(query_token(token(&sub))).await;
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
        let (status, body) = s.app.refused(query_token(token(&sub))).await;
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
        thread_id: Some(threads[3].clone()),
        ..s.app.as_user("\u{e9}")
    };
    assert_eq!(s.app.refused(opts).await.0, 403);
    s.others_unaffected().await;
}
