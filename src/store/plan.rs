//! What a batch writes, whatever the backend: the new threads, how many `seq`s each thread
//! needs, and, once the backend has reserved them, [`plan`]: every frame built, every row to
//! write, every op's result, in batch order.
//!
//! Reserving the `seq`s and writing the rows are the backends'; the row format of
//! `thread_events` is the codec's.

use std::collections::HashMap;
use std::sync::Arc;

use super::codec;
use super::writer::{Applied, Op, Outcome};
use super::StoreError;
use crate::broker::Delivery;
use crate::context::UserExecutionContext;
use crate::protocol::{self, FrameMeta, PreparedFrame};
use crate::registry::OutFrame;
use crate::session::{AckTo, NewEvent, StagedWrite};

/// One `thread_events` row: the consecutive events of one thread in one batch (see `codec`).
pub(super) struct EventRow<'a> {
    pub(super) thread_id: &'a str,
    /// The last event's seq.
    pub(super) seq: i64,
    /// The last event's kind.
    pub(super) kind: &'a str,
    /// The last event's run.
    pub(super) run_id: Option<&'a str>,
    /// The events' frames, newline-separated.
    pub(super) frame: String,
}

/// One `messages` row.
pub(super) struct MessageRow<'a> {
    /// The session's context: thread, user and request ids.
    pub(super) ctx: &'a UserExecutionContext,
    pub(super) message_id: &'a str,
    pub(super) run_id: Option<&'a str>,
    pub(super) role: &'static str,
    pub(super) content: &'a str,
}

/// A run's end: a `runs` row inserted finished, or an update of one a batch before inserted.
pub(super) struct RunFinish<'a> {
    pub(super) run_id: &'a str,
    pub(super) status: &'static str,
    pub(super) duration_ms: i64,
    pub(super) error_code: Option<&'a str>,
}

/// The contexts of the sessions that create their thread.
pub(super) fn new_threads(ops: &[Op]) -> Vec<&UserExecutionContext> {
    ops.iter()
        .filter(|op| !op.blocked())
        .filter_map(|op| match op {
            Op::Session { ctx, writes, .. }
                if writes
                    .iter()
                    .any(|w| matches!(w, StagedWrite::CreateThread)) =>
            {
                Some(ctx)
            }
            _ => None,
        })
        .collect()
}

/// How many `seq`s each (thread, user) of the batch needs, in order of first appearance.
pub(super) fn seq_requests(ops: &[Op]) -> Vec<(&str, &str, i64)> {
    let mut wanted: Vec<(&str, &str, i64)> = Vec::new();
    for op in ops.iter().filter(|op| !op.blocked()) {
        if let Op::Session { ctx, writes, .. } = op {
            let n = writes
                .iter()
                .filter(|w| matches!(w, StagedWrite::Event(_)))
                .count() as i64;
            if n == 0 {
                continue;
            }
            // Keyed by thread and user: another user's session on this thread id reserves
            // nothing (its user does not own the thread) and fails alone in `plan`, whichever
            // comes first in the batch.
            match wanted
                .iter_mut()
                .find(|(t, u, _)| *t == ctx.thread_id() && *u == ctx.user_id())
            {
                Some(w) => w.2 += n,
                None => wanted.push((ctx.thread_id(), ctx.user_id(), n)),
            }
        }
    }
    wanted
}

/// Next seq to hand out, per thread (with the user it was reserved for).
pub(super) type NextSeqs<'a> = HashMap<&'a str, (&'a str, u64)>;

/// The rows a batch writes once its seqs are reserved.
#[derive(Default)]
pub(super) struct Rows<'a> {
    pub(super) events: Vec<EventRow<'a>>,
    pub(super) messages: Vec<MessageRow<'a>>,
    /// Runs started: each the run's own context.
    pub(super) runs: Vec<&'a UserExecutionContext>,
    pub(super) finishes: Vec<RunFinish<'a>>,
    /// Audit rows opened: the connection's context and when.
    pub(super) opens: Vec<(&'a UserExecutionContext, i64)>,
    /// Audit rows closed: connection id, when, reason, close code.
    pub(super) closes: Vec<(&'a str, i64, &'a str, i64)>,
}

/// Assign seqs in batch order, build every frame, and collect the rows to write and each
/// op's result. The same for every backend: only how rows reach the database differs.
pub(super) fn plan<'a>(
    ops: &'a [Op],
    next: &mut NextSeqs<'a>,
    now: i64,
) -> (Rows<'a>, Vec<Outcome>) {
    let mut planner = Planner {
        rows: Rows::default(),
        // One time for the whole batch: it commits as one.
        ts: protocol::rfc3339_ms(now as u64),
        event_row: HashMap::default(),
    };
    let mut results: Vec<Outcome> = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(planner.op(op, next));
    }
    (planner.rows, results)
}

/// [`plan`]'s state while it walks a batch.
struct Planner<'a> {
    rows: Rows<'a>,
    /// The batch's time, formatted once.
    ts: String,
    /// The row of each thread's events in this batch (their seqs are consecutive).
    event_row: HashMap<&'a str, usize>,
}

impl<'a> Planner<'a> {
    /// One op's rows and outcome.
    fn op(&mut self, op: &'a Op, next: &mut NextSeqs<'a>) -> Outcome {
        match op {
            Op::Session { ctx, writes, .. } => self.session(op, ctx, writes, next),
            Op::AuditOpen { ctx, at } => {
                self.rows.opens.push((ctx, *at));
                Ok(Applied::default())
            }
            Op::AuditClose {
                connection_id,
                code,
                reason,
                at,
            } => {
                self.rows
                    .closes
                    .push((connection_id, *at, reason, i64::from(*code)));
                Ok(Applied::default())
            }
            Op::Shutdown { .. } => Ok(Applied::default()),
        }
    }

    /// A session's rows, frames and seqs; or, if it is blocked by a gate or its thread is not
    /// its user's, its failure (it then writes nothing, and fails the gates it opens).
    fn session(
        &mut self,
        op: &'a Op,
        ctx: &'a UserExecutionContext,
        writes: &'a [StagedWrite],
        next: &mut NextSeqs<'a>,
    ) -> Outcome {
        // Checked in batch order: a gate shut by an earlier op of this batch counts.
        if op.blocked() {
            op.fail_gates();
            return Err(StoreError::MessageNotStored);
        }
        let has_events = writes.iter().any(|w| matches!(w, StagedWrite::Event(_)));
        let mut seq_slot = next
            .get_mut(ctx.thread_id())
            .filter(|(user, _)| *user == ctx.user_id())
            .map(|(_, seq)| seq);
        if has_events && seq_slot.is_none() {
            op.fail_gates();
            return Err(StoreError::ThreadNotFound);
        }
        let mut applied = Applied::default();
        for w in writes {
            self.write(ctx, w, seq_slot.as_deref_mut(), &mut applied);
        }
        Ok(applied)
    }

    /// One staged write of a session that passed; `seq_slot` is its thread's next seq.
    fn write(
        &mut self,
        ctx: &'a UserExecutionContext,
        w: &'a StagedWrite,
        seq_slot: Option<&mut u64>,
        applied: &mut Applied,
    ) {
        match w {
            StagedWrite::CreateThread => {}
            StagedWrite::Event(ev) => {
                let Some(slot) = seq_slot else {
                    return;
                };
                let seq = *slot;
                *slot += 1;
                self.event(ctx, ev, seq, applied);
            }
            StagedWrite::Message {
                message_id,
                role,
                content,
                run_id,
            } => self.rows.messages.push(MessageRow {
                ctx,
                message_id,
                run_id: run_id.as_deref(),
                role: role.as_str(),
                content,
            }),
            StagedWrite::RunStarted { run } => self.rows.runs.push(run),
            StagedWrite::RunFinished {
                status,
                duration_ms,
                error_code,
            } => self.rows.finishes.push(RunFinish {
                run_id: ctx.run_id(),
                status,
                duration_ms: *duration_ms as i64,
                error_code: error_code.as_deref(),
            }),
            StagedWrite::Opens(_) | StagedWrite::Requires(_) => {}
            StagedWrite::Transient { text } => {
                let mut frame = OutFrame::new(0, text.as_str());
                frame.droppable = true;
                applied.deliveries.push(Delivery::thread(ctx, frame, None));
            }
        }
    }

    /// An event with its seq: its frame, its delivery (with an `ack` for the sender if it
    /// asks for one), and its place in its thread's row.
    fn event(
        &mut self,
        ctx: &'a UserExecutionContext,
        ev: &'a NewEvent,
        seq: u64,
        applied: &mut Applied,
    ) {
        let text = match &ev.prepared {
            Some(p) => p.finish(seq, &self.ts),
            None => prepare(ctx, ev).finish(seq, &self.ts),
        };
        applied.seqs.push(seq);
        let ack = ev
            .ack
            .as_ref()
            .map(|to| ack(ctx, ev.reply_to.as_deref(), to, seq, &self.ts));
        applied.deliveries.push(Delivery::thread(
            ctx,
            OutFrame::new(seq, text.as_str()),
            ack,
        ));
        self.append(ctx.thread_id(), ev, seq, text);
    }

    /// Add an event's frame to its thread's row in this batch, or start that row.
    fn append(&mut self, thread_id: &'a str, ev: &'a NewEvent, seq: u64, text: String) {
        match self.event_row.get(thread_id) {
            Some(&i) => {
                let row = &mut self.rows.events[i];
                row.seq = seq as i64;
                row.kind = ev.kind;
                row.run_id = ev.run_id.as_deref();
                codec::push_frame(&mut row.frame, &text);
            }
            None => {
                self.event_row.insert(thread_id, self.rows.events.len());
                self.rows.events.push(EventRow {
                    thread_id,
                    seq: seq as i64,
                    kind: ev.kind,
                    run_id: ev.run_id.as_deref(),
                    frame: text,
                });
            }
        }
    }
}

/// The `ack` the sender of a user message gets instead of the event: its connection and frame.
fn ack(
    ctx: &UserExecutionContext,
    reply_to: Option<&str>,
    to: &AckTo,
    seq: u64,
    ts: &str,
) -> (Arc<str>, OutFrame) {
    let ack = protocol::frame_at(
        "ack",
        FrameMeta {
            thread_id: Some(ctx.thread_id()),
            seq: Some(seq),
            reply_to,
            ..Default::default()
        },
        ts,
        &protocol::AckData {
            message_id: &to.message_id,
            run_id: &to.run_id,
            seq,
        },
    );
    (ctx.connection_id_arc().clone(), OutFrame::new(seq, ack))
}

/// A thread event's frame, serialized up to its `seq` and time.
pub(super) fn prepare(ctx: &UserExecutionContext, ev: &NewEvent) -> PreparedFrame {
    PreparedFrame::new(
        ev.kind,
        Some(ctx.thread_id()),
        ev.run_id.as_deref(),
        ev.reply_to.as_deref(),
        &ev.data,
    )
}
