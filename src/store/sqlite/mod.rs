//! The SQLite backend. The writer is a thread that owns the write connection and the whole
//! loop (waiting, writing, publishing, answering), so a batch costs no hop through the async
//! runtime; a second thread publishes committed frames and answers waiters while the next
//! batch is written; a third checkpoints the WAL (`checkpoint`). The pool's connections, used
//! for reads and the schema, get the same journal and `synchronous` settings ([`pragmas`]).
//!
//! One batch as statements is `write`; the writer's guess of each thread's `last_seq` is
//! `seq_cache`. The queue, batching and publishing order are the writer's (`store::writer`).

mod checkpoint;
mod seq_cache;
mod write;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, Executor};

use self::seq_cache::SeqCache;
use super::writer::{alone, Done, Writer};
use super::StoreError;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// The `synchronous` setting, checked: `FULL`, `NORMAL` or `EXTRA`, in any case.
pub(super) fn synchronous(value: &str) -> Result<String, StoreError> {
    match value.to_ascii_uppercase().as_str() {
        s @ ("FULL" | "NORMAL" | "EXTRA") => Ok(s.to_string()),
        _ => Err(StoreError::Config(
            "sqlite synchronous must be FULL, NORMAL or EXTRA".into(),
        )),
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
    let mut checkpoints = checkpoint::spawn(ck)?;
    std::thread::Builder::new()
        .name("tether-sqlite-writer".into())
        .spawn(move || {
            let mut conn = conn;
            let mut seqs = SeqCache::default();
            while w.shutdown.is_none() {
                let Some(first) = w.rx.blocking_recv() else {
                    break;
                };
                let batch = w.batch(first);
                if batch.is_empty() {
                    continue;
                }
                let started = Instant::now();
                let results = match write::write_batch(&mut conn, &mut seqs, &batch, &w.node_id) {
                    Ok(results) => results,
                    Err(e) => {
                        tracing::warn!(error = %e, ops = batch.len(), "group commit failed; retrying each session alone");
                        batch
                            .chunks(1)
                            .map(|op| alone(write::write_batch(&mut conn, &mut seqs, op, &w.node_id), op))
                            .collect()
                    }
                };
                w.finish(batch, results, started);
                checkpoints.written();
            }
            // Before the shutdown is confirmed: the database file gets the last commits, so a
            // copy of it without its `-wal` file is current too.
            checkpoint::checkpoint(&conn);
            w.close();
        })
        .map_err(|e| StoreError::Config(format!("cannot start the SQLite writer: {e}")))?;
    Ok(())
}
