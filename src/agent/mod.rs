//! Agents and their runs.
//!
//! An [`Agent`] receives a run's child context (same user and thread as the connection, its own
//! run and request ids) and an [`EventSink`]; it emits `agent_thinking` and tool events and
//! returns the reply. [`drive_run`] owns everything around it: `agent_started`, the final
//! `agent_completed` or `agent_error` (exactly one), cancellation, the timeout, the run's row,
//! its span and its metrics.
//!
//! Every event is written through a session of the run's context. The sink stages events;
//! [`drive_run`] submits what is staged as one session whenever the agent waits and when it
//! ends, without waiting for the commit (the store keeps the order and delivers each event only
//! after its commit), so an agent's steps are stored and seen as it goes, steps taken without
//! waiting share one session, and the run waits for all of its sessions before it is over. A
//! run also starts without waiting for its user message's commit: its sessions require the
//! message session's [`Gate`], so they are stored (and delivered) only if the message is, and a
//! fast run commits in the same transaction as its message. An agent with effects outside
//! Tether (an HTTP agent calls a service) may therefore see a message whose commit then fails
//! (a database failure); none of its events is stored then, and the sender gets an `error`.

//! [`DemoAgent`] is the built-in agent. It is a demo and says so: no model, it counts the words
//! of the message with a real (small) tool and echoes the text.

mod runs;

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::UserExecutionContext;
use crate::ids;
use crate::metrics::{metrics, RunOutcome};
use crate::protocol::{self, FrameMeta};
use crate::session::{CommitReceipt, Gate, NewEvent, Role, SessionFactory, Write};
use crate::store::StoreError;

pub(crate) use runs::ActiveRuns;

/// Why a run ended without a reply. `code` is the `agent_error` code on the wire.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The user (or shutdown) cancelled the run.
    #[error("run cancelled")]
    Cancelled,
    /// The run took longer than `TETHER_RUN_TIMEOUT_MS`.
    #[error("run timed out after {0:?}")]
    Timeout(Duration),
    /// The agent failed; the text is shown to the user.
    #[error("agent failed: {0}")]
    Failed(String),
    /// A session of the run could not be stored.
    #[error("store failed: {0}")]
    Store(#[from] StoreError),
}

impl AgentError {
    /// The `agent_error` code on the wire.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Cancelled => "cancelled",
            AgentError::Timeout(_) => "timeout",
            AgentError::Failed(_) => "agent_failed",
            AgentError::Store(_) => "internal",
        }
    }

    fn outcome(&self) -> RunOutcome {
        match self {
            AgentError::Cancelled => RunOutcome::Cancelled,
            _ => RunOutcome::Failed,
        }
    }

    /// What the user is told (no internals).
    fn public_message(&self) -> String {
        match self {
            AgentError::Cancelled => "run cancelled by the user".into(),
            AgentError::Timeout(d) => format!("run timed out after {} s", d.as_secs()),
            AgentError::Failed(m) => m.clone(),
            AgentError::Store(_) => "internal error while storing the run".into(),
        }
    }
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// The user's message.
    pub content: String,
    /// The id of the user message that started the run.
    pub message_id: String,
    /// The gate of the session that stores the message, when the run starts before that commit
    /// is confirmed: the run's events are then stored only if the message is.
    pub after: Option<Gate>,
}

/// An agent.
///
/// Guarantee expected of implementations: emit only through the sink, return the whole reply
/// text, and stop at the next `.await` when the run is cancelled (the future is dropped).
#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// The name shown in `agent_started`.
    fn name(&self) -> &str;

    /// Run once for one user message: emit through `sink`, return the whole reply text.
    async fn run(&self, input: &RunInput, sink: &mut EventSink) -> Result<String, AgentError>;
}

/// Where an agent puts its run's events. They are staged, and the run's driver submits what was
/// staged as one session of the run's context each time the agent waits (its future returns
/// `Pending`) and when it ends: an agent that streams as it works has each step stored and
/// delivered before it waits for the next, and steps taken without waiting share a session.
pub struct EventSink {
    ctx: UserExecutionContext,
    reply_to: Option<Arc<str>>,
    staged: Staged,
    reply_message_id: String,
    delta_offset: usize,
}

/// Writes staged by the sink, taken by the run's [`Flusher`].
type Staged = Arc<std::sync::Mutex<Vec<Write>>>;

impl EventSink {
    fn new(ctx: UserExecutionContext, reply_to: Option<Arc<str>>) -> Self {
        Self {
            ctx,
            reply_to,
            staged: Staged::default(),
            reply_message_id: ids::message_id(),
            delta_offset: 0,
        }
    }

    /// The run's child context (same user and thread as the connection).
    pub fn context(&self) -> &UserExecutionContext {
        &self.ctx
    }

    fn event(&self, kind: &'static str, data: Value) -> Write {
        Write::Event(NewEvent {
            kind,
            run_id: Some(self.ctx.run_id().into()),
            reply_to: self.reply_to.clone(),
            data,
            ack: None,
            prepared: None,
        })
    }

    fn stage(&self, writes: impl IntoIterator<Item = Write>) {
        // Never held across an await; a panic elsewhere cannot leave the Vec inconsistent.
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        staged.extend(writes);
    }

    /// `agent_thinking`.
    pub async fn thinking(&mut self, thought: &str) -> Result<(), AgentError> {
        let w = self.event("agent_thinking", json!({ "thought": thought }));
        self.stage([w]);
        Ok(())
    }

    /// `tool_executing`; returns the `tool_call_id` to pass to [`EventSink::tool_completed`].
    pub async fn tool_executing(&mut self, tool: &str, input: Value) -> Result<String, AgentError> {
        let call = ids::tool_call_id();
        let w = self.event(
            "tool_executing",
            json!({ "tool": tool, "input": input, "tool_call_id": call }),
        );
        self.stage([w]);
        Ok(call)
    }

    /// `tool_completed` for a call started with [`EventSink::tool_executing`].
    pub async fn tool_completed(
        &mut self,
        tool: &str,
        tool_call_id: &str,
        output: Value,
        duration: Duration,
    ) -> Result<(), AgentError> {
        let w = self.event(
            "tool_completed",
            json!({ "tool": tool, "output": output, "duration_ms": duration.as_millis() as u64, "tool_call_id": tool_call_id }),
        );
        self.stage([w]);
        Ok(())
    }

    /// `agent_text_delta`: a piece of the reply, not stored, droppable for slow consumers.
    pub async fn text_delta(&mut self, delta: &str) -> Result<(), AgentError> {
        let text = protocol::frame(
            "agent_text_delta",
            FrameMeta {
                thread_id: Some(self.ctx.thread_id()),
                run_id: Some(self.ctx.run_id()),
                reply_to: self.reply_to.as_deref(),
                ..Default::default()
            },
            &json!({ "message_id": self.reply_message_id, "offset": self.delta_offset, "delta": delta }),
        );
        self.delta_offset += delta.chars().count();
        self.stage([Write::Transient { text }]);
        Ok(())
    }
}

/// Submits what the sink staged, as sessions of the run's context, and remembers their receipts.
struct Flusher {
    factory: SessionFactory,
    ctx: UserExecutionContext,
    staged: Staged,
    /// The gate of the user message's session: every session of the run requires it.
    after: Option<Gate>,
    receipts: Vec<CommitReceipt>,
}

impl Flusher {
    fn has_staged(&self) -> bool {
        !self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    async fn flush(&mut self) -> Result<(), AgentError> {
        let writes = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        if writes.is_empty() {
            return Ok(());
        }
        let mut session = self.factory.create_session_from_context(&self.ctx);
        if let Some(gate) = &self.after {
            session.stage(Write::Requires(gate.clone()));
        }
        for w in writes {
            session.stage(w);
        }
        self.receipts.push(session.submit().await?);
        Ok(())
    }

    /// Wait for every submitted session to commit.
    async fn settle(&mut self) -> Result<(), AgentError> {
        let mut first_err = None;
        for r in self.receipts.drain(..) {
            match r.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(AgentError::Store(e));
                }
                Err(_) => {
                    first_err.get_or_insert(AgentError::Store(StoreError::Closed));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Run an agent for one user message, from `agent_started` to exactly one of
/// `agent_completed` / `agent_error`. `ctx` is the run's child context (its row was written with
/// the user message).
pub(crate) async fn drive_run(
    agent: Arc<dyn Agent>,
    factory: SessionFactory,
    ctx: UserExecutionContext,
    input: RunInput,
    reply_to: Option<Arc<str>>,
    cancel: CancellationToken,
    timeout: Duration,
) -> Result<(), AgentError> {
    let span = ctx.run_span();
    async move {
        let m = metrics();
        m.runs_started.inc();
        m.runs_active.inc();
        let started = Instant::now();
        tracing::info!("run started");
        let mut sink = EventSink::new(ctx.clone(), reply_to);
        let mut flusher = Flusher {
            factory,
            ctx: ctx.clone(),
            staged: sink.staged.clone(),
            after: input.after.clone(),
            receipts: Vec::new(),
        };
        sink.stage([sink.event("agent_started", json!({ "agent": agent.name(), "run_id": ctx.run_id() }))]);
        // Only the agent's own work is cancelled or timed out: a flush always runs to its end
        // (it waits at most for room in the writer's queue), so nothing staged is lost.
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut fut = agent.run(&input, &mut sink);
        let mut result = loop {
            // Poll the agent; whenever it waits with events staged, submit them first.
            let step = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Err(AgentError::Cancelled),
                _ = &mut deadline => break Err(AgentError::Timeout(timeout)),
                step = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending if flusher.has_staged() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }) => step,
            };
            match step {
                Some(r) => break r,
                None => {
                    if let Err(e) = flusher.flush().await {
                        break Err(e);
                    }
                }
            }
        };
        drop(fut);
        let duration_ms = started.elapsed().as_millis() as u64;
        let final_writes = match &result {
            Ok(reply) => vec![
                Write::Message {
                    message_id: sink.reply_message_id.clone(),
                    role: Role::Agent,
                    content: reply.clone(),
                    run_id: Some(ctx.run_id().to_string()),
                },
                sink.event(
                    "agent_completed",
                    json!({ "message_id": sink.reply_message_id, "content": reply, "duration_ms": duration_ms }),
                ),
                Write::RunFinished {
                    status: "completed",
                    duration_ms,
                    error_code: None,
                },
            ],
            Err(e) => vec![
                sink.event("agent_error", json!({ "code": e.code(), "message": e.public_message() })),
                Write::RunFinished {
                    status: if matches!(e, AgentError::Cancelled) { "cancelled" } else { "failed" },
                    duration_ms,
                    error_code: Some(e.code().to_string()),
                },
            ],
        };
        sink.stage(final_writes);
        if let Err(e) = flusher.flush().await {
            result = Err(e);
        }
        if let Err(e) = flusher.settle().await {
            tracing::error!(error = %e, "run events were not all stored");
            result = Err(e);
        }
        let outcome = match &result {
            Ok(_) => RunOutcome::Completed,
            Err(e) => e.outcome(),
        };
        m.runs_active.dec();
        m.run_finished(outcome);
        m.run_duration.observe(started.elapsed().as_secs_f64());
        tracing::info!(outcome = outcome.label(), duration_ms, "run finished");
        result.map(|_| ())
    }
    .instrument(span)
    .await
}

/// The built-in demo agent. Not an AI: it says so, runs a real word-count tool on the message
/// and echoes it. `delay` paces its steps so a person can watch them (0 for benchmarks).
pub struct DemoAgent {
    /// Pause between the demo's steps (`TETHER_AGENT_DELAY_MS`).
    pub delay: Duration,
}

impl DemoAgent {
    async fn pace(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// The demo agent's tool: words and characters of a text.
pub(crate) fn word_count(text: &str) -> Value {
    json!({ "words": text.split_whitespace().count(), "characters": text.chars().count() })
}

/// The demo agent's reply to `content`, given its word count (`word_count`'s output).
pub(crate) fn demo_reply(content: &str, count: &Value) -> String {
    let words = count["words"].as_u64().unwrap_or(0);
    let chars = count["characters"].as_u64().unwrap_or(0);
    format!(
        "(demo agent) You said: \"{content}\" ({words} word{}, {chars} character{}). I am a demo without a model; connect a real agent to get real answers.",
        if words == 1 { "" } else { "s" },
        if chars == 1 { "" } else { "s" },
    )
}

/// `text` cut in two at its middle character (the demo's two text deltas).
pub(crate) fn halves(text: &str) -> (&str, &str) {
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(i, _)| i);
    text.split_at(cut)
}

#[async_trait]
impl Agent for DemoAgent {
    fn name(&self) -> &str {
        "demo"
    }

    async fn run(&self, input: &RunInput, sink: &mut EventSink) -> Result<String, AgentError> {
        self.pace().await;
        sink.thinking("I am Tether's built-in demo agent, not an AI model: I will count the words of your message and echo it.")
            .await?;
        self.pace().await;
        let started = Instant::now();
        let call = sink
            .tool_executing("word_count", json!({ "text": input.content }))
            .await?;
        let output = word_count(&input.content);
        self.pace().await;
        sink.tool_completed("word_count", &call, output.clone(), started.elapsed())
            .await?;
        let reply = demo_reply(&input.content, &output);
        // Stream the reply in two pieces, as a real agent would token by token.
        let (first, second) = halves(&reply);
        sink.text_delta(first).await?;
        self.pace().await;
        sink.text_delta(second).await?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_count_counts_words_and_characters() {
        assert_eq!(
            word_count("hello  wide world"),
            json!({"words": 3, "characters": 17})
        );
        assert_eq!(word_count(""), json!({"words": 0, "characters": 0}));
        assert_eq!(word_count("héllo"), json!({"words": 1, "characters": 5}));
    }
}
