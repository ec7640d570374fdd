//! One batch on SQLite: the plan's rows as prepared single-row statements (in-process calls
//! of a few microseconds each), and the `seq`s reserved by a compare-and-set against the
//! [`SeqCache`]'s guess.
//!
//! What the rows are is the plan's; the loop around a batch is the writer's.

use std::collections::HashMap;

use rusqlite::{params, CachedStatement, Connection, OptionalExtension};

use super::seq_cache::SeqCache;
use crate::context::UserExecutionContext;
use crate::ids::unix_ms;
use crate::store::codec::pack;
use crate::store::plan::{
    new_threads, plan, seq_requests, EventRow, MessageRow, NextSeqs, RunFinish,
};
use crate::store::writer::{BatchResult, Op};
use crate::store::{DbErrorKind, StoreError};

/// Write `ops` in one `IMMEDIATE` transaction: new threads, the `seq`s reserved thread by
/// thread (a compare-and-set against `seqs`), then events, messages, runs and audit rows, each
/// as a prepared single-row statement. Sessions whose thread is missing (or not their user's)
/// fail alone with `ThreadNotFound` and write nothing. `seqs` learns the reservations once the
/// transaction has committed.
pub(super) fn write_batch(
    conn: &mut rusqlite::Connection,
    seqs: &mut SeqCache,
    ops: &[Op],
    node_id: &str,
) -> BatchResult {
    let now = unix_ms() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    insert_threads(&tx, ops, now)?;
    let (mut next, reserved) = reserve_seqs(&tx, seqs, ops, now)?;
    let (rows, results) = plan(ops, &mut next, now);
    insert_events(&tx, &rows.events, now)?;
    insert_messages(&tx, &rows.messages, now)?;
    // A run that starts and finishes in this batch (a fast agent) is inserted finished; the
    // finishes left over update runs of earlier batches.
    let mut finishes: HashMap<&str, &RunFinish<'_>> =
        rows.finishes.iter().map(|f| (f.run_id, f)).collect();
    insert_runs(&tx, &rows.runs, &mut finishes, now)?;
    finish_runs(&tx, &finishes, now)?;
    insert_opens(&tx, &rows.opens, node_id)?;
    close_connections(&tx, &rows.closes)?;
    tx.commit()?;
    seqs.committed(reserved);
    Ok(results)
}

/// `(thread, user, last_seq)` of each thread whose seqs a batch reserved.
type Reserved<'a> = Vec<(&'a str, &'a str, i64)>;

fn insert_threads(tx: &Connection, ops: &[Op], now: i64) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO threads (thread_id, user_id, created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, 0)",
    )?;
    for ctx in new_threads(ops) {
        st.execute(params![ctx.thread_id(), ctx.user_id(), now, now])?;
    }
    Ok(())
}

/// Reserve the seqs each thread of the batch needs: the next seq of each thread, and what to
/// remember once the batch commits.
///
/// A compare-and-set against the remembered `last_seq` (read only when not remembered or
/// moved): `UPDATE .. RETURNING` builds a temporary table on every call in SQLite, a large
/// share of the writer's work (BENCHMARKS.md). The writer's IMMEDIATE transaction already
/// serializes appends.
fn reserve_seqs<'a>(
    tx: &Connection,
    seqs: &mut SeqCache,
    ops: &'a [Op],
    now: i64,
) -> Result<(NextSeqs<'a>, Reserved<'a>), StoreError> {
    let wanted = seq_requests(ops);
    let mut next: NextSeqs<'a> = NextSeqs::with_capacity(wanted.len());
    let mut reserved = Vec::with_capacity(wanted.len());
    let mut read =
        tx.prepare_cached("SELECT last_seq FROM threads WHERE thread_id = ? AND user_id = ?")?;
    let mut bump = tx.prepare_cached(
        "UPDATE threads SET last_seq = ?, updated_at = ? WHERE thread_id = ? AND user_id = ? AND last_seq = ?",
    )?;
    for &(t, u, n) in &wanted {
        if let Some(b) = reserve(&mut read, &mut bump, seqs, (t, u, n), now)? {
            next.insert(t, (u, b as u64 + 1));
            reserved.push((t, u, b + n));
        }
    }
    Ok((next, reserved))
}

/// Reserve `n` seqs of thread `t` for user `u`: the `last_seq` they follow, or `None` if the
/// thread is gone or not `u`'s (the session then fails in `plan`). The remembered value first;
/// the database's when there is none or it moved.
fn reserve(
    read: &mut CachedStatement<'_>,
    bump: &mut CachedStatement<'_>,
    seqs: &mut SeqCache,
    (t, u, n): (&str, &str, i64),
    now: i64,
) -> Result<Option<i64>, StoreError> {
    if let Some(l) = seqs.get(t, u) {
        if bump.execute(params![l + n, now, t, u, l])? == 1 {
            return Ok(Some(l));
        }
    }
    let read: Option<i64> = read.query_row(params![t, u], |r| r.get(0)).optional()?;
    match read {
        Some(l) => {
            let b = l.max(0);
            // Just read inside this IMMEDIATE transaction: the compare must hold, or the seqs
            // handed out were never reserved.
            if bump.execute(params![b + n, now, t, u, l])? != 1 {
                return Err(StoreError::database(
                    DbErrorKind::Other,
                    "thread seq reservation changed no row",
                ));
            }
            Ok(Some(b))
        }
        // Gone or owned by someone else: forget it.
        None => {
            seqs.forget(t);
            Ok(None)
        }
    }
}

fn insert_events(tx: &Connection, events: &[EventRow<'_>], now: i64) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO thread_events (thread_id, seq, kind, run_id, created_at, frame) VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for e in events {
        st.execute(params![
            e.thread_id,
            e.seq,
            e.kind,
            e.run_id,
            now,
            pack(&e.frame)
        ])?;
    }
    Ok(())
}

fn insert_messages(
    tx: &Connection,
    messages: &[MessageRow<'_>],
    now: i64,
) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO messages (message_id, thread_id, user_id, run_id, request_id, role, content, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for m in messages {
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
    Ok(())
}

/// Insert the runs started in this batch; those that also finished in it (taken out of
/// `finishes`) are inserted finished.
fn insert_runs(
    tx: &Connection,
    runs: &[&UserExecutionContext],
    finishes: &mut HashMap<&str, &RunFinish<'_>>,
    now: i64,
) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO runs (run_id, thread_id, user_id, request_id, connection_id, parent_run_id, status, started_at, finished_at, duration_ms, error_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for r in runs {
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
    Ok(())
}

/// Finish runs that earlier batches inserted.
fn finish_runs(
    tx: &Connection,
    finishes: &HashMap<&str, &RunFinish<'_>>,
    now: i64,
) -> Result<(), StoreError> {
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
    Ok(())
}

fn insert_opens(
    tx: &Connection,
    opens: &[(&UserExecutionContext, i64)],
    node_id: &str,
) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO connections (connection_id, node_id, user_id, thread_id, request_id, opened_at) VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for (c, at) in opens {
        st.execute(params![
            c.connection_id(),
            node_id,
            c.user_id(),
            c.thread_id(),
            c.request_id(),
            at
        ])?;
    }
    Ok(())
}

fn close_connections(tx: &Connection, closes: &[(&str, i64, &str, i64)]) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "UPDATE connections SET closed_at = ?, close_code = ?, close_reason = ? WHERE connection_id = ? AND closed_at IS NULL",
    )?;
    for (cid, at, reason, code) in closes {
        st.execute(params![at, code, reason, cid])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::tests::{close, commit_events, store_with_thread};

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
}
