//! `chat --stalled K`: clients that never read. Each of the K is its own user, upgrades a raw
//! socket with a small receive buffer, reads `connection_established` and nothing after it,
//! while the tool publishes frames to it until the server refuses one (its queue is full); the
//! tool then times the server's slow-consumer close, and opens the next stalled client. The
//! socket itself, below the WebSocket library, is in [`socket`].

mod socket;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::{json, Value};
use tether::{Auth, Secret};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::ChatArgs;
use crate::stats::{first_words, ms_between, Percentiles, Problems, Tally};
use crate::target::{Target, TOKEN_TTL};
use socket::{probe_until_closed, raw_upgrade};

/// Stall records kept in the report (the figures cover all of them).
const MAX_STALL_RECORDS: usize = 20;

/// What happened to one stalled connection.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StallRecord {
    /// Its user, `bench-stalled-K`.
    pub(crate) user: String,
    /// When it read `connection_established` and stopped reading, seconds after the stalled
    /// connections started.
    pub(crate) started_s: f64,
    /// Frames published to it, and how many of them the server's queue accepted.
    pub(crate) published: u64,
    pub(crate) accepted: u64,
    /// From sending the first frame it left unread to sending the first publish the server
    /// refused (`delivered: 0`: the queue was full).
    pub(crate) stall_to_overflow_ms: Option<f64>,
    /// From sending that refused publish to the client's first write that failed because the
    /// server had closed the socket (resolution: the 5 ms probe interval).
    pub(crate) overflow_to_close_ms: Option<f64>,
    /// From the first unread frame to the close.
    pub(crate) stall_to_close_ms: Option<f64>,
    /// `closed after overflow`, or what went wrong.
    pub(crate) end: String,
}

/// The stalled connections of a `chat --stalled` run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StalledReport {
    /// K: stalled connections at any time.
    pub(crate) connections: u64,
    pub(crate) frame_bytes: u64,
    pub(crate) publish_rate_per_s: u64,
    /// Stalled connections opened over the run (each closed one is replaced).
    pub(crate) stalls: u64,
    /// Of those, how many had a publish refused (queue full), and were then closed.
    pub(crate) overflowed: u64,
    pub(crate) closed_after_overflow: u64,
    /// Closed within one second of the refused publish being sent.
    pub(crate) closed_within_1s_of_overflow: u64,
    /// Median of frames the server accepted for one stalled connection before it overflowed
    /// (its queue plus what the socket buffers took).
    pub(crate) accepted_before_overflow_p50: Option<u64>,
    pub(crate) stall_to_overflow: Percentiles,
    pub(crate) overflow_to_close: Percentiles,
    pub(crate) stall_to_close: Percentiles,
    /// Over the run, from the server's `/metrics`: `tether_slow_consumer_closes_total` (queue
    /// overflows) and `tether_connections_closed_total{code="4009"}` (connections ended with
    /// 4009); none when `/metrics` could not be read.
    pub(crate) slow_consumer_closes: Option<u64>,
    pub(crate) closes_4009: Option<u64>,
    /// The first stalls, in order.
    pub(crate) records: Vec<StallRecord>,
    pub(crate) problems: Problems,
}

impl StalledReport {
    /// Every stalled connection overflowed and was closed, without errors.
    pub(crate) fn passed(&self) -> bool {
        self.problems.errors == 0
            && self.problems.violations == 0
            && self.stalls > 0
            && self.closed_after_overflow == self.stalls
    }

    fn new(
        args: &ChatArgs,
        records: Vec<StallRecord>,
        metrics: Option<(u64, u64)>,
        problems: Problems,
    ) -> Self {
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
        Self {
            connections: args.stalled,
            frame_bytes: args.stall_frame_bytes,
            publish_rate_per_s: args.stall_rate,
            stalls: records.len() as u64,
            overflowed: accepted.len() as u64,
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
            slow_consumer_closes: metrics.map(|d| d.0),
            closes_4009: metrics.map(|d| d.1),
            records: records.into_iter().take(MAX_STALL_RECORDS).collect(),
            problems,
        }
    }
}

/// The stall figures `chat --stalled` reads from `/metrics`: (slow-consumer closes, closes
/// with 4009).
async fn slow_consumer_figures(target: &Target) -> Option<(u64, u64)> {
    let bearer = target.admin_token.as_ref().map(Secret::expose);
    let (status, body) = target.http.get("/metrics", bearer).await.ok()?;
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

/// Refuse a stalled run that cannot publish (no admin token) or would publish nothing.
pub(crate) fn check_stall_args(target: &Target, args: &ChatArgs) -> anyhow::Result<()> {
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
pub(crate) struct Stalls {
    args: ChatArgs,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    records: Arc<Mutex<Vec<StallRecord>>>,
    tally: Arc<Tally>,
    /// Stalled connections the server closed so far (for the progress line).
    closed: Arc<AtomicU64>,
    metrics_before: Option<(u64, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking stall cannot leave the list of records inconsistent; keep it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stalls {
    pub(crate) async fn start(target: &Target, args: &ChatArgs) -> anyhow::Result<Self> {
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
            let token = auth.mint(&user, TOKEN_TTL).context("cannot mint tokens")?;
            let slot = StallSlot {
                target: target.clone(),
                timeout: args.timeout,
                rate: args.stall_rate,
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
                while !stop.is_cancelled() {
                    let (record, again) = slot.stall_once().await;
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

    /// The count of stalled connections the server has closed, as it grows.
    pub(crate) fn closed(&self) -> Arc<AtomicU64> {
        self.closed.clone()
    }

    /// Let the stalls in progress finish (each is bounded), then sum them up.
    pub(crate) async fn finish(mut self, target: &Target) -> StalledReport {
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
        StalledReport::new(&self.args, records, delta, self.tally.summary())
    }
}

/// One of the K stalled connections, reopened after every close.
struct StallSlot {
    target: Target,
    /// `--timeout`: the longest each phase of a stall (connect, overflow, close) may take.
    timeout: Duration,
    /// Publishes per second.
    rate: u64,
    user: String,
    token: String,
    admin: Secret,
    /// The publish request's body.
    body: Arc<String>,
    started: Instant,
    tally: Arc<Tally>,
    closed: Arc<AtomicU64>,
}

/// When the first frame left unread was sent, and when the publish the server refused was.
struct Overflow {
    first_unread: Option<Instant>,
    refused: Option<Instant>,
}

impl StallSlot {
    /// One stalled connection: upgrade, read `connection_established`, then never read again
    /// while frames are published to it until the server refuses one; then probe until the
    /// server has closed it. Returns the record and whether to stall another one.
    async fn stall_once(&self) -> (StallRecord, bool) {
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
        let (sock, est) = match self.connect().await {
            Ok(c) => c,
            Err(end) => {
                rec.end = end;
                return (rec, false);
            }
        };
        let stall_start = Instant::now();
        rec.started_s = stall_start.duration_since(self.started).as_secs_f64();
        let overflow = match self.publish_until_refused(&mut rec, stall_start).await {
            Ok(o) => o,
            Err(end) => {
                rec.end = end;
                return (rec, false);
            }
        };
        let first_unread = overflow.first_unread.unwrap_or(stall_start);
        if let Some(o) = overflow.refused {
            rec.stall_to_overflow_ms = Some(ms_between(first_unread, o));
        }
        let closed = probe_until_closed(sock, &est, self.timeout).await;
        if let Some(c) = closed {
            self.closed.fetch_add(1, Ordering::Relaxed);
            rec.stall_to_close_ms = Some(ms_between(first_unread, c));
        }
        rec.end = self.conclude(&mut rec, overflow.refused, closed);
        (rec, true)
    }

    /// The stalled client's socket, after `connection_established`; or why not (counted).
    async fn connect(&self) -> Result<(TcpStream, Value), String> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, raw_upgrade(self.target.addr, &self.token)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                self.tally.error("stalled: connect failed".into(), || {
                    format!("{}: {e:#}", self.user)
                });
                Err(format!("connect failed: {e:#}"))
            }
            Err(_) => {
                self.tally.error("stalled: connect timed out".into(), || {
                    format!(
                        "{}: no connection_established within {timeout:?}",
                        self.user
                    )
                });
                Err("connect timed out".into())
            }
        }
    }

    /// Publish at the set rate until the server refuses a frame (`delivered: 0`: the queue is
    /// full), for at most `--timeout`. An answer that is not the expected one ends the stall
    /// (counted), with the reason.
    async fn publish_until_refused(
        &self,
        rec: &mut StallRecord,
        stall_start: Instant,
    ) -> Result<Overflow, String> {
        let path = format!("/api/users/{}/events", self.user);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / self.rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = stall_start + self.timeout;
        let mut o = Overflow {
            first_unread: None,
            refused: None,
        };
        while Instant::now() < deadline {
            tick.tick().await;
            let sent = Instant::now();
            let r = self
                .target
                .http
                .post_json(&path, self.admin.expose(), (*self.body).clone())
                .await;
            rec.published += 1;
            let delivered = self.delivered(&path, r)?;
            o.first_unread.get_or_insert(sent);
            match delivered {
                0 => {
                    o.refused = Some(sent);
                    break;
                }
                _ => rec.accepted += 1,
            }
        }
        Ok(o)
    }

    /// The `delivered` count of a publish's answer; anything else is an error (counted).
    fn delivered(&self, path: &str, r: anyhow::Result<(u16, String)>) -> Result<u64, String> {
        match r {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["delivered"].as_u64())
                .ok_or_else(|| {
                    self.tally
                        .error("stalled: publish answer without delivered".into(), || {
                            format!("POST {path}: no \"delivered\" in the answer")
                        });
                    "publish answer without delivered".to_string()
                }),
            Ok((status, body)) => {
                self.tally
                    .error(format!("stalled: publish answered {status}"), || {
                        format!("POST {path}: {status} {}", first_words(&body))
                    });
                Err(format!("publish answered {status}"))
            }
            Err(e) => {
                self.tally.error("stalled: publish failed".into(), || {
                    format!("POST {path}: {e:#}")
                });
                Err(format!("publish failed: {e:#}"))
            }
        }
    }

    /// How the stall ended; anything but a close after the overflow is an error (counted).
    fn conclude(
        &self,
        rec: &mut StallRecord,
        overflow: Option<Instant>,
        closed: Option<Instant>,
    ) -> String {
        let timeout = self.timeout;
        match (overflow, closed) {
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
        }
    }
}
