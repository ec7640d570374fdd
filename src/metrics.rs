//! Metrics: every figure the gateway exports, in one place.
//!
//! One process-wide [`Metrics`] (`metrics()`), plain atomics, rendered to the Prometheus text
//! format by [`Metrics::render`]. Labels come only from closed enums (the ones below, and the
//! close-code table, `protocol::CloseCode`): never a user, thread or connection id, so
//! cardinality is fixed at compile time.
//!
//! Gauges that the registry or the store already know (connections active, managers, sessions
//! open) are read from them at render time by the caller, not duplicated here.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::protocol::CloseCode;

/// A monotonically increasing counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Take one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    /// The value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds, so it fits an integer atomic.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Count one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let idx = self.bounds.partition_point(|b| *b < seconds);
        if let Some(b) = self.buckets.get(idx) {
            b.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// An estimate of quantile `q` (0..1) in seconds, by linear interpolation in the bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let target = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        let mut lower = 0.0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            if seen + n >= target {
                let upper = self.bounds[i];
                let frac = if n == 0 {
                    1.0
                } else {
                    (target - seen) as f64 / n as f64
                };
                return Some(lower + (upper - lower) * frac);
            }
            seen += n;
            lower = self.bounds[i];
        }
        Some(lower)
    }

    /// The `_bucket`, `_sum` and `_count` lines, with `labels` (`k="v"`, or empty) before `le`.
    #[expect(
        clippy::let_underscore_must_use,
        reason = "writing to a String cannot fail"
    )]
    fn write_series(&self, out: &mut String, name: &str, labels: &str) {
        let (open, sep) = if labels.is_empty() {
            ("", "")
        } else {
            (labels, ",")
        };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{open}{sep}le=\"{}\"}} {cumulative}",
                self.bounds[i]
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{open}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
        } else {
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}"
            );
        }
    }
}

macro_rules! closed_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name { $($variant),+ }
        impl $name {
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];
            pub(crate) fn label(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
            fn index(self) -> usize { self as usize }
        }
    };
}

closed_enum!(
    /// Kinds of client frames, for `messages_in_total`.
    InKind {
        UserMessage => "user_message",
        Ping => "ping",
        GetHistory => "get_history",
        CancelRun => "cancel_run",
        Unknown => "unknown",
        Invalid => "invalid",
    }
);

closed_enum!(
    /// Kinds of server frames, for `messages_out_total`.
    OutKind {
        ConnectionEstablished => "connection_established",
        Ack => "ack",
        ThreadEvent => "thread_event",
        TextDelta => "agent_text_delta",
        Pong => "pong",
        History => "history",
        Error => "error",
        ServerEvent => "server_event",
    }
);

closed_enum!(
    /// How a run ended.
    RunOutcome {
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

closed_enum!(
    /// Where a thread id mismatch was seen.
    MismatchSource {
        Frame => "frame",
        Cleanup => "cleanup",
    }
);

closed_enum!(
    /// Which per-user limit refused a connection.
    LimitKind {
        Connections => "connections",
        Managers => "managers",
    }
);

closed_enum!(
    /// Store operations, for the latency histogram's label.
    StoreOp {
        Commit => "commit",
        Read => "read",
    }
);

closed_enum!(
    /// HTTP-level refusals before the upgrade.
    Rejection {
        Unauthorized => "unauthorized",
        ForbiddenThread => "forbidden_thread",
        RateLimited => "rate_limited",
        InvalidRequest => "invalid_request",
        Draining => "draining",
        Overloaded => "overloaded",
    }
);

fn counters<E>(all: &[E]) -> Vec<Counter> {
    all.iter().map(|_| Counter::default()).collect()
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Every metric of the process.
pub struct Metrics {
    /// Thread id mismatches, by `MismatchSource`.
    pub thread_mismatches: Vec<Counter>,
    /// Manager cleanups attempted.
    pub cleanups_attempted: Counter,
    /// Manager cleanups that found their manager.
    pub cleanups_completed: Counter,
    /// Entries the backstop reaper removed (expected 0).
    pub emergency_cleanups: Counter,
    /// Connections accepted and registered.
    pub connections_opened: Counter,
    /// Connections closed, one counter per code of the close-code table and `other` last.
    pub connections_closed: Vec<Counter>,
    /// Per-user limit refusals, by `LimitKind`.
    pub limit_rejections: Vec<Counter>,
    /// Refusals before the upgrade, by `Rejection`.
    pub handshake_rejections: Vec<Counter>,
    /// Client frames, by `InKind`.
    pub messages_in: Vec<Counter>,
    /// Server frames, by `OutKind`.
    pub messages_out: Vec<Counter>,
    /// Agent runs started.
    pub runs_started: Counter,
    /// Agent runs finished, by `RunOutcome`.
    pub runs_finished: Vec<Counter>,
    /// Agent runs in progress.
    pub runs_active: Gauge,
    /// Agent run durations.
    pub run_duration: Histogram,
    /// Database sessions opened.
    pub sessions_opened: Counter,
    /// Database sessions committed.
    pub sessions_committed: Counter,
    /// Database sessions rolled back.
    pub sessions_rolled_back: Counter,
    /// Database sessions open now.
    pub sessions_open: Gauge,
    /// Store latency, by `StoreOp`.
    pub store_latency: Vec<Histogram>,
    /// Sessions per group commit.
    pub store_batch_size: Histogram,
    /// Frames dropped at a full outbound queue.
    pub outbound_drops: Counter,
    /// Connections closed with 4009.
    pub slow_consumer_closes: Counter,
    /// Connections closed with 4000.
    pub heartbeat_timeouts: Counter,
    /// Audit rows of an earlier process closed at start.
    pub audit_rows_recovered: Counter,
}

const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl Metrics {
    fn new() -> Self {
        Self {
            thread_mismatches: counters(MismatchSource::ALL),
            cleanups_attempted: Counter::default(),
            cleanups_completed: Counter::default(),
            emergency_cleanups: Counter::default(),
            connections_opened: Counter::default(),
            // One per code of the close-code table, and `other` last.
            connections_closed: (0..=CloseCode::ALL.len())
                .map(|_| Counter::default())
                .collect(),
            limit_rejections: counters(LimitKind::ALL),
            handshake_rejections: counters(Rejection::ALL),
            messages_in: counters(InKind::ALL),
            messages_out: counters(OutKind::ALL),
            runs_started: Counter::default(),
            runs_finished: counters(RunOutcome::ALL),
            runs_active: Gauge::default(),
            run_duration: Histogram::new(LATENCY_BOUNDS),
            sessions_opened: Counter::default(),
            sessions_committed: Counter::default(),
            sessions_rolled_back: Counter::default(),
            sessions_open: Gauge::default(),
            store_latency: StoreOp::ALL
                .iter()
                .map(|_| Histogram::new(LATENCY_BOUNDS))
                .collect(),
            store_batch_size: Histogram::new(BATCH_BOUNDS),
            outbound_drops: Counter::default(),
            slow_consumer_closes: Counter::default(),
            heartbeat_timeouts: Counter::default(),
            audit_rows_recovered: Counter::default(),
        }
    }

    /// Count a thread id mismatch.
    pub(crate) fn thread_mismatch(&self, source: MismatchSource) {
        self.thread_mismatches[source.index()].inc();
    }
    /// All thread id mismatches.
    pub fn thread_mismatch_total(&self) -> u64 {
        self.thread_mismatches.iter().map(Counter::get).sum()
    }
    /// A connection ended with `code` (sent, received from the peer, or recorded: 1006).
    pub fn connection_closed(&self, code: u16) {
        let other = CloseCode::ALL.len();
        let idx = CloseCode::from_u16(code)
            .filter(|c| c.has_series())
            .and_then(|c| CloseCode::ALL.iter().position(|x| *x == c))
            .unwrap_or(other);
        self.connections_closed[idx].inc();
    }
    /// Count a per-user limit refusal.
    pub(crate) fn limit_rejection(&self, kind: LimitKind) {
        self.limit_rejections[kind.index()].inc();
    }
    /// All per-user limit refusals.
    pub fn limit_rejection_total(&self) -> u64 {
        self.limit_rejections.iter().map(Counter::get).sum()
    }
    /// Count a refusal before the upgrade.
    pub(crate) fn handshake_rejected(&self, r: Rejection) {
        self.handshake_rejections[r.index()].inc();
    }
    /// Count a client frame.
    pub(crate) fn message_in(&self, k: InKind) {
        self.messages_in[k.index()].inc();
    }
    /// All client frames.
    pub fn message_in_total(&self) -> u64 {
        self.messages_in.iter().map(Counter::get).sum()
    }
    /// Count a server frame.
    pub(crate) fn message_out(&self, k: OutKind) {
        self.messages_out[k.index()].inc();
    }
    /// Count `n` server frames of one kind.
    pub(crate) fn message_out_n(&self, k: OutKind, n: u64) {
        self.messages_out[k.index()].add(n);
    }
    /// All server frames.
    pub fn message_out_total(&self) -> u64 {
        self.messages_out.iter().map(Counter::get).sum()
    }
    /// Count a finished run.
    pub(crate) fn run_finished(&self, outcome: RunOutcome) {
        self.runs_finished[outcome.index()].inc();
    }
    /// Runs finished with `outcome`.
    pub(crate) fn runs_finished(&self, outcome: RunOutcome) -> u64 {
        self.runs_finished[outcome.index()].get()
    }
    /// The latency histogram of a store operation.
    pub(crate) fn store_latency(&self, op: StoreOp) -> &Histogram {
        &self.store_latency[op.index()]
    }

    /// Render every metric, plus the live gauges the caller reads from the registry and store,
    /// in the Prometheus text format: one `Family` row per metric, in this order.
    pub(crate) fn render(&self, live: &LiveGauges) -> String {
        use Sample::{Counter as C, Counters, Gauge as G, Histogram as H, Histograms};
        let families = [
            Family("tether_thread_mismatches_total", "Frames whose thread_id did not match their connection's context, and cleanups that found no entry for their key.",
                Counters("source", by(MismatchSource::ALL, &self.thread_mismatches, MismatchSource::label))),
            Family("tether_manager_cleanups_attempted_total", "Manager cleanups attempted (last guard of a manager dropped).", C(self.cleanups_attempted.get())),
            Family("tether_manager_cleanups_completed_total", "Manager cleanups that found and removed their manager.", C(self.cleanups_completed.get())),
            Family("tether_emergency_cleanups_total", "Registry entries the backstop reaper had to remove (expected 0).", C(self.emergency_cleanups.get())),
            Family("tether_managers_active", "Isolated managers (user, thread) alive.", G(live.managers as f64)),
            Family("tether_users_with_managers", "Users with at least one manager.", G(live.users as f64)),
            Family("tether_managers_per_user_avg", "Average managers per user with managers.", G(live.managers_per_user_avg)),
            Family("tether_managers_per_user_max", "Largest number of managers one user holds.", G(live.managers_per_user_max as f64)),
            Family("tether_connections_active", "WebSocket connections registered now.", G(live.connections as f64)),
            Family("tether_connections_opened_total", "WebSocket connections accepted and registered.", C(self.connections_opened.get())),
            Family("tether_connections_closed_total", "WebSocket connections closed, by close code (1006: no close handshake).",
                Counters("code", self.closes_by_code())),
            Family("tether_limit_rejections_total", "Connections refused with 4008 by a per-user limit.",
                Counters("limit", by(LimitKind::ALL, &self.limit_rejections, LimitKind::label))),
            Family("tether_handshake_rejections_total", "Upgrade requests refused before the upgrade.",
                Counters("reason", by(Rejection::ALL, &self.handshake_rejections, Rejection::label))),
            Family("tether_messages_in_total", "Client frames received, by type.",
                Counters("type", by(InKind::ALL, &self.messages_in, InKind::label))),
            Family("tether_messages_out_total", "Server frames queued, by type.",
                Counters("type", by(OutKind::ALL, &self.messages_out, OutKind::label))),
            Family("tether_runs_started_total", "Agent runs started.", C(self.runs_started.get())),
            Family("tether_runs_finished_total", "Agent runs finished, by outcome.",
                Counters("outcome", by(RunOutcome::ALL, &self.runs_finished, RunOutcome::label))),
            Family("tether_runs_active", "Agent runs in progress.", G(self.runs_active.get() as f64)),
            Family("tether_run_duration_seconds", "Agent run duration, start to completed/error.", H(&self.run_duration)),
            Family("tether_db_sessions_opened_total", "Request-scoped database sessions opened.", C(self.sessions_opened.get())),
            Family("tether_db_sessions_committed_total", "Database sessions committed.", C(self.sessions_committed.get())),
            Family("tether_db_sessions_rolled_back_total", "Database sessions rolled back (dropped without commit, or failed).", C(self.sessions_rolled_back.get())),
            Family("tether_db_sessions_open", "Database sessions open now.", G(self.sessions_open.get() as f64)),
            Family("tether_store_query_seconds", "Store latency by operation.",
                Histograms("op", StoreOp::ALL.iter().map(|op| (op.label(), self.store_latency(*op))).collect())),
            Family("tether_store_commit_batch_size", "Sessions committed per group commit.", H(&self.store_batch_size)),
            Family("tether_outbound_queue_drops_total", "Frames dropped because a connection's outbound queue was full.", C(self.outbound_drops.get())),
            Family("tether_slow_consumer_closes_total", "Connections closed with 4009 (outbound queue overflow).", C(self.slow_consumer_closes.get())),
            Family("tether_heartbeat_timeouts_total", "Connections closed with 4000 (no pong in time).", C(self.heartbeat_timeouts.get())),
            Family("tether_audit_rows_recovered_total", "Audit rows left open by an earlier process and closed at start.", C(self.audit_rows_recovered.get())),
            Family("tether_draining", "1 while the node drains.", G(if live.draining { 1.0 } else { 0.0 })),
            Family("tether_tasks_alive", "Live tokio tasks (connections, runs, HTTP connections, housekeeping).", G(live.tasks_alive as f64)),
        ];
        let mut o = String::with_capacity(8 * 1024);
        for f in &families {
            f.write(&mut o);
        }
        o
    }

    /// `tether_connections_closed_total`'s series: the codes of the table that have one, by
    /// number, then `other`.
    fn closes_by_code(&self) -> Vec<(Cow<'static, str>, u64)> {
        let mut series: Vec<_> = CloseCode::ALL
            .iter()
            .zip(&self.connections_closed)
            .filter(|(c, _)| c.has_series())
            .map(|(c, n)| (Cow::Owned(c.as_u16().to_string()), n.get()))
            .collect();
        let other = self.connections_closed[CloseCode::ALL.len()].get();
        series.push((Cow::Borrowed("other"), other));
        series
    }
}

/// One metric of [`Metrics::render`]: its name, its help text and its samples.
struct Family<'a>(&'static str, &'static str, Sample<'a>);

/// The samples of one metric.
enum Sample<'a> {
    Counter(u64),
    Gauge(f64),
    /// A counter by one label: the label's name, then each value with its count.
    Counters(&'static str, Vec<(Cow<'static, str>, u64)>),
    Histogram(&'a Histogram),
    /// A histogram by one label: the label's name, then each value with its histogram.
    Histograms(&'static str, Vec<(&'static str, &'a Histogram)>),
}

/// The series of a counter labelled by a closed enum, in the enum's order.
fn by<E: Copy>(
    all: &[E],
    values: &[Counter],
    label: fn(E) -> &'static str,
) -> Vec<(Cow<'static, str>, u64)> {
    all.iter()
        .zip(values)
        .map(|(e, v)| (Cow::Borrowed(label(*e)), v.get()))
        .collect()
}

impl Family<'_> {
    #[expect(
        clippy::let_underscore_must_use,
        reason = "writing to a String cannot fail"
    )]
    fn write(&self, o: &mut String) {
        let Family(name, help, sample) = self;
        let kind = match sample {
            Sample::Counter(_) | Sample::Counters(..) => "counter",
            Sample::Gauge(_) => "gauge",
            Sample::Histogram(_) | Sample::Histograms(..) => "histogram",
        };
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        match sample {
            Sample::Counter(v) => {
                let _ = writeln!(o, "{name} {v}");
            }
            Sample::Gauge(v) => {
                let _ = writeln!(o, "{name} {v}");
            }
            Sample::Counters(label, series) => {
                for (value, n) in series {
                    let _ = writeln!(o, "{name}{{{label}=\"{value}\"}} {n}");
                }
            }
            Sample::Histogram(h) => h.write_series(o, name, ""),
            Sample::Histograms(label, series) => {
                for (value, h) in series {
                    h.write_series(o, name, &format!("{label}=\"{value}\""));
                }
            }
        }
    }
}

/// Gauges read from their owners at render time.
#[derive(Debug, Default, Clone)]
pub(crate) struct LiveGauges {
    pub(crate) connections: u64,
    pub(crate) managers: u64,
    pub(crate) users: u64,
    pub(crate) managers_per_user_avg: f64,
    pub(crate) managers_per_user_max: u64,
    pub(crate) draining: bool,
    pub(crate) tasks_alive: u64,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_fall_in_the_right_bucket() {
        let h = Histogram::new(LATENCY_BOUNDS);
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..99 {
            h.observe(0.003);
        }
        h.observe(2.0);
        let p50 = h.quantile(0.5).unwrap();
        assert!((0.0025..=0.005).contains(&p50), "{p50}");
        let p100 = h.quantile(1.0).unwrap();
        assert!((1.0..=2.5).contains(&p100), "{p100}");
    }

    #[test]
    fn render_has_no_ids_and_parses_as_text_format() {
        let m = Metrics::new();
        m.connection_closed(4008);
        m.connection_closed(1234);
        let text = m.render(&LiveGauges::default());
        assert!(text.contains("tether_connections_closed_total{code=\"4008\"} 1"));
        assert!(text.contains("tether_connections_closed_total{code=\"other\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(!name.is_empty());
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
        }
    }
}
