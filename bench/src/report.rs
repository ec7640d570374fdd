//! How a run is shown: its report as JSON (`--json`), or a one-screen summary per mode.

use serde::Serialize;

use crate::chat::{ChatReport, StalledCompareReport};
use crate::churn::{ChurnReport, Residue};
use crate::cli::CommonArgs;
use crate::idle::IdleReport;
use crate::stalled::StalledReport;
use crate::stats::Problems;

/// Print `r` as JSON on stdout with `--json`, else its summary.
pub(crate) fn print_report<R: Serialize>(
    common: &CommonArgs,
    r: &R,
    summary: impl FnOnce() -> String,
) {
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
pub(crate) fn chat_summary(r: &ChatReport) -> String {
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

/// Both runs' summaries, then the comparison.
pub(crate) fn stalled_compare_summary(r: &StalledCompareReport) -> String {
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
pub(crate) fn idle_summary(r: &IdleReport) -> String {
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
pub(crate) fn churn_summary(r: &ChurnReport) -> String {
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
