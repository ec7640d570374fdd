//! The run's driver: [`drive_run`] takes a run from `agent_started` to exactly one terminal
//! event (`agent_completed` or `agent_error`), with cancellation, the timeout, the run's row,
//! span and metrics; its [`Flusher`] submits what the agent staged, as sessions of the run's
//! context, each time the agent waits.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::sink::Staged;
use super::{Agent, AgentError, EventSink, RunInput};
use crate::context::UserExecutionContext;
use crate::metrics::{metrics, RunOutcome};
use crate::session::{CommitReceipt, Gate, Role, SessionFactory, StagedWrite};
use crate::store::StoreError;

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
            session.stage(StagedWrite::Requires(gate.clone()));
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
                StagedWrite::Message {
                    message_id: sink.reply_message_id.clone(),
                    role: Role::Agent,
                    content: reply.clone(),
                    run_id: Some(ctx.run_id().to_string()),
                },
                sink.event(
                    "agent_completed",
                    json!({ "message_id": sink.reply_message_id, "content": reply, "duration_ms": duration_ms }),
                ),
                StagedWrite::RunFinished {
                    status: "completed",
                    duration_ms,
                    error_code: None,
                },
            ],
            Err(e) => vec![
                sink.event("agent_error", json!({ "code": e.code(), "message": e.public_message() })),
                StagedWrite::RunFinished {
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
