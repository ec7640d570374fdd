//! The multi-process idle run. The parent spawns this executable once per share (`idle
//! --child`); each child opens its share, prints a `ready` line, holds until its stdin closes
//! (or its own deadline), then prints a `done` line. The lines are JSON ([`ChildLine`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{ChildStdin, ChildStdout};
use tokio::time::Instant;

use super::share::{IdleShare, ShareSpec};
use crate::cli::{IdleArgs, Spread};
use crate::stats::Tally;
use crate::target::{Target, Tokens};

/// A child's report line.
#[derive(Debug, Serialize, Deserialize)]
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

/// The child processes of a multi-process idle run.
pub(super) struct Children {
    kids: Vec<Child>,
}

struct Child {
    proc: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl Children {
    /// Spawn `processes` children, each with its share of the connections.
    pub(super) fn spawn(
        target: &Target,
        args: &IdleArgs,
        processes: u32,
        users: u64,
        spread: bool,
    ) -> anyhow::Result<Self> {
        let exe =
            std::env::current_exe().context("cannot find the tether-bench binary to spawn")?;
        let n = args.connections;
        let k = u64::from(processes);
        // A child that loses its parent still ends: connect time, hold and a margin.
        let deadline = args.connect_timeout * 4 + args.hold + Duration::from_secs(120);
        let mut kids = Vec::new();
        for p in 0..k {
            let first = n * p / k;
            let count = n * (p + 1) / k - first;
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["idle", "--child", "--no-progress"])
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
        Ok(Self { kids })
    }

    /// The child's next report line, skipping anything else it prints, until `until`.
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

    /// Wait for every child's `ready` line: (connected, failed, the children).
    pub(super) async fn wait_ready(
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
                    tally.add_errors(&l.errors, &l.samples);
                }
                None => tally.error("child failed".into(), || {
                    format!("idle child {i} did not report ready")
                }),
            }
        }
        (connected, failed, self)
    }

    /// Close the children's stdin (their signal to stop), collect `done` lines, reap them;
    /// the connections they lost while holding.
    pub(super) async fn stop(mut self, tally: &Tally) -> u64 {
        for kid in &mut self.kids {
            kid.stdin.take();
        }
        let until = Instant::now() + Duration::from_secs(60);
        let mut lost = 0;
        for (i, kid) in self.kids.iter_mut().enumerate() {
            match Self::read_line(kid, until).await {
                Some(l) => {
                    lost += l.lost;
                    tally.add_errors(&l.errors, &l.samples);
                }
                None => tally.error("child failed".into(), || {
                    format!("idle child {i} did not report done")
                }),
            }
            if tokio::time::timeout_at(until, kid.proc.wait())
                .await
                .is_err()
            {
                // Past the deadline: kill it (kill_on_drop reaps it if this fails).
                let _killed = kid.proc.start_kill();
            }
        }
        lost
    }
}

/// The child side of a multi-process idle run.
pub(crate) async fn idle_child(target: &Target, args: &IdleArgs) -> anyhow::Result<()> {
    let users = args.users.unwrap_or(args.connections).max(1);
    let tokens = Arc::new(Tokens::mint(target, users)?);
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + args.child_deadline;
    let spec = ShareSpec {
        range: args.first_index..args.first_index + args.connections,
        spread: args.spread == Spread::On,
        concurrency: args.connect_concurrency,
        connect_timeout: args.connect_timeout,
    };
    let progress = Arc::new(AtomicU64::new(0));
    let share = IdleShare::open(target, tokens, spec, tally.clone(), progress).await;
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
    tally.clear_errors();
    // Hold until the parent closes our stdin (or dies), or our own deadline.
    let _parent_gone = tokio::time::timeout_at(deadline, stdin_closed()).await;
    let lost = share.lost.load(Ordering::Relaxed);
    println!("{}", line("done", lost));
    share.close().await;
    Ok(())
}

/// Resolves when stdin reaches its end (or fails). A plain thread reads it: tokio's stdin read
/// cannot be cancelled and would hold up the runtime's shutdown, while a detached thread ends
/// with the process.
async fn stdin_closed() {
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
        // The receiver is gone when the deadline came first; nothing to tell then.
        let _told = tx.send(());
    });
    // A dropped sender (the thread panicked) also means: stop holding.
    let _closed = rx.await;
}
