//! The store: threads, messages, runs, thread events and the connection audit trail.
//!
//! [`Store`] is the seam; [`SqlStore`] implements it for SQLite (the embedded default: a WAL
//! file under the data directory) and PostgreSQL, with one set of portable SQL (`$n`
//! parameters, `BIGINT` unix-ms timestamps, `UPDATE .. RETURNING`).
//!
//! Writes go through one *group-commit writer* task per store: it takes every session that is
//! waiting, writes them in one transaction, commits, and only then hands their frames to the
//! broker, in order, and answers each waiter. So an `ack` or a thread event never leaves before
//! its commit (DESIGN-NOTES invariant 4), and per-thread `seq`s are assigned inside the
//! transaction from `threads.last_seq` (PostgreSQL: `UPDATE .. RETURNING`, which serializes
//! appends per thread across nodes sharing the database, invariant 5; SQLite: inside the
//! writer's `IMMEDIATE` transaction, a compare-and-set against the `last_seq` the writer
//! remembers, reading the row only when it is not remembered or has moved). If a batch fails,
//! each session in it is retried alone, so one bad session cannot fail others. Sessions can be
//! gated on an earlier one ([`crate::session::Gate`]): a run's events are stored only if its
//! user message is.
//!
//! SQLite: the writer is a thread that owns the loop, WAL checkpoints run on a second thread,
//! and a third publishes committed frames and answers waiters while the next batch is written.
//! Event rows are LZ4-packed there (`pack`); PostgreSQL keeps them as text.
//!
//! The schema is created (and migrated) when the store opens, in one transaction; on
//! PostgreSQL under an advisory lock, so nodes starting together do not race on its DDL.
//!
//! Reads (history, thread lists, ownership checks) use the pool directly.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, Delivery};
use crate::context::{OwnedThread, UserExecutionContext};
use crate::ids::unix_ms;
use crate::metrics::{metrics, StoreOp};
use crate::protocol::{self, FrameMeta, PreparedFrame};
use crate::registry::OutFrame;
use crate::session::{NewEvent, Write};

/// Errors at the store boundary. Messages never contain credentials (connection URLs are not
/// included).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the user message of this run was not stored")]
    MessageNotStored,
    #[error("database error: {0}")]
    Database(String),
    #[error("thread not found for this user")]
    ThreadNotFound,
    #[error("the store is shut down")]
    Closed,
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // sqlx errors carry no connection strings; Configuration errors may, so drop their text.
        match e {
            sqlx::Error::Configuration(_) => {
                StoreError::Config("bad database configuration".into())
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}

/// A thread as listed by `GET /api/threads`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ThreadSummary {
    pub thread_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_seq: u64,
}

/// Stored events of a thread: each the JSON text of the frame as it was sent.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<(u64, String)>,
    pub last_seq: u64,
}

/// Where rows are stored.
///
/// Guarantees: a session handed to [`Store::submit`] is committed atomically or not at all;
/// sessions submitted in order commit and deliver in that order; event `seq`s of a thread are
/// 1, 2, 3, ... without gaps or duplicates, across restarts and nodes; the frames of a session
/// reach the broker only after its commit.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Queue a session's writes for the group-commit writer. Resolves once queued; the receiver
    /// resolves after the commit with the `seq`s of the session's events.
    async fn submit(
        &self,
        ctx: UserExecutionContext,
        writes: Vec<Write>,
    ) -> Result<oneshot::Receiver<Result<Vec<u64>, StoreError>>, StoreError>;

    /// The thread if it exists and belongs to `user_id` (ownership proof), with its last `seq`.
    async fn find_thread(
        &self,
        user_id: &str,
        thread_id: &str,
    ) -> Result<Option<(OwnedThread, u64)>, StoreError>;

    /// The user's threads, most recently updated first.
    async fn list_threads(
        &self,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<ThreadSummary>, StoreError>;

    /// Events with `seq > since`, oldest first, at most `limit`.
    async fn events_since(
        &self,
        thread_id: &str,
        since: u64,
        limit: u32,
    ) -> Result<EventPage, StoreError>;

    /// Record a connection as opened (audit trail). Queued in order with the writer.
    async fn audit_open(&self, ctx: &UserExecutionContext) -> Result<(), StoreError>;

    /// Record a connection as closed. Never blocks (called from Drop).
    fn audit_close(&self, connection_id: Arc<str>, code: u16, reason: String);

    /// Close audit rows an earlier process of this node left open. Returns how many.
    async fn recover_open_audit_rows(&self) -> Result<u64, StoreError>;

    /// Audit rows of this node still open.
    async fn open_audit_rows(&self) -> Result<u64, StoreError>;

    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Commit everything queued, then stop the writer.
    async fn close(&self);
}

/// SQL dialect differences that portable SQL cannot hide (only DDL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS threads (
        thread_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_seq BIGINT NOT NULL DEFAULT 0)",
    // By owner only: `updated_at` changes with every commit to a thread, and in the index each
    // change was a delete and an insert on the writer (lists sort a user's threads instead).
    "DROP INDEX IF EXISTS threads_by_user",
    "CREATE INDEX IF NOT EXISTS threads_of_user ON threads (user_id)",
    // A row holds the consecutive events of one thread committed in one batch (a run's events
    // usually commit together): their frames, newline-separated (compact JSON has no raw
    // newline), with `seq`, `kind` and `run_id` of the last one. One row and one index entry per
    // batch and thread instead of one per event keeps the writer's commits small; readers split.
    // SQLite stores the text LZ4-packed, as a BLOB (see `pack`).
    "CREATE TABLE IF NOT EXISTS thread_events (
        thread_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        run_id TEXT,
        created_at BIGINT NOT NULL,
        frame TEXT NOT NULL,
        PRIMARY KEY (thread_id, seq))",
    "CREATE TABLE IF NOT EXISTS messages (
        message_id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        run_id TEXT,
        request_id TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        connection_id TEXT NOT NULL,
        parent_run_id TEXT,
        status TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        finished_at BIGINT,
        duration_ms BIGINT,
        error_code TEXT)",
    "CREATE TABLE IF NOT EXISTS connections (
        connection_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        opened_at BIGINT NOT NULL,
        closed_at BIGINT,
        close_code BIGINT,
        close_reason TEXT)",
    "CREATE INDEX IF NOT EXISTS connections_open ON connections (node_id) WHERE closed_at IS NULL",
];

/// The PostgreSQL advisory lock key under which a node creates or migrates the schema.
pub const SCHEMA_LOCK: i64 = 7_464_657_468;

/// WAL pages after which the SQLite writer checkpoints inline (see `start_sqlite_writer`).
const WAL_BACKSTOP_PAGES: i64 = 4096;

/// Commits between two kicks of the SQLite checkpointer. Every commit rewrites the same hot
/// pages (the `threads` rows, the B-tree tails and interior pages); checkpointing after every
/// commit copied each of them into the database file once per commit, checkpointing every 16
/// copies them once per 16. Measured (BENCHMARKS.md): 16 keeps most of the gain of 64 without
/// its larger checkpoints, which cost the chat p99 about 3 ms on two cores. Under load about
/// 16 × 46 pages (3 MB) build up between kicks.
const CHECKPOINT_EVERY_COMMITS: u64 = 16;

/// When no kick came for this long, the checkpointer copies what is left anyway, so a quiet
/// store does not keep its last commits only in the WAL.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// The SQLite form of a `thread_events.frame` value: LZ4 (block format, length prefix). A
/// run's frames repeat their thread, run and reply ids, so they shrink to about a third, and a
/// row of them fits a quarter page instead of most of one: the WAL, the checkpoints and the
/// database file all write that much less. (PostgreSQL compresses values over about 2 KB
/// itself, TOAST, and keeps the rows as text.)
fn pack(frames: &str) -> Vec<u8> {
    lz4_flex::compress_prepend_size(frames.as_bytes())
}

/// A stored frame row as text: SQLite rows written by [`pack`] are BLOBs, older SQLite rows
/// and PostgreSQL rows are TEXT (told apart by the value's own type, not by its bytes).
/// `seq` only names the row in an error.
fn unpack(row: &AnyRow, idx: usize, seq: u64) -> Result<String, StoreError> {
    let blob = sqlx::ValueRef::type_info(&row.try_get_raw(idx)?).kind()
        == sqlx::any::AnyTypeInfoKind::Blob;
    if !blob {
        return Ok(row.try_get(idx)?);
    }
    let bytes: &[u8] = row.try_get(idx)?;
    let corrupt =
        |why: &str| StoreError::Database(format!("corrupt thread_events row (seq {seq}): {why}"));
    let size = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| corrupt("too short"))?;
    // LZ4 cannot expand a block more than 255 times, so any row `pack` wrote passes, and a
    // corrupt prefix cannot make a read allocate more than 255 times what it already holds.
    if size > (bytes.len() - 4).saturating_mul(255) {
        return Err(corrupt("length prefix too large"));
    }
    let raw = lz4_flex::decompress_size_prepended(bytes).map_err(|e| corrupt(&e.to_string()))?;
    String::from_utf8(raw).map_err(|_| corrupt("not UTF-8"))
}

/// How many sessions one group commit takes at most.
const MAX_BATCH: usize = 512;
/// The writer queue's bound; submitters wait (backpressure) when it is full.
const WRITER_QUEUE: usize = 8192;

enum Op {
    Session {
        ctx: UserExecutionContext,
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    AuditOpen {
        ctx: UserExecutionContext,
        at: i64,
    },
    AuditClose {
        connection_id: Arc<str>,
        code: u16,
        reason: String,
        at: i64,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    /// A session that must not be written because the session it depends on failed.
    fn blocked(&self) -> bool {
        match self {
            Op::Session { ctx, writes, .. } => writes.iter().any(|w| match w {
                Write::Requires(g) => !g.admits(ctx),
                // Only a session of the gate's own key may decide it (see `Gate`).
                Write::Opens(g) => !g.belongs_to(ctx),
                _ => false,
            }),
            _ => false,
        }
    }

    /// This op failed: fail the gates it opens, so its dependents fail too.
    fn fail_gates(&self) {
        if let Op::Session { writes, .. } = self {
            for w in writes {
                if let Write::Opens(g) = w {
                    g.fail();
                }
            }
        }
    }
}

/// SQLite or PostgreSQL through sqlx's `Any` driver.
pub struct SqlStore {
    pool: AnyPool,
    tx: mpsc::Sender<Op>,
    node_id: Arc<str>,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("SqlStore")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// Options of a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// `sqlite://...` or `postgres://...`.
    pub url: String,
    pub node_id: String,
    /// SQLite `synchronous`: `FULL` (default; an acknowledged write survives power loss) or
    /// `NORMAL` (survives a process crash; faster).
    pub sqlite_synchronous: String,
    pub read_pool_size: u32,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("url", &"<redacted>")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl StoreOptions {
    /// The embedded default: `tether.db` in `data_dir`.
    pub fn sqlite_in(data_dir: &Path) -> Self {
        Self {
            url: format!("sqlite://{}?mode=rwc", data_dir.join("tether.db").display()),
            node_id: "local".into(),
            sqlite_synchronous: "FULL".into(),
            read_pool_size: 4,
        }
    }
}

impl SqlStore {
    /// Connect, create the schema, and start the writer, which hands committed frames to
    /// `broker`.
    pub async fn open(
        opts: StoreOptions,
        broker: Arc<dyn Broker>,
    ) -> Result<Arc<Self>, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if opts.url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if opts.url.starts_with("postgres:") || opts.url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            return Err(StoreError::Config(
                "database URL must start with sqlite:// or postgres://".into(),
            ));
        };
        let sync = match opts.sqlite_synchronous.to_ascii_uppercase().as_str() {
            s @ ("FULL" | "NORMAL" | "EXTRA") => s.to_string(),
            _ => {
                return Err(StoreError::Config(
                    "sqlite synchronous must be FULL, NORMAL or EXTRA".into(),
                ))
            }
        };
        let pool = AnyPoolOptions::new()
            // Statements are prepared once per connection and reused: writer batches use a few
            // fixed chunk sizes per table (see `pow2_chunks`).
            .max_connections(opts.read_pool_size.max(1) + 1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                let sync = sync.clone();
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        conn.execute("PRAGMA journal_mode=WAL").await?;
                        conn.execute(format!("PRAGMA synchronous={sync}").as_str())
                            .await?;
                        conn.execute("PRAGMA busy_timeout=10000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&opts.url)
            .await?;
        {
            // One transaction, and on PostgreSQL one node at a time: nodes starting together on
            // a fresh or older database would otherwise race on `IF NOT EXISTS` DDL (PostgreSQL
            // reports the loser as a duplicate key in its catalog). The lock is the
            // transaction's: commit, rollback or a dropped connection releases it.
            let mut tx = pool.begin().await?;
            if dialect == Dialect::Postgres {
                tx.execute(format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK})").as_str())
                    .await?;
            }
            for ddl in SCHEMA {
                tx.execute(*ddl).await?;
            }
            tx.commit().await?;
        }
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let node_id: Arc<str> = opts.node_id.as_str().into();
        let writer = Writer {
            rx,
            broker,
            node_id: node_id.clone(),
            shutdown: None,
            publisher: None,
        };
        match dialect {
            Dialect::Sqlite => {
                start_sqlite_writer(sqlite_path(&opts.url)?, &opts.sqlite_synchronous, writer)?
            }
            Dialect::Postgres => {
                let conn = pool.acquire().await?.detach();
                tokio::spawn(pg_writer(writer, conn, opts.url.clone()));
            }
        }
        Ok(Arc::new(Self { pool, tx, node_id }))
    }

    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)
    }
}

fn read_timer() -> impl Drop {
    struct T(Instant);
    impl Drop for T {
        fn drop(&mut self) {
            metrics()
                .store_latency(StoreOp::Read)
                .observe(self.0.elapsed().as_secs_f64());
        }
    }
    T(Instant::now())
}

fn u64_of(row: &AnyRow, idx: usize) -> Result<u64, StoreError> {
    Ok(row.try_get::<i64, _>(idx)?.max(0) as u64)
}

#[async_trait]
impl Store for SqlStore {
    async fn submit(
        &self,
        ctx: UserExecutionContext,
        mut writes: Vec<Write>,
    ) -> Result<oneshot::Receiver<Result<Vec<u64>, StoreError>>, StoreError> {
        // Serialize here, on the submitter's task: the writer is one thread for everyone.
        for w in &mut writes {
            if let Write::Event(ev) = w {
                ev.prepared = Some(prepare(&ctx, ev));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.send(Op::Session { ctx, writes, reply }).await?;
        Ok(rx)
    }

    async fn find_thread(
        &self,
        user_id: &str,
        thread_id: &str,
    ) -> Result<Option<(OwnedThread, u64)>, StoreError> {
        let _t = read_timer();
        let row = sqlx::query("SELECT user_id, last_seq FROM threads WHERE thread_id = $1")
            .bind(thread_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let owner: String = row.try_get(0)?;
        if owner != user_id {
            return Ok(None);
        }
        Ok(Some((
            OwnedThread::new(user_id, thread_id),
            u64_of(&row, 1)?,
        )))
    }

    async fn list_threads(
        &self,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<ThreadSummary>, StoreError> {
        let _t = read_timer();
        let rows = sqlx::query(
            "SELECT thread_id, created_at, updated_at, last_seq FROM threads
             WHERE user_id = $1 ORDER BY updated_at DESC, created_at DESC, thread_id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ThreadSummary {
                    thread_id: r.try_get(0)?,
                    created_at: protocol::rfc3339_ms(u64_of(r, 1)?),
                    updated_at: protocol::rfc3339_ms(u64_of(r, 2)?),
                    last_seq: u64_of(r, 3)?,
                })
            })
            .collect()
    }

    async fn events_since(
        &self,
        thread_id: &str,
        since: u64,
        limit: u32,
    ) -> Result<EventPage, StoreError> {
        let _t = read_timer();
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT seq, frame FROM thread_events WHERE thread_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(thread_id)
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let last = sqlx::query("SELECT last_seq FROM threads WHERE thread_id = $1")
            .bind(thread_id)
            .fetch_optional(&self.pool)
            .await?;
        let last_seq = match last {
            Some(r) => u64_of(&r, 0)?,
            None => 0,
        };
        // A row holds one or more events (see `SCHEMA`); `limit` rows hold at least `limit`.
        let mut events = Vec::with_capacity(rows.len());
        'rows: for r in &rows {
            let last = u64_of(r, 0)?;
            let text = unpack(r, 1, last)?;
            let n = text.split('\n').count() as u64;
            for (i, frame) in text.split('\n').enumerate() {
                let seq = (last + 1 + i as u64).saturating_sub(n);
                if seq <= since as u64 {
                    continue;
                }
                if events.len() == limit as usize {
                    break 'rows;
                }
                events.push((seq, frame.to_string()));
            }
        }
        Ok(EventPage { events, last_seq })
    }

    async fn audit_open(&self, ctx: &UserExecutionContext) -> Result<(), StoreError> {
        self.send(Op::AuditOpen {
            ctx: ctx.clone(),
            at: unix_ms() as i64,
        })
        .await
    }

    fn audit_close(&self, connection_id: Arc<str>, code: u16, reason: String) {
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
                    handle.spawn(async move {
                        let _ = tx.send(op).await;
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The writer is gone (shutdown finished): the row is closed at next start.
            }
        }
    }

    async fn recover_open_audit_rows(&self) -> Result<u64, StoreError> {
        let res = sqlx::query(
            "UPDATE connections SET closed_at = $1, close_code = 1006,
             close_reason = 'closed at restart: left open by an earlier process'
             WHERE node_id = $2 AND closed_at IS NULL",
        )
        .bind(unix_ms() as i64)
        .bind(&*self.node_id)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected())
    }

    async fn open_audit_rows(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM connections WHERE node_id = $1 AND closed_at IS NULL",
        )
        .bind(&*self.node_id)
        .fetch_one(&self.pool)
        .await?;
        u64_of(&row, 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What a committed session hands on: frames for the broker, `seq`s for the waiter.
#[derive(Default)]
struct Applied {
    seqs: Vec<u64>,
    deliveries: Vec<Delivery>,
}

/// One writer's queue: it takes every op that is waiting (up to [`MAX_BATCH`]) as one batch,
/// and answers each op once its batch is over. Shared by the async PostgreSQL writer and the
/// SQLite writer thread, which differ only in how they wait and write.
struct Writer {
    rx: mpsc::Receiver<Op>,
    broker: Arc<dyn Broker>,
    node_id: Arc<str>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Where outcomes go when publishing runs on its own thread (SQLite); inline if `None`.
    publisher: Option<std::sync::mpsc::SyncSender<Done>>,
}

/// What the writer hands on, in commit order: frames to publish and waiters to answer.
enum Done {
    /// Whole ops, so that freeing their writes happens off the writer too.
    Batch(Vec<(Op, Result<Applied, StoreError>)>),
    Closed(oneshot::Sender<()>),
}

impl Done {
    /// Publish committed frames in order, then answer each waiter.
    fn deliver(self, broker: &dyn Broker) {
        match self {
            Done::Batch(items) => {
                for (op, result) in items {
                    let Op::Session { reply, .. } = op else {
                        continue;
                    };
                    let _ = reply.send(result.map(|applied| {
                        for d in applied.deliveries {
                            broker.publish(d);
                        }
                        applied.seqs
                    }));
                }
            }
            Done::Closed(reply) => {
                let _ = reply.send(());
            }
        }
    }
}

impl Writer {
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
    fn finish(&self, batch: Vec<Op>, results: Vec<Result<Applied, StoreError>>, started: Instant) {
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
        let _ = reply.send(Err(StoreError::Closed));
    }
}

/// The result of one op written alone, after its batch failed.
fn alone(r: BatchResult, op: &[Op]) -> Result<Applied, StoreError> {
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

/// The PostgreSQL writer: a task with its own connection. Each batch is one transaction of a few
/// multi-row statements (each one a network round trip, so fewer is faster).
async fn pg_writer(mut w: Writer, mut conn: AnyConnection, url: String) {
    while w.shutdown.is_none() {
        let Some(first) = w.rx.recv().await else {
            break;
        };
        let batch = w.batch(first);
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let results = match write_batch(&mut conn, &batch, &w.node_id, Dialect::Postgres).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, ops = batch.len(), "group commit failed; retrying each session alone");
                // Reconnect if the connection broke (a database restart).
                if conn.ping().await.is_err() {
                    match sqlx::AnyConnection::connect(&url).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            tracing::error!(error = %StoreError::from(e), "store writer cannot reconnect")
                        }
                    }
                }
                let mut results = Vec::with_capacity(batch.len());
                for op in batch.chunks(1) {
                    let r = write_batch(&mut conn, op, &w.node_id, Dialect::Postgres).await;
                    results.push(alone(r, op));
                }
                results
            }
        };
        w.finish(batch, results, started);
    }
    w.close();
}

type BatchResult = Result<Vec<Result<Applied, StoreError>>, StoreError>;

/// The file path of a `sqlite://PATH?options` URL.
fn sqlite_path(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path.contains(":memory:") {
        return Err(StoreError::Config(
            "SQLite needs a file (in-memory databases are not shared between connections)".into(),
        ));
    }
    Ok(path.into())
}

/// The SQLite writer: a thread that owns the write connection and the whole loop (waiting,
/// writing, publishing, answering), so a batch costs no hop through the async runtime. Prepared
/// single-row statements: in-process calls of a few microseconds each.
///
/// WAL checkpoints run on a second thread with its own connection, so copying pages into the
/// database file and its fsync rarely stall a commit: the writer's own (automatic) checkpoint
/// only runs past [`WAL_BACKSTOP_PAGES`], when at most [`CHECKPOINT_EVERY_COMMITS`] commits
/// are left to copy. The writer copies what is left once more when it stops, so a closed store
/// leaves its database file current.
fn start_sqlite_writer(
    path: std::path::PathBuf,
    synchronous: &str,
    w: Writer,
) -> Result<(), StoreError> {
    let conn = rusqlite::Connection::open(&path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(32);
    // A backstop, not the main path: the checkpointer thread copies pages while the writer
    // keeps appending, so its passive checkpoints rarely end exactly at the WAL's end, and the
    // WAL only restarts from its beginning after a complete one. When the WAL passes this many
    // pages the writer checkpoints inline, right after a commit, where nothing can append: at
    // most the commits since the last kick are left to copy, it usually completes (a reader on
    // an old snapshot can hold it back), and the next commit restarts the WAL (without it the
    // WAL grew by hundreds of MB under load, and every new page of it cost the kernel a zeroed
    // page).
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
    // A WAL that grew during a burst is cut back to this size when it restarts.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    let ck = rusqlite::Connection::open(&path)?;
    ck.busy_timeout(Duration::from_secs(10))?;
    // Publishing (registry lookups, queue pushes, waking tasks) runs beside the next commit.
    // Bounded: if publishing falls behind, the writer waits (and the writer queue fills up and
    // holds submitters back), so committed-but-unpublished batches cannot pile up.
    let (publisher, done_rx) = std::sync::mpsc::sync_channel::<Done>(16);
    let broker = w.broker.clone();
    std::thread::Builder::new()
        .name("tether-publisher".into())
        .spawn(move || {
            while let Ok(done) = done_rx.recv() {
                done.deliver(&*broker);
            }
        })
        .map_err(|e| StoreError::Config(format!("cannot start the publisher: {e}")))?;
    let mut w = w;
    w.publisher = Some(publisher);
    // The writer kicks the checkpointer every `CHECKPOINT_EVERY_COMMITS` commits. The writer
    // thread owns the sender, so however that thread ends (closed, panicked, or never started)
    // the checkpointer ends.
    let (kick, kicked) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("tether-sqlite-ckpt".into())
        .spawn(move || checkpointer(ck, kicked))
        .map_err(|e| StoreError::Config(format!("cannot start the SQLite checkpointer: {e}")))?;
    std::thread::Builder::new()
        .name("tether-sqlite-writer".into())
        .spawn(move || {
            let mut conn = conn;
            let mut seqs = SeqCache::default();
            let mut commits = 0u64;
            while w.shutdown.is_none() {
                let Some(first) = w.rx.blocking_recv() else {
                    break;
                };
                let batch = w.batch(first);
                if batch.is_empty() {
                    continue;
                }
                let started = Instant::now();
                let results = match sqlite_write_batch(&mut conn, &mut seqs, &batch, &w.node_id) {
                    Ok(results) => results,
                    Err(e) => {
                        tracing::warn!(error = %e, ops = batch.len(), "group commit failed; retrying each session alone");
                        batch
                            .chunks(1)
                            .map(|op| alone(sqlite_write_batch(&mut conn, &mut seqs, op, &w.node_id), op))
                            .collect()
                    }
                };
                w.finish(batch, results, started);
                commits += 1;
                if commits.is_multiple_of(CHECKPOINT_EVERY_COMMITS) {
                    // Full means a kick is already waiting.
                    let _ = kick.try_send(());
                }
            }
            // Before the shutdown is confirmed: the database file gets the last commits, so a
            // copy of it without its `-wal` file is current too.
            checkpoint(&conn);
            w.close();
        })
        .map_err(|e| StoreError::Config(format!("cannot start the SQLite writer: {e}")))?;
    Ok(())
}

/// Passive checkpoints on their own thread: after each kick, and after [`CHECKPOINT_IDLE`]
/// without one; ends with the writer thread (its sender).
fn checkpointer(ck: rusqlite::Connection, kicked: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    while let Ok(()) | Err(RecvTimeoutError::Timeout) = kicked.recv_timeout(CHECKPOINT_IDLE) {
        checkpoint(&ck);
    }
}

/// A passive checkpoint (it never blocks the writer), repeated while it makes progress and the
/// WAL is not all copied. With nothing new in the WAL it returns at once.
fn checkpoint(conn: &rusqlite::Connection) {
    let mut last_done = -1;
    loop {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) if done < log && done != last_done => last_done = done,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "SQLite checkpoint failed");
                break;
            }
        }
    }
}

/// The SQLite writer's memory of each thread's owner and `last_seq`, as of its last commit, so
/// a batch does not read them back. Each reservation still goes through the database as a
/// compare-and-set (`WHERE thread_id = ? AND user_id = ? AND last_seq = remembered`): if
/// anything else moved the row, the update changes nothing, the thread is read afresh, and the
/// reservation is made again. So the cache is only ever a guess, and it keeps 64-bit hashes of
/// the ids instead of the ids: a collision costs one read, never a wrong `seq`. Entries only
/// change after a commit succeeds; a rolled-back batch leaves them as they were.
///
/// Bounded by generations, not by time: threads committed to since the last rotation are in
/// `current`, the generation before in `previous`; when `current` holds [`Self::GENERATION`]
/// threads it becomes `previous` and the old `previous` is dropped. A thread that keeps
/// chatting stays remembered, a thread that went quiet is forgotten after two generations, and
/// the memory stays flat however many threads a node sees over its life (with every thread
/// remembered, 20,000 churned connections with a message each kept 3.7 MiB more resident).
#[derive(Default)]
struct SeqCache {
    current: std::collections::HashMap<u64, (u64, i64)>,
    previous: std::collections::HashMap<u64, (u64, i64)>,
    ids: std::collections::hash_map::RandomState,
}

impl SeqCache {
    /// Threads per generation: at most twice this many are remembered, in two maps of at most
    /// 8,192 slots of 25 bytes (about 400 KB in all). A batch touches at most a few hundred
    /// threads, so a thread still chatting is always in one of the two.
    const GENERATION: usize = 4_096;

    fn key(&self, id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.ids.hash_one(id)
    }

    fn get(&self, thread_id: &str, user_id: &str) -> Option<i64> {
        let k = self.key(thread_id);
        let (owner, last) = self.current.get(&k).or_else(|| self.previous.get(&k))?;
        (*owner == self.key(user_id)).then_some(*last)
    }

    fn forget(&mut self, thread_id: &str) {
        let k = self.key(thread_id);
        self.current.remove(&k);
        self.previous.remove(&k);
    }

    fn committed(&mut self, reserved: Vec<(&str, &str, i64)>) {
        for (thread, user, last) in reserved {
            let entry = (self.key(user), last);
            self.current.insert(self.key(thread), entry);
        }
        if self.current.len() >= Self::GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// The SQLite form of [`write_batch`]: the same plan, single-row prepared statements.
fn sqlite_write_batch(
    conn: &mut rusqlite::Connection,
    seqs: &mut SeqCache,
    ops: &[Op],
    node_id: &str,
) -> BatchResult {
    use rusqlite::{params, OptionalExtension};
    let now = unix_ms() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO threads (thread_id, user_id, created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, 0)",
        )?;
        for ctx in new_threads(ops) {
            st.execute(params![ctx.thread_id(), ctx.user_id(), now, now])?;
        }
    }
    let wanted = seq_requests(ops);
    let mut next: NextSeqs<'_> = NextSeqs::with_capacity(wanted.len());
    let mut reserved = Vec::with_capacity(wanted.len());
    {
        // A compare-and-set against the remembered `last_seq` (read only when not remembered
        // or moved): `UPDATE .. RETURNING` builds a temporary table on every call in SQLite,
        // which cost as much as all the batch's inserts together. The writer's IMMEDIATE
        // transaction already serializes appends.
        let mut read =
            tx.prepare_cached("SELECT last_seq FROM threads WHERE thread_id = ? AND user_id = ?")?;
        let mut bump = tx.prepare_cached(
            "UPDATE threads SET last_seq = ?, updated_at = ? WHERE thread_id = ? AND user_id = ? AND last_seq = ?",
        )?;
        for (t, u, n) in &wanted {
            // The remembered value first; the database's when there is none or it moved.
            let mut base = None;
            if let Some(l) = seqs.get(t, u) {
                if bump.execute(params![l + n, now, t, u, l])? == 1 {
                    base = Some(l);
                }
            }
            if base.is_none() {
                let read: Option<i64> = read.query_row(params![t, u], |r| r.get(0)).optional()?;
                match read {
                    Some(l) => {
                        let b = l.max(0);
                        // Just read inside this IMMEDIATE transaction: the compare must hold,
                        // or the seqs handed out below were never reserved.
                        if bump.execute(params![b + n, now, t, u, l])? != 1 {
                            return Err(StoreError::Database(
                                "thread seq reservation changed no row".into(),
                            ));
                        }
                        base = Some(b);
                    }
                    // Gone or owned by someone else: forget it (the session fails in `plan`).
                    None => seqs.forget(t),
                }
            }
            if let Some(b) = base {
                next.insert(t, (u, b as u64 + 1));
                reserved.push((*t, *u, b + n));
            }
        }
    }
    let (rows, results) = plan(ops, &mut next, now);
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO thread_events (thread_id, seq, kind, run_id, created_at, frame) VALUES (?, ?, ?, ?, ?, ?)",
        )?;
        for e in &rows.events {
            st.execute(params![
                e.thread_id,
                e.seq,
                e.kind,
                e.run_id,
                now,
                pack(&e.frame)
            ])?;
        }
    }
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO messages (message_id, thread_id, user_id, run_id, request_id, role, content, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for m in &rows.messages {
            st.execute(params![
                m.message_id,
                m.ctx.thread_id(),
                m.ctx.user_id(),
                m.run_id,
                m.ctx.request_id(),
                m.role,
                m.content,
                now
            ])?;
        }
    }
    // A run that starts and finishes in this batch (a fast agent) is inserted finished; the
    // finishes left over update runs of earlier batches.
    let mut finishes: std::collections::HashMap<&str, &RunFinish<'_>> =
        rows.finishes.iter().map(|f| (f.run_id, f)).collect();
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO runs (run_id, thread_id, user_id, request_id, connection_id, parent_run_id, status, started_at, finished_at, duration_ms, error_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for r in &rows.runs {
            let f = finishes.remove(r.run_id());
            st.execute(params![
                r.run_id(),
                r.thread_id(),
                r.user_id(),
                r.request_id(),
                r.connection_id(),
                r.parent_run_id(),
                f.map_or("running", |f| f.status),
                now,
                f.map(|_| now),
                f.map(|f| f.duration_ms),
                f.and_then(|f| f.error_code),
            ])?;
        }
    }
    {
        let mut st = tx.prepare_cached(
            "UPDATE runs SET status = ?, finished_at = ?, duration_ms = ?, error_code = ? WHERE run_id = ?",
        )?;
        for f in finishes.values() {
            st.execute(params![
                f.status,
                now,
                f.duration_ms,
                f.error_code,
                f.run_id
            ])?;
        }
    }
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO connections (connection_id, node_id, user_id, thread_id, request_id, opened_at) VALUES (?, ?, ?, ?, ?, ?)",
        )?;
        for (c, at) in &rows.opens {
            st.execute(params![
                c.connection_id(),
                node_id,
                c.user_id(),
                c.thread_id(),
                c.request_id(),
                at
            ])?;
        }
    }
    {
        let mut st = tx.prepare_cached(
            "UPDATE connections SET closed_at = ?, close_code = ?, close_reason = ? WHERE connection_id = ? AND closed_at IS NULL",
        )?;
        for (cid, at, reason, code) in &rows.closes {
            st.execute(params![at, code, reason, cid])?;
        }
    }
    tx.commit()?;
    seqs.committed(reserved);
    Ok(results)
}

/// Rows per multi-row statement (well under SQLite's and PostgreSQL's bind-parameter limits).
const ROWS_PER_STATEMENT: usize = 256;

/// Split `rows` into chunks whose lengths are powers of two (at most [`ROWS_PER_STATEMENT`]), so
/// a batch of any size uses a few statement texts that the connection keeps prepared: parsing
/// a fresh multi-row statement on every batch was the writer's largest cost.
fn pow2_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = rows.len().min(ROWS_PER_STATEMENT);
        let size = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

impl Dialect {
    /// The parameter sigil: `$1, $2, ...` for PostgreSQL; plain `?` for SQLite, bound in order
    /// of appearance (SQLite treats `$1` and `?1` as *named* parameters, and binding them looks
    /// each name up in a list: quadratic in a multi-row statement's parameters).
    fn placeholder(self) -> char {
        match self {
            Dialect::Sqlite => '?',
            Dialect::Postgres => '$',
        }
    }
}

/// `prefix` followed by `rows` groups of `cols` numbered parameters, starting at `$first`.
/// One parameter: `$n`, or `?` (numbered by position) for SQLite. Callers generate parameters
/// in the order they bind them.
fn push_param(sql: &mut String, ph: char, n: usize) {
    sql.push(ph);
    if ph == '$' {
        sql.push_str(&n.to_string());
    }
}

fn values_sql(ph: char, prefix: &str, cols: usize, rows: usize, first: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 5);
    sql.push_str(prefix);
    let mut n = first;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            push_param(&mut sql, ph, n);
            n += 1;
        }
        sql.push(')');
    }
    sql
}

/// `(SELECT CAST($a AS T1) AS c1, ... UNION ALL SELECT ...) AS v`: a typed inline table that
/// both SQLite and PostgreSQL accept in `UPDATE .. FROM`.
fn inline_table(ph: char, cols: &[(&str, &str)], rows: usize, first: usize) -> String {
    let mut sql = String::from("(");
    let mut n = first;
    for r in 0..rows {
        sql.push_str(if r == 0 {
            "SELECT "
        } else {
            " UNION ALL SELECT "
        });
        for (i, (name, ty)) in cols.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("CAST(");
            push_param(&mut sql, ph, n);
            sql.push_str(" AS ");
            sql.push_str(ty);
            sql.push(')');
            if r == 0 {
                sql.push_str(" AS ");
                sql.push_str(name);
            }
            n += 1;
        }
    }
    sql.push_str(") AS v");
    sql
}

/// Run one multi-row statement per chunk of `rows`: `$sql_for(n)` builds the SQL for `n` rows,
/// `$bind(q, row)` binds one row. Statements with many rows are not cached. (A macro: the
/// query borrows both the SQL string and the rows, which a helper function's signature cannot
/// express without boxing.)
macro_rules! execute_chunks {
    ($tx:expr, $rows:expr, |$n:ident| $sql:expr, |$q:ident, $r:pat_param| $bind:expr $(,)?) => {
        for chunk in pow2_chunks(&$rows) {
            let $n = chunk.len();
            let sql: String = $sql;
            let mut q = sqlx::query(&sql);
            for row in chunk {
                let $q = q;
                let $r = row;
                q = $bind;
            }
            q.execute(&mut *$tx).await?;
        }
    };
}

/// One `thread_events` row: the consecutive events of one thread in one batch (see [`SCHEMA`]).
struct EventRow<'a> {
    thread_id: &'a str,
    /// The last event's seq.
    seq: i64,
    kind: &'a str,
    run_id: Option<&'a str>,
    frame: String,
}

struct MessageRow<'a> {
    ctx: &'a UserExecutionContext,
    message_id: &'a str,
    run_id: Option<&'a str>,
    role: &'static str,
    content: &'a str,
}

struct RunFinish<'a> {
    run_id: &'a str,
    status: &'static str,
    duration_ms: i64,
    error_code: Option<&'a str>,
}

/// The contexts of the sessions that create their thread.
fn new_threads(ops: &[Op]) -> Vec<&UserExecutionContext> {
    ops.iter()
        .filter(|op| !op.blocked())
        .filter_map(|op| match op {
            Op::Session { ctx, writes, .. }
                if writes.iter().any(|w| matches!(w, Write::CreateThread)) =>
            {
                Some(ctx)
            }
            _ => None,
        })
        .collect()
}

/// How many `seq`s each (thread, user) of the batch needs, in order of first appearance.
fn seq_requests(ops: &[Op]) -> Vec<(&str, &str, i64)> {
    let mut wanted: Vec<(&str, &str, i64)> = Vec::new();
    for op in ops.iter().filter(|op| !op.blocked()) {
        if let Op::Session { ctx, writes, .. } = op {
            let n = writes
                .iter()
                .filter(|w| matches!(w, Write::Event(_)))
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
type NextSeqs<'a> = std::collections::HashMap<&'a str, (&'a str, u64)>;

/// The rows a batch writes once its seqs are reserved.
#[derive(Default)]
struct Rows<'a> {
    events: Vec<EventRow<'a>>,
    messages: Vec<MessageRow<'a>>,
    runs: Vec<&'a UserExecutionContext>,
    finishes: Vec<RunFinish<'a>>,
    opens: Vec<(&'a UserExecutionContext, i64)>,
    closes: Vec<(&'a str, i64, &'a str, i64)>,
}

/// Assign seqs in batch order, build every frame, and collect the rows to write and each
/// op's result. The same for every backend: only how rows reach the database differs.
fn plan<'a>(
    ops: &'a [Op],
    next: &mut NextSeqs<'a>,
    now: i64,
) -> (Rows<'a>, Vec<Result<Applied, StoreError>>) {
    let mut results: Vec<Result<Applied, StoreError>> = Vec::with_capacity(ops.len());
    let mut rows = Rows::default();
    // One time for the whole batch: it commits as one.
    let ts = protocol::rfc3339_ms(now as u64);
    // The row of each thread's events in this batch (their seqs are consecutive).
    let mut event_row: std::collections::HashMap<&str, usize> = Default::default();
    for op in ops {
        match op {
            Op::Session { ctx, writes, .. } => {
                // Checked in batch order: a gate shut by an earlier op of this batch counts.
                if op.blocked() {
                    op.fail_gates();
                    results.push(Err(StoreError::MessageNotStored));
                    continue;
                }
                let has_events = writes.iter().any(|w| matches!(w, Write::Event(_)));
                let mut seq_slot = next
                    .get_mut(ctx.thread_id())
                    .filter(|(user, _)| *user == ctx.user_id())
                    .map(|(_, seq)| seq);
                if has_events && seq_slot.is_none() {
                    op.fail_gates();
                    results.push(Err(StoreError::ThreadNotFound));
                    continue;
                }
                let mut applied = Applied::default();
                for w in writes {
                    match w {
                        Write::CreateThread => {}
                        Write::Event(ev) => {
                            let Some(slot) = seq_slot.as_deref_mut() else {
                                continue;
                            };
                            let seq = *slot;
                            *slot += 1;
                            let text = match &ev.prepared {
                                Some(p) => p.finish(seq, &ts),
                                None => prepare(ctx, ev).finish(seq, &ts),
                            };
                            applied.seqs.push(seq);
                            let ack = ev.ack.as_ref().map(|a| {
                                let ack = protocol::frame_at(
                                    "ack",
                                    FrameMeta {
                                        thread_id: Some(ctx.thread_id()),
                                        seq: Some(seq),
                                        reply_to: ev.reply_to.as_deref(),
                                        ..Default::default()
                                    },
                                    &ts,
                                    &protocol::AckData {
                                        message_id: &a.message_id,
                                        run_id: &a.run_id,
                                        seq,
                                    },
                                );
                                (ctx.connection_id_arc().clone(), OutFrame::new(seq, ack))
                            });
                            applied.deliveries.push(Delivery::thread(
                                ctx,
                                OutFrame::new(seq, text.as_str()),
                                ack,
                            ));
                            match event_row.get(ctx.thread_id()) {
                                Some(&i) => {
                                    let row = &mut rows.events[i];
                                    row.seq = seq as i64;
                                    row.kind = ev.kind;
                                    row.run_id = ev.run_id.as_deref();
                                    row.frame.push('\n');
                                    row.frame.push_str(&text);
                                }
                                None => {
                                    event_row.insert(ctx.thread_id(), rows.events.len());
                                    rows.events.push(EventRow {
                                        thread_id: ctx.thread_id(),
                                        seq: seq as i64,
                                        kind: ev.kind,
                                        run_id: ev.run_id.as_deref(),
                                        frame: text,
                                    });
                                }
                            }
                        }
                        Write::Message {
                            message_id,
                            role,
                            content,
                            run_id,
                        } => rows.messages.push(MessageRow {
                            ctx,
                            message_id,
                            run_id: run_id.as_deref(),
                            role: role.as_str(),
                            content,
                        }),
                        Write::RunStarted { run } => rows.runs.push(run),
                        Write::RunFinished {
                            status,
                            duration_ms,
                            error_code,
                        } => rows.finishes.push(RunFinish {
                            run_id: ctx.run_id(),
                            status,
                            duration_ms: *duration_ms as i64,
                            error_code: error_code.as_deref(),
                        }),
                        Write::Opens(_) | Write::Requires(_) => {}
                        Write::Transient { text } => {
                            let mut frame = OutFrame::new(0, text.as_str());
                            frame.droppable = true;
                            applied.deliveries.push(Delivery::thread(ctx, frame, None));
                        }
                    }
                }
                results.push(Ok(applied));
            }
            Op::AuditOpen { ctx, at } => {
                rows.opens.push((ctx, *at));
                results.push(Ok(Applied::default()));
            }
            Op::AuditClose {
                connection_id,
                code,
                reason,
                at,
            } => {
                rows.closes
                    .push((connection_id, *at, reason, i64::from(*code)));
                results.push(Ok(Applied::default()));
            }
            Op::Shutdown { .. } => results.push(Ok(Applied::default())),
        }
    }
    (rows, results)
}

/// Write `ops` in one transaction with a handful of multi-row statements, however many sessions
/// the batch holds: new threads, one `UPDATE .. RETURNING` that reserves the `seq`s of every
/// thread in the batch, then events, messages, runs and audit rows. Sessions whose thread is
/// missing (or not their user's) fail alone with `ThreadNotFound` and write nothing.
async fn write_batch(
    conn: &mut AnyConnection,
    ops: &[Op],
    node_id: &str,
    dialect: Dialect,
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let ph = dialect.placeholder();
    // The first parameter of the UPDATE statements (it comes first in their text).
    let p1 = if ph == '$' { "$1" } else { "?" };
    let now = unix_ms() as i64;
    let mut tx = conn.begin().await?;

    // 1. New threads.
    let new_threads = new_threads(ops);
    execute_chunks!(
        tx,
        new_threads,
        |n| values_sql(
            ph,
            "INSERT INTO threads (thread_id, user_id, created_at, updated_at, last_seq) VALUES ",
            5,
            n,
            1
        ),
        |q, ctx| q
            .bind(ctx.thread_id())
            .bind(ctx.user_id())
            .bind(now)
            .bind(now)
            .bind(0i64),
    );

    // 2. Reserve seqs.
    let wanted = seq_requests(ops);
    let mut next: NextSeqs<'_> = NextSeqs::with_capacity(wanted.len());
    for chunk in pow2_chunks(&wanted) {
        let sql = format!(
            "UPDATE threads SET last_seq = GREATEST(threads.last_seq, 0) + v.n, updated_at = {p1} FROM {} \
             WHERE threads.thread_id = v.tid AND threads.user_id = v.uid RETURNING thread_id, user_id, last_seq",
            inline_table(ph, &[("tid", "TEXT"), ("uid", "TEXT"), ("n", "BIGINT")], chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).bind(now);
        for (t, u, n) in chunk {
            q = q.bind(*t).bind(*u).bind(*n);
        }
        for row in q.fetch_all(&mut *tx).await? {
            let thread: String = row.try_get(0)?;
            let user: String = row.try_get(1)?;
            let last = u64_of(&row, 2)?;
            if let Some((t, u, n)) = chunk.iter().find(|(t, u, _)| *t == thread && *u == user) {
                // `last_seq` is at least `n` (a negative one edited by hand counts as 0, as
                // on SQLite), so this cannot underflow.
                next.insert(t, (u, last + 1 - *n as u64));
            }
        }
    }

    // 3. Frames, rows, results.
    let (rows, results) = plan(ops, &mut next, now);

    // 4. The rows.
    execute_chunks!(
        tx,
        rows.events,
        |n| values_sql(
            ph,
            "INSERT INTO thread_events (thread_id, seq, kind, run_id, created_at, frame) VALUES ",
            6,
            n,
            1
        ),
        |q, e| q
            .bind(e.thread_id)
            .bind(e.seq)
            .bind(e.kind)
            .bind(e.run_id)
            .bind(now)
            .bind(e.frame.as_str()),
    );
    execute_chunks!(
        tx,
        rows.messages,
        |n| {
            values_sql(
                ph,
                "INSERT INTO messages (message_id, thread_id, user_id, run_id, request_id, role, content, created_at) VALUES ",
                8,
                n,
                1,
            )
        },
        |q, m| {
            q.bind(m.message_id)
                .bind(m.ctx.thread_id())
                .bind(m.ctx.user_id())
                .bind(m.run_id)
                .bind(m.ctx.request_id())
                .bind(m.role)
                .bind(m.content)
                .bind(now)
        },
    );
    execute_chunks!(
        tx,
        rows.runs,
        |n| {
            values_sql(
                ph,
                "INSERT INTO runs (run_id, thread_id, user_id, request_id, connection_id, parent_run_id, status, started_at) VALUES ",
                8,
                n,
                1,
            )
        },
        |q, r| {
            q.bind(r.run_id())
                .bind(r.thread_id())
                .bind(r.user_id())
                .bind(r.request_id())
                .bind(r.connection_id())
                .bind(r.parent_run_id())
                .bind("running")
                .bind(now)
        },
    );
    for chunk in pow2_chunks(&rows.finishes) {
        let sql = format!(
            "UPDATE runs SET status = v.status, finished_at = {p1}, duration_ms = v.dur, error_code = v.err FROM {} WHERE runs.run_id = v.rid",
            inline_table(ph, &[("rid", "TEXT"), ("status", "TEXT"), ("dur", "BIGINT"), ("err", "TEXT")], chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).bind(now);
        for f in chunk {
            q = q
                .bind(f.run_id)
                .bind(f.status)
                .bind(f.duration_ms)
                .bind(f.error_code);
        }
        q.execute(&mut *tx).await?;
    }
    execute_chunks!(
        tx,
        rows.opens,
        |n| {
            values_sql(
                ph,
                "INSERT INTO connections (connection_id, node_id, user_id, thread_id, request_id, opened_at) VALUES ",
                6,
                n,
                1,
            )
        },
        |q, (c, at)| {
            q.bind(c.connection_id())
                .bind(node_id)
                .bind(c.user_id())
                .bind(c.thread_id())
                .bind(c.request_id())
                .bind(*at)
        },
    );
    execute_chunks!(
        tx,
        rows.closes,
        |n| {
            format!(
                "UPDATE connections SET closed_at = v.at, close_code = v.code, close_reason = v.reason FROM {} \
                 WHERE connections.connection_id = v.cid AND connections.closed_at IS NULL",
                inline_table(ph, &[("cid", "TEXT"), ("at", "BIGINT"), ("reason", "TEXT"), ("code", "BIGINT")], n, 1)
            )
        },
        |q, (cid, at, reason, code)| q.bind(*cid).bind(*at).bind(*reason).bind(*code),
    );
    tx.commit().await?;
    Ok(results)
}

/// A thread event's frame, serialized up to its `seq` and time.
fn prepare(ctx: &UserExecutionContext, ev: &NewEvent) -> PreparedFrame {
    PreparedFrame::new(
        ev.kind,
        Some(ctx.thread_id()),
        ev.run_id.as_deref(),
        ev.reply_to.as_deref(),
        &ev.data,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::context::ThreadChoice;
    use crate::registry::{Limits, Registry};
    use crate::session::{CommitReceipt, NewEvent, SessionFactory};

    fn ctx(user: &str) -> UserExecutionContext {
        UserExecutionContext::from_websocket_request(
            user,
            &crate::ids::connection_id(),
            ThreadChoice::New,
        )
        .unwrap()
    }

    fn event(n: u64) -> Write {
        Write::Event(NewEvent {
            kind: "agent_thinking",
            run_id: None,
            reply_to: None,
            data: serde_json::json!({ "n": n }),
            ack: None,
            prepared: None,
        })
    }

    /// A store and a session factory, with a new thread of `user` already created.
    async fn store_with_thread(
        user: &str,
    ) -> (
        Arc<SqlStore>,
        std::path::PathBuf,
        SessionFactory,
        UserExecutionContext,
    ) {
        let (store, dir) = store().await;
        let sessions = SessionFactory::new(store.clone());
        let c = ctx(user);
        let mut s = sessions.create_session_from_context(&c);
        s.stage(Write::CreateThread);
        s.commit().await.unwrap();
        (store, dir, sessions, c)
    }

    /// Commit one session of the events `ns` (see [`event`]) on `c`'s thread; their seqs.
    async fn commit_events(
        sessions: &SessionFactory,
        c: &UserExecutionContext,
        ns: std::ops::Range<u64>,
    ) -> Vec<u64> {
        let mut s = sessions.create_session_from_context(c);
        for n in ns {
            s.stage(event(n));
        }
        s.commit().await.unwrap()
    }

    /// Write a `thread_events` row by hand, as an older binary or a damaged file left it.
    async fn insert_row<'q, F>(store: &SqlStore, thread_id: &'q str, seq: i64, frame: F)
    where
        F: 'q + Send + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>,
    {
        sqlx::query("INSERT INTO thread_events (thread_id, seq, kind, run_id, created_at, frame) VALUES ($1, $2, 'x', NULL, 0, $3)")
            .bind(thread_id)
            .bind(seq)
            .bind(frame)
            .execute(&store.pool)
            .await
            .unwrap();
    }

    /// Submit one event as "bob" on `owner`'s thread (a forged ownership proof).
    async fn submit_as_intruder(
        sessions: &SessionFactory,
        owner: &UserExecutionContext,
    ) -> CommitReceipt {
        let bob_on_owner = UserExecutionContext::from_websocket_request(
            "bob",
            &crate::ids::connection_id(),
            ThreadChoice::Resume(OwnedThread::new("bob", owner.thread_id())),
        )
        .unwrap();
        let mut s = sessions.create_session_from_context(&bob_on_owner);
        s.stage(event(0));
        s.submit().await.unwrap()
    }

    async fn close(store: Arc<SqlStore>, dir: std::path::PathBuf) {
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn store() -> (Arc<SqlStore>, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tether-store-{}", crate::ids::connection_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut opts = StoreOptions::sqlite_in(&dir);
        opts.sqlite_synchronous = "NORMAL".into();
        let reg = Registry::new(Limits::default());
        (
            SqlStore::open(opts, Arc::new(LocalBroker::new(reg)))
                .await
                .unwrap(),
            dir,
        )
    }

    #[tokio::test]
    async fn a_run_whose_message_fails_stores_nothing_and_leaves_no_seq_gap() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        // The message fails (its thread does not exist); its run, queued right behind it
        // (usually in the same batch), is refused.
        let bob = ctx("bob");
        let gate = crate::session::Gate::new(&bob);
        let mut msg = sessions.create_session_from_context(&bob);
        msg.stage(event(0)).stage(Write::Opens(gate.clone()));
        let msg = msg.submit().await.unwrap();
        let mut run = sessions.create_session_from_context(&bob);
        run.stage(Write::Requires(gate.clone())).stage(event(1));
        let run = run.submit().await.unwrap();
        assert!(matches!(
            msg.await.unwrap(),
            Err(StoreError::ThreadNotFound)
        ));
        assert!(matches!(
            run.await.unwrap(),
            Err(StoreError::MessageNotStored)
        ));
        assert!(gate.failed());
        // A gate never admits another thread's session, even open: here alice's, which must
        // not reserve a seq it then leaves unused.
        let open = crate::session::Gate::new(&bob);
        let mut stray = sessions.create_session_from_context(&a);
        stray.stage(Write::Requires(open)).stage(event(2));
        let stray = stray.submit().await.unwrap();
        let mut late = sessions.create_session_from_context(&bob);
        late.stage(Write::Requires(gate)).stage(event(2));
        assert!(matches!(
            late.commit().await,
            Err(StoreError::MessageNotStored)
        ));
        assert!(matches!(
            stray.await.unwrap(),
            Err(StoreError::MessageNotStored)
        ));
        let mut other = sessions.create_session_from_context(&a);
        other.stage(event(3));
        assert_eq!(other.commit().await.unwrap(), vec![1]);
        close(store, dir).await;
    }

    #[tokio::test]
    async fn an_intruder_first_in_a_batch_does_not_fail_the_owner() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        // Back to back, so usually one batch, the intruder first.
        let intruder = submit_as_intruder(&sessions, &a).await;
        let mut owner = sessions.create_session_from_context(&a);
        owner.stage(event(1));
        let owner = owner.submit().await.unwrap();
        assert!(matches!(
            intruder.await.unwrap(),
            Err(StoreError::ThreadNotFound)
        ));
        assert_eq!(owner.await.unwrap().unwrap(), vec![1]);
        close(store, dir).await;
    }

    #[tokio::test]
    async fn events_committed_together_share_a_row_and_read_back_one_by_one() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        assert_eq!(
            commit_events(&sessions, &a, 0..5).await,
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(commit_events(&sessions, &a, 5..7).await, vec![6, 7]);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM thread_events")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(rows, 2);
        let seqs = |p: EventPage| p.events.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        let all = store.events_since(a.thread_id(), 0, 100).await.unwrap();
        assert_eq!(all.last_seq, 7);
        for (seq, frame) in &all.events {
            let v: serde_json::Value = serde_json::from_str(frame).unwrap();
            assert_eq!(v["seq"], *seq);
            assert_eq!(v["data"]["n"], *seq - 1);
        }
        assert_eq!(seqs(all), (1..=7).collect::<Vec<_>>());
        // `since` and `limit` inside a row, and paging across rows.
        assert_eq!(
            seqs(store.events_since(a.thread_id(), 2, 2).await.unwrap()),
            vec![3, 4]
        );
        assert_eq!(
            seqs(store.events_since(a.thread_id(), 4, 100).await.unwrap()),
            vec![5, 6, 7]
        );
        assert_eq!(
            seqs(store.events_since(a.thread_id(), 6, 1).await.unwrap()),
            vec![7]
        );
        assert!(store
            .events_since(a.thread_id(), 7, 10)
            .await
            .unwrap()
            .events
            .is_empty());
        close(store, dir).await;
    }

    #[tokio::test]
    async fn sqlite_packs_frame_rows_and_still_reads_text_rows() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        commit_events(&sessions, &a, 0..6).await;
        let (kind, packed): (String, i64) =
            sqlx::query_as("SELECT typeof(frame), length(frame) FROM thread_events")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(kind, "blob");
        let all = store.events_since(a.thread_id(), 0, 100).await.unwrap();
        let text: usize = all.events.iter().map(|(_, f)| f.len() + 1).sum();
        assert!(
            (packed as usize) < text / 2,
            "{packed} bytes stored for {text}"
        );
        // A row written as text before packing (two frames, newline-separated) reads back.
        let legacy = ["{\"type\":\"x\",\"seq\":7}", "{\"type\":\"y\",\"seq\":8}"];
        insert_row(&store, a.thread_id(), 8, legacy.join("\n")).await;
        let page = store.events_since(a.thread_id(), 6, 100).await.unwrap();
        assert_eq!(
            page.events,
            vec![(7, legacy[0].to_string()), (8, legacy[1].to_string())]
        );
        close(store, dir).await;
    }

    #[tokio::test]
    async fn the_writer_rereads_a_seq_that_moved_behind_its_back() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        assert_eq!(commit_events(&sessions, &a, 0..2).await, vec![1, 2]);
        // Remembered: the next batch does not read the row.
        assert_eq!(commit_events(&sessions, &a, 2..3).await, vec![3]);
        // Moved by someone else (another process on the same file, a repair by hand).
        sqlx::query("UPDATE threads SET last_seq = 10 WHERE thread_id = $1")
            .bind(a.thread_id())
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(commit_events(&sessions, &a, 3..5).await, vec![11, 12]);
        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM threads WHERE thread_id = $1")
            .bind(a.thread_id())
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(last, 12);
        close(store, dir).await;
    }

    #[tokio::test]
    async fn a_closed_store_leaves_its_database_file_current() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        commit_events(&sessions, &a, 0..2).await;
        // Fewer commits than a checkpointer kick needs, and well within its idle wait.
        store.close().await;
        // The database file alone, as an operator might copy it without its `-wal` file.
        let copy = dir.join("copy.db");
        std::fs::copy(dir.join("tether.db"), &copy).unwrap();
        let db = rusqlite::Connection::open(&copy).unwrap();
        let rows: i64 = db
            .query_row("SELECT COUNT(*) FROM thread_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        drop(db);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_corrupt_packed_row_is_an_error_not_a_panic() {
        let (store, dir) = store().await;
        let a = ctx("alice");
        for (seq, blob, why) in [
            (
                1,
                vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
                "length prefix too large",
            ),
            (2, vec![1], "too short"),
            // Five literal bytes announced, two present.
            (3, vec![5, 0, 0, 0, 0x50, b'a', 0xff], "corrupt"),
            (
                4,
                lz4_flex::compress_prepend_size(&[0xff, 0xfe]),
                "not UTF-8",
            ),
        ] {
            sqlx::query("DELETE FROM thread_events")
                .execute(&store.pool)
                .await
                .unwrap();
            insert_row(&store, a.thread_id(), seq, blob).await;
            let err = store.events_since(a.thread_id(), 0, 10).await.unwrap_err();
            let err = err.to_string();
            assert!(err.contains("corrupt thread_events row"), "{err}");
            assert!(err.contains(why), "{err}");
        }
        close(store, dir).await;
    }

    #[tokio::test]
    async fn a_run_behind_a_stored_message_commits_with_it() {
        let (store, dir) = store().await;
        let sessions = SessionFactory::new(store.clone());
        let a = ctx("alice");
        let gate = crate::session::Gate::new(&a);
        let mut msg = sessions.create_session_from_context(&a);
        msg.stage(Write::CreateThread)
            .stage(event(0))
            .stage(Write::Opens(gate.clone()));
        let msg = msg.submit().await.unwrap();
        let mut run = sessions.create_session_from_context(&a);
        run.stage(Write::Requires(gate.clone())).stage(event(1));
        assert_eq!(run.commit().await.unwrap(), vec![2]);
        assert_eq!(msg.await.unwrap().unwrap(), vec![1]);
        assert!(!gate.failed());
        close(store, dir).await;
    }

    #[tokio::test]
    async fn concurrent_sessions_get_gap_free_seqs_and_a_bad_one_fails_alone() {
        let (store, dir, sessions, a) = store_with_thread("alice").await;
        // Submitted back to back, so the writer takes them as one batch.
        let mut receipts = Vec::new();
        for i in 0..50 {
            let mut s = sessions.create_session_from_context(&a);
            s.stage(event(i)).stage(event(i));
            receipts.push(s.submit().await.unwrap());
        }
        // A session on a thread that does not exist, and one by another user on alice's thread.
        let mut ghost = sessions.create_session_from_context(&ctx("bob"));
        ghost.stage(event(0));
        let ghost = ghost.submit().await.unwrap();
        let intruder = submit_as_intruder(&sessions, &a).await;
        let mut all = Vec::new();
        for r in receipts {
            all.extend(r.await.unwrap().unwrap());
        }
        assert_eq!(all, (1..=100).collect::<Vec<u64>>());
        assert!(matches!(
            ghost.await.unwrap(),
            Err(StoreError::ThreadNotFound)
        ));
        assert!(matches!(
            intruder.await.unwrap(),
            Err(StoreError::ThreadNotFound)
        ));
        let page = store.events_since(a.thread_id(), 98, 10).await.unwrap();
        assert_eq!(page.last_seq, 100);
        assert_eq!(
            page.events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![99, 100]
        );
        close(store, dir).await;
    }

    #[test]
    fn the_seq_cache_stays_bounded_and_keeps_threads_that_keep_chatting() {
        let mut cache = SeqCache::default();
        let mut busy_last = 0;
        for i in 0..SeqCache::GENERATION * 5 {
            let thread = format!("thread_{i}");
            cache.committed(vec![(thread.as_str(), "bob", 1)]);
            if i % 1_000 == 0 {
                busy_last = i as i64;
                cache.committed(vec![("thread_busy", "alice", busy_last)]);
            }
            assert!(cache.len() <= 2 * SeqCache::GENERATION, "{}", cache.len());
        }
        assert_eq!(cache.get("thread_busy", "alice"), Some(busy_last));
        // Another user's guess is no guess; a thread quiet for two generations is forgotten.
        assert_eq!(cache.get("thread_busy", "bob"), None);
        assert_eq!(cache.get("thread_0", "bob"), None);
        let recent = format!("thread_{}", SeqCache::GENERATION * 5 - 1);
        assert_eq!(cache.get(&recent, "bob"), Some(1));
        cache.forget(&recent);
        assert_eq!(cache.get(&recent, "bob"), None);
    }

    #[test]
    fn batches_split_into_power_of_two_chunks() {
        let rows: Vec<u32> = (0..700).collect();
        let sizes: Vec<usize> = pow2_chunks(&rows).map(<[u32]>::len).collect();
        assert_eq!(sizes, vec![256, 256, 128, 32, 16, 8, 4]);
        assert_eq!(sizes.iter().sum::<usize>(), 700);
        assert_eq!(pow2_chunks(&rows[..1]).count(), 1);
        assert_eq!(pow2_chunks(&rows[..0]).count(), 0);
    }

    #[test]
    fn placeholders_follow_the_dialect() {
        assert_eq!(values_sql('?', "V ", 2, 2, 3), "V (?, ?), (?, ?)");
        assert_eq!(values_sql('$', "V ", 2, 2, 3), "V ($3, $4), ($5, $6)");
        assert_eq!(
            inline_table('$', &[("a", "TEXT")], 2, 1),
            "(SELECT CAST($1 AS TEXT) AS a UNION ALL SELECT CAST($2 AS TEXT)) AS v"
        );
    }

    #[tokio::test]
    async fn a_dropped_session_writes_nothing() {
        let (store, dir) = store().await;
        let sessions = SessionFactory::new(store.clone());
        let a = ctx("alice");
        let mut s = sessions.create_session_from_context(&a);
        s.stage(Write::CreateThread);
        drop(s);
        assert!(store
            .find_thread("alice", a.thread_id())
            .await
            .unwrap()
            .is_none());
        close(store, dir).await;
    }
}
