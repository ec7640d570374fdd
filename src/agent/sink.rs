//! [`EventSink`]: the events an agent may emit, staged for the run's driver to store.
//!
//! Its methods are `async` although they only stage: an agent awaits them, and each `.await`
//! where the agent's future returns `Pending` is where the driver (`run`) submits what was
//! staged, so an agent that streams as it works has each step stored and delivered before it
//! waits for the next.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::AgentError;
use crate::context::UserExecutionContext;
use crate::ids;
use crate::protocol::{self, FrameMeta};
use crate::session::{NewEvent, StagedWrite};

/// Where an agent puts its run's events. They are staged, and the run's driver submits what was
/// staged as one session of the run's context each time the agent waits (its future returns
/// `Pending`) and when it ends: an agent that streams as it works has each step stored and
/// delivered before it waits for the next, and steps taken without waiting share a session.
pub struct EventSink {
    pub(super) ctx: UserExecutionContext,
    pub(super) reply_to: Option<Arc<str>>,
    pub(super) staged: Staged,
    pub(super) reply_message_id: String,
    pub(super) delta_offset: usize,
}

/// Writes staged by the sink, taken by the run's flusher.
pub(super) type Staged = Arc<std::sync::Mutex<Vec<StagedWrite>>>;

impl EventSink {
    pub(super) fn new(ctx: UserExecutionContext, reply_to: Option<Arc<str>>) -> Self {
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

    pub(super) fn event(&self, kind: &'static str, data: Value) -> StagedWrite {
        StagedWrite::Event(NewEvent {
            kind,
            run_id: Some(self.ctx.run_id().into()),
            reply_to: self.reply_to.clone(),
            data,
            ack: None,
            prepared: None,
        })
    }

    pub(super) fn stage(&self, writes: impl IntoIterator<Item = StagedWrite>) {
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
        self.stage([StagedWrite::Transient { text }]);
        Ok(())
    }
}
