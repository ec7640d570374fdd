//! The protocol checker: every frame of a connection against PROTOCOL.md. Per run `ack`,
//! `agent_started`, then thinking/tool/delta events, then exactly one terminal event, all with
//! the message's `reply_to` and the `ack`'s `run_id`; `seq` +1 on every thread event; every
//! frame on the connection's thread. What a frame meant comes out as an [`Outcome`].

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// What one server frame meant for the runs of a connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
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
pub(crate) struct RunChecker {
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
    pub(crate) fn new(established: &Value) -> Self {
        Self {
            thread_id: established["thread_id"].as_str().unwrap_or("").to_string(),
            last_seq: established["last_seq"].as_u64().unwrap_or(0),
            next_id: 0,
            runs: HashMap::new(),
            frames: 0,
        }
    }

    /// Mint the id of the next message and start tracking its run.
    pub(crate) fn send(&mut self, now: Instant) -> String {
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
    pub(crate) fn in_flight(&self) -> usize {
        self.runs.len()
    }

    /// Frames checked so far.
    pub(crate) fn frames(&self) -> u64 {
        self.frames
    }

    /// Check one frame; what it meant goes to `out`.
    pub(crate) fn on_frame(&mut self, v: &Value, now: Instant, out: &mut Vec<Outcome>) {
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

/// A frame as text, cut after 120 characters, for an error or violation sample.
pub(crate) fn clip(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
