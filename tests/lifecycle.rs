//! Leak-freedom: after many connect/disconnect cycles (normal closes, TCP resets, closes in the
//! middle of a run) the registry, the sessions and the audit table hold nothing open; a graceful
//! shutdown closes every connection with 1001 and every audit row.
//!
//! This file holds the tests that read process-wide metrics (sessions open), so it runs them in
//! one test to keep other tests' sessions out of the figures.

mod common;

use common::*;
use serde_json::json;
use tether::client::{Client, ConnectOptions};

#[tokio::test]
async fn churn_with_resets_and_mid_run_closes_leaves_nothing_open_and_shutdown_closes_all() {
    let app = spawn_app().await;
    let users = ["u1", "u2", "u3", "u4"];
    let mut threads = Vec::new();
    for i in 0..300 {
        let user = users[i % users.len()];
        let (mut c, est) = app.connect(user).await;
        if i % 10 == 0 {
            threads.push((user, est["data"]["thread_id"].as_str().unwrap().to_string()));
        }
        match i % 3 {
            0 => c.close().await.unwrap(),
            1 => c.abort(),
            _ => {
                // Mid-run: send a message, wait for the ack, go away abruptly.
                c.send_json(
                    &json!({"type": "user_message", "id": "m", "data": {"content": "bye"}}),
                )
                .await
                .unwrap();
                c.until("ack", T).await.unwrap();
                c.abort();
            }
        }
    }
    // Tabs resuming threads, closed in bulk.
    let mut tabs = Vec::new();
    for (user, thread) in &threads {
        tabs.push(app.connect_thread(user, thread, Some(0)).await.0);
    }
    for (i, t) in tabs.into_iter().enumerate() {
        if i % 2 == 0 {
            t.abort()
        } else {
            t.close().await.unwrap()
        }
    }
    let s = app
        .wait_stats("everything released", |s| {
            s["connections"] == 0
                && s["managers"] == 0
                && s["users"] == 0
                && s["sessions_open"] == 0
                && s["runs"]["active"] == 0
                && s["tasks"]["tracked"] == 0
        })
        .await;
    assert_eq!(s["emergency_cleanups"], 0);

    assert_eq!(s["thread_mismatches"], 0);
    assert_eq!(s["cleanups"]["attempted"], s["cleanups"]["completed"]);
    assert_eq!(app.state.registry().reap(), 0, "the backstop finds nothing");
    // Every audit row closed (closes are written by the group-commit writer; poll briefly).
    let store = app.state.store();
    poll("every audit row to be closed", || async move {
        match store.open_audit_rows().await.unwrap() {
            0 => Ok(()),
            open => Err(format!("{open} audit rows still open")),
        }
    })
    .await;

    // Graceful shutdown with live connections and a run in flight: 1001 for all, rows closed.
    let (mut a, _) = app.connect("alice").await;
    let (mut b, _) = app.connect("bob").await;
    a.send_json(&json!({"type": "user_message", "id": "m", "data": {"content": "in flight"}}))
        .await
        .unwrap();
    a.until("ack", T).await.unwrap();
    let store = store.clone();
    let state = app.state.clone();
    let config = app.config.clone();
    let shutdown = tokio::spawn(app.shutdown_keep());
    assert_eq!(a.closed(T).await.unwrap().0, 1001);
    assert_eq!(
        b.closed(T).await.unwrap(),
        (1001, "server shutting down".to_string())
    );
    assert!(state.is_draining());
    shutdown.await.unwrap();
    drop(store);
    // Restart on the same data: no audit row was left open, nothing to recover.
    let app = start(config, false).await;
    assert_eq!(app.state.store().open_audit_rows().await.unwrap(), 0);
    assert_eq!(tether::metrics().audit_rows_recovered.get(), 0);
    Client::connect(&app.ws_base(), &ConnectOptions::default())
        .await
        .ok();
}
