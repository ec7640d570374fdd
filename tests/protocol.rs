//! PROTOCOL.md sections 1 to 8 against the real server over real sockets.

mod common;

use common::raw::{upgrade_request, Raw};
use common::*;
use serde_json::{json, Value};
use tether::client::{ClientError, ConnectOptions};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

fn is_id(v: &Value, prefix: &str) -> bool {
    v.as_str()
        .is_some_and(|s| tether::ids::parse(s).is_ok_and(|p| p.prefix == prefix))
}

#[tokio::test]
async fn connection_established_carries_one_consistent_context() {
    let app = spawn_app().await;
    let (_c, est) = app.connect("alice").await;
    let d = &est["data"];
    assert_eq!(d["user_id"], "alice");
    assert_eq!(d["protocol"], "tether.v1");
    assert_eq!(d["resumed"], false);
    assert_eq!(d["last_seq"], 0);
    assert!(is_id(&d["thread_id"], "thread"));
    assert!(is_id(&d["run_id"], "run"));
    assert!(is_id(&d["request_id"], "req"));
    assert!(is_id(&d["connection_id"], "conn"));
    assert!(d["thread_id"]
        .as_str()
        .unwrap()
        .starts_with("thread_websocket_session_"));
    assert!(tether::ids::ids_consistent(
        d["thread_id"].as_str().unwrap(),
        d["run_id"].as_str().unwrap()
    ));
    assert_eq!(est["thread_id"], d["thread_id"]);
    assert_eq!(d["limits"]["max_message_bytes"], 65536);
    assert_eq!(d["limits"]["heartbeat_interval_ms"], 25000);
    assert_eq!(d["limits"]["max_connections_per_user"], 20);
    assert_eq!(d["limits"]["max_managers_per_user"], 20);
    let ts = est["ts"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
}

#[tokio::test]
async fn a_user_message_is_acked_then_runs_in_order_with_consecutive_seqs() {
    let app = spawn_app().await;
    let (mut c, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    let frames = chat(&mut c, "c-17", "hello wide world").await;
    let stored: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] != "agent_text_delta")
        .collect();
    let kinds: Vec<&str> = stored.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ack",
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_completed"
        ]
    );
    let ack = stored[0];
    assert_eq!(ack["reply_to"], "c-17");
    assert_eq!(ack["data"]["seq"], 1);
    assert!(is_id(&ack["data"]["message_id"], "msg"));
    let run_id = ack["data"]["run_id"].as_str().unwrap();
    assert!(run_id.starts_with("run_agent_run_"));
    assert_eq!(seqs(&frames), vec![1, 2, 3, 4, 5, 6]);
    for f in &stored[1..] {
        assert_eq!(f["run_id"], run_id);
        assert_eq!(f["reply_to"], "c-17");
        assert_eq!(f["thread_id"], thread.as_str());
    }
    assert_eq!(
        stored[3]["data"]["tool_call_id"],
        stored[4]["data"]["tool_call_id"]
    );
    assert_eq!(stored[4]["data"]["output"]["words"], 3);
    let reply = stored[5]["data"]["content"].as_str().unwrap();
    assert!(
        reply.contains("hello wide world") && reply.contains("demo"),
        "{reply}"
    );
    // The streamed deltas add up to the stored reply.
    let streamed: String = frames
        .iter()
        .filter(|f| f["type"] == "agent_text_delta")
        .map(|f| f["data"]["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, reply);
    // A second message continues the thread's seq.
    let frames = chat(&mut c, "c-18", "again").await;
    assert_eq!(seqs(&frames), vec![7, 8, 9, 10, 11, 12]);
}

#[tokio::test]
async fn other_tabs_get_the_message_and_the_run_and_other_users_get_nothing() {
    let app = spawn_app().await;
    let (mut a1, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    let (mut a2, est2) = app.connect_thread("alice", &thread, None).await;
    assert_eq!(est2["data"]["resumed"], true);
    assert_eq!(
        est2["data"]["run_id"], est["data"]["run_id"],
        "resumers share the thread's root run"
    );
    assert_ne!(est2["data"]["request_id"], est["data"]["request_id"]);
    let (mut other_thread, _) = app.connect("alice").await;
    let (mut bob, _) = app.connect("bob").await;

    let sent = chat(&mut a1, "m1", "secret plans").await;
    let seen = a2.until("agent_completed", T).await.unwrap();
    assert_eq!(seen[0]["type"], "user_message");
    assert_eq!(seen[0]["data"]["content"], "secret plans");
    assert_eq!(seen[0]["data"]["user_id"], "alice");
    assert_eq!(seen[0]["seq"], 1);
    assert_eq!(seqs(&sent), seqs(&seen));

    // Nothing reached bob or alice's other thread: a ping round trip proves the queue is empty.
    for c in [&mut bob, &mut other_thread] {
        c.send_json(&json!({"type": "ping", "id": "p"}))
            .await
            .unwrap();
        let f = c.next_json(T).await.unwrap();
        assert_eq!(f["type"], "pong", "{f}");
        assert_eq!(f["reply_to"], "p");
    }
}

#[tokio::test]
async fn resume_with_since_replays_in_order_without_gaps_or_duplicates() {
    let app = spawn_app().await;
    let (mut c, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut c, "a", "one").await;
    chat(&mut c, "b", "two").await;
    c.close().await.unwrap();

    let (mut r, est) = app.connect_thread("alice", &thread, Some(3)).await;
    assert_eq!(est["data"]["last_seq"], 12);
    let mut replayed = Vec::new();
    for _ in 0..9 {
        replayed.push(r.next_json(T).await.unwrap());
    }
    assert_eq!(seqs(&replayed), (4..=12).collect::<Vec<_>>());
    // Live events continue right after the replay.
    let live = chat(&mut r, "c", "three").await;
    assert_eq!(seqs(&live), (13..=18).collect::<Vec<_>>());

    // A since beyond the end replays nothing and live events still arrive.
    let (mut far, _) = app.connect_thread("alice", &thread, Some(1000)).await;
    let live = chat(&mut far, "d", "four").await;
    assert_eq!(seqs(&live), (19..=24).collect::<Vec<_>>());
}

#[tokio::test]
async fn history_and_events_api_return_stored_events() {
    let app = spawn_app().await;
    let (mut c, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut c, "a", "one").await;
    c.send_json(&json!({"type": "get_history", "id": "h", "data": {"since": 2, "limit": 3}}))
        .await
        .unwrap();
    let h = c.until("history", T).await.unwrap().pop().unwrap();
    assert_eq!(h["reply_to"], "h");
    assert_eq!(h["data"]["last_seq"], 6);
    assert_eq!(seqs(h["data"]["events"].as_array().unwrap()), vec![3, 4, 5]);

    let body: Value = get_json(
        &app.http(&format!("/api/threads/{thread}/events?since=1")),
        &app.token("alice"),
    )
    .await;
    assert_eq!(body["thread_id"], thread.as_str());
    assert_eq!(body["last_seq"], 6);
    assert_eq!(
        seqs(body["events"].as_array().unwrap()),
        vec![2, 3, 4, 5, 6]
    );
    assert_eq!(body["events"][0]["type"], "agent_started");

    let res = get(
        &app.http(&format!("/api/threads/{thread}/events")),
        &app.token("bob"),
    )
    .await;
    assert_eq!(res.status(), 403);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "forbidden_thread");

    let threads: Value = get_json(&app.http("/api/threads"), &app.token("alice")).await;
    assert_eq!(threads["threads"][0]["thread_id"], thread.as_str());
    assert_eq!(threads["threads"][0]["last_seq"], 6);
}

#[tokio::test]
async fn handshake_refusals_are_plain_http_with_json_errors() {
    let app = spawn_app().await;
    let (status, body) = app.refused(ConnectOptions::default()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = app.refused(bearer("garbage")).await;
    assert_eq!(status, 401);

    let (_c, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap();
    let bob = |thread: &str| ConnectOptions {
        thread_id: Some(thread.into()),
        ..app.as_user("bob")
    };
    let (status, body) = app.refused(bob(thread)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden_thread"))
    );
    // A thread that does not exist gets the same answer.
    let (status2, body2) = app
        .refused(bob("thread_websocket_session_1_1_00000000"))
        .await;
    assert_eq!(
        (status2, &body2["error"]["code"]),
        (403, &body["error"]["code"])
    );
    let (status, _) = app.refused(bob("nonsense")).await;
    assert_eq!(status, 403);

    let (status, body) = app
        .refused(ConnectOptions {
            thread_id: Some(thread.into()),
            query: Some("since=-1".into()),
            ..app.as_user("alice")
        })
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn tokens_work_from_subprotocol_query_and_single_use_tickets() {
    let app = spawn_app().await;
    // Subprotocol: the server selects tether.v1 and never echoes the token.
    let opts = ConnectOptions {
        protocols: vec!["tether.v1".into(), format!("jwt.{}", app.token("alice"))],
        ..Default::default()
    };
    let (_c, est) = app.connect_opts(opts).await;
    assert_eq!(est["data"]["user_id"], "alice");

    let (_c, est) = app.connect_opts(query_token(app.token("carol"))).await;
    assert_eq!(est["data"]["user_id"], "carol");

    let http = reqwest::Client::new();
    let t: Value = json_answer(
        http.post(app.http("/api/tickets"))
            .bearer_auth(app.token("dave")),
    )
    .await;
    assert_eq!(t["expires_in"], 30);
    let ticket = t["ticket"].as_str().unwrap().to_string();
    let opts = ConnectOptions {
        query: Some(format!("ticket={ticket}")),
        ..Default::default()
    };
    let (_c, est) = app.connect_opts(opts.clone()).await;
    assert_eq!(est["data"]["user_id"], "dave");
    let (status, _) = app.refused(opts).await;
    assert_eq!(status, 401, "a ticket works once");

    // The Authorization header decides over a query token.
    let opts = ConnectOptions {
        token: Some("bad".into()),
        ..query_token(app.token("erin"))
    };
    assert_eq!(app.refused(opts).await.0, 401);
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let app = spawn_app().await;
    let (mut c, _) = app.connect("alice").await;
    let cases = [
        ("not json", "invalid_json"),
        (r#"{"id":"x1"}"#, "invalid_message"),
        (
            r#"{"type":"user_message","id":"x2","data":{}}"#,
            "invalid_message",
        ),
        (r#"{"type":"teleport","id":"x3"}"#, "unknown_type"),
        (
            r#"{"type":"user_message","id":"x4","thread_id":"thread_other_1_1_00000000","data":{"content":"hi"}}"#,
            "thread_mismatch",
        ),
        (
            r#"{"type":"cancel_run","id":"x5","data":{"run_id":"run_agent_run_1_1_00000000"}}"#,
            "unknown_run",
        ),
    ];
    for (text, code) in cases {
        c.send_raw(Message::Text(text.into())).await.unwrap();
        let f = c.next_json(T).await.unwrap();
        assert_eq!(f["type"], "error", "{text}");
        assert_eq!(f["data"]["code"], code, "{text}");
    }
    c.send_json(&json!({"type": "teleport", "id": "c-9"}))
        .await
        .unwrap();
    assert_eq!(c.next_json(T).await.unwrap()["reply_to"], "c-9");
    // Still usable.
    let frames = chat(&mut c, "ok", "still here").await;
    assert_eq!(frames.last().unwrap()["type"], "agent_completed");
}

#[tokio::test]
async fn binary_and_oversized_frames_close_with_1003_and_1009() {
    let app =
        spawn_with(|c| c.limits.max_message_bytes = std::num::NonZeroUsize::new(1024).unwrap())
            .await;
    let (mut c, _) = app.connect("alice").await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(c.closed(T).await.unwrap().0, 1003);

    let (mut c, _) = app.connect("alice").await;
    let big = json!({"type": "user_message", "data": {"content": "x".repeat(2000)}});
    c.send_json(&big).await.unwrap();
    let (code, reason) = c.closed(T).await.unwrap();
    assert_eq!(code, 1009);
    assert!(reason.contains("1024"), "{reason}");
}

#[tokio::test]
async fn per_user_limits_close_new_connections_with_4008_and_spare_existing_ones() {
    let app = spawn_with(|c| {
        c.limits.max_connections_per_user = std::num::NonZeroUsize::new(3).unwrap();
        c.limits.max_managers_per_user = std::num::NonZeroUsize::new(2).unwrap();
    })
    .await;
    let (mut a, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    let (_b, _) = app.connect("alice").await;
    // A third thread needs a third manager.
    let mut c = app.upgrade(&app.as_user("alice")).await;
    let (code, reason) = c.closed(T).await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (4008, "too many managers for user (2/2)")
    );
    // A tab on an existing thread is fine, then the connection limit hits.
    let (_t, _) = app.connect_thread("alice", &thread, None).await;
    let mut d = app
        .upgrade(&ConnectOptions {
            thread_id: Some(thread.clone()),
            ..app.as_user("alice")
        })
        .await;
    let (code, reason) = d.closed(T).await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (4008, "too many connections for user (3/3)")
    );
    // Existing connections are untouched; other users are unaffected.
    let frames = chat(&mut a, "still", "works").await;
    assert_eq!(frames.last().unwrap()["type"], "agent_completed");
    let (_bob, _) = app.connect("bob").await;
    let s = app.stats().await;
    assert_eq!(s["connections"], 4);
    assert!(s["limit_rejections"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn flooding_gets_rate_limited_errors_then_4029() {
    let app = spawn_with(|c| c.limits.message_rate = std::num::NonZeroU32::new(5).unwrap()).await;
    let (mut c, _) = app.connect("alice").await;
    for i in 0..40 {
        if c.send_json(&json!({"type": "ping", "id": format!("p{i}")}))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut limited = 0;
    let code = loop {
        match c.next_json(T).await {
            Ok(f) if f["type"] == "error" => {
                assert_eq!(f["data"]["code"], "rate_limited");
                limited += 1;
            }
            Ok(_) => {}
            Err(ClientError::Closed(Some((code, reason)))) => {
                assert!(reason.contains("5/s"), "{reason}");
                break code;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 4029);
    assert!(limited >= 1);
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_4000() {
    let app = spawn_with(|c| {
        c.limits.heartbeat_interval = std::time::Duration::from_millis(100);
        c.limits.pong_timeout = std::time::Duration::from_millis(100);
    })
    .await;
    // A raw client that reads but never answers pings (tungstenite answers automatically, so
    // read through a plain TCP socket).
    let mut raw = Raw::connect(&app, "alice").await;
    // Read until the close frame, past the unanswered pings.
    let ((code, _), _) = raw.closed().await;
    assert_eq!(code, 4000);
}

#[tokio::test]
async fn admin_endpoints_publish_disconnect_and_require_the_admin_token() {
    let app = spawn_app().await;
    let (mut a, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    let (mut a2, _) = app.connect("alice").await;
    let http = reqwest::Client::new();
    let res = http
        .post(app.http("/api/users/alice/events"))
        .json(&json!({"type": "notice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let r: Value = json_answer(
        http.post(app.http("/api/users/alice/events"))
            .bearer_auth(ADMIN)
            .json(&json!({"type": "notice", "data": {"text": "hello"}, "thread_id": thread})),
    )
    .await;
    assert_eq!(r["delivered"], 1);
    let f = a.next_json(T).await.unwrap();
    assert_eq!(f["type"], "notice");
    assert_eq!(f["data"]["text"], "hello");
    assert!(f.get("seq").is_none());

    let r: Value = json_answer(
        http.delete(app.http("/api/users/alice/connections"))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(r["closed"], 2);
    assert_eq!(
        a.closed(T).await.unwrap(),
        (1008, "disconnected by server".to_string())
    );
    assert_eq!(a2.closed(T).await.unwrap().0, 1008);
    app.wait_stats("no connections", |s| s["connections"] == 0)
        .await;
    assert_eq!(
        http.get(app.http("/api/stats"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let app = spawn_app().await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(app.http("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(app.http("/readyz")).send().await.unwrap().status(),
        200
    );
    let m = http
        .get(app.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tether_connections_active"));
    assert!(m.contains("tether_manager_cleanups_completed_total"));
    assert!(!m.contains("alice"));
}

#[tokio::test]
async fn cancel_run_ends_the_run_with_agent_error_cancelled() {
    let app = spawn_with(|c| c.agent.delay = std::time::Duration::from_millis(300)).await;
    let (mut c, _) = app.connect("alice").await;
    c.send_json(&json!({"type": "user_message", "id": "m", "data": {"content": "slow"}}))
        .await
        .unwrap();
    let ack = c.until("ack", T).await.unwrap().pop().unwrap();
    let run_id = ack["data"]["run_id"].as_str().unwrap().to_string();
    c.until("agent_started", T).await.unwrap();
    c.send_json(&json!({"type": "cancel_run", "id": "x", "data": {"run_id": run_id}}))
        .await
        .unwrap();
    let frames = c.until("agent_error", T).await.unwrap();
    let err = frames.last().unwrap();
    assert_eq!(err["data"]["code"], "cancelled");
    assert_eq!(err["run_id"], run_id.as_str());
    assert_eq!(err["reply_to"], "m");
    assert!(frames.iter().all(|f| f["type"] != "agent_completed"));
}

#[tokio::test]
async fn events_survive_a_restart() {
    let app = spawn_app().await;
    let (mut c, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut c, "a", "remember me").await;
    drop(c);
    let config = app.shutdown_keep().await;
    let app = start(config, false).await;
    let (mut r, est) = app.connect_thread("alice", &thread, Some(0)).await;
    assert_eq!(est["data"]["last_seq"], 6);
    let mut replayed = Vec::new();
    for _ in 0..6 {
        replayed.push(r.next_json(T).await.unwrap());
    }
    assert_eq!(seqs(&replayed), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(replayed[0]["data"]["content"], "remember me");
    let live = chat(&mut r, "b", "after restart").await;
    assert_eq!(seqs(&live)[0], 7);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer_and_others_are_unaffected() {
    let app =
        spawn_with(|c| c.limits.outbound_queue = std::num::NonZeroUsize::new(8).unwrap()).await;
    // A raw client with a tiny receive buffer that upgrades and then never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(app.addr).await.unwrap();
    let req = upgrade_request(&app, &format!("token={}", app.token("stalled")));
    stalled.write_all(req.as_bytes()).await.unwrap();
    let (mut bob, _) = app.connect("bob").await;
    app.wait_stats("the stalled client registered", |s| s["connections"] == 2)
        .await;
    let http = reqwest::Client::new();
    let big = "x".repeat(60_000);
    let mut published = 0;
    // Publish until the server gives up on the stalled client (bounded).
    while app
        .state
        .registry()
        .connection_count(tether::Scope::User("stalled"))
        > 0
    {
        assert!(published < 2000, "never closed as a slow consumer");
        http.post(app.http("/api/users/stalled/events"))
            .bearer_auth(ADMIN)
            .json(&json!({"type": "bulk", "data": {"blob": big}}))
            .send()
            .await
            .unwrap();
        published += 1;
    }
    assert!(tether::metrics().slow_consumer_closes.get() >= 1);
    // Bob is served as before.
    bob.send_json(&json!({"type": "ping", "id": "still"}))
        .await
        .unwrap();
    assert_eq!(bob.next_json(T).await.unwrap()["reply_to"], "still");
    drop(stalled);
}

#[tokio::test]
async fn the_per_ip_connection_rate_answers_429() {
    let app = spawn_with(|c| c.limits.connect_rate_per_ip = 2).await;
    let mut refused = 0;
    for _ in 0..10 {
        if let Err((status, body)) = app.try_upgrade(&app.as_user("alice")).await {
            assert_eq!(status, 429);
            assert_eq!(body["error"]["code"], "rate_limited");
            refused += 1;
        }
    }
    // Ten attempts span at most two one-second windows: at most 4 get through.
    assert!(refused >= 6, "refused {refused}");
}

#[tokio::test]
async fn a_client_that_goes_away_with_a_fin_is_released_without_a_close_frame() {
    let app = spawn_app().await;
    let raw = Raw::connect(&app, "alice").await;
    // A killed tab: FIN, no close frame.
    let rest = raw.fin_then_read_to_end().await;
    assert!(
        !rest.contains(&0x88),
        "the server answered a vanished peer with a close frame: {rest:?}"
    );
    app.wait_stats("released", |s| s["connections"] == 0).await;
}
