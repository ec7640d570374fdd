//! Test harness: start the real server on port 0 and talk to it over real sockets.
//!
//! - this file: [`TestApp`] (a server in this process) and the client-side helpers most tests use;
//! - [`raw`]: WebSocket frames and HTTP written and read by hand, below the client library;
//! - [`env`]: what a test needs from outside (a service, a browser), or one `SKIPPED` line.

// Each test binary compiles all of `common` and uses part of it.
#![allow(dead_code)]

pub(crate) mod env;
pub(crate) mod raw;

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tether::client::{Client, ClientError, ConnectOptions, WsError};
use tether::AppState;
use tether::Config;
use tether::Server;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const T: Duration = Duration::from_secs(10);
pub(crate) const ADMIN: &str = "admin-test-token";

pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<AppState>,
    pub(crate) data_dir: PathBuf,
    pub(crate) config: Config,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    keep_dir: bool,
}

pub(crate) fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-test-{}", tether::ids::connection_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port that was free a moment ago, for a child process that cannot take port 0.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Call `check` every 20 ms until it gives `Ok`; fail after [`T`] with what it gave last.
pub(crate) async fn poll<V, E: Display, F: Future<Output = Result<V, E>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> V {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() > deadline => {
                panic!("timed out waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Start a server with the test defaults (agent delay 0, no connect-rate limit).
pub(crate) async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub(crate) async fn spawn_with(f: impl FnOnce(&mut Config)) -> TestApp {
    let dir = temp_dir();
    let mut config = Config::for_tests(&dir);
    f(&mut config);
    start(config, false).await
}

/// Start a server on an existing configuration (e.g. to restart on the same data directory).
pub(crate) async fn start(config: Config, keep_dir: bool) -> TestApp {
    let server = Server::bind(config.clone()).await.expect("server binds");
    let addr = server.local_addr();
    let state = server.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        server
            .run(async move {
                // A stop, or the TestApp dropped without one: either way, stop.
                stopped.await.ok();
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

/// Options that carry `token` in the `Authorization` header.
pub(crate) fn bearer(token: impl Into<String>) -> ConnectOptions {
    ConnectOptions {
        token: Some(token.into()),
        ..Default::default()
    }
}

/// Options that carry `token` in the query string (`?token=`), as a browser must.
pub(crate) fn query_token(token: impl Into<String>) -> ConnectOptions {
    ConnectOptions {
        query: Some(format!("token={}", token.into())),
        ..Default::default()
    }
}

impl TestApp {
    pub(crate) fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }
    pub(crate) fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub(crate) fn token(&self, user: &str) -> String {
        self.state
            .auth()
            .mint(user, Duration::from_secs(3600))
            .unwrap()
    }

    /// Options that authenticate as `user` (a bearer token), on a new thread.
    pub(crate) fn as_user(&self, user: &str) -> ConnectOptions {
        bearer(self.token(user))
    }

    /// Connect as `user` on a new thread and read `connection_established`.
    pub(crate) async fn connect(&self, user: &str) -> (Client, Value) {
        self.connect_opts(self.as_user(user)).await
    }

    /// Connect as `user` to an existing thread.
    pub(crate) async fn connect_thread(
        &self,
        user: &str,
        thread_id: &str,
        since: Option<u64>,
    ) -> (Client, Value) {
        self.connect_opts(ConnectOptions {
            thread_id: Some(thread_id.to_string()),
            since,
            ..self.as_user(user)
        })
        .await
    }

    pub(crate) async fn connect_opts(&self, opts: ConnectOptions) -> (Client, Value) {
        let mut c = self.upgrade(&opts).await;
        let est = c.next_json(T).await.expect("connection_established");
        assert_eq!(est["type"], "connection_established", "{est}");
        (c, est)
    }

    /// Upgrade and read nothing: for a connection the server closes right after the upgrade.
    pub(crate) async fn upgrade(&self, opts: &ConnectOptions) -> Client {
        match self.try_upgrade(opts).await {
            Ok(c) => c,
            Err((status, body)) => panic!("the upgrade was refused: {status} {body}"),
        }
    }

    /// Upgrade, or the HTTP refusal of the upgrade: its status and JSON body (`Null` without one).
    pub(crate) async fn try_upgrade(&self, opts: &ConnectOptions) -> Result<Client, (u16, Value)> {
        match Client::connect(&self.ws_base(), opts).await {
            Ok(c) => Ok(c),
            Err(ClientError::Ws(WsError::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).expect("a JSON error body"))
                    .unwrap_or(Value::Null);
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// The HTTP refusal of an upgrade that must be refused: status and JSON body.
    pub(crate) async fn refused(&self, opts: ConnectOptions) -> (u16, Value) {
        match self.try_upgrade(&opts).await {
            Err(refusal) => refusal,
            Ok(_) => panic!("connection was accepted"),
        }
    }

    pub(crate) async fn stats(&self) -> Value {
        get_json(&self.http("/api/stats"), ADMIN).await
    }

    /// Poll `/api/stats` until `pred` holds (or fail after a deadline).
    pub(crate) async fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_json(&self.http("/api/stats"), ADMIN, what, pred).await
    }

    /// Stop gracefully and wait until the server is fully shut down.
    pub(crate) async fn shutdown(mut self) {
        self.stop_and_wait().await;
    }

    async fn stop_and_wait(&mut self) {
        if let Some(s) = self.stop.take() {
            s.send(()).ok();
        }
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(30), j)
                .await
                .expect("shutdown in time")
                .unwrap();
        }
    }

    /// Shut down but keep the data directory (for a restart).
    pub(crate) async fn shutdown_keep(mut self) -> Config {
        self.keep_dir = true;
        self.stop_and_wait().await;
        self.config.clone()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.send(()).ok();
        }
        if !self.keep_dir {
            std::fs::remove_dir_all(&self.data_dir).ok();
        }
    }
}

/// `GET url` with a bearer token.
pub(crate) async fn get(url: &str, bearer: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
}

/// `GET url` with a bearer token, as JSON.
pub(crate) async fn get_json(url: &str, bearer: &str) -> Value {
    get(url, bearer).await.json().await.unwrap()
}

/// Send `req` and read its answer as JSON.
pub(crate) async fn json_answer(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// Poll `GET url` (JSON, with a bearer token) until `pred` holds; fail after [`T`].
pub(crate) async fn wait_json(
    url: &str,
    bearer: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let pred = &pred;
    poll(what, || async move {
        let v = get_json(url, bearer).await;
        if pred(&v) {
            Ok(v)
        } else {
            Err(format!("{url}: {v}"))
        }
    })
    .await
}

/// Send a user message and collect frames up to the run's end.
pub(crate) async fn chat(c: &mut Client, id: &str, content: &str) -> Vec<Value> {
    c.send_json(
        &serde_json::json!({"type": "user_message", "id": id, "data": {"content": content}}),
    )
    .await
    .unwrap();
    c.until("agent_completed", T).await.expect("run completes")
}

/// A `ping` frame answered by a `pong` that echoes its id.
pub(crate) async fn ping_pong(c: &mut Client, id: &str) {
    c.send_json(&serde_json::json!({"type": "ping", "id": id}))
        .await
        .unwrap();
    let frames = c.until("pong", T).await.expect("pong");
    assert_eq!(frames.last().unwrap()["reply_to"], id);
}

/// The frames of `frames` that are thread events (carry `seq`).
pub(crate) fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}
