//! The idle mode: N authenticated connections held open, and the server's resident memory per
//! connection from `/proc/PID/status`. The connections are opened by one [`share`] in this
//! process, or split over [`children`] when one process may not hold them all (at most 20,000
//! file descriptors per process here).

mod children;
mod share;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use tokio::time::Instant;

use crate::cli::IdleArgs;
use crate::procfs::{fd_budget, rss_kib, ProcSample};
use crate::stats::{progress_enabled, Problems, Progress, Tally};
use crate::target::{spread_on, Target, Tokens};
use children::Children;
use share::{IdleShare, ShareSpec};

pub(crate) use children::idle_child;

/// The result of `tether-bench idle`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleReport {
    pub(crate) mode: &'static str,
    pub(crate) target: String,
    pub(crate) connections: u64,
    pub(crate) connected: u64,
    pub(crate) failed: u64,
    /// Connections that ended while they should have been held.
    pub(crate) lost: u64,
    pub(crate) users: u64,
    pub(crate) processes: u32,
    pub(crate) source_addresses: u64,
    pub(crate) connect_s: f64,
    pub(crate) connects_per_s: f64,
    pub(crate) hold_s: f64,
    pub(crate) server_pid: Option<u32>,
    /// Before the first connection.
    pub(crate) server_before: ProcSample,
    /// At the end of the hold, every connection open.
    pub(crate) server_held: ProcSample,
    /// Highest resident memory seen during the hold.
    pub(crate) server_rss_peak_kib: Option<u64>,
    /// (held - before) / connected, in bytes.
    pub(crate) rss_per_connection_bytes: Option<f64>,
    /// What a million such connections would need, in GiB (the memory figure only).
    pub(crate) projected_rss_per_million_gib: Option<f64>,
    pub(crate) problems: Problems,
    pub(crate) passed: bool,
}

/// Who holds the connections open during the hold.
enum Holder {
    Local(IdleShare),
    Children(Children),
}

impl Holder {
    /// Close every connection; how many were lost while held.
    async fn release(self, tally: &Tally) -> u64 {
        match self {
            Holder::Local(share) => {
                let lost = share.lost.load(Ordering::Relaxed);
                share.close().await;
                lost
            }
            Holder::Children(kids) => kids.stop(tally).await,
        }
    }
}

/// How the connections were opened and held.
struct Opened {
    users: u64,
    processes: u32,
    spread: bool,
    connected: u64,
    failed: u64,
    connect_s: f64,
}

/// What the server looked like over the hold.
struct Held {
    before: ProcSample,
    held: ProcSample,
    peak: Option<u64>,
    hold_s: f64,
}

/// Run the idle mode.
pub(crate) async fn idle(target: &Target, args: &IdleArgs) -> anyhow::Result<IdleReport> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let users = args.users.unwrap_or(args.connections).max(1);
    let processes = plan_processes(args)?;
    let spread = spread_on(args.spread, &target.addr, args.connections);
    let tally = Arc::new(Tally::default());
    let progress_n = Arc::new(AtomicU64::new(0));
    let before = ProcSample::of(target.server_pid);

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
    let (connected, failed, holder) = if processes == 1 {
        let tokens = Arc::new(Tokens::mint(target, users)?);
        let spec = ShareSpec {
            range: 0..args.connections,
            spread,
            concurrency: args.connect_concurrency,
            connect_timeout: args.connect_timeout,
        };
        let share = IdleShare::open(target, tokens, spec, tally.clone(), progress_n.clone()).await;
        (share.connected, share.failed, Holder::Local(share))
    } else {
        let kids = Children::spawn(target, args, processes, users, spread)?;
        let (c, f, kids) = kids.wait_ready(&tally, &progress_n, args).await;
        (c, f, Holder::Children(kids))
    };
    let connect_s = started.elapsed().as_secs_f64();
    progress.finish().await;

    let held = hold(target.server_pid, args.hold, before).await;
    let lost = holder.release(&tally).await;
    let opened = Opened {
        users,
        processes,
        spread,
        connected,
        failed,
        connect_s,
    };
    Ok(IdleReport::new(
        target,
        args,
        opened,
        held,
        lost,
        tally.summary(),
    ))
}

/// The processes to split the connections over: as asked, or as few as the open-file budget
/// allows.
fn plan_processes(args: &IdleArgs) -> anyhow::Result<u32> {
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
    Ok(processes)
}

/// Hold for `hold`, sampling the server's memory; the last sample is the figure.
async fn hold(pid: Option<u32>, hold: Duration, before: ProcSample) -> Held {
    let hold_started = Instant::now();
    let mut peak = before.rss_kib;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Some(r) = pid.and_then(rss_kib) {
            peak = Some(peak.map_or(r, |p| p.max(r)));
        }
        if hold_started.elapsed() >= hold {
            break;
        }
    }
    Held {
        before,
        held: ProcSample::of(pid),
        peak,
        hold_s: hold_started.elapsed().as_secs_f64(),
    }
}

impl IdleReport {
    fn new(
        target: &Target,
        args: &IdleArgs,
        o: Opened,
        h: Held,
        lost: u64,
        problems: Problems,
    ) -> Self {
        let per_conn = match (h.before.rss_kib, h.held.rss_kib) {
            (Some(a), Some(b)) if o.connected > 0 => {
                Some((b as f64 - a as f64) * 1024.0 / o.connected as f64)
            }
            _ => None,
        };
        let passed = problems.violations == 0
            && o.failed == 0
            && lost == 0
            && o.connected == args.connections;
        Self {
            mode: "idle",
            target: target.addr.to_string(),
            connections: args.connections,
            connected: o.connected,
            failed: o.failed,
            lost,
            users: o.users,
            processes: o.processes,
            source_addresses: if o.spread { 253 } else { 1 },
            connect_s: o.connect_s,
            connects_per_s: o.connected as f64 / o.connect_s.max(1e-9),
            hold_s: h.hold_s,
            server_pid: target.server_pid,
            server_before: h.before,
            server_held: h.held,
            server_rss_peak_kib: h.peak,
            rss_per_connection_bytes: per_conn.map(|b| b.round()),
            projected_rss_per_million_gib: per_conn
                .map(|b| (b * 1e6 / (1u64 << 30) as f64 * 100.0).round() / 100.0),
            problems,
            passed,
        }
    }
}
