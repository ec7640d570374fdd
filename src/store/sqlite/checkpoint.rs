//! WAL checkpoints for the SQLite writer. A thread of their own, on a connection of their own,
//! copies committed pages into the database file, so that copy and its fsync rarely stall a
//! commit: the writer kicks it every [`CHECKPOINT_EVERY_COMMITS`] commits ([`Kicker`]), and it
//! runs anyway after [`CHECKPOINT_IDLE`] without a kick. The writer's own automatic checkpoint
//! is only a backstop past [`WAL_BACKSTOP_PAGES`] ([`backstop`]), and the writer checkpoints
//! once more ([`checkpoint`]) before it confirms a shutdown.
//!
//! When the writer commits and when it stops is the writer thread's (`super`).

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use crate::store::StoreError;

/// WAL pages after which the SQLite writer checkpoints inline (see [`backstop`]).
const WAL_BACKSTOP_PAGES: i64 = 4096;

/// Commits between two kicks of the checkpointer. Every commit rewrites the same hot pages (the
/// `threads` rows, the B-tree tails and interior pages); checkpointing after every commit
/// copied each of them into the database file once per commit, checkpointing every 16 copies
/// them once per 16. Larger intervals gain little more and make larger checkpoints, which
/// compete with the commits for the cores and lengthen the tail latency (BENCHMARKS.md).
const CHECKPOINT_EVERY_COMMITS: u64 = 16;

/// When no kick came for this long, the checkpointer copies what is left anyway, so a quiet
/// store does not keep its last commits only in the WAL.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Set the writer connection's automatic checkpoint as a backstop, not the main path: the
/// checkpointer thread copies pages while the writer keeps appending, so its passive
/// checkpoints rarely end exactly at the WAL's end, and the WAL only restarts from its
/// beginning after a complete one. When the WAL passes [`WAL_BACKSTOP_PAGES`] pages the writer
/// checkpoints inline, right after a commit, where nothing can append: at most the commits
/// since the last kick are left to copy, it usually completes (a reader on an old snapshot can
/// hold it back), and the next commit restarts the WAL (without it the WAL kept growing under
/// load, and every new page of it cost the kernel a zeroed page).
pub(super) fn backstop(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
    // A WAL that grew during a burst is cut back to this size when it restarts.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(())
}

/// The checkpointer's own connection to the database at `path`.
pub(super) fn connection(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let ck = rusqlite::Connection::open(path)?;
    ck.busy_timeout(Duration::from_secs(10))?;
    Ok(ck)
}

/// The writer's side of the checkpointer: it counts commits and kicks the checkpointer every
/// [`CHECKPOINT_EVERY_COMMITS`]. The writer thread owns it, so however that thread ends
/// (closed, panicked, or never started) the checkpointer ends.
pub(super) struct Kicker {
    kick: SyncSender<()>,
    commits: u64,
}

impl Kicker {
    /// A batch was written (committed or rolled back).
    pub(super) fn written(&mut self) {
        self.commits += 1;
        if self.commits.is_multiple_of(CHECKPOINT_EVERY_COMMITS) {
            // Full means a kick is already waiting.
            self.kick.try_send(()).ok();
        }
    }
}

/// Start the checkpointer thread on `ck` (see [`connection`]).
pub(super) fn spawn(ck: rusqlite::Connection) -> Result<Kicker, StoreError> {
    let (kick, kicked) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("tether-sqlite-ckpt".into())
        .spawn(move || checkpointer(ck, kicked))
        .map_err(|e| StoreError::Config(format!("cannot start the SQLite checkpointer: {e}")))?;
    Ok(Kicker { kick, commits: 0 })
}

/// Passive checkpoints on their own thread: after each kick, and after [`CHECKPOINT_IDLE`]
/// without one; ends with the writer thread (its sender).
fn checkpointer(ck: rusqlite::Connection, kicked: Receiver<()>) {
    while let Ok(()) | Err(RecvTimeoutError::Timeout) = kicked.recv_timeout(CHECKPOINT_IDLE) {
        checkpoint(&ck);
    }
}

/// A passive checkpoint (it never blocks the writer), repeated while it makes progress and the
/// WAL is not all copied. With nothing new in the WAL it returns at once.
pub(super) fn checkpoint(conn: &rusqlite::Connection) {
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

#[cfg(test)]
mod tests {
    use crate::store::tests::{commit_events, store_with_thread};
    use crate::store::Store;

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
        std::fs::remove_dir_all(dir).ok();
    }
}
