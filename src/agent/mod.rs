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
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` | the seam: [`Agent`] (its guarantee), [`RunInput`], [`AgentError`] |
//! | `sink` | [`EventSink`]: the events an agent may emit |
//! | `run` | the run's driver and the flusher that submits what the agent staged |
//! | `runs` | the runs in progress on this node, for `cancel_run` |
//! | `demo` | [`DemoAgent`], the built-in agent: no model, and it says so |

mod demo;
mod run;
mod runs;
mod sink;

use std::time::Duration;

use async_trait::async_trait;

use crate::metrics::RunOutcome;
use crate::session::Gate;
use crate::store::StoreError;

pub use demo::DemoAgent;
#[cfg(any(test, feature = "testing"))]
pub(crate) use demo::{demo_reply, halves, word_count};
pub(crate) use run::drive_run;
pub(crate) use runs::ActiveRuns;
pub use sink::EventSink;

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
