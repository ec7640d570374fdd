//! The load tool (`tether::bench`) in-process against the real server, at tiny sizes: it must
//! find no protocol violation, and churn must end with everything released.

mod common;

use std::time::Duration;

use common::*;
use tether::bench::{self, ChatArgs, ChurnArgs, Target};

fn target(app: &TestApp) -> Target {
    Target {
        addr: app.addr,
        jwt_secret: app
            .config
            .auth
            .jwt_secret
            .clone()
            .expect("tests configure a secret"),
        admin_token: app.config.auth.admin_token.clone(),
        // The server runs in this process: its memory figures would be the test's own.
        server_pid: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_mode_checks_every_run_and_finds_no_violation() {
    let app = spawn_app().await;
    let args = ChatArgs {
        connections: 4,
        users: Some(2),
        messages: Some(3),
        // Two in flight: runs interleave on a connection, and seq must still be +1.
        in_flight: 2,
        ..ChatArgs::default()
    };
    let r = bench::chat(&target(&app), &args).await.expect("chat runs");
    assert_eq!(r.problems.violations, 0, "{:?}", r.problems);
    assert_eq!(r.problems.errors, 0, "{:?}", r.problems);
    assert_eq!((r.connected, r.runs_completed), (4, 12), "{r:?}");
    // Eight frames per run, plus nothing else.
    assert_eq!(r.frames_received, 12 * 8);
    assert!(r.passed);
    assert!(r.latency.p50_ms > 0.0 && r.latency.max_ms >= r.latency.p99_ms);
    // The summary renders.
    assert!(bench::chat_summary(&r).contains("PASS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_mode_ends_with_everything_at_zero() {
    let app = spawn_app().await;
    let args = ChurnArgs {
        cycles: 50,
        concurrency: 8,
        warmup_cycles: Some(5),
        settle_timeout: Duration::from_secs(10),
        ..ChurnArgs::default()
    };
    let r = bench::churn(&target(&app), &args)
        .await
        .expect("churn runs");
    assert_eq!(r.problems.violations, 0, "{:?}", r.problems);
    assert_eq!(r.problems.errors, 0, "{:?}", r.problems);
    assert_eq!(r.cycles_ok, 50);
    assert_eq!(r.resets + r.clean_closes, 50);
    assert!(r.resets > 0 && r.midrun > 0, "{r:?}");
    assert_eq!(r.settled, Some(true), "{:?}", r.end);
    let end = r.end.expect("stats were polled");
    assert_eq!(
        (
            end.connections,
            end.managers,
            end.sessions_open,
            end.audit_rows_open
        ),
        (Some(0), Some(0), Some(0), Some(0))
    );
    assert!(r.passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_without_an_admin_token_is_refused_not_passed() {
    let app = spawn_app().await;
    let t = Target {
        admin_token: None,
        ..target(&app)
    };
    let err = bench::churn(&t, &ChurnArgs::default()).await.unwrap_err();
    assert!(err.to_string().contains("TETHER_ADMIN_TOKEN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_a_stalled_client_closes_it_and_serves_the_others() {
    // A small queue, so the stalled connection overflows after a few frames.
    let app =
        spawn_with(|c| c.limits.outbound_queue = std::num::NonZeroUsize::new(16).unwrap()).await;
    let args = ChatArgs {
        connections: 3,
        messages: Some(5),
        stalled: 1,
        // Large frames: the server's socket send buffer (up to 4 MiB here) fills first.
        stall_rate: 1000,
        stall_frame_bytes: 32 * 1024,
        ..ChatArgs::default()
    };
    let r = bench::chat(&target(&app), &args).await.expect("chat runs");
    // The others: every run completed and checked.
    assert_eq!(r.problems.violations, 0, "{:?}", r.problems);
    assert_eq!(r.problems.errors, 0, "{:?}", r.problems);
    assert_eq!((r.connected, r.runs_completed), (3, 15), "{r:?}");
    // The stalled one: its queue overflowed and the server closed it.
    let st = r.stalled.as_ref().expect("a stalled report");
    assert!(st.stalls >= 1, "{st:?}");
    assert_eq!(st.problems.errors, 0, "{:?}", st.problems);
    assert_eq!(st.closed_after_overflow, st.stalls, "{st:?}");
    assert!(st.records[0].accepted >= 16, "{st:?}");
    assert!(st.overflow_to_close.count >= 1 && st.overflow_to_close.max_ms < 10_000.0);
    // The server counted it: an overflow, and a connection ended with 4009.
    assert!(st.slow_consumer_closes >= Some(1), "{st:?}");
    assert!(st.closes_4009 >= Some(1), "{st:?}");
    assert!(r.passed);
    assert!(bench::chat_summary(&r).contains("closed after it"));
    // Nothing of the stalled connections is left.
    app.wait_stats("connections released", |s| s["connections"] == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_without_an_admin_token_are_refused_not_passed() {
    let app = spawn_app().await;
    let t = Target {
        admin_token: None,
        ..target(&app)
    };
    let args = ChatArgs {
        stalled: 1,
        ..ChatArgs::default()
    };
    let err = bench::chat(&t, &args).await.unwrap_err();
    assert!(err.to_string().contains("TETHER_ADMIN_TOKEN"), "{err}");
    let err = bench::chat_stalled_compare(&t, &ChatArgs::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TETHER_ADMIN_TOKEN"), "{err}");
}
