//! The churn mode: C connect/close cycles, K at once, some closed by TCP reset, some in the
//! middle of a run; after a warm-up and again at the end, `/api/stats` must come back to zero
//! (connections, managers, sessions, audit rows), and the server's memory is compared.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use tether::client::{Client, ClientError, SocketOptions};
use tokio::time::Instant;

use crate::checker::{clip, Outcome, RunChecker};
use crate::cli::ChurnArgs;
use crate::procfs::ProcSample;
use crate::stats::{progress_enabled, Problems, Progress, Tally};
use crate::target::{connect_established, error_kind, source_ip, spread_on, Target, Tokens};

/// The result of `tether-bench churn`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChurnReport {
    pub(crate) mode: &'static str,
    pub(crate) target: String,
    pub(crate) cycles: u64,
    pub(crate) warmup_cycles: u64,
    pub(crate) concurrency: u64,
    pub(crate) users: u64,
    pub(crate) cycles_ok: u64,
    pub(crate) resets: u64,
    pub(crate) midrun: u64,
    pub(crate) clean_closes: u64,
    pub(crate) source_addresses: u64,
    pub(crate) elapsed_s: f64,
    pub(crate) cycles_per_s: f64,
    /// Whether /api/stats was polled.
    pub(crate) stats_checked: bool,
    /// Everything at zero after the warm-up.
    pub(crate) warm_settled: Option<bool>,
    pub(crate) warm: Option<Residue>,
    pub(crate) warm_server: ProcSample,
    /// Everything at zero at the end.
    pub(crate) settled: Option<bool>,
    pub(crate) settle_s: Option<f64>,
    pub(crate) end: Option<Residue>,
    pub(crate) end_server: ProcSample,
    /// End resident memory over the warm baseline, in percent.
    pub(crate) rss_growth_pct: Option<f64>,
    /// `/api/stats` at the end, as the server sent it.
    pub(crate) end_stats: Option<Value>,
    pub(crate) problems: Problems,
    pub(crate) passed: bool,
}

/// The figures churn waits for, read from `/api/stats`.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub(crate) struct Residue {
    pub(crate) connections: Option<u64>,
    pub(crate) managers: Option<u64>,
    pub(crate) sessions_open: Option<u64>,
    pub(crate) audit_rows_open: Option<u64>,
    /// `runs.active`, when exposed: runs still going (a closed connection's run finishes).
    pub(crate) runs_active: Option<u64>,
    /// A live task count, when the server exposes one (`tasks`, `live_tasks`, `runtime.tasks`).
    pub(crate) live_tasks: Option<u64>,
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

/// How a poll of `/api/stats` ended.
struct Settled {
    /// Everything came back to zero before the deadline.
    ok: bool,
    residue: Residue,
    stats: Value,
    /// Seconds it took (or waited).
    after_s: f64,
}

/// Poll `/api/stats` until [`Residue::is_zero`] or the deadline.
async fn settle(target: &Target, timeout: Duration) -> anyhow::Result<Settled> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let stats = target.stats().await?;
        let residue = Residue::from_stats(&stats);
        let ok = residue.is_zero();
        if ok || Instant::now() >= deadline {
            return Ok(Settled {
                ok,
                residue,
                stats,
                after_s: started.elapsed().as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The golden ratio's and sqrt(2)'s fractional parts: low-discrepancy sequences, so any stretch
/// of cycles has very nearly the asked fractions of resets and mid-run closes, independently.
const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
const SQRT2_FRAC: f64 = 0.414_213_562_373_095_1;

/// Whether cycle `i` ends with a reset, and whether it starts a run first.
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

/// What every cycle of a phase shares.
struct Cycles<'a> {
    target: &'a Target,
    tokens: &'a Tokens,
    args: &'a ChurnArgs,
    spread: bool,
}

impl Cycles<'_> {
    /// Run `range` cycles with `--concurrency` at once.
    async fn run(&self, range: Range<u64>, tally: &Tally, counts: &ChurnCounts) {
        futures_util::stream::iter(range)
            .for_each_concurrent(self.args.concurrency.max(1) as usize, |i| {
                self.cycle(i, tally, counts)
            })
            .await;
    }

    /// One cycle: connect, maybe start a run and wait for its ack, then reset or close.
    async fn cycle(&self, i: u64, tally: &Tally, counts: &ChurnCounts) {
        let args = self.args;
        let (reset, midrun) = cycle_kind(i, args.resets, args.midrun);
        let sock = SocketOptions {
            bind: source_ip(self.spread, i),
            nodelay: true,
            read_buffer_size: Some(4096),
        };
        let token = self.tokens.for_index(i);
        let fut = async {
            let (mut client, est) =
                connect_established(self.target, token, &sock, args.cycle_timeout).await?;
            if midrun {
                start_run(&mut client, &est, args.cycle_timeout, tally).await?;
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
}

/// Send a `user_message` and wait for its `ack` (or `error`); every frame on the way is checked.
async fn start_run(
    client: &mut Client,
    est: &Value,
    timeout: Duration,
    tally: &Tally,
) -> Result<(), ClientError> {
    let mut checker = RunChecker::new(est);
    let id = checker.send(Instant::now());
    client
        .send_json(&json!({"type": "user_message", "id": id, "data": {"content": "churn"}}))
        .await?;
    // The ack is the first frame for this message; anything before it is checked too.
    let mut out = Vec::new();
    loop {
        let f = client.next_json(timeout).await?;
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
            return Ok(());
        }
    }
}

/// Run the churn mode.
pub(crate) async fn churn(target: &Target, args: &ChurnArgs) -> anyhow::Result<ChurnReport> {
    if args.cycles == 0 || args.concurrency == 0 {
        bail!("--cycles and --concurrency must be at least 1");
    }
    let check_stats = !args.no_stats;
    if check_stats && target.admin_token.is_none() {
        bail!("churn polls /api/stats: set TETHER_ADMIN_TOKEN (or --data-dir of the server), or pass --no-stats");
    }
    let warmup = args.warmup_cycles.unwrap_or((args.cycles / 10).min(20_000));
    let tokens = Tokens::mint(target, args.users.max(1))?;
    let spread = spread_on(args.spread, &target.addr, args.cycles + warmup);
    let cycles = Cycles {
        target,
        tokens: &tokens,
        args,
        spread,
    };

    // Warm-up, then the baseline the end is compared with.
    let warm_tally = Tally::default();
    cycles
        .run(0..warmup, &warm_tally, &ChurnCounts::default())
        .await;
    let warm = if check_stats {
        Some(settle(target, args.settle_timeout).await?)
    } else {
        None
    };
    let warm_server = ProcSample::of(target.server_pid);

    let tally = Arc::new(Tally::default());
    let counts = Arc::new(ChurnCounts::default());
    let progress = churn_progress(args, &tally, &counts);
    let started = Instant::now();
    cycles
        .run(warmup..warmup + args.cycles, &tally, &counts)
        .await;
    let elapsed_s = started.elapsed().as_secs_f64();
    progress.finish().await;

    let end = if check_stats {
        Some(settle(target, args.settle_timeout).await?)
    } else {
        None
    };
    let end_server = ProcSample::of(target.server_pid);
    tally.add_warmup(&warm_tally);
    let phases = Phases {
        warmup,
        spread,
        elapsed_s,
        warm,
        warm_server,
        end,
        end_server,
    };
    Ok(ChurnReport::new(
        target,
        args,
        phases,
        &counts,
        tally.summary(),
    ))
}

/// The progress line: cycles done (or failed) of those asked.
fn churn_progress(args: &ChurnArgs, tally: &Arc<Tally>, counts: &Arc<ChurnCounts>) -> Progress {
    let (tally, counts) = (tally.clone(), counts.clone());
    let total = args.cycles;
    Progress::start(progress_enabled(&args.common), "churn", move || {
        let ok = counts.ok.load(Ordering::Relaxed);
        let errors = tally.error_total();
        (
            (ok + errors) as f64 / total as f64,
            format!("{}/{total} cycles  errors {errors}", ok + errors),
        )
    })
}

/// What the warm-up and the measured cycles left behind.
struct Phases {
    warmup: u64,
    spread: bool,
    elapsed_s: f64,
    warm: Option<Settled>,
    warm_server: ProcSample,
    end: Option<Settled>,
    end_server: ProcSample,
}

impl ChurnReport {
    fn new(
        target: &Target,
        args: &ChurnArgs,
        p: Phases,
        counts: &ChurnCounts,
        problems: Problems,
    ) -> Self {
        let rss_growth_pct = match (p.warm_server.rss_kib, p.end_server.rss_kib) {
            (Some(a), Some(b)) if a > 0 => {
                Some(((b as f64 - a as f64) * 100.0 / a as f64 * 10.0).round() / 10.0)
            }
            _ => None,
        };
        let rss_ok = match (args.max_rss_growth_pct, rss_growth_pct) {
            (Some(max), Some(g)) => g <= max,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let warm_settled = p.warm.as_ref().map(|s| s.ok);
        let settled = p.end.as_ref().map(|s| s.ok);
        let passed = problems.violations == 0
            && problems.errors == 0
            && settled != Some(false)
            && warm_settled != Some(false)
            && rss_ok;
        let (settle_s, end, end_stats) = match p.end {
            Some(s) => (Some(s.after_s), Some(s.residue), Some(s.stats)),
            None => (None, None, None),
        };
        Self {
            mode: "churn",
            target: target.addr.to_string(),
            cycles: args.cycles,
            warmup_cycles: p.warmup,
            concurrency: args.concurrency,
            users: args.users.max(1),
            cycles_ok: counts.ok.load(Ordering::Relaxed),
            resets: counts.resets.load(Ordering::Relaxed),
            midrun: counts.midrun.load(Ordering::Relaxed),
            clean_closes: counts.clean.load(Ordering::Relaxed),
            source_addresses: if p.spread { 253 } else { 1 },
            elapsed_s: p.elapsed_s,
            cycles_per_s: args.cycles as f64 / p.elapsed_s.max(1e-9),
            stats_checked: !args.no_stats,
            warm_settled,
            warm: p.warm.map(|s| s.residue),
            warm_server: p.warm_server,
            settled,
            settle_s,
            end,
            end_server: p.end_server,
            rss_growth_pct,
            end_stats,
            problems,
            passed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn stats_residue_needs_the_four_figures_at_zero() {
        let s = json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": 0, "runs": {"active": 0}});
        assert!(Residue::from_stats(&s).is_zero());
        let s =
            json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": null});
        assert!(!Residue::from_stats(&s).is_zero());
        let s = json!({"connections": 0, "managers": 0, "sessions_open": 0, "audit_rows_open": 0, "runs": {"active": 2}});
        assert!(!Residue::from_stats(&s).is_zero());
    }
}
