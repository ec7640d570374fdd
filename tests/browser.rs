//! End-to-end: the chat page (`/chat`) and the operator dashboard (`/`) in a real headless
//! Chromium, driven over WebDriver (Debian's `chromedriver`) against the real server.
//!
//! - Chat: a dev token, a new thread, a message, the agent's reply on the page; then a reload,
//!   the thread picked from the list and the earlier reply shown again from history. Every
//!   WebSocket URL the page opened carries a `ticket=` and never the token (the server is also
//!   configured to refuse `?token=`).
//! - Dashboard: 401 prompt without the admin token, live figures with it (the browser's chat
//!   connection and one from `tether::client`), then `Draining` once a drain starts.
//! - Screenshots of both pages land in `target/e2e/` (`chat.png`, `dashboard.png`,
//!   `dashboard-draining.png`; `failure.png` when the test fails).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`TETHER_CHROMIUM` / `TETHER_CHROMEDRIVER`
//! override the binaries). Without them the test is skipped with one line on stderr, unless
//! `CI` is set: then it fails. Nothing here downloads a browser.

mod common;

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{json, Value};

/// How long any one thing on a page may take to show up.
const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_dashboard_pages_work_in_headless_chromium() {
    let Some(tools) = browser_tools() else { return };
    let app = spawn_with(|c| {
        c.auth.dev_mode = true;
        c.agent.delay = std::time::Duration::from_millis(50);
        // The page must use tickets: a token in the URL would be refused outright.
        c.auth.allow_query_token = false;
    })
    .await;
    let driver = Driver::start(&tools);
    let browser = driver.session(&tools).await;

    let outcome = AssertUnwindSafe(scenario(&app, &browser))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        // Keep what the page looked like when it went wrong.
        if let Ok(png) = browser.screenshot().await {
            let path = artifact_dir().join("failure.png");
            if std::fs::write(&path, png).is_ok() {
                writeln!(
                    std::io::stderr(),
                    "browser test: page at failure saved to {}",
                    path.display()
                )
                .ok();
            }
        }
    }
    browser.close().await.ok();
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    app.shutdown().await;
}

async fn scenario(app: &TestApp, b: &Browser) {
    let dir = artifact_dir();
    std::fs::remove_file(dir.join("failure.png")).ok();

    // ---- chat: dev token, new thread, a message and the agent's reply -------------------
    b.goto(&app.http("/chat")).await.expect("open /chat");
    spy_on_websockets(b).await;
    let dev_user = find(b, "#dev-user").await;
    dev_user.clear().await.unwrap();
    dev_user.send_keys("alice").await.unwrap();
    find(b, "#dev-token-btn").await.click().await.unwrap();
    wait_js(
        b,
        "the dev token in #token-input",
        "return document.getElementById('token-input').value.split('.').length === 3",
        vec![],
    )
    .await;
    let token = js(
        b,
        "return document.getElementById('token-input').value.trim()",
        vec![],
    )
    .await
    .as_str()
    .unwrap()
    .to_string();
    assert_eq!(
        app.state
            .auth()
            .verify(&token)
            .expect("the dev token verifies"),
        "alice"
    );

    find(b, "#new-thread-btn").await.click().await.unwrap();
    wait_connected(b).await;
    let thread_id = js(
        b,
        "return document.getElementById('conn-status').title",
        vec![],
    )
    .await
    .as_str()
    .unwrap()
    .to_string();
    assert!(
        thread_id.starts_with("thread_websocket_session_"),
        "{thread_id}"
    );

    let first = "Hello from headless Chromium";
    send_message(b, first).await;
    wait_reply(b, first).await;
    wait_js(
        b,
        "the sent message acknowledged (stored)",
        "return document.querySelectorAll('.msg.user.acked').length === 1",
        vec![],
    )
    .await;
    wait_js(
        b,
        "the run's events (thinking, tool, completed) shown",
        "const t = [...document.querySelectorAll('.run .ev')].map(e => e.textContent).join('\\n');
         return t.includes('word_count') && t.includes('completed');",
        vec![],
    )
    .await;
    // The thread list refreshes after a reply: this thread, active, with its six events
    // (user_message, agent_started, agent_thinking, tool_executing, tool_completed,
    // agent_completed).
    wait_js(
        b,
        "this thread listed, marked active, with 6 events",
        "const li = document.querySelector(`#thread-list li.thread-item.active[data-thread-id='${arguments[0]}']`);
         return !!li && li.querySelector('.meta').textContent.startsWith('6 events');",
        vec![json!(thread_id)],
    )
    .await;
    screenshot(b, &dir.join("chat.png")).await;
    let mut ws_urls = ws_urls_now(b).await;

    // ---- chat: reload, pick the thread, history resumes -----------------------------------
    b.refresh().await.expect("reload /chat");
    spy_on_websockets(b).await;
    assert_eq!(
        js(
            b,
            "return document.getElementById('token-input').value.trim()",
            vec![]
        )
        .await,
        json!(token),
        "the token survives a reload of the tab (sessionStorage)"
    );
    assert_eq!(
        js(
            b,
            "return document.querySelectorAll('.agent-reply').length",
            vec![]
        )
        .await,
        json!(0),
        "a fresh page starts empty"
    );
    let item = format!("#thread-list li.thread-item[data-thread-id='{thread_id}']");
    wait_js(
        b,
        "the thread in the list after reload",
        "return !!document.querySelector(arguments[0])",
        vec![json!(item)],
    )
    .await;
    find(b, &item).await.click().await.unwrap();
    wait_connected(b).await;
    wait_js(
        b,
        "the resumed connection",
        "return document.getElementById('conn-status').textContent.includes('resumed')",
        vec![],
    )
    .await;
    wait_reply(b, first).await;
    wait_js(
        b,
        "the earlier user message replayed from history",
        "return [...document.querySelectorAll('.msg.user')].some(e => e.textContent.includes(arguments[0]))",
        vec![json!(first)],
    )
    .await;
    // The resumed connection works: a second message on the same thread.
    let second = "And a second one after the reload";
    send_message(b, second).await;
    wait_reply(b, second).await;
    assert_eq!(
        js(
            b,
            "return document.getElementById('conn-status').title",
            vec![]
        )
        .await,
        json!(thread_id),
        "still on the same thread"
    );
    ws_urls.extend(ws_urls_now(b).await);

    // ---- tickets, never a token in a URL ---------------------------------------------------
    assert!(
        ws_urls.len() >= 2,
        "the page opened its sockets: {ws_urls:?}"
    );
    for url in &ws_urls {
        assert!(
            url.contains("/ws?ticket="),
            "WebSocket URL without a ticket: {url}"
        );
        assert!(
            !url.contains("token="),
            "token parameter in a WebSocket URL: {url}"
        );
        assert!(
            !url.contains(&token),
            "the token itself in a WebSocket URL: {url}"
        );
    }
    assert!(
        ws_urls
            .iter()
            .any(|u| u.contains(&format!("thread_id={thread_id}"))),
        "the reload resumed the thread by id: {ws_urls:?}"
    );
    let requested = js(
        b,
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]",
        vec![],
    )
    .await;
    for url in requested.as_array().unwrap() {
        let url = url.as_str().unwrap();
        assert!(!url.contains(&token), "the token in a request URL: {url}");
    }

    // ---- dashboard: protected, then live -----------------------------------------------------
    // A second tab, so the chat page's connection stays open beside a tether::client one.
    let tab = b.new_window(true).await.expect("new tab");
    b.switch_to_window(tab.handle).await.unwrap();
    let (bob, _) = app.connect("bob").await;
    b.goto(&app.http("/")).await.expect("open /");
    wait_js(
        b,
        "the admin-token prompt (401 without a token)",
        "return getComputedStyle(document.getElementById('auth-prompt')).display !== 'none'
             && document.getElementById('stat-connections').textContent === '—'",
        vec![],
    )
    .await;
    let field = find(b, "#admin-token").await;
    field.send_keys(ADMIN).await.unwrap();
    find(b, "#admin-token-save").await.click().await.unwrap();
    wait_js(
        b,
        "#stat-connections ≥ 2 (the chat tab and the test's client)",
        "return parseInt(document.getElementById('stat-connections').textContent, 10) >= 2",
        vec![],
    )
    .await;
    wait_js(
        b,
        "alice and bob in the managers-per-user table, prompt gone, Ready",
        "const users = [...document.querySelectorAll('#top-users tbody tr')].map(r => r.dataset.userId);
         return users.includes('alice') && users.includes('bob')
             && getComputedStyle(document.getElementById('auth-prompt')).display === 'none'
             && document.getElementById('status-pill').textContent === 'Ready';",
        vec![],
    )
    .await;
    wait_js(
        b,
        "the runs shown (2 started, 2 completed, p50 latency)",
        "return document.getElementById('footer-runs').textContent.startsWith('2 started · 2 ok')
             && /ms|s$/.test(document.getElementById('stat-p50').textContent)",
        vec![],
    )
    .await;
    // A few samples, so the chart has a line.
    wait_js(
        b,
        "a few chart samples",
        "return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/api/stats')).length >= 4",
        vec![],
    )
    .await;
    screenshot(b, &dir.join("dashboard.png")).await;

    // ---- drain, visible ------------------------------------------------------------------
    app.state.start_drain();
    wait_js(
        b,
        "#status-pill shows Draining, with the drain banner",
        "return document.getElementById('status-pill').textContent === 'Draining'
             && getComputedStyle(document.getElementById('drain-banner')).display !== 'none'",
        vec![],
    )
    .await;
    screenshot(b, &dir.join("dashboard-draining.png")).await;
    drop(bob);
}

// ---- page helpers --------------------------------------------------------------------------

async fn find(b: &Browser, css: &str) -> fantoccini::elements::Element {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element {css}: {e}"))
}

async fn js(b: &Browser, script: &str, args: Vec<Value>) -> Value {
    b.execute(script, args)
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Poll `script` until it returns something truthy; fail with what the page shows otherwise.
async fn wait_js(b: &Browser, what: &str, script: &str, args: Vec<Value>) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = js(b, script, args.clone()).await;
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(x) => *x,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let page = js(
                b,
                "return location.pathname + '\\n' + document.body.innerText.slice(0, 3000)",
                vec![],
            )
            .await;
            panic!(
                "timed out after {DEADLINE:?} waiting for {what}; the page shows:\n{}",
                page.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_connected(b: &Browser) {
    wait_js(
        b,
        "#conn-status connected",
        "return document.getElementById('conn-status').className === 'connected'
             && !document.getElementById('composer-input').disabled",
        vec![],
    )
    .await;
}

async fn send_message(b: &Browser, text: &str) {
    let input = find(b, "#composer-input").await;
    input.send_keys(text).await.unwrap();
    find(b, "#send-btn").await.click().await.unwrap();
}

async fn wait_reply(b: &Browser, text: &str) {
    wait_js(
        b,
        &format!("an .agent-reply containing {text:?}"),
        "return [...document.querySelectorAll('.agent-reply')].some(e => e.textContent.includes(arguments[0]))",
        vec![json!(text)],
    )
    .await;
}

/// Record the URL of every WebSocket the page opens from now on (until the next navigation).
async fn spy_on_websockets(b: &Browser) {
    js(
        b,
        "if (!window.__tetherWsUrls) {
           window.__tetherWsUrls = [];
           const Native = window.WebSocket;
           window.WebSocket = class extends Native {
             constructor(url, protocols) { super(url, protocols); window.__tetherWsUrls.push(String(url)); }
           };
         }
         return true;",
        vec![],
    )
    .await;
}

async fn ws_urls_now(b: &Browser) -> Vec<String> {
    let v = js(b, "return window.__tetherWsUrls || []", vec![]).await;
    serde_json::from_value(v).unwrap()
}

async fn screenshot(b: &Browser, path: &Path) {
    let png = b.screenshot().await.expect("screenshot");
    std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `target/e2e` (or `$CARGO_TARGET_DIR/e2e`), created.
fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("e2e");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- the browser ---------------------------------------------------------------------------

struct Tools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

/// Find Debian's chromium and chromedriver; skip (or, under CI, fail) without them.
fn browser_tools() -> Option<Tools> {
    let chromium = from_env("TETHER_CHROMIUM")
        // The real binary, not the /usr/bin/chromium wrapper script (which adds its own flags).
        .or_else(|| Some(PathBuf::from("/usr/lib/chromium/chromium")).filter(|p| p.is_file()))
        .or_else(|| in_path("chromium"))
        .or_else(|| in_path("chromium-browser"));
    let chromedriver = from_env("TETHER_CHROMEDRIVER").or_else(|| in_path("chromedriver"));
    let missing: Vec<&str> = [
        ("chromium", chromium.is_none()),
        (
            "chromedriver (package chromium-driver)",
            chromedriver.is_none(),
        ),
    ]
    .into_iter()
    .filter_map(|(name, gone)| gone.then_some(name))
    .collect();
    if missing.is_empty() {
        return Some(Tools {
            chromium: chromium.unwrap(),
            chromedriver: chromedriver.unwrap(),
        });
    }
    let why = format!(
        "{} not found; install with `apt-get install -y chromium chromium-driver`",
        missing.join(" and ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("browser test cannot run: {why} (CI is set, so this is a failure)");
    }
    env::skipped("browser test", &why);
    None
}

fn from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A chromedriver child on a loopback port and the browser profile it uses; dropping it ends
/// both (and any Chromium left behind on that profile) and removes the profile.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    fn start(tools: &Tools) -> Self {
        let profile = temp_dir();
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&tools.chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!(
                    "--log-path={}",
                    profile.with_extension("chromedriver.log").display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", tools.chromedriver.display()));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("chromedriver exited early ({status})");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child,
                        port,
                        profile,
                    };
                }
                if Instant::now() > deadline {
                    child.kill().ok();
                    child.wait().ok();
                    last_err = "chromedriver did not listen within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("cannot start chromedriver: {last_err}");
    }

    async fn session(&self, tools: &Tools) -> Browser {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": tools.chromium,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-quic",
                    "--disable-dev-shm-usage",
                    "--disable-extensions",
                    "--no-default-browser-check",
                    "--window-size=1280,1000",
                    "--force-device-scale-factor=1",
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut last = None;
        // Chromium's first start on a fresh profile can be slow on a loaded machine.
        for _ in 0..2 {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(b) => return b,
                Err(e) => last = Some(e),
            }
        }
        panic!(
            "chromedriver could not start Chromium: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        );
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        kill_browsers_on_profile(&self.profile);
        std::fs::remove_dir_all(&self.profile).ok();
        std::fs::remove_file(self.profile.with_extension("chromedriver.log")).ok();
    }
}

/// Chromium processes started for this test (recognised by our own `--user-data-dir`), in case
/// the session was not closed. Killed one by one by pid.
fn kill_browsers_on_profile(profile: &Path) {
    let needle = format!("--user-data-dir={}", profile.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|&c| c == 0)
            .any(|arg| arg == needle.as_bytes())
        {
            Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status()
                .ok();
        }
    }
}
