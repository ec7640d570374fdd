//! Request-scoped database sessions: units of work created only from a context.
//!
//! A [`DbSession`] is opened by [`SessionFactory::create_session_from_context`], carries that
//! context's ids into every row it writes, stages writes, and is either committed
//! ([`DbSession::commit`] or [`DbSession::submit`]) or dropped, which rolls it back (nothing staged
//! reaches the database). Whatever path ends it, Drop keeps the counters true: opened, committed,
//! rolled back, open now.
//!
//! The session does not talk to the database itself: committing hands the staged writes to the
//! store's group-commit writer ([`crate::store`]), which puts many sessions in one transaction
//! (a session that fails is retried alone, so it cannot fail the others) and delivers their
//! events, in `seq` order, only after the commit.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::oneshot;

use crate::context::UserExecutionContext;
use crate::metrics::metrics;
use crate::store::{Store, StoreError};

/// Deliver an `ack` to the sending connection instead of the event itself.
#[derive(Debug, Clone)]
pub struct AckTo {
    /// The stored user message's id.
    pub message_id: String,
    /// The run the message starts.
    pub run_id: String,
}

/// A thread event to append; the writer assigns its `seq` and timestamp.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The thread event's type (`user_message`, `agent_thinking`, ...).
    pub kind: &'static str,
    /// The run the event belongs to.
    pub run_id: Option<Arc<str>>,
    /// The client `id` the event answers.
    pub reply_to: Option<Arc<str>>,
    /// The event's `data`.
    pub data: Value,
    /// For `user_message`: the sender (the session's connection) gets an `ack`, the user's other
    /// connections on the thread get the event.
    pub ack: Option<AckTo>,
    /// The frame serialized up to its `seq` and time; the store fills it in when the session is
    /// submitted (leave it `None`).
    pub prepared: Option<crate::protocol::PreparedFrame>,
}

/// The role of a stored chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The user's message.
    User,
    /// The agent's reply.
    Agent,
}

impl Role {
    /// The role as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Agent => "agent",
        }
    }
}

/// One write staged in a [`DbSession`], stored when the session commits (named apart from
/// `std::io::Write`, which it would shadow).
#[derive(Debug, Clone)]
pub enum StagedWrite {
    /// Create the session's thread, owned by its user.
    CreateThread,
    /// A thread event.
    Event(NewEvent),
    /// A chat message (the thread's history for agents).
    Message {
        /// The message's id.
        message_id: String,
        /// Who wrote it.
        role: Role,
        /// Its text.
        content: String,
        /// The run it started or answered.
        run_id: Option<String>,
    },
    /// Record a run (of the given child context) as started.
    RunStarted {
        /// The run's child context.
        run: UserExecutionContext,
    },
    /// Record the session's run as finished.
    RunFinished {
        /// `completed`, `failed` or `cancelled`.
        status: &'static str,
        /// How long the run took.
        duration_ms: u64,
        /// The `agent_error` code, if it failed.
        error_code: Option<String>,
    },
    /// Not stored: a frame (a text delta) delivered in order with the session's thread events.
    Transient {
        /// The frame's JSON text.
        text: String,
    },
    /// If this session fails, `gate` fails (staged by the session that stores a user message).
    Opens(Gate),
    /// This session fails without writing anything if `gate` has failed (staged by every
    /// session of the run the message starts).
    Requires(Gate),
}

/// Lets a run start before its user message is committed, which saves one commit round per
/// run: the run's sessions are queued behind the message's session (the writer keeps order),
/// and if the message's session fails, the writer fails every session that requires the gate,
/// so none of the run's events is stored or delivered. A failed gate never reopens.
///
/// A gate belongs to the isolation key of the context it was made from, and only sessions of
/// that key can pass it (others are refused): so a failing message and its run always fail on
/// the same thread, before any `seq` of that thread is reserved, and no gap can appear.
#[derive(Debug, Clone)]
pub struct Gate {
    failed: Arc<std::sync::atomic::AtomicBool>,
    key: crate::context::IsolationKey,
}

impl Gate {
    /// A gate for a session of `ctx`, open until that session fails.
    pub fn new(ctx: &UserExecutionContext) -> Self {
        Self {
            failed: Arc::default(),
            key: ctx.isolation_key().clone(),
        }
    }

    /// Whether the session it belongs to failed (what requires it is then refused).
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `ctx` has the gate's isolation key.
    pub(crate) fn belongs_to(&self, ctx: &UserExecutionContext) -> bool {
        *ctx.isolation_key() == self.key
    }

    /// Whether a session of `ctx` may pass (not failed, same isolation key).
    pub(crate) fn admits(&self, ctx: &UserExecutionContext) -> bool {
        !self.failed() && self.belongs_to(ctx)
    }

    pub(crate) fn fail(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Opens sessions. Cheap to clone.
#[derive(Clone)]
pub struct SessionFactory {
    store: Arc<dyn Store>,
}

impl SessionFactory {
    /// Sessions on `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The only way to open a session: from an existing context, whose ids it uses.
    pub fn create_session_from_context(&self, ctx: &UserExecutionContext) -> DbSession {
        metrics().sessions_opened.inc();
        metrics().sessions_open.inc();
        DbSession {
            ctx: ctx.clone(),
            store: self.store.clone(),
            writes: Vec::new(),
            finished: false,
        }
    }

    /// The store sessions commit to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// A unit of work. Dropping it uncommitted rolls it back.
#[must_use = "a session that is dropped is rolled back"]
pub struct DbSession {
    ctx: UserExecutionContext,
    store: Arc<dyn Store>,
    writes: Vec<StagedWrite>,
    finished: bool,
}

impl std::fmt::Debug for DbSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbSession")
            .field("ctx", &self.ctx)
            .field("writes", &self.writes.len())
            .finish()
    }
}

/// The outcome of a submitted session: the `seq`s of its events, once committed.
pub(crate) type CommitReceipt = oneshot::Receiver<Result<Vec<u64>, StoreError>>;

impl DbSession {
    /// The context this session belongs to.
    pub fn context(&self) -> &UserExecutionContext {
        &self.ctx
    }

    /// Stage a write; nothing is written before `commit` or `submit`.
    pub fn stage(&mut self, write: StagedWrite) -> &mut Self {
        self.writes.push(write);
        self
    }

    /// Hand the writes to the store's writer without waiting for the commit. Order is kept:
    /// sessions submitted one after the other commit (and deliver) in that order. The receipt
    /// tells the outcome; dropping it is fine.
    pub async fn submit(mut self) -> Result<CommitReceipt, StoreError> {
        let writes = std::mem::take(&mut self.writes);
        self.finished = true;
        let res = self.store.submit(self.ctx.clone(), writes).await;
        // The writer counts committed or rolled back once the transaction ends; a session the
        // writer never received is rolled back here.
        if res.is_err() {
            metrics().sessions_rolled_back.inc();
        }
        res
    }

    /// Commit and wait: returns the `seq`s of the appended events.
    pub async fn commit(self) -> Result<Vec<u64>, StoreError> {
        let receipt = self.submit().await?;
        receipt.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for DbSession {
    fn drop(&mut self) {
        metrics().sessions_open.dec();
        if !self.finished {
            metrics().sessions_rolled_back.inc();
        }
    }
}
