//! The store: threads, messages, runs, thread events and the connection audit trail.
//!
//! [`Store`] is the seam; [`SqlStore`] implements it for SQLite (the embedded default: a WAL
//! file under the data directory) and PostgreSQL, and [`SqlStore::open`] picks which from the
//! URL. The schema and the reads are one set of portable SQL over sqlx's `Any` pool (`$n`
//! parameters, `BIGINT` unix-ms timestamps); each backend writes with statements of its own.
//!
//! Writes go through one *group-commit writer* per store: it takes every session that is
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
//! Event rows are LZ4-packed there; PostgreSQL keeps them as text.
//!
//! The schema is created (and migrated) when the store opens, in one transaction; on
//! PostgreSQL under an advisory lock, so nodes starting together do not race on its DDL.
//!
//! Reads (history, thread lists, ownership checks) use the pool directly.
//!
//! # Where things are
//!
//! | module | owns |
//! |---|---|
//! | this one | the seam: [`Store`], [`StoreError`], the page types, [`SqlStore::open`] choosing the backend |
//! | `schema` | the tables and indexes, created and migrated at open |
//! | `read` | the queries over the pool: history, thread lists, ownership, audit rows |
//! | `codec` | the `thread_events` row: frames joined, packed on SQLite, unpacked and split again |
//! | `writer` | the group-commit queue and its one loop: ops, batches, retrying each op alone, publishing in commit order |
//! | `plan` | what a batch writes, whatever the backend: seqs handed out, frames, rows, results |
//! | `sqlite` | the writer, publisher and checkpointer threads; single-row prepared statements; the seq cache |
//! | `postgres` | the writer task and its reconnection; multi-row statements |

mod codec;
mod plan;
mod postgres;
mod read;
mod schema;
mod sqlite;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::config::SqliteSynchronous;
use crate::context::{OwnedThread, UserExecutionContext};
use crate::session::StagedWrite;

#[cfg(any(test, feature = "testing"))]
pub(crate) use schema::SCHEMA_LOCK;

/// Errors at the store boundary. Messages never contain credentials (connection URLs are not
/// included). Cheap to clone: a database error shares its cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A session gated on a user message (a gate) whose session failed.
    #[error("the user message of this run was not stored")]
    MessageNotStored,
    /// The database failed; [`StoreError::db_kind`] says how.
    #[error("database error: {source}")]
    Database {
        /// What kind of failure it is.
        kind: DbErrorKind,
        /// The driver's error (sqlx or rusqlite), or what the store found wrong.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The session's thread does not exist, or is not its user's.
    #[error("thread not found for this user")]
    ThreadNotFound,
    /// The store's writer has stopped (the store was closed).
    #[error("the store is shut down")]
    Closed,
    /// The store cannot open with these options.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

/// What kind of failure a [`StoreError::Database`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DbErrorKind {
    /// The connection failed or was lost: I/O, TLS, the pool closed or timed out, the server
    /// shutting down or not yet accepting connections. A new connection may succeed.
    ConnectionLost,
    /// A constraint rejected a row (unique, foreign key, not null, check): retrying the same
    /// writes fails again.
    Constraint,
    /// Stored data cannot be read back as it was written (a damaged row or file).
    Corrupt,
    /// Anything else (an SQL error, a busy database, a value that does not decode).
    Other,
}

impl StoreError {
    /// A database error of `kind` caused by `source`.
    pub(crate) fn database(
        kind: DbErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Database {
            kind,
            source: Arc::from(source.into()),
        }
    }

    /// The kind of a database error; `None` for the other errors.
    pub fn db_kind(&self) -> Option<DbErrorKind> {
        match self {
            StoreError::Database { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether the database connection failed or was lost (a database restart, a network cut),
    /// rather than the database refusing what was asked.
    pub fn is_connection_lost(&self) -> bool {
        self.db_kind() == Some(DbErrorKind::ConnectionLost)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let kind = match &e {
            // sqlx errors carry no connection strings; Configuration errors may, so drop their
            // text.
            E::Configuration(_) => {
                return StoreError::Config("bad database configuration".into());
            }
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                DbErrorKind::ConnectionLost
            }
            E::Database(db) => db_error_kind(db.as_ref()),
            _ => DbErrorKind::Other,
        };
        StoreError::database(kind, e)
    }
}

/// The kind of an error the database itself reported (SQLite through sqlx, or PostgreSQL).
fn db_error_kind(db: &dyn sqlx::error::DatabaseError) -> DbErrorKind {
    use sqlx::error::ErrorKind;
    match db.kind() {
        ErrorKind::UniqueViolation
        | ErrorKind::ForeignKeyViolation
        | ErrorKind::NotNullViolation
        | ErrorKind::CheckViolation => return DbErrorKind::Constraint,
        _ => {}
    }
    match db.code().as_deref() {
        // PostgreSQL: connection exceptions (class 08); the server shutting down, crashed, or
        // not accepting connections yet (57P01-57P03).
        Some(c) if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03") => {
            DbErrorKind::ConnectionLost
        }
        // PostgreSQL: data_corrupted, index_corrupted.
        Some("XX001" | "XX002") => DbErrorKind::Corrupt,
        // SQLite: the (extended) result code; its low byte SQLITE_CORRUPT (11) or
        // SQLITE_NOTADB (26).
        Some(c) => match c.parse::<i32>() {
            Ok(n) if matches!(n & 0xff, 11 | 26) => DbErrorKind::Corrupt,
            _ => DbErrorKind::Other,
        },
        None => DbErrorKind::Other,
    }
}

/// A thread as listed by `GET /api/threads`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ThreadSummary {
    /// The thread's id.
    pub thread_id: String,
    /// When the thread was created (RFC 3339, milliseconds).
    pub created_at: String,
    /// When a session last committed to the thread (RFC 3339, milliseconds).
    pub updated_at: String,
    /// The `seq` of the thread's last event; 0 if it has none.
    pub last_seq: u64,
}

/// Stored events of a thread: each the JSON text of the frame as it was sent.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    /// `(seq, frame)`, oldest first.
    pub events: Vec<(u64, String)>,
    /// The thread's last `seq` when the page was read (0 if the thread is unknown).
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
        writes: Vec<StagedWrite>,
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

/// The database a URL names, and so which writer a store starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn of(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Config(
                "database URL must start with sqlite:// or postgres://".into(),
            ))
        }
    }
}

/// SQLite or PostgreSQL through sqlx's `Any` driver.
pub struct SqlStore {
    pool: AnyPool,
    queue: writer::Queue,
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
    /// This node's id: the audit rows it opens carry it, and at start it closes the ones an
    /// earlier process with this id left open.
    pub node_id: String,
    /// SQLite `synchronous`: `FULL` (default; an acknowledged write survives power loss),
    /// `NORMAL` (survives a process crash; faster) or `EXTRA`.
    pub sqlite_synchronous: SqliteSynchronous,
    /// Connections for reads; the pool holds one more.
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
            sqlite_synchronous: SqliteSynchronous::Full,
            read_pool_size: 4,
        }
    }
}

impl SqlStore {
    /// Connect, create the schema, and start the writer, which hands committed frames to
    /// `broker`. The URL picks the backend: `sqlite://` or `postgres://`.
    pub async fn open(
        opts: StoreOptions,
        broker: Arc<dyn Broker>,
    ) -> Result<Arc<Self>, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(&opts.url)?;
        let synchronous = opts.sqlite_synchronous.as_str();
        let pool = connect(&opts, backend, synchronous).await?;
        schema::create(&pool, backend).await?;
        let node_id: Arc<str> = opts.node_id.as_str().into();
        let (queue, writer) = writer::queue(broker, node_id.clone());
        match backend {
            Backend::Sqlite => sqlite::start(sqlite::path(&opts.url)?, synchronous, writer)?,
            Backend::Postgres => postgres::start(&pool, opts.url.clone(), writer).await?,
        }
        Ok(Arc::new(Self {
            pool,
            queue,
            node_id,
        }))
    }
}

/// The pool for reads (and, on PostgreSQL, the writer's first connection).
async fn connect(
    opts: &StoreOptions,
    backend: Backend,
    synchronous: &'static str,
) -> Result<AnyPool, StoreError> {
    let pool = AnyPoolOptions::new()
        // Statements are prepared once per connection and reused: writer batches use a few
        // fixed chunk sizes per table (see `postgres::write::pow2_chunks`).
        .max_connections(opts.read_pool_size.max(1) + 1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    sqlite::pragmas(conn, synchronous).await?;
                }
                Ok(())
            })
        })
        .connect(&opts.url)
        .await?;
    Ok(pool)
}

#[async_trait]
impl Store for SqlStore {
    async fn submit(
        &self,
        ctx: UserExecutionContext,
        writes: Vec<StagedWrite>,
    ) -> Result<oneshot::Receiver<Result<Vec<u64>, StoreError>>, StoreError> {
        self.queue.session(ctx, writes).await
    }

    async fn find_thread(
        &self,
        user_id: &str,
        thread_id: &str,
    ) -> Result<Option<(OwnedThread, u64)>, StoreError> {
        read::find_thread(&self.pool, user_id, thread_id).await
    }

    async fn list_threads(
        &self,
        user_id: &str,
        limit: u32,
    ) -> Result<Vec<ThreadSummary>, StoreError> {
        read::list_threads(&self.pool, user_id, limit).await
    }

    async fn events_since(
        &self,
        thread_id: &str,
        since: u64,
        limit: u32,
    ) -> Result<EventPage, StoreError> {
        read::events_since(&self.pool, thread_id, since, limit).await
    }

    async fn audit_open(&self, ctx: &UserExecutionContext) -> Result<(), StoreError> {
        self.queue.audit_open(ctx).await
    }

    fn audit_close(&self, connection_id: Arc<str>, code: u16, reason: String) {
        self.queue.audit_close(connection_id, code, reason);
    }

    async fn recover_open_audit_rows(&self) -> Result<u64, StoreError> {
        read::recover_open_audit_rows(&self.pool, &self.node_id).await
    }

    async fn open_audit_rows(&self) -> Result<u64, StoreError> {
        read::open_audit_rows(&self.pool, &self.node_id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        read::ping(&self.pool).await
    }

    async fn close(&self) {
        self.queue.shutdown().await;
    }
}
