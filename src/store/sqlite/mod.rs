//! The SQLite backend. The writer is a thread that owns the write connection and runs the
//! writer loop (waiting, writing, handing on), so a batch costs no hop through the async
//! runtime; WAL checkpoints run on a second thread (`checkpoint`); a third publishes committed
//! frames and answers waiters while the next batch is written. The pool's connections, used
//! for reads and the schema, get the same journal and `synchronous` settings ([`pragmas`]).
//!
//! One batch as statements is `write`; the writer's guess of each thread's `last_seq` is
//! `seq_cache`. The queue, batching and publishing order are the writer's (`store::writer`).

mod checkpoint;
mod seq_cache;
mod write;

use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::Duration;

use sqlx::{AnyConnection, Executor};
use tokio::sync::mpsc;

use self::seq_cache::SeqCache;
use super::writer::{BatchResult, BatchWriter, Done, Op, Writer};
use super::{DbErrorKind, StoreError};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let kind = match e.sqlite_error_code() {
            Some(C::ConstraintViolation) => DbErrorKind::Constraint,
            Some(C::DatabaseCorrupt | C::NotADatabase) => DbErrorKind::Corrupt,
            _ => DbErrorKind::Other,
        };
        StoreError::database(kind, e)
    }
}

/// The file path of a `sqlite://PATH?options` URL.
pub(super) fn path(url: &str) -> Result<PathBuf, StoreError> {
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

/// The settings of each pool connection: WAL, `synchronous`, and a busy timeout (the writer
/// holds the write lock most of the time).
pub(super) async fn pragmas(
    conn: &mut AnyConnection,
    synchronous: &str,
) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode=WAL").await?;
    conn.execute(format!("PRAGMA synchronous={synchronous}").as_str())
        .await?;
    conn.execute("PRAGMA busy_timeout=10000").await?;
    Ok(())
}

/// The writer's connection: WAL, `synchronous`, a busy timeout, prepared statements kept, and
/// the checkpoint backstop.
fn open_writer(
    path: &std::path::Path,
    synchronous: &str,
) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(32);
    checkpoint::backstop(&conn)?;
    Ok(conn)
}

/// Start the writer, publisher and checkpointer threads on the database at `path`, the writer
/// serving `w`'s queue. The writer copies what is left in the WAL once more when it stops, so
/// a closed store leaves its database file current.
pub(super) fn start(path: PathBuf, synchronous: &str, mut w: Writer) -> Result<(), StoreError> {
    let conn = open_writer(&path, synchronous)?;
    let ck = checkpoint::connection(&path)?;
    // Publishing (registry lookups, queue pushes, waking tasks) runs beside the next commit.
    // Bounded: if publishing falls behind, the writer waits (and the writer queue fills up and
    // holds submitters back), so committed-but-unpublished batches cannot pile up.
    let (publisher, done_rx) = std::sync::mpsc::sync_channel::<Done>(16);
    let broker = w.broker().clone();
    std::thread::Builder::new()
        .name("tether-publisher".into())
        .spawn(move || {
            while let Ok(done) = done_rx.recv() {
                done.deliver(&*broker);
            }
        })
        .map_err(|e| StoreError::Config(format!("cannot start the publisher: {e}")))?;
    w.publish_through(publisher);
    let checkpoints = checkpoint::spawn(ck)?;
    std::thread::Builder::new()
        .name("tether-sqlite-writer".into())
        .spawn(move || {
            run_here(w.run(SqliteWriter {
                conn,
                seqs: SeqCache::default(),
                checkpoints,
            }))
        })
        .map_err(|e| StoreError::Config(format!("cannot start the SQLite writer: {e}")))?;
    Ok(())
}

/// The writer thread's side of a batch: its connection, its seq cache, its checkpointer.
struct SqliteWriter {
    conn: rusqlite::Connection,
    seqs: SeqCache,
    checkpoints: checkpoint::Kicker,
}

/// Every method returns without waiting on a future: the thread blocks instead (it has no
/// runtime to yield to), so [`run_here`] can drive the loop.
impl BatchWriter for SqliteWriter {
    async fn recv(&mut self, rx: &mut mpsc::Receiver<Op>) -> Option<Op> {
        rx.blocking_recv()
    }

    async fn write(&mut self, ops: &[Op], node_id: &str) -> BatchResult {
        write::write_batch(&mut self.conn, &mut self.seqs, ops, node_id)
    }

    fn written(&mut self) {
        self.checkpoints.written();
    }

    fn stopping(&mut self) {
        // Before the shutdown is confirmed: the database file gets the last commits, so a
        // copy of it without its `-wal` file is current too.
        checkpoint::checkpoint(&self.conn);
    }
}

/// Run the writer loop on this thread, to its end, without an async runtime: with
/// [`SqliteWriter`] nothing in it ever waits on a future (waiting for ops blocks the thread),
/// so the first poll completes it.
fn run_here(writer: impl Future<Output = ()>) {
    let mut writer = pin!(writer);
    let polled = writer
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    assert!(
        polled.is_ready(),
        "the SQLite writer waited on a future; it must block instead"
    );
}
