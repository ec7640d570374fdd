#![allow(
    missing_docs,
    clippy::let_underscore_must_use,
    unreachable_pub,
    clippy::disallowed_methods
)] // temporary: this file is being split
//! The load tool behind `tether bench`: `chat`, `idle` and `churn` against a running server.
//!
//! It speaks only the wire protocol (through [`crate::client`]), so it measures Tether and the
//! bare baseline (`examples/baseline.rs`) with the very same client code: the ratio between the
//! two is the cost of Tether's machinery. Every run is bounded in count and in time and stops
//! by itself; every wait has a deadline.
//!
//! - [`chat`]: N connections over U users, each sending `user_message`s with W in flight.
//!   Latency is send to the matching `agent_completed` (matched by `reply_to`). Every frame is
//!   checked by a [`RunChecker`]: event order per run and `seq` +1 per thread. With `--stalled
//!   K`, K more connections never read while frames are published to them, and the tool times
//!   the server's slow-consumer close; `--stalled-compare` runs the load without and with them.
//! - [`idle`]: N authenticated connections held open; the server's resident memory per
//!   connection from `/proc/PID/status`. May split itself over several processes, because one
//!   process may hold at most 20,000 file descriptors here.
//! - [`churn`]: C connect/close cycles, some closed by TCP reset, some in the middle of a run;
//!   then `/api/stats` must come back to zero (connections, managers, sessions, audit rows).
//!
//! Reports are `serde` structs: `--json` prints them, otherwise a one-screen summary. The
//! library functions take a [`Target`] and options, so tests run them in-process.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::client::{Client, ClientError, ConnectOptions, SocketOptions, WsError};
use crate::config::{Config, Secret};

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// `tether bench`: the load tool.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: BenchMode,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchMode {
    /// Connections send user messages; runs/s, latency percentiles, event order and seq checks.
    Chat(ChatArgs),
    /// Connections held open; the server's resident memory per connection.
    Idle(IdleArgs),
    /// Connect/close cycles (some reset, some mid-run); then /api/stats must be back to zero.
    Churn(ChurnArgs),
}

/// Options every mode takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The server, host:port (default: --listen / TETHER_LISTEN, the server's own setting).
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Print the report as JSON on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// No progress bar (it is only drawn when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// HS256 secret to mint tokens with (default: --jwt-secret / TETHER_JWT_SECRET, else the
    /// secret the server generated in --data-dir).
    #[arg(long)]
    pub token_secret: Option<String>,
    /// PID of the server, for its memory and CPU (default: the process listening on the port).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// Spread source addresses over 127.0.0.2-127.0.0.254.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// When there are more than 10,000 connections or cycles to a loopback target.
    Auto,
    On,
    Off,
}

/// `tether bench chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections (N).
    #[arg(long, short = 'n', default_value_t = 50)]
    pub connections: u64,
    /// Users the connections are spread over (U; default: one per connection).
    #[arg(long)]
    pub users: Option<u64>,
    /// Messages per connection (M; default 100 unless --duration is given).
    #[arg(long, short = 'm')]
    pub messages: Option<u64>,
    /// Messages in flight per connection (W).
    #[arg(long, short = 'w', default_value_t = 1)]
    pub in_flight: u64,
    /// Keep sending for this long (e.g. 20s); with --messages, whichever ends first.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Longest wait for any one frame before the connection counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// The text of each message.
    #[arg(long, default_value = "hello from tether bench")]
    pub content: String,
    /// Stalled connections (K) besides the N: each is its own user (`bench-stalled-K`), upgrades
    /// with a small receive buffer, reads `connection_established` and never reads again, while
    /// the tool publishes frames to it (POST /api/users/{user}/events, admin token) until the
    /// server refuses one (its queue is full); the tool then times the server's close. A closed
    /// one is replaced by a new one until the load ends. Tether only.
    #[arg(long, default_value_t = 0)]
    pub stalled: u64,
    /// Run the load twice, without and then with --stalled K (at least 1) stalled connections,
    /// and report the others' latency with over without.
    #[arg(long)]
    pub stalled_compare: bool,
    /// Frames per second published to each stalled connection.
    #[arg(long, default_value_t = 200)]
    pub stall_rate: u64,
    /// Bytes of padding in each frame published to a stalled connection.
    #[arg(long, default_value_t = 4096)]
    pub stall_frame_bytes: u64,
}

/// `tether bench idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections (N).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: u64,
    /// Users the connections are spread over (default: one per connection).
    #[arg(long)]
    pub users: Option<u64>,
    /// How long to hold the connections open once all are established.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub hold: Duration,
    /// Processes to split the connections over (default: enough for the open-file limit).
    #[arg(long)]
    pub processes: Option<u32>,
    /// Spread source addresses over 127.0.0.2-127.0.0.254.
    #[arg(long, value_enum, default_value_t = Spread::Auto)]
    pub spread: Spread,
    /// Handshakes in progress at once (over all processes).
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: u64,
    /// Longest one connection may take to reach `connection_established`.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub connect_timeout: Duration,
    /// Internal: run as a child of a multi-process idle run.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: the child's first connection index.
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_index: u64,
    /// Internal: the child exits by itself after this long.
    #[arg(long, hide = true, value_parser = parse_duration, default_value = "10m")]
    pub child_deadline: Duration,
}

/// `tether bench churn`.
#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connect/close cycles (C).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub cycles: u64,
    /// Cycles in progress at once (K).
    #[arg(long, short = 'k', default_value_t = 32)]
    pub concurrency: u64,
    /// Fraction of cycles closed by TCP reset (SO_LINGER 0, no close frame).
    #[arg(long, value_parser = parse_fraction, default_value = "0.3")]
    pub resets: f64,
    /// Fraction of cycles closed mid-run (after the `ack` of a `user_message`).
    #[arg(long, value_parser = parse_fraction, default_value = "0.1")]
    pub midrun: f64,
    /// Users the cycles are spread over.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Cycles before the measured ones, after which the warm baseline is taken (default: a
    /// tenth of --cycles, at most 20,000: SQLite's page cache takes ~10,000 cycles to fill,
    /// and a shorter warm-up shows that growth as if it were a leak).
    #[arg(long)]
    pub warmup_cycles: Option<u64>,
    /// How long /api/stats may take to come back to zero.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub settle_timeout: Duration,
    /// Longest one cycle may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub cycle_timeout: Duration,
    /// Do not poll /api/stats (servers without it, e.g. the baseline); the run then cannot
    /// prove cleanup.
    #[arg(long)]
    pub no_stats: bool,
    /// Fail when the server's resident memory grows more than this (percent) over the warm
    /// baseline.
    #[arg(long)]
    pub max_rss_growth_pct: Option<f64>,
    /// Spread source addresses over 127.0.0.2-127.0.0.254.
    #[arg(long, value_enum, default_value_t = Spread::Auto)]
    pub spread: Spread,
}

/// Parses the defaults out of the clap definitions, so the library defaults (tests, embedding)
/// and the command line cannot drift apart.
#[derive(Parser)]
struct Defaults {
    #[command(subcommand)]
    mode: BenchMode,
}

fn defaults(mode: &str) -> BenchMode {
    // The arguments are constants and the unit test `defaults_parse` proves they parse.
    match Defaults::try_parse_from(["bench", mode]) {
        Ok(d) => d.mode,
        Err(e) => unreachable!("bench defaults do not parse: {e}"),
    }
}

impl Default for ChatArgs {
    fn default() -> Self {
        match defaults("chat") {
            BenchMode::Chat(a) => a,
            _ => unreachable!("chat parses as chat"),
        }
    }
}

impl Default for IdleArgs {
    fn default() -> Self {
        match defaults("idle") {
            BenchMode::Idle(a) => a,
            _ => unreachable!("idle parses as idle"),
        }
    }
}

impl Default for ChurnArgs {
    fn default() -> Self {
        match defaults("churn") {
            BenchMode::Churn(a) => a,
            _ => unreachable!("churn parses as churn"),
        }
    }
}

/// `250ms`, `20s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 250ms, 20s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("invalid duration unit in '{s}' (use ms, s or m)")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction between 0 and 1")),
    }
}

// ---------------------------------------------------------------------------------------------
// Target
// ---------------------------------------------------------------------------------------------

/// The server under load and what the tool needs to talk to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// HS256 secret for minting user tokens (the baseline accepts any token).
    pub jwt_secret: Secret,
    /// For `/api/stats`.
    pub admin_token: Option<Secret>,
    /// For the server's memory, file descriptors and CPU time, when it runs on this machine.
    pub server_pid: Option<u32>,
}

impl Target {
    /// From the command line and the server's configuration. Secrets are only read here,
    /// never generated: a generated one would not be the server's.
    pub fn resolve(common: &CommonArgs, config: &Config) -> anyhow::Result<Self> {
        let addr = common.target.unwrap_or(config.listen.addr);
        let jwt_secret = match (&common.token_secret, &config.auth.jwt_secret) {
            (Some(s), _) => Secret::new(s.clone()),
            (None, Some(s)) => s.clone(),
            (None, None) => {
                read_secret(&config.store.data_dir.join("jwt-secret")).with_context(|| {
                    format!(
                        "no token secret: pass --token-secret or TETHER_JWT_SECRET, or --data-dir \
                     of the server (no {}/jwt-secret)",
                        config.store.data_dir.display()
                    )
                })?
            }
        };
        let admin_token = config
            .auth
            .admin_token
            .clone()
            .or_else(|| read_secret(&config.store.data_dir.join("admin-token")).ok());
        let server_pid = common
            .server_pid
            .or_else(|| find_listening_pid(addr.port()));
        Ok(Self {
            addr,
            jwt_secret,
            admin_token,
            server_pid,
        })
    }

    fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<Secret> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(Secret::new(s))
}

/// One token per user, minted once: users `bench-u0`, `bench-u1`, ...
struct Tokens(Vec<String>);

impl Tokens {
    fn mint(target: &Target, users: u64) -> anyhow::Result<Self> {
        let auth = Auth::hs256(&target.jwt_secret);
        let tokens = (0..users.max(1))
            .map(|u| auth.mint(&format!("bench-u{u}"), Duration::from_secs(6 * 3600)))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot mint tokens")?;
        Ok(Self(tokens))
    }

    /// The token of connection `i` (connections go round-robin over the users).
    fn for_index(&self, i: u64) -> &str {
        &self.0[(i % self.0.len() as u64) as usize]
    }
}

/// Whether source addresses are spread, for `count` connections to `target`.
fn spread_on(spread: Spread, target: &SocketAddr, count: u64) -> bool {
    let loopback_v4 = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
    match spread {
        Spread::Off => false,
        Spread::On => loopback_v4,
        Spread::Auto => loopback_v4 && count > 10_000,
    }
}

/// Source address of connection `i`: 127.0.0.2-127.0.0.254 round-robin (127.0.0.1 is left
/// to everything else on the machine).
fn source_ip(on: bool, i: u64) -> Option<IpAddr> {
    on.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8)))
}

/// Connect and wait for `connection_established`; returns its `data`.
async fn connect_established(
    target: &Target,
    token: &str,
    sock: &SocketOptions,
    timeout: Duration,
) -> Result<(Client, Value), ClientError> {
    let opts = ConnectOptions {
        token: Some(token.to_string()),
        ..Default::default()
    };
    let fut = async {
        let mut client = Client::connect_with(&target.ws_base(), &opts, sock).await?;
        let first = client.next_json(timeout).await?;
        if first["type"] != "connection_established" {
            return Err(ClientError::BadFrame(format!(
                "first frame is {} instead of connection_established",
                first["type"]
            )));
        }
        Ok((client, first["data"].clone()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout("connection_established".into()))?
}

/// A short category for an error, for the error counts.
fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Ws(WsError::Http(resp)) => format!("refused: HTTP {}", resp.status().as_u16()),
        ClientError::Ws(WsError::Io(io)) => format!("io: {:?}", io.kind()),
        ClientError::Ws(other) => format!("websocket: {}", first_words(&other.to_string())),
        ClientError::Timeout(what) => format!("timeout waiting for {what}"),
        ClientError::Closed(Some((code, _))) => format!("closed by server: {code}"),
        ClientError::Closed(None) => "closed without close frame".into(),
        ClientError::BadFrame(_) => "bad frame".into(),
    }
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Counters, percentiles, progress
// ---------------------------------------------------------------------------------------------

const MAX_SAMPLES: usize = 10;

/// Errors and protocol violations of a run, shared by its tasks.
#[derive(Default)]
struct Tally {
    errors: Mutex<BTreeMap<String, u64>>,
    error_samples: Mutex<Vec<String>>,
    violations: AtomicU64,
    violation_samples: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking task cannot leave a counter map inconsistent; keep counting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tally {
    fn error(&self, kind: String, detail: impl FnOnce() -> String) {
        *lock(&self.errors).entry(kind).or_default() += 1;
        let mut s = lock(&self.error_samples);
        if s.len() < MAX_SAMPLES {
            s.push(detail());
        }
    }

    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.violation_samples);
        if s.len() < MAX_SAMPLES {
            s.push(what);
        }
    }

    fn error_total(&self) -> u64 {
        lock(&self.errors).values().sum()
    }

    fn summary(&self) -> Problems {
        Problems {
            errors: self.error_total(),
            error_counts: lock(&self.errors).clone(),
            error_samples: lock(&self.error_samples).clone(),
            violations: self.violations.load(Ordering::Relaxed),
            violation_samples: lock(&self.violation_samples).clone(),
        }
    }
}

/// Errors (the run could not do what it wanted) and violations (the server broke the protocol).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Problems {
    pub errors: u64,
    pub error_counts: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub violations: u64,
    pub violation_samples: Vec<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    /// From samples in microseconds.
    fn from_micros(mut v: Vec<u32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let n = v.len();
        let ms = |us: u32| (f64::from(us) / 10.0).round() / 100.0;
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let at = |q: f64| ms(v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
        let mean = v.iter().map(|&x| u64::from(x)).sum::<u64>() as f64 / n as f64;
        Self {
            count: n as u64,
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: ms(v[n - 1]),
            mean_ms: (mean / 10.0).round() / 100.0,
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A progress line on stderr, redrawn a few times a second; only on a terminal.
struct Progress {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `state` returns the fraction done (0 to 1) and a text such as "1200/5000 runs".
    fn start(
        enabled: bool,
        label: &'static str,
        state: impl Fn() -> (f64, String) + Send + 'static,
    ) -> Self {
        let stop = CancellationToken::new();
        if !enabled {
            return Self { stop, task: None };
        }
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {
                        let (frac, text) = state();
                        let width = 30;
                        let filled = (frac.clamp(0.0, 1.0) * width as f64) as usize;
                        let line = format!(
                            "\r\x1b[2K{label} [{}{}] {:>5.1}s {text}",
                            "#".repeat(filled),
                            "-".repeat(width - filled),
                            started.elapsed().as_secs_f64()
                        );
                        eprint!("{line}");
                    }
                }
            }
            eprint!("\r\x1b[2K");
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    async fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn progress_enabled(common: &CommonArgs) -> bool {
    !common.no_progress && std::io::stderr().is_terminal()
}

// ---------------------------------------------------------------------------------------------
// The server process: memory, descriptors, CPU (Linux /proc)
// ---------------------------------------------------------------------------------------------

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// CPU time (user + system) of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; clock ticks of
    // USER_HZ, which is 100 on every Linux ABI.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The process listening on TCP `port` (any address), found through /proc/net/tcp{,6} and the
/// processes' descriptors. Only processes of this user are visible, which is the usual case.
pub fn find_listening_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && lport == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// What a server process looked like at one moment.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProcSample {
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub threads: Option<u64>,
    pub cpu_s: Option<f64>,
}

impl ProcSample {
    fn of(pid: Option<u32>) -> Self {
        let Some(pid) = pid else {
            return Self::default();
        };
        Self {
            rss_kib: rss_kib(pid),
            fds: fd_count(pid),
            threads: status_field(pid, "Threads:"),
            cpu_s: cpu_seconds(pid),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /api/stats
// ---------------------------------------------------------------------------------------------

/// `GET path` over a fresh HTTP/1.1 connection (a few lines instead of an HTTP client crate).
async fn http_get(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(16 * 1024 * 1024).read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("GET timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .context("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("malformed chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("malformed chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        s = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// `GET /api/stats` with the admin token.
pub async fn fetch_stats(target: &Target) -> anyhow::Result<Value> {
    let token = target
        .admin_token
        .as_ref()
        .context("no admin token: set TETHER_ADMIN_TOKEN or --data-dir of the server")?;
    let (status, body) = http_get(target.addr, "/api/stats", Some(token.expose())).await?;
    if status != 200 {
        bail!("GET /api/stats answered {status}: {}", first_words(&body));
    }
    serde_json::from_str(&body).context("GET /api/stats: not JSON")
}

/// The figures churn waits for, read from `/api/stats`.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Residue {
    pub connections: Option<u64>,
    pub managers: Option<u64>,
    pub sessions_open: Option<u64>,
    pub audit_rows_open: Option<u64>,
    /// `runs.active`, when exposed: runs still going (a closed connection's run finishes).
    pub runs_active: Option<u64>,
    /// A live task count, when the server exposes one (`tasks`, `live_tasks`, `runtime.tasks`).
    pub live_tasks: Option<u64>,
}

impl Residue {
    fn from_stats(s: &Value) -> Self {
        let u = |v: &Value| v.as_u64();
        Self {
            connections: u(&s["connections"]),
            managers: u(&s["managers"]),
            sessions_open: u(&s["sessions_open"]),
            audit_rows_open: u(&s["audit_rows_open"]),
            runs_active: u(&s["runs"]["active"]),
            live_tasks: u(&s["live_tasks"])
                .or_else(|| u(&s["tasks"]))
                .or_else(|| u(&s["runtime"]["tasks"]))
                .or_else(|| u(&s["tasks"]["live"]))
                .or_else(|| u(&s["tasks"]["alive"])),
        }
    }

    /// Everything back to zero. The four the issue names must be present; active runs only
    /// count when the server reports them.
    fn is_zero(&self) -> bool {
        [
            self.connections,
            self.managers,
            self.sessions_open,
            self.audit_rows_open,
        ]
        .iter()
        .all(|v| *v == Some(0))
            && self.runs_active.unwrap_or(0) == 0
    }
}

/// Poll `/api/stats` until [`Residue::is_zero`] or the deadline. Returns (settled, last
/// figures, raw stats, seconds it took).
async fn settle(target: &Target, timeout: Duration) -> anyhow::Result<(bool, Residue, Value, f64)> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let stats = fetch_stats(target).await?;
        let r = Residue::from_stats(&stats);
        if r.is_zero() {
            return Ok((true, r, stats, started.elapsed().as_secs_f64()));
        }
        if Instant::now() >= deadline {
            return Ok((false, r, stats, started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol checker
// ---------------------------------------------------------------------------------------------

/// What one server frame meant for the runs of a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `agent_completed` for a run: send to completion, send to `ack`.
    Completed {
        latency: Duration,
        ack: Option<Duration>,
    },
    /// `agent_error` for a run, with its code.
    Failed(String),
    /// An `error` frame answering one of our messages (the run never started), with its code.
    Rejected(String),
    /// An `error` frame about nothing we sent.
    Error(String),
    /// The server broke the protocol.
    Violation(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sent,
    Acked,
    Started,
}

#[derive(Debug)]
struct Run {
    sent: Instant,
    acked: Option<Instant>,
    stage: Stage,
    run_id: Option<String>,
    open_tools: Vec<String>,
}

/// Checks one connection's frames against PROTOCOL.md: per run `ack`, `agent_started`, then
/// thinking/tool/delta events, then exactly one `agent_completed`/`agent_error`, all with the
/// `reply_to` of the message and the `run_id` of the `ack`; `seq` +1 on every thread event
/// (text deltas carry none); every frame on the connection's thread.
pub struct RunChecker {
    thread_id: String,
    last_seq: u64,
    next_id: u64,
    runs: HashMap<String, Run>,
    frames: u64,
}

/// Thread events: they carry `seq` (the `ack` carries the stored `user_message`'s).
const THREAD_EVENTS: &[&str] = &[
    "ack",
    "user_message",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
    "agent_error",
];

impl RunChecker {
    /// For a connection whose `connection_established` had this `data`.
    pub fn new(established: &Value) -> Self {
        Self {
            thread_id: established["thread_id"].as_str().unwrap_or("").to_string(),
            last_seq: established["last_seq"].as_u64().unwrap_or(0),
            next_id: 0,
            runs: HashMap::new(),
            frames: 0,
        }
    }

    /// Mint the id of the next message and start tracking its run.
    pub fn send(&mut self, now: Instant) -> String {
        let id = format!("m{}", self.next_id);
        self.next_id += 1;
        self.runs.insert(
            id.clone(),
            Run {
                sent: now,
                acked: None,
                stage: Stage::Sent,
                run_id: None,
                open_tools: Vec::new(),
            },
        );
        id
    }

    /// Runs sent and not finished.
    pub fn in_flight(&self) -> usize {
        self.runs.len()
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Check one frame; what it meant goes to `out`.
    pub fn on_frame(&mut self, v: &Value, now: Instant, out: &mut Vec<Outcome>) {
        self.frames += 1;
        let Some(kind) = v["type"].as_str() else {
            out.push(Outcome::Violation(format!(
                "frame without a type: {}",
                clip(v)
            )));
            return;
        };
        if let Some(t) = v.get("thread_id").and_then(Value::as_str) {
            if t != self.thread_id {
                out.push(Outcome::Violation(format!(
                    "{kind} for thread {t}, not this connection's {}",
                    self.thread_id
                )));
            }
        }
        self.check_seq(kind, v, out);
        let reply_to = v["reply_to"].as_str();
        match kind {
            "ack" => {
                let Some(run) = reply_to.and_then(|r| self.runs.get_mut(r)) else {
                    out.push(self.stray(kind, reply_to));
                    return;
                };
                if run.stage != Stage::Sent {
                    out.push(Outcome::Violation(format!("second ack for {reply_to:?}")));
                    return;
                }
                match v["data"]["run_id"].as_str() {
                    Some(r) => run.run_id = Some(r.to_string()),
                    None => out.push(Outcome::Violation("ack without data.run_id".into())),
                }
                run.stage = Stage::Acked;
                run.acked = Some(now);
            }
            "agent_started" | "agent_thinking" | "tool_executing" | "tool_completed"
            | "agent_text_delta" | "agent_completed" | "agent_error" => {
                let Some(id) = reply_to.filter(|r| self.runs.contains_key(*r)) else {
                    out.push(self.stray(kind, reply_to));
                    return;
                };
                let id = id.to_string();
                self.on_run_event(kind, &id, v, now, out);
            }
            "error" => {
                let code = v["data"]["code"].as_str().unwrap_or("?").to_string();
                match reply_to.and_then(|r| self.runs.get(r).map(|run| (r, run.stage))) {
                    Some((r, Stage::Sent)) => {
                        let r = r.to_string();
                        self.runs.remove(&r);
                        out.push(Outcome::Rejected(code));
                    }
                    _ => out.push(Outcome::Error(code)),
                }
            }
            "connection_established" => {
                out.push(Outcome::Violation("second connection_established".into()))
            }
            // pong, history, server events published by an operator, other connections'
            // user_message: nothing to check beyond seq.
            _ => {}
        }
    }

    fn on_run_event(
        &mut self,
        kind: &str,
        id: &str,
        v: &Value,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        let expected = match kind {
            "agent_started" => Stage::Acked,
            _ => Stage::Started,
        };
        if run.stage != expected {
            out.push(Outcome::Violation(format!(
                "{kind} for {id} while the run is {:?} (expected {expected:?})",
                run.stage
            )));
        }
        let frame_run = v["run_id"].as_str();
        if frame_run.is_none() || frame_run != run.run_id.as_deref() {
            out.push(Outcome::Violation(format!(
                "{kind} for {id} with run_id {frame_run:?}, the ack said {:?}",
                run.run_id
            )));
        }
        match kind {
            "agent_started" => run.stage = Stage::Started,
            "tool_executing" => match v["data"]["tool_call_id"].as_str() {
                Some(c) => run.open_tools.push(c.to_string()),
                None => out.push(Outcome::Violation(
                    "tool_executing without tool_call_id".into(),
                )),
            },
            "tool_completed" => {
                let call = v["data"]["tool_call_id"].as_str();
                match run.open_tools.iter().position(|c| Some(c.as_str()) == call) {
                    Some(i) => {
                        run.open_tools.swap_remove(i);
                    }
                    None => out.push(Outcome::Violation(format!(
                        "tool_completed {call:?} without its tool_executing"
                    ))),
                }
            }
            "agent_completed" => {
                if !run.open_tools.is_empty() {
                    out.push(Outcome::Violation(format!(
                        "agent_completed for {id} with tool calls still open: {:?}",
                        run.open_tools
                    )));
                }
                let latency = now.saturating_duration_since(run.sent);
                let ack = run.acked.map(|a| a.saturating_duration_since(run.sent));
                self.runs.remove(id);
                out.push(Outcome::Completed { latency, ack });
            }
            "agent_error" => {
                let code = v["data"]["code"].as_str().unwrap_or("?").to_string();
                self.runs.remove(id);
                out.push(Outcome::Failed(code));
            }
            // thinking and text deltas: the stage check above is all.
            _ => {}
        }
    }

    /// A run event whose `reply_to` is not a run in flight.
    fn stray(&self, kind: &str, reply_to: Option<&str>) -> Outcome {
        let ours = reply_to
            .and_then(|r| r.strip_prefix('m'))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < self.next_id);
        Outcome::Violation(if ours {
            format!("{kind} for {reply_to:?} after its run ended")
        } else {
            format!("{kind} with unknown reply_to {reply_to:?}")
        })
    }

    fn check_seq(&mut self, kind: &str, v: &Value, out: &mut Vec<Outcome>) {
        let top = v.get("seq");
        if kind == "agent_text_delta" {
            if top.is_some() {
                out.push(Outcome::Violation("agent_text_delta with a seq".into()));
            }
            return;
        }
        if !THREAD_EVENTS.contains(&kind) {
            return;
        }
        // The ack's seq is the stored user_message's: top level, and in data.
        let seq = match (top.map(Value::as_u64), v["data"]["seq"].as_u64()) {
            (Some(Some(s)), Some(d)) if kind == "ack" && s != d => {
                out.push(Outcome::Violation(format!("ack seq {s} but data.seq {d}")));
                s
            }
            (Some(Some(s)), _) => s,
            (None, Some(d)) if kind == "ack" => d,
            _ => {
                out.push(Outcome::Violation(format!("{kind} without an integer seq")));
                return;
            }
        };
        if seq != self.last_seq + 1 {
            out.push(Outcome::Violation(format!(
                "{kind} seq {seq} after {} (expected {})",
                self.last_seq,
                self.last_seq + 1
            )));
        }
        // Resynchronise, so one gap is one violation rather than a cascade.
        self.last_seq = seq;
    }
}

fn clip(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// chat
// ---------------------------------------------------------------------------------------------

/// The result of `tether bench chat`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    pub mode: &'static str,
    pub target: String,
    pub connections: u64,
    pub connected: u64,
    pub users: u64,
    pub in_flight: u64,
    pub messages_per_connection: Option<u64>,
    pub duration_s: Option<f64>,
    pub connect_s: f64,
    pub runs_completed: u64,
    /// Runs that ended with `agent_error`.
    pub runs_failed: u64,
    /// Messages answered with `error` instead of a run.
    pub runs_rejected: u64,
    /// Runs still open when their connection failed.
    pub runs_unfinished: u64,
    pub frames_received: u64,
    pub elapsed_s: f64,
    pub runs_per_s: f64,
    pub latency: Percentiles,
    pub ack_latency: Percentiles,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub load_tool_cpu_s: Option<f64>,
    /// The N connections' errors and violations (the stalled ones have their own).
    pub problems: Problems,
    /// With `--stalled`: what happened to the stalled connections.
    pub stalled: Option<StalledReport>,
    pub passed: bool,
}

struct ConnOutcome {
    client: Option<Client>,
    latencies: Vec<u32>,
    acks: Vec<u32>,
    failed: u64,
    rejected: u64,
    unfinished: u64,
    frames: u64,
}

/// Run the chat mode: connect N, send, check every frame, measure.
pub async fn chat(target: &Target, args: &ChatArgs) -> anyhow::Result<ChatReport> {
    if args.connections == 0 || args.in_flight == 0 {
        bail!("--connections and --in-flight must be at least 1");
    }
    if args.messages == Some(0) {
        bail!("--messages must be at least 1");
    }
    if args.stalled > 0 {
        check_stall_args(target, args)?;
    }
    let messages = match (args.messages, args.duration) {
        (None, None) => Some(100),
        (m, _) => m,
    };
    let users = args.users.unwrap_or(args.connections).max(1);
    let tokens = Tokens::mint(target, users)?;
    let tally = Arc::new(Tally::default());
    let progress_on = progress_enabled(&args.common);

    // Connect everyone first, so the measured window is messages only.
    let connect_started = Instant::now();
    let sock = SocketOptions {
        bind: None,
        nodelay: true,
        read_buffer_size: None,
    };
    let conns: Vec<(Client, Value)> = futures_util::stream::iter(0..args.connections)
        .map(|i| {
            let (tokens, sock, tally) = (&tokens, &sock, &tally);
            async move {
                match connect_established(target, tokens.for_index(i), sock, args.timeout).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tally.error(error_kind(&e), || format!("connection {i}: {e}"));
                        None
                    }
                }
            }
        })
        .buffer_unordered(64)
        .filter_map(|c| async move { c })
        .collect()
        .await;
    let connect_s = connect_started.elapsed().as_secs_f64();

    // The stalled connections start with the measured window and run alongside it; they are
    // not among the N whose latency is measured.
    let stalls = if args.stalled > 0 {
        Some(Stalls::start(target, args).await?)
    } else {
        None
    };
    let completed = Arc::new(AtomicU64::new(0));
    let expected = messages.map(|m| m * conns.len() as u64);
    let started = Instant::now();
    let stop_at = args.duration.map(|d| started + d);
    let progress = {
        let completed = completed.clone();
        let tally = tally.clone();
        let duration = args.duration;
        let stall_closed = stalls.as_ref().map(|s| s.closed.clone());
        Progress::start(progress_on, "chat", move || {
            let done = completed.load(Ordering::Relaxed);
            let elapsed = started.elapsed().as_secs_f64();
            let mut extra = format!(
                "{:.0} runs/s  errors {}  violations {}",
                done as f64 / elapsed.max(0.001),
                tally.error_total(),
                tally.violations.load(Ordering::Relaxed)
            );
            if let Some(c) = &stall_closed {
                extra += &format!("  stalled closed {}", c.load(Ordering::Relaxed));
            }
            // With both a count and a duration, whichever is further along.
            let by_count = expected.map(|t| done as f64 / t.max(1) as f64);
            let by_time = duration.map(|d| elapsed / d.as_secs_f64().max(0.001));
            let frac = by_count.into_iter().chain(by_time).fold(0.0, f64::max);
            let runs = match expected {
                Some(total) => format!("{done}/{total} runs"),
                None => format!("{done} runs"),
            };
            (frac, format!("{runs}  {extra}"))
        })
    };
    let server_cpu0 = target.server_pid.and_then(cpu_seconds);
    let self_cpu0 = cpu_seconds(std::process::id());

    let mut tasks = JoinSet::new();
    let connected = conns.len() as u64;
    for (client, est) in conns {
        let tally = tally.clone();
        let completed = completed.clone();
        let args = args.clone();
        tasks.spawn(chat_connection(
            client, est, args, messages, stop_at, tally, completed,
        ));
    }
    let mut latencies = Vec::new();
    let mut acks = Vec::new();
    let (mut failed, mut rejected, mut unfinished, mut frames) = (0, 0, 0, 0);
    let mut clients = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(o) => {
                latencies.extend(o.latencies);
                acks.extend(o.acks);
                failed += o.failed;
                rejected += o.rejected;
                unfinished += o.unfinished;
                frames += o.frames;
                clients.extend(o.client);
            }
            Err(e) => tally.error("load tool task failed".into(), || e.to_string()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = target
        .server_pid
        .and_then(cpu_seconds)
        .zip(server_cpu0)
        .map(|(b, a)| b - a);
    let self_cpu = cpu_seconds(std::process::id())
        .zip(self_cpu0)
        .map(|(b, a)| b - a);
    progress.finish().await;

    // Close outside the measured window, politely, so the server records normal closes.
    futures_util::stream::iter(clients)
        .for_each_concurrent(64, |c| async move {
            let _ = c.close().await;
        })
        .await;
    // The stalled connection in progress finishes its stall (bounded), then the figures.
    let stalled = match stalls {
        Some(s) => Some(s.finish(target).await),
        None => None,
    };

    let runs_completed = latencies.len() as u64;
    let problems = tally.summary();
    let passed = problems.violations == 0
        && problems.errors == 0
        && failed == 0
        && rejected == 0
        && unfinished == 0
        && connected == args.connections
        && stalled.as_ref().is_none_or(StalledReport::passed);
    Ok(ChatReport {
        mode: "chat",
        target: target.addr.to_string(),
        connections: args.connections,
        connected,
        users,
        in_flight: args.in_flight,
        messages_per_connection: messages,
        duration_s: args.duration.map(|d| d.as_secs_f64()),
        connect_s,
        runs_completed,
        runs_failed: failed,
        runs_rejected: rejected,
        runs_unfinished: unfinished,
        frames_received: frames,
        elapsed_s: elapsed,
        runs_per_s: runs_completed as f64 / elapsed.max(1e-9),
        latency: Percentiles::from_micros(latencies),
        ack_latency: Percentiles::from_micros(acks),
        server_pid: target.server_pid,
        server_cpu_s: server_cpu,
        load_tool_cpu_s: self_cpu,
        problems,
        stalled,
        passed,
    })
}

/// One chat connection: keep W messages in flight until M are sent or the time is up, check
/// every frame, then hand the client back for closing.
async fn chat_connection(
    mut client: Client,
    established: Value,
    args: ChatArgs,
    messages: Option<u64>,
    stop_at: Option<Instant>,
    tally: Arc<Tally>,
    completed: Arc<AtomicU64>,
) -> ConnOutcome {
    let mut checker = RunChecker::new(&established);
    let mut o = ConnOutcome {
        client: None,
        latencies: Vec::new(),
        acks: Vec::new(),
        failed: 0,
        rejected: 0,
        unfinished: 0,
        frames: 0,
    };
    let mut sent = 0u64;
    let mut outcomes = Vec::new();
    let mut alive = true;
    loop {
        while (checker.in_flight() as u64) < args.in_flight
            && messages.is_none_or(|m| sent < m)
            && stop_at.is_none_or(|t| Instant::now() < t)
        {
            let id = checker.send(Instant::now());
            let frame =
                json!({"type": "user_message", "id": id, "data": {"content": args.content}});
            if let Err(e) = client.send_json(&frame).await {
                tally.error(error_kind(&e), || format!("send: {e}"));
                alive = false;
                break;
            }
            sent += 1;
        }
        if !alive || checker.in_flight() == 0 {
            break;
        }
        let frame = match client.next_json(args.timeout).await {
            Ok(f) => f,
            Err(e) => {
                tally.error(error_kind(&e), || {
                    format!(
                        "connection failed with {} runs open: {e}",
                        checker.in_flight()
                    )
                });
                alive = false;
                break;
            }
        };
        let now = Instant::now();
        checker.on_frame(&frame, now, &mut outcomes);
        for out in outcomes.drain(..) {
            match out {
                Outcome::Completed { latency, ack } => {
                    o.latencies.push(micros(latency));
                    if let Some(a) = ack {
                        o.acks.push(micros(a));
                    }
                    completed.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed(code) => {
                    o.failed += 1;
                    tally.error(format!("agent_error {code}"), || {
                        format!("agent_error {code}: {}", clip(&frame))
                    });
                }
                Outcome::Rejected(code) => {
                    o.rejected += 1;
                    tally.error(format!("error {code}"), || {
                        format!("message refused: {}", clip(&frame))
                    });
                }
                Outcome::Error(code) => tally.error(format!("error {code}"), || clip(&frame)),
                Outcome::Violation(v) => tally.violation(v),
            }
        }
    }
    o.unfinished = checker.in_flight() as u64;
    o.frames = checker.frames();
    if alive {
        o.client = Some(client);
    }
    o
}

// ---------------------------------------------------------------------------------------------
// chat --stalled: clients that never read
// ---------------------------------------------------------------------------------------------

/// The stalled client's receive buffer (the kernel doubles it): small, so the server's writes
/// block after a few frames and its outbound queue takes the rest.
const STALL_RCVBUF: u32 = 4096;

/// How often a stalled client checks, after the overflow, whether the server closed it.
const STALL_PROBE: Duration = Duration::from_millis(5);

/// Stall records kept in the report (the figures cover all of them).
const MAX_STALL_RECORDS: usize = 20;

/// What happened to one stalled connection.
#[derive(Debug, Clone, Serialize)]
pub struct StallRecord {
    /// Its user, `bench-stalled-K`.
    pub user: String,
    /// When it read `connection_established` and stopped reading, seconds after the stalled
    /// connections started.
    pub started_s: f64,
    /// Frames published to it, and how many of them the server's queue accepted.
    pub published: u64,
    pub accepted: u64,
    /// From sending the first frame it left unread to sending the first publish the server
    /// refused (`delivered: 0`: the queue was full).
    pub stall_to_overflow_ms: Option<f64>,
    /// From sending that refused publish to the client's first write that failed because the
    /// server had closed the socket (resolution: the 5 ms probe interval).
    pub overflow_to_close_ms: Option<f64>,
    /// From the first unread frame to the close.
    pub stall_to_close_ms: Option<f64>,
    /// `closed after overflow`, or what went wrong.
    pub end: String,
}

/// The stalled connections of a `chat --stalled` run.
#[derive(Debug, Clone, Serialize)]
pub struct StalledReport {
    /// K: stalled connections at any time.
    pub connections: u64,
    pub frame_bytes: u64,
    pub publish_rate_per_s: u64,
    /// Stalled connections opened over the run (each closed one is replaced).
    pub stalls: u64,
    /// Of those, how many had a publish refused (queue full), and were then closed.
    pub overflowed: u64,
    pub closed_after_overflow: u64,
    /// Closed within one second of the refused publish being sent.
    pub closed_within_1s_of_overflow: u64,
    /// Median of frames the server accepted for one stalled connection before it overflowed
    /// (its queue plus what the socket buffers took).
    pub accepted_before_overflow_p50: Option<u64>,
    pub stall_to_overflow: Percentiles,
    pub overflow_to_close: Percentiles,
    pub stall_to_close: Percentiles,
    /// Over the run, from the server's `/metrics`: `tether_slow_consumer_closes_total` (queue
    /// overflows) and `tether_connections_closed_total{code="4009"}` (connections ended with
    /// 4009); none when `/metrics` could not be read.
    pub slow_consumer_closes: Option<u64>,
    pub closes_4009: Option<u64>,
    /// The first stalls, in order.
    pub records: Vec<StallRecord>,
    pub problems: Problems,
}

impl StalledReport {
    /// Every stalled connection overflowed and was closed, without errors.
    pub fn passed(&self) -> bool {
        self.problems.errors == 0
            && self.problems.violations == 0
            && self.stalls > 0
            && self.closed_after_overflow == self.stalls
    }
}

/// The stall figures `chat --stalled` reads from `/metrics`: (slow-consumer closes, closes
/// with 4009).
async fn slow_consumer_figures(target: &Target) -> Option<(u64, u64)> {
    let bearer = target.admin_token.as_ref().map(|t| t.expose());
    let (status, body) = http_get(target.addr, "/metrics", bearer).await.ok()?;
    if status != 200 {
        return None;
    }
    let get = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some((
        get("tether_slow_consumer_closes_total ")?,
        get("tether_connections_closed_total{code=\"4009\"} ").unwrap_or(0),
    ))
}

fn check_stall_args(target: &Target, args: &ChatArgs) -> anyhow::Result<()> {
    if target.admin_token.is_none() {
        bail!(
            "--stalled publishes to the stalled connections (POST /api/users/{{user}}/events): \
             set TETHER_ADMIN_TOKEN (or --data-dir of the server)"
        );
    }
    if args.stall_rate == 0 {
        bail!("--stall-rate must be at least 1");
    }
    Ok(())
}

/// The stalled connections of a run: K tasks, each stalling one connection after another
/// until told to stop.
struct Stalls {
    args: ChatArgs,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    records: Arc<Mutex<Vec<StallRecord>>>,
    tally: Arc<Tally>,
    /// Stalled connections the server closed so far (for the progress line).
    closed: Arc<AtomicU64>,
    metrics_before: Option<(u64, u64)>,
}

impl Stalls {
    async fn start(target: &Target, args: &ChatArgs) -> anyhow::Result<Self> {
        check_stall_args(target, args)?;
        let Some(admin) = target.admin_token.clone() else {
            bail!("no admin token");
        };
        let auth = Auth::hs256(&target.jwt_secret);
        let metrics_before = slow_consumer_figures(target).await;
        let stop = CancellationToken::new();
        let records = Arc::new(Mutex::new(Vec::new()));
        let tally = Arc::new(Tally::default());
        let closed = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let body = Arc::new(
            json!({"type": "bench_stall", "data": {"pad": "x".repeat(args.stall_frame_bytes as usize)}})
                .to_string(),
        );
        let mut tasks = JoinSet::new();
        for k in 0..args.stalled {
            let user = format!("bench-stalled-{k}");
            let token = auth
                .mint(&user, Duration::from_secs(6 * 3600))
                .context("cannot mint tokens")?;
            let slot = StallSlot {
                target: target.clone(),
                args: args.clone(),
                user,
                token,
                admin: admin.clone(),
                body: body.clone(),
                started,
                tally: tally.clone(),
                closed: closed.clone(),
            };
            let (stop, records) = (stop.clone(), records.clone());
            tasks.spawn(async move {
                let mut http = HttpConn::new(slot.target.addr);
                while !stop.is_cancelled() {
                    let (record, again) = slot.stall_once(&mut http).await;
                    lock(&records).push(record);
                    if !again {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            args: args.clone(),
            stop,
            tasks,
            records,
            tally,
            closed,
            metrics_before,
        })
    }

    /// Let the stalls in progress finish (each is bounded), then sum them up.
    async fn finish(mut self, target: &Target) -> StalledReport {
        self.stop.cancel();
        // One stall: connect, overflow and close, each within --timeout.
        let bound = self.args.timeout * 3 + Duration::from_secs(5);
        let finished = tokio::time::timeout(bound, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            self.tasks.abort_all();
            self.tally
                .error("stalled connection did not finish".into(), || {
                    format!("a stall was still going {bound:?} after the load ended")
                });
        }
        let metrics_after = slow_consumer_figures(target).await;
        let delta = self
            .metrics_before
            .zip(metrics_after)
            .map(|(a, b)| (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)));
        let records = std::mem::take(&mut *lock(&self.records));
        let micros_of = |f: fn(&StallRecord) -> Option<f64>| -> Vec<u32> {
            records
                .iter()
                .filter_map(f)
                .map(|ms| (ms * 1000.0).round() as u32)
                .collect()
        };
        let overflow_to_close = micros_of(|r| r.overflow_to_close_ms);
        let mut accepted: Vec<u64> = records
            .iter()
            .filter(|r| r.stall_to_overflow_ms.is_some())
            .map(|r| r.accepted)
            .collect();
        accepted.sort_unstable();
        StalledReport {
            connections: self.args.stalled,
            frame_bytes: self.args.stall_frame_bytes,
            publish_rate_per_s: self.args.stall_rate,
            stalls: records.len() as u64,
            overflowed: records
                .iter()
                .filter(|r| r.stall_to_overflow_ms.is_some())
                .count() as u64,
            closed_after_overflow: overflow_to_close.len() as u64,
            closed_within_1s_of_overflow: overflow_to_close
                .iter()
                .filter(|&&us| us <= 1_000_000)
                .count() as u64,
            accepted_before_overflow_p50: accepted
                .get(accepted.len().saturating_sub(1) / 2)
                .copied(),
            stall_to_overflow: Percentiles::from_micros(micros_of(|r| r.stall_to_overflow_ms)),
            overflow_to_close: Percentiles::from_micros(overflow_to_close),
            stall_to_close: Percentiles::from_micros(micros_of(|r| r.stall_to_close_ms)),
            slow_consumer_closes: delta.map(|d| d.0),
            closes_4009: delta.map(|d| d.1),
            records: records.into_iter().take(MAX_STALL_RECORDS).collect(),
            problems: self.tally.summary(),
        }
    }
}

/// One of the K stalled connections, reopened after every close.
struct StallSlot {
    target: Target,
    args: ChatArgs,
    user: String,
    token: String,
    admin: Secret,
    /// The publish request's body.
    body: Arc<String>,
    started: Instant,
    tally: Arc<Tally>,
    closed: Arc<AtomicU64>,
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    (b.saturating_duration_since(a).as_secs_f64() * 100_000.0).round() / 100.0
}

impl StallSlot {
    /// One stalled connection: upgrade, read `connection_established`, then never read again
    /// while frames are published to it until the server refuses one; then probe until the
    /// server has closed it. Returns the record and whether to stall another one.
    async fn stall_once(&self, http: &mut HttpConn) -> (StallRecord, bool) {
        let timeout = self.args.timeout;
        let mut rec = StallRecord {
            user: self.user.clone(),
            started_s: 0.0,
            published: 0,
            accepted: 0,
            stall_to_overflow_ms: None,
            overflow_to_close_ms: None,
            stall_to_close_ms: None,
            end: String::new(),
        };
        let (mut sock, est) =
            match tokio::time::timeout(timeout, raw_upgrade(self.target.addr, &self.token)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.tally.error("stalled: connect failed".into(), || {
                        format!("{}: {e:#}", self.user)
                    });
                    rec.end = format!("connect failed: {e:#}");
                    return (rec, false);
                }
                Err(_) => {
                    self.tally.error("stalled: connect timed out".into(), || {
                        format!(
                            "{}: no connection_established within {timeout:?}",
                            self.user
                        )
                    });
                    rec.end = "connect timed out".into();
                    return (rec, false);
                }
            };
        let stall_start = Instant::now();
        rec.started_s = stall_start.duration_since(self.started).as_secs_f64();

        // Publish at the set rate until the server refuses a frame: the queue is full.
        let path = format!("/api/users/{}/events", self.user);
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.args.stall_rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let overflow_deadline = stall_start + timeout;
        let mut first_unread: Option<Instant> = None;
        let mut overflow: Option<Instant> = None;
        while Instant::now() < overflow_deadline {
            tick.tick().await;
            let sent = Instant::now();
            let r = http.post_json(&path, self.admin.expose(), &self.body).await;
            rec.published += 1;
            let delivered = match r {
                Ok((200, body)) => serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["delivered"].as_u64()),
                Ok((status, body)) => {
                    self.tally
                        .error(format!("stalled: publish answered {status}"), || {
                            format!("POST {path}: {status} {}", first_words(&body))
                        });
                    rec.end = format!("publish answered {status}");
                    return (rec, false);
                }
                Err(e) => {
                    self.tally.error("stalled: publish failed".into(), || {
                        format!("POST {path}: {e:#}")
                    });
                    rec.end = format!("publish failed: {e:#}");
                    return (rec, false);
                }
            };
            first_unread.get_or_insert(sent);
            match delivered {
                Some(0) => {
                    overflow = Some(sent);
                    break;
                }
                Some(_) => rec.accepted += 1,
                None => {
                    self.tally
                        .error("stalled: publish answer without delivered".into(), || {
                            format!("POST {path}: no \"delivered\" in the answer")
                        });
                    rec.end = "publish answer without delivered".into();
                    return (rec, false);
                }
            }
        }
        let first_unread = first_unread.unwrap_or(stall_start);
        if let Some(o) = overflow {
            rec.stall_to_overflow_ms = Some(ms_between(first_unread, o));
        }

        // Probe: trickle the bytes of a frame that never completes. The server, stuck in a
        // write to this socket, does not read them, so when it drops the connection the
        // kernel resets it, and the next write here fails.
        let max_len = est["data"]["limits"]["max_message_bytes"]
            .as_u64()
            .unwrap_or(65_536)
            .clamp(126, 65_535) as u16;
        let mut probe = vec![0x81, 0x80 | 126];
        probe.extend_from_slice(&max_len.to_be_bytes());
        probe.extend_from_slice(&[0x5a, 0x5a, 0x5a, 0x5a, b'x']);
        let mut payload_sent = 1u64;
        let close_deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(STALL_PROBE);
        let closed = loop {
            tick.tick().await;
            if payload_sent + 1 < u64::from(max_len) {
                // Written, or not yet (the send buffer is full): still open.
                let write = tokio::time::timeout(STALL_PROBE, sock.write_all(&probe)).await;
                if let Ok(Err(_)) = write {
                    break Some(Instant::now());
                }
                if probe.len() > 1 {
                    probe = vec![b'x'];
                } else {
                    payload_sent += 1;
                }
            }
            if Instant::now() >= close_deadline {
                break None;
            }
        };
        drop(sock);
        if let Some(c) = closed {
            self.closed.fetch_add(1, Ordering::Relaxed);
            rec.stall_to_close_ms = Some(ms_between(first_unread, c));
        }
        rec.end = match (overflow, closed) {
            (Some(o), Some(c)) => {
                rec.overflow_to_close_ms = Some(ms_between(o, c));
                "closed after overflow".into()
            }
            (Some(_), None) => {
                self.tally
                    .error("stalled: not closed after overflow".into(), || {
                        format!(
                            "{}: still open {timeout:?} after its queue overflowed",
                            self.user
                        )
                    });
                "not closed after overflow".into()
            }
            (None, Some(_)) => {
                self.tally
                    .error("stalled: closed before overflow".into(), || {
                        format!(
                            "{}: closed without a refused publish ({} accepted)",
                            self.user, rec.accepted
                        )
                    });
                "closed before overflow".into()
            }
            (None, None) => {
                self.tally.error("stalled: no overflow".into(), || {
                    format!(
                        "{}: {} frames accepted in {timeout:?}, no overflow, no close",
                        self.user, rec.accepted
                    )
                });
                "neither overflowed nor closed".into()
            }
        };
        (rec, true)
    }
}

/// Upgrade a raw TCP socket with a small receive buffer and read `connection_established` (and
/// nothing else): a client that then never reads again.
async fn raw_upgrade(
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<(tokio::net::TcpStream, Value)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_recv_buffer_size(STALL_RCVBUF)?;
    let mut s = socket.connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut head_end = None;
    loop {
        if head_end.is_none() {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let status = String::from_utf8_lossy(&buf[..i]);
                let status = status.lines().next().unwrap_or("").to_string();
                if status.split_whitespace().nth(1) != Some("101") {
                    bail!("upgrade refused: {status}");
                }
                head_end = Some(i + 4);
            }
        }
        if let Some(h) = head_end {
            if let Some(v) = first_server_frame(&buf[h..])? {
                if v["type"] != "connection_established" {
                    bail!(
                        "first frame is {} instead of connection_established",
                        v["type"]
                    );
                }
                return Ok((s, v));
            }
        }
        if buf.len() > 256 * 1024 {
            bail!("no connection_established in the first 256 KiB");
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before connection_established");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The first WebSocket frame in `b` (a server's: unmasked), as JSON, once it is complete.
fn first_server_frame(b: &[u8]) -> anyhow::Result<Option<Value>> {
    let (len, at) = match b {
        [_, l, ..] if l & 0x80 != 0 => bail!("masked frame from the server"),
        [_, 126, x, y, ..] => (usize::from(u16::from_be_bytes([*x, *y])), 4),
        [_, 127, rest @ ..] if rest.len() >= 8 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&rest[..8]);
            (
                usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                10,
            )
        }
        [_, l, ..] if *l < 126 => (usize::from(*l), 2),
        _ => return Ok(None),
    };
    if b[0] & 0x0f != 1 {
        bail!("first frame has opcode {}, not text", b[0] & 0x0f);
    }
    if len > 1024 * 1024 {
        bail!("first frame of {len} bytes");
    }
    match b.get(at..at + len) {
        Some(payload) => Ok(Some(
            serde_json::from_slice(payload).context("first frame is not JSON")?,
        )),
        None => Ok(None),
    }
}

/// A kept-alive HTTP/1.1 connection for POSTs (a few lines instead of an HTTP client crate).
struct HttpConn {
    addr: SocketAddr,
    conn: Option<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl HttpConn {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// POST a JSON body; the status and body of the answer. Bounded in time.
    async fn post_json(
        &mut self,
        path: &str,
        bearer: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {bearer}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        // A kept-alive connection the server closed in the meantime fails at once: one more try
        // on a new connection.
        for _ in 0..2 {
            let reused = self.conn.is_some();
            if !reused {
                let s = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(self.addr),
                )
                .await
                .context("connect timed out")??;
                s.set_nodelay(true)?;
                self.conn = Some(tokio::io::BufReader::new(s));
            }
            let Some(conn) = self.conn.as_mut() else {
                bail!("no connection");
            };
            match tokio::time::timeout(Duration::from_secs(10), http_exchange(conn, &req)).await {
                Ok(Ok((status, body, keep))) => {
                    if !keep {
                        self.conn = None;
                    }
                    return Ok((status, body));
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    if !reused {
                        return Err(e);
                    }
                }
                Err(_) => {
                    self.conn = None;
                    bail!("POST {path} timed out");
                }
            }
        }
        bail!("POST {path}: the connection failed twice")
    }
}

/// Write one request, read one answer with a Content-Length body: (status, body, keep-alive).
async fn http_exchange(
    c: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    req: &str,
) -> anyhow::Result<(u16, String, bool)> {
    c.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    let mut head = (&mut *c).take(64 * 1024);
    head.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP status line {line:?}"))?;
    let (mut len, mut keep) = (None, true);
    loop {
        line.clear();
        if head.read_line(&mut line).await? == 0 {
            bail!("connection closed in the middle of an HTTP answer");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            len = value.parse::<usize>().ok();
        } else if name == "connection" && value.eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    let len = len.context("HTTP answer without Content-Length")?;
    if len > 1024 * 1024 {
        bail!("HTTP answer of {len} bytes");
    }
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}

// ---------------------------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------------------------

/// The result of `tether bench idle`.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub mode: &'static str,
    pub target: String,
    pub connections: u64,
    pub connected: u64,
    pub failed: u64,
    /// Connections that ended while they should have been held.
    pub lost: u64,
    pub users: u64,
    pub processes: u32,
    pub source_addresses: u64,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub hold_s: f64,
    pub server_pid: Option<u32>,
    /// Before the first connection.
    pub server_before: ProcSample,
    /// At the end of the hold, every connection open.
    pub server_held: ProcSample,
    /// Highest resident memory seen during the hold.
    pub server_rss_peak_kib: Option<u64>,
    /// (held - before) / connected, in bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// What a million such connections would need, in GiB (the memory figure only).
    pub projected_rss_per_million_gib: Option<f64>,
    pub problems: Problems,
    pub passed: bool,
}

/// Which idle connections one process opens, and how.
struct ShareSpec {
    /// Global connection indexes: users and source addresses follow them.
    range: Range<u64>,
    spread: bool,
    concurrency: u64,
    connect_timeout: Duration,
}

/// One process's share of idle connections, held open until `stop`.
struct IdleShare {
    connected: u64,
    failed: u64,
    lost: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl IdleShare {
    /// Open the connections of `spec`, each in its own task, and wait until every one is
    /// established or has failed.
    async fn open(
        target: &Target,
        tokens: Arc<Tokens>,
        spec: ShareSpec,
        tally: Arc<Tally>,
        progress: Arc<AtomicU64>,
    ) -> Self {
        let ShareSpec {
            range,
            spread,
            concurrency,
            connect_timeout,
        } = spec;
        let permits = Arc::new(Semaphore::new(concurrency.max(1) as usize));
        let stop = CancellationToken::new();
        let lost = Arc::new(AtomicU64::new(0));
        let n = range.end - range.start;
        let (tx, mut rx) = mpsc::channel::<bool>(1024);
        let mut tasks = JoinSet::new();
        for i in range {
            let (target, tokens, permits, stop, lost, tx, tally) = (
                target.clone(),
                tokens.clone(),
                permits.clone(),
                stop.clone(),
                lost.clone(),
                tx.clone(),
                tally.clone(),
            );
            tasks.spawn(async move {
                let sock = SocketOptions {
                    bind: source_ip(spread, i),
                    nodelay: true,
                    // The smallest useful buffer: an idle client reads a few small frames.
                    read_buffer_size: Some(4096),
                };
                let conn = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = connect_established(&target, tokens.for_index(i), &sock, connect_timeout) => r,
                    }
                };
                let mut client = match conn {
                    Ok((c, _)) => {
                        let _ = tx.send(true).await;
                        c
                    }
                    Err(e) => {
                        tally.error(error_kind(&e), || format!("connection {i}: {e}"));
                        let _ = tx.send(false).await;
                        return;
                    }
                };
                drop(tx);
                // Hold: keep reading, which also answers the server's pings.
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = client.next_json(Duration::from_secs(3600)) => match r {
                            Ok(_) | Err(ClientError::Timeout(_)) => continue,
                            Err(e) => {
                                lost.fetch_add(1, Ordering::Relaxed);
                                tally.error(format!("lost: {}", error_kind(&e)), || format!("connection {i} lost: {e}"));
                                break;
                            }
                        },
                    }
                }
                // Dropping the client closes the socket (FIN); the server cleans up.
            });
        }
        drop(tx);
        let (mut connected, mut failed) = (0, 0);
        for _ in 0..n {
            match rx.recv().await {
                Some(true) => connected += 1,
                Some(false) => failed += 1,
                None => break,
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            connected,
            failed,
            lost,
            stop,
            tasks,
        }
    }

    /// Close every connection and wait for the tasks (bounded).
    async fn close(mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// Most descriptors one process may use for connections: the hard limit here is 20,000 and
/// cannot be raised; the rest is left for the runtime, stdio and the odd HTTP request.
fn fd_budget() -> u64 {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(1024);
    limit.saturating_sub(200).max(100)
}

/// A child's report line.
#[derive(Debug, Serialize, serde::Deserialize)]
struct ChildLine {
    event: String,
    connected: u64,
    failed: u64,
    lost: u64,
    #[serde(default)]
    errors: BTreeMap<String, u64>,
    #[serde(default)]
    samples: Vec<String>,
}

/// Run the idle mode.
pub async fn idle(target: &Target, args: &IdleArgs) -> anyhow::Result<IdleReport> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let users = args.users.unwrap_or(args.connections).max(1);
    let budget = fd_budget();
    let processes = match args.processes {
        Some(0) => bail!("--processes must be at least 1"),
        Some(p) => p,
        None => args.connections.div_ceil(budget) as u32,
    };
    let per_process = args.connections.div_ceil(u64::from(processes));
    if per_process > budget {
        bail!(
            "{per_process} connections per process exceed the open-file budget of {budget}: \
             use --processes {} or more",
            args.connections.div_ceil(budget)
        );
    }
    let spread = spread_on(args.spread, &target.addr, args.connections);
    let tally = Arc::new(Tally::default());
    let progress_n = Arc::new(AtomicU64::new(0));
    let pid = target.server_pid;
    let before = ProcSample::of(pid);

    let progress = {
        let n = progress_n.clone();
        let total = args.connections;
        Progress::start(progress_enabled(&args.common), "idle", move || {
            let n = n.load(Ordering::Relaxed);
            (
                n as f64 / total as f64,
                format!("{n}/{total} connected or failed"),
            )
        })
    };
    let started = Instant::now();
    let (connected, failed, lost, holder) = if processes == 1 {
        let tokens = Arc::new(Tokens::mint(target, users)?);
        let spec = ShareSpec {
            range: 0..args.connections,
            spread,
            concurrency: args.connect_concurrency,
            connect_timeout: args.connect_timeout,
        };
        let share = IdleShare::open(target, tokens, spec, tally.clone(), progress_n.clone()).await;
        (
            share.connected,
            share.failed,
            share.lost.clone(),
            Holder::Local(share),
        )
    } else {
        let children = spawn_children(target, args, processes, users, spread).await?;
        let (c, f, kids) = children.wait_ready(&tally, &progress_n, args).await;
        (c, f, Arc::new(AtomicU64::new(0)), Holder::Children(kids))
    };
    let connect_s = started.elapsed().as_secs_f64();
    progress.finish().await;

    // Hold, sampling the server's memory; the last sample is the figure.
    let hold_started = Instant::now();
    let mut peak = before.rss_kib;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Some(r) = pid.and_then(rss_kib) {
            peak = Some(peak.map_or(r, |p| p.max(r)));
        }
        if hold_started.elapsed() >= args.hold {
            break;
        }
    }
    let held = ProcSample::of(pid);
    let hold_s = hold_started.elapsed().as_secs_f64();
    let lost = match holder {
        Holder::Local(share) => {
            let l = lost.load(Ordering::Relaxed);
            share.close().await;
            l
        }
        Holder::Children(kids) => kids.stop(&tally).await,
    };

    let per_conn = match (before.rss_kib, held.rss_kib) {
        (Some(a), Some(b)) if connected > 0 => {
            Some((b as f64 - a as f64) * 1024.0 / connected as f64)
        }
        _ => None,
    };
    let problems = tally.summary();
    let passed =
        problems.violations == 0 && failed == 0 && lost == 0 && connected == args.connections;
    Ok(IdleReport {
        mode: "idle",
        target: target.addr.to_string(),
        connections: args.connections,
        connected,
        failed,
        lost,
        users,
        processes,
        source_addresses: if spread { 253 } else { 1 },
        connect_s,
        connects_per_s: connected as f64 / connect_s.max(1e-9),
        hold_s,
        server_pid: pid,
        server_before: before,
        server_held: held,
        server_rss_peak_kib: peak,
        rss_per_connection_bytes: per_conn.map(|b| b.round()),
        projected_rss_per_million_gib: per_conn
            .map(|b| (b * 1e6 / (1u64 << 30) as f64 * 100.0).round() / 100.0),
        problems,
        passed,
    })
}

enum Holder {
    Local(IdleShare),
    Children(Children),
}

/// The child processes of a multi-process idle run. Each opens its share, prints a `ready`
/// line, holds until its stdin closes (or its own deadline), then prints a `done` line.
struct Children {
    kids: Vec<Child>,
}

struct Child {
    proc: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stdin: Option<tokio::process::ChildStdin>,
}

async fn spawn_children(
    target: &Target,
    args: &IdleArgs,
    processes: u32,
    users: u64,
    spread: bool,
) -> anyhow::Result<Children> {
    let exe = std::env::current_exe().context("cannot find the tether binary to spawn")?;
    let n = args.connections;
    let k = u64::from(processes);
    // A child that loses its parent still ends: connect time, hold and a margin.
    let deadline = args.connect_timeout * 4 + args.hold + Duration::from_secs(120);
    let mut kids = Vec::new();
    for p in 0..k {
        let first = n * p / k;
        let count = n * (p + 1) / k - first;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["bench", "idle", "--child", "--no-progress"])
            .arg("--target")
            .arg(target.addr.to_string())
            .arg("--connections")
            .arg(count.to_string())
            .arg("--first-index")
            .arg(first.to_string())
            .arg("--users")
            .arg(users.to_string())
            .arg("--spread")
            .arg(if spread { "on" } else { "off" })
            .arg("--connect-concurrency")
            .arg((args.connect_concurrency / k).max(1).to_string())
            .arg("--connect-timeout")
            .arg(format!("{}ms", args.connect_timeout.as_millis()))
            .arg("--child-deadline")
            .arg(format!("{}ms", deadline.as_millis()))
            // The secret goes by environment, not on a command line others can read.
            .env("TETHER_JWT_SECRET", target.jwt_secret.expose())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut proc = cmd.spawn().context("cannot spawn an idle child")?;
        let stdout = proc.stdout.take().context("child without stdout")?;
        let stdin = proc.stdin.take();
        kids.push(Child {
            proc,
            lines: tokio::io::BufReader::new(stdout).lines(),
            stdin,
        });
    }
    Ok(Children { kids })
}

impl Children {
    async fn read_line(child: &mut Child, until: Instant) -> Option<ChildLine> {
        loop {
            match tokio::time::timeout_at(until, child.lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    if let Ok(line) = serde_json::from_str::<ChildLine>(&l) {
                        return Some(line);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Wait for every child's `ready` line.
    async fn wait_ready(
        mut self,
        tally: &Tally,
        progress: &AtomicU64,
        args: &IdleArgs,
    ) -> (u64, u64, Self) {
        let until = Instant::now() + args.connect_timeout * 4 + Duration::from_secs(60);
        let (mut connected, mut failed) = (0, 0);
        for (i, kid) in self.kids.iter_mut().enumerate() {
            match Self::read_line(kid, until).await {
                Some(l) => {
                    connected += l.connected;
                    failed += l.failed;
                    progress.fetch_add(l.connected + l.failed, Ordering::Relaxed);
                    merge_child_errors(tally, &l);
                }
                None => tally.error("child failed".into(), || {
                    format!("idle child {i} did not report ready")
                }),
            }
        }
        (connected, failed, self)
    }

    /// Close the children's stdin (their signal to stop), collect `done` lines, reap them.
    async fn stop(mut self, tally: &Tally) -> u64 {
        for kid in &mut self.kids {
            kid.stdin.take();
        }
        let until = Instant::now() + Duration::from_secs(60);
        let mut lost = 0;
        for (i, kid) in self.kids.iter_mut().enumerate() {
            match Self::read_line(kid, until).await {
                Some(l) => {
                    lost += l.lost;
                    merge_child_errors(tally, &l);
                }
                None => tally.error("child failed".into(), || {
                    format!("idle child {i} did not report done")
                }),
            }
            if tokio::time::timeout_at(until, kid.proc.wait())
                .await
                .is_err()
            {
                let _ = kid.proc.start_kill();
            }
        }
        lost
    }
}

fn merge_child_errors(tally: &Tally, l: &ChildLine) {
    for (kind, n) in &l.errors {
        *lock(&tally.errors).entry(kind.clone()).or_default() += n;
    }
    let mut s = lock(&tally.error_samples);
    for sample in &l.samples {
        if s.len() < MAX_SAMPLES {
            s.push(sample.clone());
        }
    }
}

/// The child side of a multi-process idle run.
async fn idle_child(target: &Target, args: &IdleArgs) -> anyhow::Result<()> {
    let users = args.users.unwrap_or(args.connections).max(1);
    let tokens = Arc::new(Tokens::mint(target, users)?);
    let tally = Arc::new(Tally::default());
    let range = args.first_index..args.first_index + args.connections;
    let spread = args.spread == Spread::On;
    let deadline = Instant::now() + args.child_deadline;
    let spec = ShareSpec {
        range,
        spread,
        concurrency: args.connect_concurrency,
        connect_timeout: args.connect_timeout,
    };
    let share = IdleShare::open(
        target,
        tokens,
        spec,
        tally.clone(),
        Arc::new(AtomicU64::new(0)),
    )
    .await;
    let line = |event: &str, lost: u64| {
        let p = tally.summary();
        serde_json::to_string(&ChildLine {
            event: event.into(),
            connected: share.connected,
            failed: share.failed,
            lost,
            errors: p.error_counts,
            samples: p.error_samples,
        })
        .unwrap_or_default()
    };
    // The parent's counts are merged from these lines; start the done line's from zero.
    println!("{}", line("ready", 0));
    *lock(&tally.errors) = BTreeMap::new();
    lock(&tally.error_samples).clear();
    // Hold until the parent closes our stdin (or dies), or our own deadline. A plain thread
    // reads stdin: tokio's stdin read cannot be cancelled and would hold up the runtime's
    // shutdown, while a detached thread ends with the process.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    let _ = tokio::time::timeout_at(deadline, rx).await;
    let lost = share.lost.load(Ordering::Relaxed);
    println!("{}", line("done", lost));
    share.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// churn
// ---------------------------------------------------------------------------------------------

/// The result of `tether bench churn`.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub mode: &'static str,
    pub target: String,
    pub cycles: u64,
    pub warmup_cycles: u64,
    pub concurrency: u64,
    pub users: u64,
    pub cycles_ok: u64,
    pub resets: u64,
    pub midrun: u64,
    pub clean_closes: u64,
    pub source_addresses: u64,
    pub elapsed_s: f64,
    pub cycles_per_s: f64,
    /// Whether /api/stats was polled.
    pub stats_checked: bool,
    /// Everything at zero after the warm-up.
    pub warm_settled: Option<bool>,
    pub warm: Option<Residue>,
    pub warm_server: ProcSample,
    /// Everything at zero at the end.
    pub settled: Option<bool>,
    pub settle_s: Option<f64>,
    pub end: Option<Residue>,
    pub end_server: ProcSample,
    /// End resident memory over the warm baseline, in percent.
    pub rss_growth_pct: Option<f64>,
    /// `/api/stats` at the end, as the server sent it.
    pub end_stats: Option<Value>,
    pub problems: Problems,
    pub passed: bool,
}

/// The golden ratio's and sqrt(2)'s fractional parts: low-discrepancy sequences, so any stretch
/// of cycles has very nearly the asked fractions of resets and mid-run closes, independently.
const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
const SQRT2_FRAC: f64 = 0.414_213_562_373_095_1;

fn cycle_kind(i: u64, resets: f64, midrun: f64) -> (bool, bool) {
    let x = i as f64;
    (
        (x * PHI_FRAC).fract() < resets,
        (x * SQRT2_FRAC).fract() < midrun,
    )
}

#[derive(Default)]
struct ChurnCounts {
    ok: AtomicU64,
    resets: AtomicU64,
    midrun: AtomicU64,
    clean: AtomicU64,
}

/// One cycle: connect, maybe start a run and wait for its ack, then reset or close.
async fn churn_cycle(
    target: &Target,
    token: &str,
    i: u64,
    args: &ChurnArgs,
    spread: bool,
    tally: &Tally,
    counts: &ChurnCounts,
) {
    let (reset, midrun) = cycle_kind(i, args.resets, args.midrun);
    let sock = SocketOptions {
        bind: source_ip(spread, i),
        nodelay: true,
        read_buffer_size: Some(4096),
    };
    let fut = async {
        let (mut client, est) =
            connect_established(target, token, &sock, args.cycle_timeout).await?;
        if midrun {
            let mut checker = RunChecker::new(&est);
            let id = checker.send(Instant::now());
            client
                .send_json(&json!({"type": "user_message", "id": id, "data": {"content": "churn"}}))
                .await?;
            // The ack is the first frame for this message; anything before it is checked too.
            let mut out = Vec::new();
            loop {
                let f = client.next_json(args.cycle_timeout).await?;
                checker.on_frame(&f, Instant::now(), &mut out);
                for o in out.drain(..) {
                    match o {
                        Outcome::Violation(v) => tally.violation(v),
                        Outcome::Rejected(c) | Outcome::Error(c) | Outcome::Failed(c) => {
                            tally.error(format!("error {c}"), || clip(&f))
                        }
                        Outcome::Completed { .. } => {}
                    }
                }
                if f["type"] == "ack" || f["type"] == "error" {
                    break;
                }
            }
            counts.midrun.fetch_add(1, Ordering::Relaxed);
        }
        if reset {
            client.abort();
            counts.resets.fetch_add(1, Ordering::Relaxed);
        } else {
            client.close().await?;
            counts.clean.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<_, ClientError>(())
    };
    match tokio::time::timeout(args.cycle_timeout * 2, fut).await {
        Ok(Ok(())) => {
            counts.ok.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => tally.error(error_kind(&e), || format!("cycle {i}: {e}")),
        Err(_) => tally.error("cycle timed out".into(), || format!("cycle {i} timed out")),
    }
}

/// Run `range` cycles with `args.concurrency` at once.
async fn churn_cycles(
    target: &Target,
    tokens: &Tokens,
    range: Range<u64>,
    args: &ChurnArgs,
    spread: bool,
    tally: &Tally,
    counts: &ChurnCounts,
) {
    futures_util::stream::iter(range)
        .for_each_concurrent(args.concurrency.max(1) as usize, |i| {
            churn_cycle(target, tokens.for_index(i), i, args, spread, tally, counts)
        })
        .await;
}

/// Run the churn mode.
pub async fn churn(target: &Target, args: &ChurnArgs) -> anyhow::Result<ChurnReport> {
    if args.cycles == 0 || args.concurrency == 0 {
        bail!("--cycles and --concurrency must be at least 1");
    }
    let check_stats = !args.no_stats;
    if check_stats && target.admin_token.is_none() {
        bail!("churn polls /api/stats: set TETHER_ADMIN_TOKEN (or --data-dir of the server), or pass --no-stats");
    }
    let warmup = args.warmup_cycles.unwrap_or((args.cycles / 10).min(20_000));
    let users = args.users.max(1);
    let tokens = Tokens::mint(target, users)?;
    let spread = spread_on(args.spread, &target.addr, args.cycles + warmup);
    let progress_on = progress_enabled(&args.common);

    // Warm-up, then the baseline the end is compared with.
    let warm_tally = Tally::default();
    churn_cycles(
        target,
        &tokens,
        0..warmup,
        args,
        spread,
        &warm_tally,
        &ChurnCounts::default(),
    )
    .await;
    let (warm_settled, warm) = if check_stats {
        let (ok, r, _, _) = settle(target, args.settle_timeout).await?;
        (Some(ok), Some(r))
    } else {
        (None, None)
    };
    let warm_server = ProcSample::of(target.server_pid);

    let tally = Arc::new(Tally::default());
    let counts = Arc::new(ChurnCounts::default());
    let progress = {
        let (tally, counts) = (tally.clone(), counts.clone());
        let total = args.cycles;
        Progress::start(progress_on, "churn", move || {
            let ok = counts.ok.load(Ordering::Relaxed);
            let errors = tally.error_total();
            (
                (ok + errors) as f64 / total as f64,
                format!("{}/{total} cycles  errors {errors}", ok + errors),
            )
        })
    };
    let started = Instant::now();
    churn_cycles(
        target,
        &tokens,
        warmup..warmup + args.cycles,
        args,
        spread,
        &tally,
        &counts,
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish().await;

    let (settled, settle_s, end, end_stats) = if check_stats {
        let (ok, r, raw, s) = settle(target, args.settle_timeout).await?;
        (Some(ok), Some(s), Some(r), Some(raw))
    } else {
        (None, None, None, None)
    };
    let end_server = ProcSample::of(target.server_pid);
    let rss_growth_pct = match (warm_server.rss_kib, end_server.rss_kib) {
        (Some(a), Some(b)) if a > 0 => {
            Some(((b as f64 - a as f64) * 100.0 / a as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    // Warm-up errors count too: they are the same server under the same load.
    for (kind, n) in lock(&warm_tally.errors).iter() {
        *lock(&tally.errors)
            .entry(format!("warm-up {kind}"))
            .or_default() += n;
    }
    let warm_violations = warm_tally.violations.load(Ordering::Relaxed);
    for v in lock(&warm_tally.violation_samples).iter() {
        tally.violation(format!("warm-up: {v}"));
    }
    // Samples beyond MAX_SAMPLES were not kept; the count still is.
    let extra = warm_violations.saturating_sub(lock(&warm_tally.violation_samples).len() as u64);
    tally.violations.fetch_add(extra, Ordering::Relaxed);

    let problems = tally.summary();
    let rss_ok = match (args.max_rss_growth_pct, rss_growth_pct) {
        (Some(max), Some(g)) => g <= max,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let passed = problems.violations == 0
        && problems.errors == 0
        && settled != Some(false)
        && warm_settled != Some(false)
        && rss_ok;
    Ok(ChurnReport {
        mode: "churn",
        target: target.addr.to_string(),
        cycles: args.cycles,
        warmup_cycles: warmup,
        concurrency: args.concurrency,
        users,
        cycles_ok: counts.ok.load(Ordering::Relaxed),
        resets: counts.resets.load(Ordering::Relaxed),
        midrun: counts.midrun.load(Ordering::Relaxed),
        clean_closes: counts.clean.load(Ordering::Relaxed),
        source_addresses: if spread { 253 } else { 1 },
        elapsed_s: elapsed,
        cycles_per_s: args.cycles as f64 / elapsed.max(1e-9),
        stats_checked: check_stats,
        warm_settled,
        warm,
        warm_server,
        settled,
        settle_s,
        end,
        end_server,
        rss_growth_pct,
        end_stats,
        problems,
        passed,
    })
}

// ---------------------------------------------------------------------------------------------
// Entry point and summaries
// ---------------------------------------------------------------------------------------------

/// `tether bench`: run a mode, print its report; `Ok(false)` when the run failed its checks
/// (the binary then exits non-zero).
pub async fn run(args: BenchArgs, config: &Config) -> anyhow::Result<bool> {
    match args.mode {
        BenchMode::Chat(a) => {
            let target = Target::resolve(&a.common, config)?;
            if a.stalled_compare {
                let r = chat_stalled_compare(&target, &a).await?;
                print_report(&a.common, &r, || stalled_compare_summary(&r));
                return Ok(r.passed);
            }
            let r = chat(&target, &a).await?;
            print_report(&a.common, &r, || chat_summary(&r));
            Ok(r.passed)
        }
        BenchMode::Idle(a) => {
            let target = Target::resolve(&a.common, config)?;
            if a.child {
                idle_child(&target, &a).await?;
                return Ok(true);
            }
            let r = idle(&target, &a).await?;
            print_report(&a.common, &r, || idle_summary(&r));
            Ok(r.passed)
        }
        BenchMode::Churn(a) => {
            let target = Target::resolve(&a.common, config)?;
            let r = churn(&target, &a).await?;
            print_report(&a.common, &r, || churn_summary(&r));
            Ok(r.passed)
        }
    }
}

fn print_report<R: Serialize>(common: &CommonArgs, r: &R, summary: impl FnOnce() -> String) {
    if common.json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot serialize the report: {e}"),
        }
    } else {
        print!("{}", summary());
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("n/a".into(), |v| v.to_string())
}

fn kib(v: Option<u64>) -> String {
    v.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn problems_summary(p: &Problems) -> String {
    let mut s = format!(
        "  problems  {} errors, {} protocol violations\n",
        p.errors, p.violations
    );
    for (kind, n) in &p.error_counts {
        s += &format!("            {n:>8}  {kind}\n");
    }
    for v in &p.violation_samples {
        s += &format!("            violation: {v}\n");
    }
    for e in p.error_samples.iter().take(3) {
        s += &format!("            e.g. {e}\n");
    }
    s
}

fn verdict(passed: bool) -> &'static str {
    if passed {
        "  result    PASS\n"
    } else {
        "  result    FAIL\n"
    }
}

/// The one-screen summary of a chat run.
pub fn chat_summary(r: &ChatReport) -> String {
    let l = &r.latency;
    let mut s = format!(
        "tether bench chat -> {}\n  setup     {}/{} connections over {} users, {} in flight each, {}\n",
        r.target,
        r.connected,
        r.connections,
        r.users,
        r.in_flight,
        match (r.messages_per_connection, r.duration_s) {
            (Some(m), Some(d)) => format!("{m} messages or {d} s"),
            (Some(m), None) => format!("{m} messages each"),
            (None, Some(d)) => format!("for {d} s"),
            (None, None) => String::new(),
        }
    );
    s += &format!(
        "  runs      {} completed in {:.2} s = {:.0} runs/s ({} agent_error, {} refused, {} unfinished)\n",
        r.runs_completed, r.elapsed_s, r.runs_per_s, r.runs_failed, r.runs_rejected, r.runs_unfinished
    );
    s += &format!(
        "  latency   p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (send to agent_completed)\n",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    );
    s += &format!(
        "  ack       p50 {:.2} ms  p99 {:.2} ms  (send to ack)\n",
        r.ack_latency.p50_ms, r.ack_latency.p99_ms
    );
    s += &format!(
        "  checked   {} frames: run event order, seq +1 per thread, thread ids\n",
        r.frames_received
    );
    if let Some(cpu) = r.server_cpu_s {
        s += &format!(
            "  cpu       server {:.1} s ({:.1} us/run), load tool {} s (pid {}; both share the machine's cores)\n",
            cpu,
            cpu * 1e6 / (r.runs_completed.max(1) as f64),
            opt(r.load_tool_cpu_s.map(|c| format!("{c:.1}"))),
            opt(r.server_pid)
        );
    }
    s += &problems_summary(&r.problems);
    if let Some(st) = &r.stalled {
        s += &stalled_summary(st);
    }
    s += verdict(r.passed);
    s
}

fn stalled_summary(st: &StalledReport) -> String {
    let mut s = format!(
        "  stalled   {} at a time, never reading ({} B frames published at {}/s each): {} stalled, \
         {} overflowed, {} closed after it ({} within 1 s)\n",
        st.connections,
        st.frame_bytes,
        st.publish_rate_per_s,
        st.stalls,
        st.overflowed,
        st.closed_after_overflow,
        st.closed_within_1s_of_overflow,
    );
    s += &format!(
        "            overflow {:.0} ms after the first unread frame (p50; {} frames accepted)\n",
        st.stall_to_overflow.p50_ms,
        opt(st.accepted_before_overflow_p50),
    );
    s += &format!(
        "            closed   {:.1} ms after the overflow (p50; max {:.1} ms), {:.0} ms after the first unread frame\n",
        st.overflow_to_close.p50_ms, st.overflow_to_close.max_ms, st.stall_to_close.p50_ms,
    );
    s += &format!(
        "            server   slow-consumer closes +{}, connections closed with 4009 +{} (/metrics)\n",
        opt(st.slow_consumer_closes),
        opt(st.closes_4009),
    );
    if st.problems.errors > 0 || st.problems.violations > 0 {
        s += &problems_summary(&st.problems).replacen("  problems", "  stalled problems", 1);
    }
    s
}

/// The result of `tether bench chat --stalled-compare`: the same load without and with K
/// stalled connections, one after the other on the same server.
#[derive(Debug, Clone, Serialize)]
pub struct StalledCompareReport {
    pub mode: &'static str,
    pub target: String,
    pub stalled: u64,
    pub without: ChatReport,
    pub with: ChatReport,
    /// The N connections' figures with the stalled ones over without.
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub runs_per_s_ratio: f64,
    pub passed: bool,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        f64::NAN
    }
}

/// Run the chat load twice on the same server: without, then with `--stalled` K (at least 1).
pub async fn chat_stalled_compare(
    target: &Target,
    args: &ChatArgs,
) -> anyhow::Result<StalledCompareReport> {
    let k = args.stalled.max(1);
    let with_args = ChatArgs {
        stalled: k,
        stalled_compare: false,
        ..args.clone()
    };
    // Refuse before the first run, not after it.
    check_stall_args(target, &with_args)?;
    let without = chat(
        target,
        &ChatArgs {
            stalled: 0,
            stalled_compare: false,
            ..args.clone()
        },
    )
    .await?;
    let with = chat(target, &with_args).await?;
    Ok(StalledCompareReport {
        mode: "chat --stalled-compare",
        target: target.addr.to_string(),
        stalled: k,
        p50_ratio: ratio(with.latency.p50_ms, without.latency.p50_ms),
        p99_ratio: ratio(with.latency.p99_ms, without.latency.p99_ms),
        runs_per_s_ratio: ratio(with.runs_per_s, without.runs_per_s),
        passed: without.passed && with.passed,
        without,
        with,
    })
}

/// Both runs' summaries, then the comparison.
pub fn stalled_compare_summary(r: &StalledCompareReport) -> String {
    let mut s = String::from("[1/2] without stalled connections\n");
    s += &chat_summary(&r.without);
    s += &format!("[2/2] with {} stalled connection(s)\n", r.stalled);
    s += &chat_summary(&r.with);
    let line = |label: &str, c: &ChatReport| {
        format!(
            "  {label:<9} {:>8.0} runs/s  p50 {:>7.2} ms  p99 {:>7.2} ms\n",
            c.runs_per_s, c.latency.p50_ms, c.latency.p99_ms
        )
    };
    s += &format!(
        "tether bench chat --stalled-compare -> {}: the {} others, without and with {} stalled\n",
        r.target, r.with.connected, r.stalled
    );
    s += &line("without", &r.without);
    s += &line("with", &r.with);
    s += &format!(
        "  ratio     p50 {:.3}  p99 {:.3} ({:+.1} %)  runs/s {:.3}  (with / without)\n",
        r.p50_ratio,
        r.p99_ratio,
        (r.p99_ratio - 1.0) * 100.0,
        r.runs_per_s_ratio
    );
    if let Some(st) = &r.with.stalled {
        s += &format!(
            "  stalled   {} closed after overflow of {}: {:.1} ms after the overflow (p50; max {:.1} ms)\n",
            st.closed_after_overflow,
            st.stalls,
            st.overflow_to_close.p50_ms,
            st.overflow_to_close.max_ms
        );
    }
    s += verdict(r.passed);
    s
}

/// The one-screen summary of an idle run.
pub fn idle_summary(r: &IdleReport) -> String {
    let mut s = format!(
        "tether bench idle -> {}\n  setup     {} connections over {} users, {} process(es), {} source address(es)\n",
        r.target, r.connections, r.users, r.processes, r.source_addresses
    );
    s += &format!(
        "  connect   {} established, {} failed, in {:.1} s ({:.0}/s); {} lost during the {:.1} s hold\n",
        r.connected, r.failed, r.connect_s, r.connects_per_s, r.lost, r.hold_s
    );
    s += &format!(
        "  server    pid {}: RSS {} before, {} held (peak {}); fds {} -> {}; threads {}\n",
        opt(r.server_pid),
        kib(r.server_before.rss_kib),
        kib(r.server_held.rss_kib),
        kib(r.server_rss_peak_kib),
        opt(r.server_before.fds),
        opt(r.server_held.fds),
        opt(r.server_held.threads),
    );
    s += &format!(
        "  memory    {} per connection ({} GiB per million)\n",
        r.rss_per_connection_bytes.map_or("n/a".into(), |b| format!(
            "{b:.0} bytes = {:.2} KiB",
            b / 1024.0
        )),
        opt(r.projected_rss_per_million_gib)
    );
    s += &problems_summary(&r.problems);
    s += verdict(r.passed);
    s
}

fn residue(r: &Option<Residue>) -> String {
    match r {
        None => "n/a".into(),
        Some(r) => format!(
            "connections {} managers {} sessions_open {} audit_rows_open {} runs_active {} live_tasks {}",
            opt(r.connections),
            opt(r.managers),
            opt(r.sessions_open),
            opt(r.audit_rows_open),
            opt(r.runs_active),
            r.live_tasks.map_or("not exposed".into(), |t| t.to_string()),
        ),
    }
}

/// The one-screen summary of a churn run.
pub fn churn_summary(r: &ChurnReport) -> String {
    let mut s = format!(
        "tether bench churn -> {}\n  setup     {} cycles (+{} warm-up), {} at once, {} users, {} source address(es)\n",
        r.target, r.cycles, r.warmup_cycles, r.concurrency, r.users, r.source_addresses
    );
    s += &format!(
        "  cycles    {} ok in {:.1} s = {:.0}/s: {} resets, {} clean closes, {} mid-run\n",
        r.cycles_ok, r.elapsed_s, r.cycles_per_s, r.resets, r.clean_closes, r.midrun
    );
    if r.stats_checked {
        s += &format!("  warm      {}\n", residue(&r.warm));
        s += &format!(
            "  end       {} (after {} s)\n",
            residue(&r.end),
            opt(r.settle_s.map(|x| format!("{x:.1}")))
        );
        s += &format!(
            "  settled   {}\n",
            if r.settled == Some(true) {
                "yes: everything back to zero"
            } else {
                "NO: leftovers after the deadline"
            }
        );
    } else {
        s += "  settled   not checked (--no-stats)\n";
    }
    s += &format!(
        "  server    RSS {} warm, {} end ({} %); fds {} -> {}; threads {}\n",
        kib(r.warm_server.rss_kib),
        kib(r.end_server.rss_kib),
        opt(r.rss_growth_pct),
        opt(r.warm_server.fds),
        opt(r.end_server.fds),
        opt(r.end_server.threads),
    );
    s += &problems_summary(&r.problems);
    s += verdict(r.passed);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est() -> Value {
        json!({"thread_id": "t1", "last_seq": 4})
    }

    fn ev(kind: &str, seq: Option<u64>, reply_to: &str, data: Value) -> Value {
        let mut v = json!({"type": kind, "thread_id": "t1", "reply_to": reply_to, "run_id": "r1", "data": data});
        if let Some(s) = seq {
            v["seq"] = json!(s);
        }
        v
    }

    /// The eight frames of a run, as Tether sends them, starting at `seq`.
    fn run_frames(id: &str, seq: u64) -> Vec<Value> {
        let mut ack = ev(
            "ack",
            Some(seq),
            id,
            json!({"seq": seq, "run_id": "r1", "message_id": "m"}),
        );
        ack.as_object_mut().map(|o| o.remove("run_id"));
        vec![
            ack,
            ev("agent_started", Some(seq + 1), id, json!({"run_id": "r1"})),
            ev("agent_thinking", Some(seq + 2), id, json!({})),
            ev(
                "tool_executing",
                Some(seq + 3),
                id,
                json!({"tool_call_id": "c1"}),
            ),
            ev(
                "tool_completed",
                Some(seq + 4),
                id,
                json!({"tool_call_id": "c1"}),
            ),
            ev("agent_text_delta", None, id, json!({"offset": 0})),
            ev("agent_text_delta", None, id, json!({"offset": 3})),
            ev("agent_completed", Some(seq + 5), id, json!({})),
        ]
    }

    fn feed(c: &mut RunChecker, frames: &[Value]) -> Vec<Outcome> {
        let mut out = Vec::new();
        for f in frames {
            c.on_frame(f, Instant::now(), &mut out);
        }
        out
    }

    fn violations(out: &[Outcome]) -> Vec<&String> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Violation(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_correct_run_completes_without_violations() {
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let out = feed(&mut c, &run_frames(&id, 5));
        assert!(violations(&out).is_empty(), "{out:?}");
        assert!(matches!(out[..], [Outcome::Completed { .. }]), "{out:?}");
        assert_eq!(c.in_flight(), 0);
        // The next run continues the thread's seq.
        let id = c.send(Instant::now());
        let out = feed(&mut c, &run_frames(&id, 11));
        assert!(violations(&out).is_empty(), "{out:?}");
    }

    #[test]
    fn seq_gaps_and_reorders_are_violations() {
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5);
        frames.swap(2, 3); // tool_executing before agent_thinking: seq 8 then 7
        let v = feed(&mut c, &frames);
        assert!(violations(&v).iter().any(|v| v.contains("seq")), "{v:?}");

        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let v = feed(&mut c, &run_frames(&id, 6)); // starts one too high
        assert_eq!(violations(&v).len(), 1, "{v:?}");
    }

    #[test]
    fn order_within_a_run_is_checked() {
        // agent_started before ack.
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5);
        frames[0]["seq"] = json!(6);
        frames[0]["data"]["seq"] = json!(6);
        frames[1]["seq"] = json!(5);
        frames.swap(0, 1);
        assert!(!violations(&feed(&mut c, &frames)).is_empty());

        // Two terminal events.
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5);
        frames.push(ev("agent_completed", Some(11), &id, json!({})));
        let out = feed(&mut c, &frames);
        assert!(violations(&out)
            .iter()
            .any(|v| v.contains("after its run ended")));

        // tool_completed without tool_executing.
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5);
        frames[4]["data"]["tool_call_id"] = json!("other");
        assert!(violations(&feed(&mut c, &frames))
            .iter()
            .any(|v| v.contains("tool_completed")));
    }

    #[test]
    fn foreign_threads_runs_and_seqs_on_deltas_are_violations() {
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5);
        frames[2]["thread_id"] = json!("t2");
        frames[3]["run_id"] = json!("r2");
        frames[5]["seq"] = json!(99);
        let out = feed(&mut c, &frames);
        let v = violations(&out);
        assert!(v.iter().any(|v| v.contains("thread t2")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("run_id")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("delta with a seq")), "{v:?}");
        let out = feed(&mut c, &[ev("agent_thinking", Some(11), "zz", json!({}))]);
        assert!(violations(&out)[0].contains("unknown reply_to"));
    }

    #[test]
    fn errors_and_agent_errors_end_runs_without_violations() {
        let mut c = RunChecker::new(&est());
        let id = c.send(Instant::now());
        let out = feed(
            &mut c,
            &[json!({"type": "error", "reply_to": id, "data": {"code": "rate_limited"}})],
        );
        assert_eq!(out, vec![Outcome::Rejected("rate_limited".into())]);
        assert_eq!(c.in_flight(), 0);

        let id = c.send(Instant::now());
        let mut frames = run_frames(&id, 5)[..2].to_vec();
        frames.push(ev("agent_error", Some(7), &id, json!({"code": "timeout"})));
        let out = feed(&mut c, &frames);
        assert_eq!(out, vec![Outcome::Failed("timeout".into())]);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::from_micros((1..=100).map(|x| x * 1000).collect());
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::from_micros(vec![]).count, 0);
        assert_eq!(Percentiles::from_micros(vec![1500]).p99_ms, 1.5);
    }

    #[test]
    fn cycle_kinds_follow_the_fractions() {
        let n = 10_000;
        let (mut r, mut m, mut both) = (0, 0, 0);
        for i in 0..n {
            let (a, b) = cycle_kind(i, 0.3, 0.1);
            r += u64::from(a);
            m += u64::from(b);
            both += u64::from(a && b);
        }
        assert!((2_990..=3_010).contains(&r), "{r}");
        assert!((990..=1_010).contains(&m), "{m}");
        assert!((200..=400).contains(&both), "{both}");
    }

    #[test]
    fn defaults_parse() {
        let c = ChatArgs::default();
        assert_eq!((c.connections, c.in_flight), (50, 1));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(IdleArgs::default().hold, Duration::from_secs(5));
        let ch = ChurnArgs::default();
        assert_eq!((ch.resets, ch.midrun), (0.3, 0.1));
    }

    #[test]
    fn durations_and_fractions_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("nan").is_err());
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
    }

    #[test]
    fn stats_residue_needs_the_four_figures_at_zero() {
        let s = json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": 0, "runs": {"active": 0}});
        assert!(Residue::from_stats(&s).is_zero());
        let s =
            json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": null});
        assert!(!Residue::from_stats(&s).is_zero());
        let s = json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": 0, "runs": {"active": 2}});
        assert!(!Residue::from_stats(&s).is_zero());
    }

    #[test]
    fn the_first_server_frame_parses_once_complete() {
        let json = br#"{"type":"connection_established","data":{}}"#;
        let mut f = vec![0x81, json.len() as u8];
        f.extend_from_slice(json);
        assert_eq!(
            first_server_frame(&f).unwrap().unwrap()["type"],
            "connection_established"
        );
        // Incomplete: not yet.
        assert!(first_server_frame(&f[..1]).unwrap().is_none());
        assert!(first_server_frame(&f[..f.len() - 1]).unwrap().is_none());
        // The 16-bit length form, and what may follow the frame.
        let big = format!(r#"{{"type":"x","pad":"{}"}}"#, "y".repeat(300));
        let mut g = vec![0x81, 126];
        g.extend_from_slice(&(big.len() as u16).to_be_bytes());
        g.extend_from_slice(big.as_bytes());
        g.extend_from_slice(&[0x81, 0x01]);
        assert_eq!(first_server_frame(&g).unwrap().unwrap()["type"], "x");
        // Masked (a server must not), binary, or not JSON: errors.
        assert!(first_server_frame(&[0x81, 0x85, 0, 0, 0, 0]).is_err());
        assert!(first_server_frame(&[0x82, 0x01, b'{']).is_err());
        assert!(first_server_frame(&[0x81, 0x01, b'{']).is_err());
    }

    #[test]
    fn stall_options_parse() {
        let c = ChatArgs::default();
        assert_eq!((c.stalled, c.stalled_compare), (0, false));
        assert_eq!((c.stall_rate, c.stall_frame_bytes), (200, 4096));
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(ratio(1.1, 1.0), 1.1);
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n").unwrap(),
            "Wikipedia"
        );
        assert!(dechunk("zz\r\n").is_err());
        assert!(dechunk("10\r\nshort").is_err());
    }

    #[test]
    fn source_addresses_stay_in_loopback() {
        let t: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!spread_on(Spread::Auto, &t, 100));
        assert!(spread_on(Spread::Auto, &t, 20_000));
        assert!(!spread_on(
            Spread::On,
            &"10.0.0.1:1".parse().unwrap(),
            20_000
        ));
        assert_eq!(source_ip(true, 0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_ip(true, 252), Some("127.0.0.254".parse().unwrap()));
        assert_eq!(source_ip(true, 253), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_ip(false, 5), None);
    }

    #[test]
    fn own_process_figures_read() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() > 0);
        assert!(cpu_seconds(me).is_some());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(find_listening_pid(l.local_addr().unwrap().port()), Some(me));
    }
}
