//! The load tool as operators run it: the `tether-bench` executable, against the real gateway
//! started in this process on port 0, at tiny sizes. It must find no protocol violation, churn
//! must end with everything released, and a run that cannot prove what it is asked to is
//! refused, not passed.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tether::{Config, Server};
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_tether-bench");

/// Longest one run of the tool may take here (they take about a second).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The gateway, in this process; stopped when dropped.
struct App {
    addr: SocketAddr,
    config: Config,
    _stop: oneshot::Sender<()>,
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-bench-{what}-{}",
        tether::ids::connection_id()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

async fn spawn_with(f: impl FnOnce(&mut Config)) -> App {
    let mut config = Config::for_tests(&temp_dir("server"));
    f(&mut config);
    let server = Server::bind(config.clone()).await.expect("server binds");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server
            .run(async move {
                // A stop, or the App dropped without one: either way, stop.
                stopped.await.ok();
            })
            .await
            .expect("server runs");
    });
    App {
        addr,
        config,
        _stop: stop,
    }
}

async fn spawn_app() -> App {
    spawn_with(|_| {}).await
}

impl Drop for App {
    fn drop(&mut self) {
        // Best effort: a leftover directory in the temp dir is harmless.
        let _removed = std::fs::remove_dir_all(&self.config.store.data_dir);
    }
}

/// Whether the tool is told the server's admin token.
#[derive(Clone, Copy, PartialEq)]
enum Admin {
    Known,
    Unknown,
}

impl App {
    /// Run `tether-bench MODE ARGS... --target ADDR`, with the server's secrets in the
    /// environment as an operator would give them (and no other `TETHER_*` variable).
    async fn bench(&self, args: &[&str], admin: Admin) -> Output {
        let mut cmd = tokio::process::Command::new(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TETHER_") {
                cmd.env_remove(name);
            }
        }
        let secret = self.config.auth.jwt_secret.as_ref().expect("a test secret");
        // An empty data directory: the tool knows only what it is told here.
        let data_dir = temp_dir("client");
        cmd.args(args)
            .arg("--target")
            .arg(self.addr.to_string())
            .env("TETHER_DATA_DIR", &data_dir)
            .env("TETHER_JWT_SECRET", secret.expose())
            .kill_on_drop(true);
        if admin == Admin::Known {
            let token = self.config.auth.admin_token.as_ref().expect("a test token");
            cmd.env("TETHER_ADMIN_TOKEN", token.expose());
        }
        let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
            .await
            .expect("the tool ends by itself")
            .expect("the tool runs");
        let _removed = std::fs::remove_dir_all(&data_dir);
        out
    }

    /// A run with `--json` that passed: its report.
    async fn report(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.bench(&args, Admin::Known).await;
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(out.status.success(), "{:?}: {report}", out.status);
        report
    }

    /// The same run with the one-screen summary; it passed.
    async fn summary(&self, args: &[&str]) -> String {
        let out = self.bench(args, Admin::Known).await;
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{:?}: {summary}", out.status);
        summary
    }

    /// A run that was refused before it started: its error.
    async fn refused(&self, args: &[&str]) -> String {
        let out = self.bench(args, Admin::Unknown).await;
        assert!(!out.status.success(), "{args:?} was not refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Poll `/api/stats` until `pred` holds, or fail after a deadline.
    async fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) {
        let token = self.config.auth.admin_token.as_ref().expect("a test token");
        let url = format!("http://{}/api/stats", self.addr);
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stats: Value = match client.get(&url).bearer_auth(token.expose()).send().await {
                Ok(r) => {
                    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default()
                }
                Err(_) => Value::Null,
            };
            if pred(&stats) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; stats: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn u(v: &Value) -> Option<u64> {
    v.as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_mode_checks_every_run_and_finds_no_violation() {
    let app = spawn_app().await;
    // Two in flight: runs interleave on a connection, and seq must still be +1.
    let args = [
        "chat",
        "--connections",
        "4",
        "--users",
        "2",
        "--messages",
        "3",
        "--in-flight",
        "2",
    ];
    let r = app.report(&args).await;
    assert_eq!(r["problems"]["violations"], 0, "{}", r["problems"]);
    assert_eq!(r["problems"]["errors"], 0, "{}", r["problems"]);
    assert_eq!(
        (u(&r["connected"]), u(&r["runs_completed"])),
        (Some(4), Some(12)),
        "{r}"
    );
    // Eight frames per run, plus nothing else.
    assert_eq!(r["frames_received"], 12 * 8);
    assert_eq!(r["passed"], true);
    let l = &r["latency"];
    let ms = |k: &str| l[k].as_f64().expect("a latency figure");
    assert!(ms("p50_ms") > 0.0 && ms("max_ms") >= ms("p99_ms"), "{l}");
    // The summary renders.
    assert!(app.summary(&args).await.contains("PASS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_mode_ends_with_everything_at_zero() {
    let app = spawn_app().await;
    let r = app
        .report(&[
            "churn",
            "--cycles",
            "50",
            "--concurrency",
            "8",
            "--warmup-cycles",
            "5",
            "--settle-timeout",
            "10s",
        ])
        .await;
    assert_eq!(r["problems"]["violations"], 0, "{}", r["problems"]);
    assert_eq!(r["problems"]["errors"], 0, "{}", r["problems"]);
    assert_eq!(r["cycles_ok"], 50);
    assert_eq!(
        u(&r["resets"])
            .zip(u(&r["clean_closes"]))
            .map(|(a, b)| a + b),
        Some(50)
    );
    assert!(
        r["resets"].as_u64() > Some(0) && r["midrun"].as_u64() > Some(0),
        "{r}"
    );
    assert_eq!(r["settled"], true, "{}", r["end"]);
    let end = &r["end"];
    assert_eq!(
        (
            u(&end["connections"]),
            u(&end["managers"]),
            u(&end["sessions_open"]),
            u(&end["audit_rows_open"])
        ),
        (Some(0), Some(0), Some(0), Some(0)),
        "{end}"
    );
    assert_eq!(r["passed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_without_an_admin_token_is_refused_not_passed() {
    let app = spawn_app().await;
    let err = app.refused(&["churn"]).await;
    assert!(err.contains("TETHER_ADMIN_TOKEN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_a_stalled_client_closes_it_and_serves_the_others() {
    // A small queue, so the stalled connection overflows after a few frames.
    let app = spawn_with(|c| c.limits.outbound_queue = NonZeroUsize::new(16).unwrap()).await;
    // Large frames: the server's socket send buffer (up to 4 MiB here) fills first.
    let args = [
        "chat",
        "--connections",
        "3",
        "--messages",
        "5",
        "--stalled",
        "1",
        "--stall-rate",
        "1000",
        "--stall-frame-bytes",
        "32768",
    ];
    let r = app.report(&args).await;
    // The others: every run completed and checked.
    assert_eq!(r["problems"]["violations"], 0, "{}", r["problems"]);
    assert_eq!(r["problems"]["errors"], 0, "{}", r["problems"]);
    assert_eq!(
        (u(&r["connected"]), u(&r["runs_completed"])),
        (Some(3), Some(15)),
        "{r}"
    );
    // The stalled one: its queue overflowed and the server closed it.
    let st = &r["stalled"];
    assert!(st["stalls"].as_u64() >= Some(1), "{st}");
    assert_eq!(st["problems"]["errors"], 0, "{}", st["problems"]);
    assert_eq!(st["closed_after_overflow"], st["stalls"], "{st}");
    assert!(st["records"][0]["accepted"].as_u64() >= Some(16), "{st}");
    let close = &st["overflow_to_close"];
    assert!(
        close["count"].as_u64() >= Some(1)
            && close["max_ms"].as_f64().is_some_and(|ms| ms < 10_000.0),
        "{close}"
    );
    // The server counted it: an overflow, and a connection ended with 4009.
    assert!(st["slow_consumer_closes"].as_u64() >= Some(1), "{st}");
    assert!(st["closes_4009"].as_u64() >= Some(1), "{st}");
    assert_eq!(r["passed"], true);
    assert!(app.summary(&args).await.contains("closed after it"));
    // Nothing of the stalled connections is left.
    app.wait_stats("connections released", |s| s["connections"] == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_without_an_admin_token_are_refused_not_passed() {
    let app = spawn_app().await;
    let err = app.refused(&["chat", "--stalled", "1"]).await;
    assert!(err.contains("TETHER_ADMIN_TOKEN"), "{err}");
    let err = app.refused(&["chat", "--stalled-compare"]).await;
    assert!(err.contains("TETHER_ADMIN_TOKEN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mode_holds_every_connection_in_one_process_or_split_over_two() {
    let app = spawn_app().await;
    for processes in ["1", "2"] {
        let r = app
            .report(&[
                "idle",
                "-n",
                "6",
                "--processes",
                processes,
                "--hold",
                "250ms",
            ])
            .await;
        assert_eq!(r["problems"]["errors"], 0, "{}", r["problems"]);
        assert_eq!(
            (u(&r["connected"]), u(&r["failed"]), u(&r["lost"])),
            (Some(6), Some(0), Some(0)),
            "{r}"
        );
        assert_eq!(r["processes"].to_string(), processes);
        assert_eq!(r["passed"], true);
    }
}

#[test]
fn help_lists_the_modes_and_their_flags() {
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for mode in ["chat", "idle", "churn"] {
        assert!(help.contains(mode), "{help}");
    }
    let chat = std::process::Command::new(BIN)
        .args(["chat", "--help"])
        .output()
        .unwrap();
    let chat = String::from_utf8_lossy(&chat.stdout);
    for flag in [
        "--stalled-compare",
        "--in-flight",
        "--target",
        "TETHER_JWT_SECRET",
    ] {
        assert!(chat.contains(flag), "{chat}");
    }
}
