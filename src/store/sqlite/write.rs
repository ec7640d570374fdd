//! One batch on SQLite: the plan's rows as prepared single-row statements (in-process calls
//! of a few microseconds each), and the `seq`s reserved by a compare-and-set against the
//! [`SeqCache`]'s guess.
//!
//! What the rows are is the plan's; the loop around a batch is the writer's.

use super::seq_cache::SeqCache;
use crate::ids::unix_ms;
use crate::store::codec::pack;
use crate::store::plan::{new_threads, plan, seq_requests, NextSeqs, RunFinish};
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
                            return Err(StoreError::database(
                                DbErrorKind::Other,
                                "thread seq reservation changed no row",
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
