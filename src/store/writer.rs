//! The group-commit queue. Sessions and the audit trail send [`Op`]s through a [`Queue`]; the
//! [`Writer`] takes every op that is waiting as one batch, has the backend write it in one
//! transaction (and, if that fails, each op alone, so one bad op cannot fail the others), then
//! publishes the committed frames and answers every op, in commit order.
//!
//! The loop and the retry are here, once ([`Writer::run`]); how a backend waits for ops and
//! writes a batch is its [`BatchWriter`]; what a batch writes is the plan's.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::plan::prepare;
use super::StoreError;
use crate::broker::{Broker, Delivery};
use crate::context::UserExecutionContext;
use crate::ids::unix_ms;
use crate::metrics::{metrics, StoreOp};
use crate::session::StagedWrite;

/// How many sessions one group commit takes at most.
const MAX_BATCH: usize = 512;
/// The writer queue's bound; submitters wait (backpressure) when it is full.
const WRITER_QUEUE: usize = 8192;

/// What the writer is asked to do, in queue order.
pub(super) enum Op {
    /// A session's writes, and its waiter.
    Session {
        ctx: UserExecutionContext,
        writes: Vec<StagedWrite>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    /// Record a connection as opened.
    AuditOpen { ctx: UserExecutionContext, at: i64 },
    /// Record a connection as closed.
    AuditClose {
        connection_id: Arc<str>,
        code: u16,
        reason: String,
        at: i64,
    },
    /// Write what came before, refuse what comes after, then confirm.
    Shutdown { reply: oneshot::Sender<()> },
}

impl Op {
    /// A session that must not be written because the session it depends on failed.
    pub(super) fn blocked(&self) -> bool {
        match self {
            Op::Session { ctx, writes, .. } => writes.iter().any(|w| match w {
                StagedWrite::Requires(g) => !g.admits(ctx),
                // Only a session of the gate's own key may decide it (see `Gate`).
                StagedWrite::Opens(g) => !g.belongs_to(ctx),
                _ => false,
            }),
            _ => false,
        }
    }

    /// This op failed: fail the gates it opens, so its dependents fail too.
    pub(super) fn fail_gates(&self) {
        if let Op::Session { writes, .. } = self {
            for w in writes {
                if let StagedWrite::Opens(g) = w {
                    g.fail();
                }
            }
        }
    }
}

/// What a committed session hands on: frames for the broker, `seq`s for the waiter.
#[derive(Default)]
pub(super) struct Applied {
    pub(super) seqs: Vec<u64>,
    pub(super) deliveries: Vec<Delivery>,
}

/// One op's outcome.
pub(super) type Outcome = Result<Applied, StoreError>;

/// A batch's outcome: each op's, or the error that rolled the whole transaction back.
pub(super) type BatchResult = Result<Vec<Outcome>, StoreError>;

/// A queue: the sending side for the store, the receiving side for its backend's writer.
pub(super) fn queue(broker: Arc<dyn Broker>, node_id: Arc<str>) -> (Queue, Writer) {
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let writer = Writer {
        rx,
        broker,
        node_id,
        shutdown: None,
        publisher: None,
    };
    (Queue { tx }, writer)
}

/// The store's side of the queue.
pub(super) struct Queue {
    tx: mpsc::Sender<Op>,
}

impl Queue {
    /// Queue a session (see [`super::Store::submit`]).
    pub(super) async fn session(
        &self,
        ctx: UserExecutionContext,
        mut writes: Vec<StagedWrite>,
    ) -> Result<oneshot::Receiver<Result<Vec<u64>, StoreError>>, StoreError> {
        // Serialize here, on the submitter's task: the writer is one thread for everyone.
        for w in &mut writes {
            if let StagedWrite::Event(ev) = w {
                ev.prepared = Some(prepare(&ctx, ev));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.send(Op::Session { ctx, writes, reply }).await?;
        Ok(rx)
    }

    /// Queue an audit row's opening (see [`super::Store::audit_open`]).
    pub(super) async fn audit_open(&self, ctx: &UserExecutionContext) -> Result<(), StoreError> {
        self.send(Op::AuditOpen {
            ctx: ctx.clone(),
            at: unix_ms() as i64,
        })
        .await
    }

    /// Queue an audit row's closing without blocking (see [`super::Store::audit_close`]).
    pub(super) fn audit_close(&self, connection_id: Arc<str>, code: u16, reason: String) {
        let op = Op::AuditClose {
            connection_id,
            code,
            reason,
            at: unix_ms() as i64,
        };
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                // The queue is full: wait for room on a task. Bounded by the number of
                // connections, each of which sends exactly one close.
                let tx = self.tx.clone();
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    // Called from Drop, with no tracker at hand; the task only waits for room in
                    // the writer's queue, and `Store::close` drains that queue before it stops.
                    #[expect(
                        clippy::disallowed_methods,
                        reason = "from Drop: only waits for room in the writer's queue"
                    )]
                    handle.spawn(async move {
                        // Only fails once the writer is gone: nothing is left to record.
                        tx.send(op).await.ok();
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The writer is gone (shutdown finished): the row is closed at next start.
            }
        }
    }

    /// Have everything queued so far written, then stop the writer (see
    /// [`super::Store::close`]).
    pub(super) async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            // An error means the writer stopped without replying: it stopped all the same.
            rx.await.ok();
        }
    }

    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)
    }
}

/// How a backend waits for ops and writes a batch: what the async PostgreSQL writer and the
/// SQLite writer thread differ in. The loop around it is [`Writer::run`].
pub(super) trait BatchWriter {
    /// The next op, waiting for one; `None` once every sender is gone.
    async fn recv(&mut self, rx: &mut mpsc::Receiver<Op>) -> Option<Op>;

    /// Write `ops` in one transaction: each op's outcome, or the error that rolled it back.
    async fn write(&mut self, ops: &[Op], node_id: &str) -> BatchResult;

    /// A batch failed: get ready to retry its ops one by one (PostgreSQL reconnects if the
    /// connection broke).
    async fn recover(&mut self) {}

    /// A batch is over (committed or not) and handed on.
    fn written(&mut self) {}

    /// The loop has ended; the shutdown is confirmed right after.
    fn stopping(&mut self) {}
}

/// One writer's queue: it takes every op that is waiting (up to [`MAX_BATCH`]) as one batch,
/// and answers each op once its batch is over. Shared by the async PostgreSQL writer and the
/// SQLite writer thread, which differ only in how they wait and write ([`BatchWriter`]).
pub(super) struct Writer {
    rx: mpsc::Receiver<Op>,
    broker: Arc<dyn Broker>,
    node_id: Arc<str>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Where outcomes go when publishing runs on its own thread (SQLite); inline if `None`.
    publisher: Option<std::sync::mpsc::SyncSender<Done>>,
}

/// What the writer hands on, in commit order: frames to publish and waiters to answer.
pub(super) enum Done {
    /// Whole ops, so that freeing their writes happens off the writer too.
    Batch(Vec<(Op, Outcome)>),
    /// The writer has stopped: confirm the shutdown.
    Closed(oneshot::Sender<()>),
}

impl Done {
    /// Publish committed frames in order, then answer each waiter.
    pub(super) fn deliver(self, broker: &dyn Broker) {
        match self {
            Done::Batch(items) => {
                for (op, result) in items {
                    let Op::Session { reply, .. } = op else {
                        continue;
                    };
                    // A waiter that is gone (its connection closed) needs no answer.
                    reply
                        .send(result.map(|applied| {
                            for d in applied.deliveries {
                                broker.publish(d);
                            }
                            applied.seqs
                        }))
                        .ok();
                }
            }
            Done::Closed(reply) => {
                reply.send(()).ok();
            }
        }
    }
}

impl Writer {
    /// Write batches with `backend` until a shutdown (or every sender is gone), then refuse
    /// what came later and confirm the shutdown.
    pub(super) async fn run<B: BatchWriter>(mut self, mut backend: B) {
        while self.shutdown.is_none() {
            let Some(first) = backend.recv(&mut self.rx).await else {
                break;
            };
            let batch = self.batch(first);
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            let results = self.write(&mut backend, &batch).await;
            self.finish(batch, results, started);
            backend.written();
        }
        backend.stopping();
        self.close();
    }

    /// The batch in one transaction; if that fails, each op alone, so one bad op cannot fail
    /// the others.
    async fn write<B: BatchWriter>(&self, backend: &mut B, batch: &[Op]) -> Vec<Outcome> {
        match backend.write(batch, &self.node_id).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, ops = batch.len(), "group commit failed; retrying each session alone");
                backend.recover().await;
                let mut results = Vec::with_capacity(batch.len());
                for op in batch.chunks(1) {
                    let r = backend.write(op, &self.node_id).await;
                    results.push(alone(r, op));
                }
                results
            }
        }
    }

    /// The broker committed frames go to.
    pub(super) fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Hand outcomes to `publisher` (a thread that publishes and answers) instead of
    /// publishing inline.
    pub(super) fn publish_through(&mut self, publisher: std::sync::mpsc::SyncSender<Done>) {
        self.publisher = Some(publisher);
    }

    /// The next batch, starting with `first` (the op the caller waited for); empty if only a
    /// shutdown came. Everything queued before a shutdown is written; later ops are refused.
    fn batch(&mut self, first: Op) -> Vec<Op> {
        let mut batch = Vec::with_capacity(MAX_BATCH.min(self.rx.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Some(pos) = batch
            .iter()
            .position(|op| matches!(op, Op::Shutdown { .. }))
        {
            for op in batch.drain(pos..) {
                match op {
                    Op::Shutdown { reply } => {
                        self.shutdown.get_or_insert(reply);
                    }
                    other => refuse(other),
                }
            }
        }
        batch
    }

    /// Count, publish committed frames in order, and answer every op of a written batch.
    fn finish(&self, batch: Vec<Op>, results: Vec<Outcome>, started: Instant) {
        metrics()
            .store_latency(StoreOp::Commit)
            .observe(started.elapsed().as_secs_f64());
        let sessions = batch
            .iter()
            .filter(|op| matches!(op, Op::Session { .. }))
            .count();
        if sessions > 0 {
            metrics().store_batch_size.observe(sessions as f64);
        }
        let mut items = Vec::with_capacity(batch.len());
        for (op, result) in batch.into_iter().zip(results) {
            if result.is_err() {
                op.fail_gates();
            }
            if matches!(op, Op::Session { .. }) {
                match &result {
                    Ok(_) => metrics().sessions_committed.inc(),
                    Err(_) => metrics().sessions_rolled_back.inc(),
                }
            }
            items.push((op, result));
        }
        self.hand_on(Done::Batch(items));
    }

    fn hand_on(&self, done: Done) {
        match &self.publisher {
            Some(p) => {
                if let Err(std::sync::mpsc::SendError(done)) = p.send(done) {
                    done.deliver(&*self.broker);
                }
            }
            None => done.deliver(&*self.broker),
        }
    }

    /// After a shutdown: refuse what arrived later (audit closes among them are recovered at the
    /// next start), then confirm the shutdown.
    fn close(mut self) {
        self.rx.close();
        while let Ok(op) = self.rx.try_recv() {
            refuse(op);
        }
        if let Some(reply) = self.shutdown.take() {
            self.hand_on(Done::Closed(reply));
        }
    }
}

/// An op that came after the shutdown: answered `Closed`, never written.
fn refuse(op: Op) {
    op.fail_gates();
    if let Op::Session { reply, .. } = op {
        metrics().sessions_rolled_back.inc();
        reply.send(Err(StoreError::Closed)).ok();
    }
}

/// The result of one op written alone, after its batch failed.
fn alone(r: BatchResult, op: &[Op]) -> Outcome {
    let r = match r {
        Ok(mut r) => r.pop().unwrap_or(Ok(Applied::default())),
        Err(e) => Err(e),
    };
    if r.is_err() {
        // Before the next op is retried: an op it gates must see the failure.
        op.iter().for_each(Op::fail_gates);
    }
    r
}
