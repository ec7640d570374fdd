//! The `tether` binary as a user runs it: token tool, config errors, crash recovery of the
//! audit trail, SIGTERM shutdown.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{bearer, free_port, poll, temp_dir, wait_json, T};
use serde_json::Value;
use tether::client::Client;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// The `tether` binary serving `dir` on `port` with agent delay 0, its stdout discarded.
fn server(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("TETHER_DATA_DIR", dir)
        .env("TETHER_LISTEN", format!("127.0.0.1:{port}"))
        .env("TETHER_AGENT_DELAY_MS", "0")
        .stdout(Stdio::null());
    cmd
}

fn serve(dir: &Path, port: u16) -> Child {
    server(dir, port)
        .env("TETHER_ADMIN_TOKEN", "admin-bin")
        .env("TETHER_SQLITE_SYNCHRONOUS", "NORMAL")
        .env("TETHER_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_ready(port: u16) {
    poll("the server to be ready", || async move {
        match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!("/readyz answered {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Connect with `token` to the server on `port` and read `connection_established`.
async fn connect(port: u16, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&format!("ws://127.0.0.1:{port}"), &bearer(token))
        .await
        .unwrap();
    let est = c.next_json(T).await.unwrap();
    (c, est)
}

/// SIGTERM, as a service manager stops the server.
fn terminate(child: &Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
}

fn token(dir: &Path, user: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "--user", user, "--ttl", "10m"])
        .env("TETHER_DATA_DIR", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn invalid_config_fails_at_start_naming_the_variable() {
    for (var, value) in [
        ("TETHER_MAX_CONNECTIONS_PER_USER", "lots"),
        ("TETHER_SQLITE_SYNCHRONOUS", "SOMETIMES"),
        ("TETHER_JWT_ALG", "none"),
        ("TETHER_ALLOW_QUERY_TOKEN", "maybe"),
        ("TETHER_RUN_TIMEOUT_MS", "0"),
        ("TETHER_LOG_FORMAT", "xml"),
    ] {
        let out = Command::new(BIN)
            .env(var, value)
            .env("TETHER_DATA_DIR", temp_dir())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}: {err}");
    }
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "TETHER_LISTEN",
        "TETHER_DATA_DIR",
        "TETHER_JWT_SECRET",
        "TETHER_CONNECT_RATE_PER_IP",
        "TETHER_AGENT_DELAY_MS",
    ] {
        assert!(help.contains(var), "--help does not document {var}");
    }
}

#[tokio::test]
async fn token_tool_and_server_agree_and_a_killed_servers_audit_rows_are_closed_at_restart() {
    let dir = temp_dir();
    let port = free_port();
    // The token is minted before the server ever ran: the secret is generated once and kept.
    let tok = token(&dir, "alice");
    let mut child = serve(&dir, port);
    wait_ready(port).await;
    let (c, est) = connect(port, &tok).await;
    assert_eq!(est["data"]["user_id"], "alice");
    // Wait until the audit row is committed, then crash the server.
    wait_json(
        &format!("http://127.0.0.1:{port}/api/stats"),
        "admin-bin",
        "the audit row to be committed",
        |s| s["audit_rows_open"] == 1,
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(c);

    let mut child = serve(&dir, port);
    wait_ready(port).await;
    let m = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tether_audit_rows_recovered_total 1"), "{m}");
    // SIGTERM: graceful, exit 0.
    let (mut c, _) = connect(port, &tok).await;
    terminate(&child);
    assert_eq!(c.closed(T).await.unwrap().0, 1001);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn json_logs_follow_one_connection_by_its_id_and_never_show_the_token() {
    let dir = temp_dir();
    let port = free_port();
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let tok = token(&dir, "alice");
    let mut child = server(&dir, port)
        .env("TETHER_LOG_FORMAT", "json")
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    wait_ready(port).await;
    let (mut c, est) = connect(port, &tok).await;
    let conn_id = est["data"]["connection_id"].as_str().unwrap().to_string();
    let thread_id = est["data"]["thread_id"].as_str().unwrap().to_string();
    c.send_json(&serde_json::json!({"type": "user_message", "id": "m", "data": {"content": "hi"}}))
        .await
        .unwrap();
    c.until("agent_completed", T).await.unwrap();
    c.close().await.unwrap();
    terminate(&child);
    assert!(child.wait().unwrap().success());

    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains(&tok), "the token appears in the logs");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains(&conn_id))
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for expected in [
        "connection accepted: registry slot taken",
        "connection opened",
        "run started",
        "run finished",
        "connection closed",
        "registry slot released",
    ] {
        assert!(
            messages.contains(&expected),
            "no '{expected}' line for {conn_id}: {messages:?}"
        );
    }
    // Creation and cleanup carry the same ids.
    for l in &lines {
        assert_eq!(l["span"]["thread_id"], thread_id.as_str(), "{l}");
        assert_eq!(l["span"]["user_id"], "alice");
    }
    std::fs::remove_dir_all(dir).ok();
}
