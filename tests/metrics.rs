//! `/metrics` in the Prometheus text format, and the figures the original leak was judged by
//! moving when a client misbehaves. (Its own test binary: metrics are process-wide.)

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::json;

/// A strict-enough parser of the text exposition format: every sample belongs to a declared
/// metric family, every value is a number, label values are quoted.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut declared: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label has =");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| declared.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(
            declared.contains_key(family),
            "sample of an undeclared family: {line}"
        );
        samples.insert(series.to_string(), value);
    }
    samples
}

async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let text = reqwest::get(app.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse(&text)
}

#[tokio::test]
async fn metrics_parse_and_move_when_clients_misbehave() {
    let app = spawn_with(|c| {
        c.limits.max_connections_per_user = std::num::NonZeroUsize::new(2).unwrap();
        c.limits.max_managers_per_user = std::num::NonZeroUsize::new(2).unwrap();
    })
    .await;
    let before = scrape(&app).await;
    for name in [
        "tether_thread_mismatches_total{source=\"frame\"}",
        "tether_thread_mismatches_total{source=\"cleanup\"}",
        "tether_manager_cleanups_attempted_total",
        "tether_manager_cleanups_completed_total",
        "tether_emergency_cleanups_total",
        "tether_managers_active",
        "tether_users_with_managers",
        "tether_managers_per_user_avg",
        "tether_managers_per_user_max",
        "tether_connections_active",
        "tether_connections_opened_total",
        "tether_connections_closed_total{code=\"1006\"}",
        "tether_limit_rejections_total{limit=\"connections\"}",
        "tether_messages_in_total{type=\"user_message\"}",
        "tether_messages_out_total{type=\"thread_event\"}",
        "tether_runs_started_total",
        "tether_runs_finished_total{outcome=\"completed\"}",
        "tether_runs_finished_total{outcome=\"failed\"}",
        "tether_run_duration_seconds_count",
        "tether_db_sessions_opened_total",
        "tether_db_sessions_committed_total",
        "tether_db_sessions_rolled_back_total",
        "tether_db_sessions_open",
        "tether_store_query_seconds_count{op=\"commit\"}",
        "tether_outbound_queue_drops_total",
        "tether_slow_consumer_closes_total",
        "tether_heartbeat_timeouts_total",
    ] {
        assert!(before.contains_key(name), "missing {name}");
    }
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    // A well-behaved client: a run, a normal close.
    let (mut a, est) = app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut a, "m", "hello").await;
    // Misbehaviour: a frame for another thread, a third connection over the limit, a reset.
    a.send_json(&json!({"type": "ping", "thread_id": "thread_elsewhere_1_1_00000000"}))
        .await
        .unwrap();
    assert_eq!(
        a.next_json(T).await.unwrap()["data"]["code"],
        "thread_mismatch"
    );
    let (_a2, _) = app.connect_thread("alice", &thread, None).await;
    let mut over = app.upgrade(&app.as_user("alice")).await;
    assert_eq!(over.closed(T).await.unwrap().0, 4008);
    let during = scrape(&app).await;
    assert_eq!(get(&during, "tether_managers_active"), 1.0);
    assert_eq!(get(&during, "tether_users_with_managers"), 1.0);
    assert_eq!(get(&during, "tether_managers_per_user_max"), 1.0);
    assert_eq!(get(&during, "tether_connections_active"), 2.0);
    a.abort();
    app.wait_stats("reset connection released", |s| s["connections"] == 1)
        .await;
    let after = scrape(&app).await;

    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta("tether_thread_mismatches_total{source=\"frame\"}"),
        1.0
    );
    assert_eq!(
        delta("tether_thread_mismatches_total{source=\"cleanup\"}"),
        0.0
    );
    assert_eq!(
        delta("tether_limit_rejections_total{limit=\"connections\"}"),
        1.0
    );
    assert_eq!(delta("tether_connections_closed_total{code=\"4008\"}"), 1.0);
    assert_eq!(delta("tether_connections_closed_total{code=\"1006\"}"), 1.0);
    assert_eq!(delta("tether_connections_opened_total"), 2.0);
    assert_eq!(delta("tether_manager_cleanups_attempted_total"), 1.0);
    assert_eq!(delta("tether_manager_cleanups_completed_total"), 1.0);
    assert_eq!(delta("tether_emergency_cleanups_total"), 0.0);
    assert_eq!(delta("tether_runs_started_total"), 1.0);
    assert_eq!(
        delta("tether_runs_finished_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(delta("tether_run_duration_seconds_count"), 1.0);
    assert_eq!(
        delta("tether_messages_in_total{type=\"user_message\"}"),
        1.0
    );
    assert!(delta("tether_messages_out_total{type=\"thread_event\"}") >= 5.0);
    // The user message's session and at least one of its run (a run's steps taken without
    // waiting share a session).
    assert!(delta("tether_db_sessions_committed_total") >= 2.0);
    assert_eq!(get(&after, "tether_db_sessions_open"), 0.0);
    assert_eq!(get(&after, "tether_connections_active"), 1.0);
}
