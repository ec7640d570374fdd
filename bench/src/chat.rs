//! The chat mode: N connections over U users, each sending `user_message`s with W in flight.
//! Latency is send to the matching `agent_completed` (matched by `reply_to`); every frame goes
//! through a [`RunChecker`]. With `--stalled K` the stalled clients of `stalled.rs` run
//! alongside the measured window; `--stalled-compare` runs the load without and then with them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use tether::client::{Client, ClientError, SocketOptions};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::checker::{clip, Outcome, RunChecker};
use crate::cli::ChatArgs;
use crate::procfs::CpuWindow;
use crate::stalled::{check_stall_args, StalledReport, Stalls};
use crate::stats::{micros, progress_enabled, Percentiles, Problems, Progress, Tally};
use crate::target::{connect_established, error_kind, Target, Tokens};

/// Handshakes in progress at once while the N connect, and polite closes at once after.
const CONNECT_CONCURRENCY: usize = 64;

/// The result of `tether-bench chat`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatReport {
    pub(crate) mode: &'static str,
    pub(crate) target: String,
    pub(crate) connections: u64,
    pub(crate) connected: u64,
    pub(crate) users: u64,
    pub(crate) in_flight: u64,
    pub(crate) messages_per_connection: Option<u64>,
    pub(crate) duration_s: Option<f64>,
    pub(crate) connect_s: f64,
    pub(crate) runs_completed: u64,
    /// Runs that ended with `agent_error`.
    pub(crate) runs_failed: u64,
    /// Messages answered with `error` instead of a run.
    pub(crate) runs_rejected: u64,
    /// Runs still open when their connection failed.
    pub(crate) runs_unfinished: u64,
    pub(crate) frames_received: u64,
    pub(crate) elapsed_s: f64,
    pub(crate) runs_per_s: f64,
    pub(crate) latency: Percentiles,
    pub(crate) ack_latency: Percentiles,
    pub(crate) server_pid: Option<u32>,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) load_tool_cpu_s: Option<f64>,
    /// The N connections' errors and violations (the stalled ones have their own).
    pub(crate) problems: Problems,
    /// With `--stalled`: what happened to the stalled connections.
    pub(crate) stalled: Option<StalledReport>,
    pub(crate) passed: bool,
}

/// What is shared by the N connections of a run.
struct Load {
    in_flight: u64,
    messages: Option<u64>,
    stop_at: Option<Instant>,
    timeout: Duration,
    content: String,
    tally: Arc<Tally>,
    /// Runs completed so far, over all connections (for the progress line).
    completed: AtomicU64,
}

/// What connections add up to.
#[derive(Default)]
struct Totals {
    latencies: Vec<u32>,
    acks: Vec<u32>,
    failed: u64,
    rejected: u64,
    unfinished: u64,
    frames: u64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.latencies.extend(o.latencies);
        self.acks.extend(o.acks);
        self.failed += o.failed;
        self.rejected += o.rejected;
        self.unfinished += o.unfinished;
        self.frames += o.frames;
    }
}

/// One connection's totals, and its client while it is still usable.
struct ConnOutcome {
    client: Option<Client>,
    totals: Totals,
}

/// The measured window's figures besides the connections' totals.
struct Window {
    users: u64,
    messages: Option<u64>,
    connected: u64,
    connect_s: f64,
    elapsed_s: f64,
    server_cpu_s: Option<f64>,
    load_tool_cpu_s: Option<f64>,
}

/// Run the chat mode: connect N, send, check every frame, measure.
pub(crate) async fn chat(target: &Target, args: &ChatArgs) -> anyhow::Result<ChatReport> {
    let messages = check_chat_args(target, args)?;
    let users = args.users.unwrap_or(args.connections).max(1);
    let tokens = Tokens::mint(target, users)?;
    let tally = Arc::new(Tally::default());

    // Connect everyone first, so the measured window is messages only.
    let connect_started = Instant::now();
    let conns = connect_all(target, &tokens, args, &tally).await;
    let connect_s = connect_started.elapsed().as_secs_f64();

    // The stalled connections start with the measured window and run alongside it; they are
    // not among the N whose latency is measured.
    let stalls = if args.stalled > 0 {
        Some(Stalls::start(target, args).await?)
    } else {
        None
    };
    let connected = conns.len() as u64;
    let started = Instant::now();
    let load = Arc::new(Load {
        in_flight: args.in_flight,
        messages,
        stop_at: args.duration.map(|d| started + d),
        timeout: args.timeout,
        content: args.content.clone(),
        tally,
        completed: AtomicU64::new(0),
    });
    let expected = messages.map(|m| m * connected);
    let progress = chat_progress(args, &load, expected, stalls.as_ref(), started);
    let cpu = CpuWindow::start(target.server_pid);
    let (totals, clients) = run_connections(conns, &load).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    let (server_cpu_s, load_tool_cpu_s) = cpu.spent();
    progress.finish().await;

    // Close outside the measured window, politely, so the server records normal closes.
    futures_util::stream::iter(clients)
        .for_each_concurrent(CONNECT_CONCURRENCY, |c| async move {
            // A failed close frame only means the connection is already gone.
            let _closed = c.close().await;
        })
        .await;
    // The stalled connection in progress finishes its stall (bounded), then the figures.
    let stalled = match stalls {
        Some(s) => Some(s.finish(target).await),
        None => None,
    };
    let window = Window {
        users,
        messages,
        connected,
        connect_s,
        elapsed_s,
        server_cpu_s,
        load_tool_cpu_s,
    };
    Ok(ChatReport::new(
        target,
        args,
        window,
        totals,
        load.tally.summary(),
        stalled,
    ))
}

/// Refuse what cannot run; the messages per connection (100 unless a duration is given).
fn check_chat_args(target: &Target, args: &ChatArgs) -> anyhow::Result<Option<u64>> {
    if args.connections == 0 || args.in_flight == 0 {
        bail!("--connections and --in-flight must be at least 1");
    }
    if args.messages == Some(0) {
        bail!("--messages must be at least 1");
    }
    if args.stalled > 0 {
        check_stall_args(target, args)?;
    }
    Ok(match (args.messages, args.duration) {
        (None, None) => Some(100),
        (m, _) => m,
    })
}

/// Connect the N and read their `connection_established`; the failed ones are counted.
async fn connect_all(
    target: &Target,
    tokens: &Tokens,
    args: &ChatArgs,
    tally: &Tally,
) -> Vec<(Client, Value)> {
    let sock = &SocketOptions {
        bind: None,
        nodelay: true,
        read_buffer_size: None,
    };
    futures_util::stream::iter(0..args.connections)
        .map(|i| async move {
            match connect_established(target, tokens.for_index(i), sock, args.timeout).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tally.error(error_kind(&e), || format!("connection {i}: {e}"));
                    None
                }
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .filter_map(|c| async move { c })
        .collect()
        .await
}

/// The progress line: runs done against those expected, or time against the duration.
fn chat_progress(
    args: &ChatArgs,
    load: &Arc<Load>,
    expected: Option<u64>,
    stalls: Option<&Stalls>,
    started: Instant,
) -> Progress {
    let load = load.clone();
    let duration = args.duration;
    let stall_closed = stalls.map(Stalls::closed);
    Progress::start(progress_enabled(&args.common), "chat", move || {
        let done = load.completed.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let mut extra = format!(
            "{:.0} runs/s  errors {}  violations {}",
            done as f64 / elapsed.max(0.001),
            load.tally.error_total(),
            load.tally.violation_total()
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
}

/// Each connection in its own task until it is done; their totals, and the clients to close.
async fn run_connections(conns: Vec<(Client, Value)>, load: &Arc<Load>) -> (Totals, Vec<Client>) {
    let mut tasks = JoinSet::new();
    for (client, est) in conns {
        tasks.spawn(chat_connection(client, est, load.clone()));
    }
    let mut totals = Totals::default();
    let mut clients = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(o) => {
                totals.add(o.totals);
                clients.extend(o.client);
            }
            Err(e) => load
                .tally
                .error("load tool task failed".into(), || e.to_string()),
        }
    }
    (totals, clients)
}

/// One chat connection: keep W messages in flight until M are sent or the time is up, check
/// every frame, then hand the client back for closing.
async fn chat_connection(mut client: Client, established: Value, load: Arc<Load>) -> ConnOutcome {
    let mut checker = RunChecker::new(&established);
    let mut totals = Totals::default();
    let mut sent = 0u64;
    let mut outcomes = Vec::new();
    let alive = loop {
        if let Err(e) = load.fill_window(&mut client, &mut checker, &mut sent).await {
            load.tally.error(error_kind(&e), || format!("send: {e}"));
            break false;
        }
        if checker.in_flight() == 0 {
            break true;
        }
        let frame = match client.next_json(load.timeout).await {
            Ok(f) => f,
            Err(e) => {
                load.tally.error(error_kind(&e), || {
                    format!(
                        "connection failed with {} runs open: {e}",
                        checker.in_flight()
                    )
                });
                break false;
            }
        };
        checker.on_frame(&frame, Instant::now(), &mut outcomes);
        load.record(&frame, outcomes.drain(..), &mut totals);
    };
    totals.unfinished = checker.in_flight() as u64;
    totals.frames = checker.frames();
    ConnOutcome {
        client: alive.then_some(client),
        totals,
    }
}

impl Load {
    /// Send until W are in flight, unless M are sent or the time is up.
    async fn fill_window(
        &self,
        client: &mut Client,
        checker: &mut RunChecker,
        sent: &mut u64,
    ) -> Result<(), ClientError> {
        while (checker.in_flight() as u64) < self.in_flight
            && self.messages.is_none_or(|m| *sent < m)
            && self.stop_at.is_none_or(|t| Instant::now() < t)
        {
            let id = checker.send(Instant::now());
            let frame =
                json!({"type": "user_message", "id": id, "data": {"content": self.content}});
            client.send_json(&frame).await?;
            *sent += 1;
        }
        Ok(())
    }

    /// Count what one frame meant.
    fn record(&self, frame: &Value, outcomes: impl Iterator<Item = Outcome>, t: &mut Totals) {
        for out in outcomes {
            match out {
                Outcome::Completed { latency, ack } => {
                    t.latencies.push(micros(latency));
                    if let Some(a) = ack {
                        t.acks.push(micros(a));
                    }
                    self.completed.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed(code) => {
                    t.failed += 1;
                    self.tally.error(format!("agent_error {code}"), || {
                        format!("agent_error {code}: {}", clip(frame))
                    });
                }
                Outcome::Rejected(code) => {
                    t.rejected += 1;
                    self.tally.error(format!("error {code}"), || {
                        format!("message refused: {}", clip(frame))
                    });
                }
                Outcome::Error(code) => self.tally.error(format!("error {code}"), || clip(frame)),
                Outcome::Violation(v) => self.tally.violation(v),
            }
        }
    }
}

impl ChatReport {
    fn new(
        target: &Target,
        args: &ChatArgs,
        w: Window,
        t: Totals,
        problems: Problems,
        stalled: Option<StalledReport>,
    ) -> Self {
        let runs_completed = t.latencies.len() as u64;
        let passed = problems.violations == 0
            && problems.errors == 0
            && t.failed == 0
            && t.rejected == 0
            && t.unfinished == 0
            && w.connected == args.connections
            && stalled.as_ref().is_none_or(StalledReport::passed);
        Self {
            mode: "chat",
            target: target.addr.to_string(),
            connections: args.connections,
            connected: w.connected,
            users: w.users,
            in_flight: args.in_flight,
            messages_per_connection: w.messages,
            duration_s: args.duration.map(|d| d.as_secs_f64()),
            connect_s: w.connect_s,
            runs_completed,
            runs_failed: t.failed,
            runs_rejected: t.rejected,
            runs_unfinished: t.unfinished,
            frames_received: t.frames,
            elapsed_s: w.elapsed_s,
            runs_per_s: runs_completed as f64 / w.elapsed_s.max(1e-9),
            latency: Percentiles::from_micros(t.latencies),
            ack_latency: Percentiles::from_micros(t.acks),
            server_pid: target.server_pid,
            server_cpu_s: w.server_cpu_s,
            load_tool_cpu_s: w.load_tool_cpu_s,
            problems,
            stalled,
            passed,
        }
    }
}

/// The result of `tether-bench chat --stalled-compare`: the same load without and with K
/// stalled connections, one after the other on the same server.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StalledCompareReport {
    pub(crate) mode: &'static str,
    pub(crate) target: String,
    pub(crate) stalled: u64,
    pub(crate) without: ChatReport,
    pub(crate) with: ChatReport,
    /// The N connections' figures with the stalled ones over without.
    pub(crate) p50_ratio: f64,
    pub(crate) p99_ratio: f64,
    pub(crate) runs_per_s_ratio: f64,
    pub(crate) passed: bool,
}

/// `a / b` to three decimals; NaN when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        f64::NAN
    }
}

/// Run the chat load twice on the same server: without, then with `--stalled` K (at least 1).
pub(crate) async fn chat_stalled_compare(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_round_and_refuse_a_zero_base() {
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(ratio(1.1, 1.0), 1.1);
    }
}
