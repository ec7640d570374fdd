//! Test harness: start the real server on port 0 and talk to it over real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tether::client::{Client, ConnectOptions};
use tether::AppState;
use tether::Config;
use tether::Server;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const T: Duration = Duration::from_secs(10);
pub const ADMIN: &str = "admin-test-token";

pub struct TestApp {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub data_dir: PathBuf,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    keep_dir: bool,
}

pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-test-{}", tether::ids::connection_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Start a server with the test defaults (agent delay 0, no connect-rate limit).
pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(f: impl FnOnce(&mut Config)) -> TestApp {
    let dir = temp_dir();
    let mut config = Config::for_tests(&dir);
    f(&mut config);
    start(config, false).await
}

/// Start a server on an existing configuration (e.g. to restart on the same data directory).
pub async fn start(config: Config, keep_dir: bool) -> TestApp {
    let server = Server::bind(config.clone()).await.expect("server binds");
    let addr = server.local_addr();
    let state = server.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        server
            .run(async move {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
    });
    TestApp {
        addr,
        state,
        data_dir: config.store.data_dir.clone(),
        config,
        stop: Some(stop),
        join: Some(join),
        keep_dir,
    }
}

impl TestApp {
    /// The raw upgrade request of `user` (for tests that must speak below the WebSocket
    /// library: never answering pings, never reading, leaving with a bare FIN).
    pub fn raw_upgrade_request(&self, user: &str) -> String {
        format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.token(user)
        )
    }

    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn token(&self, user: &str) -> String {
        self.state
            .auth()
            .mint(user, Duration::from_secs(3600))
            .unwrap()
    }

    /// Connect as `user` on a new thread and read `connection_established`.
    pub async fn connect(&self, user: &str) -> (Client, Value) {
        self.connect_opts(ConnectOptions {
            token: Some(self.token(user)),
            ..Default::default()
        })
        .await
    }

    /// Connect as `user` to an existing thread.
    pub async fn connect_thread(
        &self,
        user: &str,
        thread_id: &str,
        since: Option<u64>,
    ) -> (Client, Value) {
        self.connect_opts(ConnectOptions {
            token: Some(self.token(user)),
            thread_id: Some(thread_id.to_string()),
            since,
            ..Default::default()
        })
        .await
    }

    pub async fn connect_opts(&self, opts: ConnectOptions) -> (Client, Value) {
        let mut c = Client::connect(&self.ws_base(), &opts)
            .await
            .expect("connects");
        let est = c.next_json(T).await.expect("connection_established");
        assert_eq!(est["type"], "connection_established", "{est}");
        (c, est)
    }

    pub async fn stats(&self) -> Value {
        get_json(&self.http("/api/stats"), ADMIN).await
    }

    /// Poll `/api/stats` until `pred` holds (or fail after a deadline).
    pub async fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let s = self.stats().await;
            if pred(&s) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; stats: {s}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop gracefully and wait until the server is fully shut down.
    pub async fn shutdown(mut self) {
        self.stop_and_wait().await;
    }

    async fn stop_and_wait(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j)
                .await
                .expect("shutdown in time")
                .unwrap();
        }
    }

    /// Shut down but keep the data directory (for a restart).
    pub async fn shutdown_keep(mut self) -> Config {
        self.keep_dir = true;
        self.stop_and_wait().await;
        self.config.clone()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// `GET url` with a bearer token, as JSON.
pub async fn get_json(url: &str, bearer: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Send a user message and collect frames up to the run's end.
pub async fn chat(c: &mut Client, id: &str, content: &str) -> Vec<Value> {
    c.send_json(
        &serde_json::json!({"type": "user_message", "id": id, "data": {"content": content}}),
    )
    .await
    .unwrap();
    c.until("agent_completed", T).await.expect("run completes")
}

/// The frames of `frames` that are thread events (carry `seq`).
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}
