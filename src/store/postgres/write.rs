//! One batch on PostgreSQL: the plan's rows as a handful of multi-row statements, however many
//! sessions the batch holds, and the `seq`s of every thread reserved by one
//! `UPDATE .. RETURNING`, which serializes appends per thread across nodes sharing the database.
//! Chunks of power-of-two sizes ([`pow2_chunks`]) keep the statement texts few, so the
//! connection keeps them prepared.
//!
//! What the rows are is the plan's; the loop around a batch is the writer's.

use sqlx::{AnyConnection, Connection, Row};

use crate::context::UserExecutionContext;
use crate::ids::unix_ms;
use crate::store::codec::u64_of;
use crate::store::plan::{
    new_threads, plan, seq_requests, EventRow, MessageRow, NextSeqs, RunFinish,
};
use crate::store::writer::{BatchResult, Op};
use crate::store::StoreError;

/// Rows per multi-row statement (well under PostgreSQL's limit of 65,535 bind parameters).
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

/// One parameter, `$n`.
fn push_param(sql: &mut String, n: usize) {
    sql.push('$');
    sql.push_str(&n.to_string());
}

/// `prefix` followed by `rows` groups of `cols` numbered parameters, starting at `$first`.
/// Callers generate parameters in the order they bind them.
fn values_sql(prefix: &str, cols: usize, rows: usize, first: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 5);
    sql.push_str(prefix);
    let mut n = first;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            push_param(&mut sql, n);
            n += 1;
        }
        sql.push(')');
    }
    sql
}

/// `(SELECT CAST($a AS T1) AS c1, ... UNION ALL SELECT ...) AS v`: a typed inline table for
/// `UPDATE .. FROM`.
fn inline_table(cols: &[(&str, &str)], rows: usize, first: usize) -> String {
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
            push_param(&mut sql, n);
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

/// Write `ops` in one transaction with a handful of multi-row statements, however many sessions
/// the batch holds: new threads, one `UPDATE .. RETURNING` that reserves the `seq`s of every
/// thread in the batch, then events, messages, runs and audit rows. Sessions whose thread is
/// missing (or not their user's) fail alone with `ThreadNotFound` and write nothing.
pub(super) async fn write_batch(
    conn: &mut AnyConnection,
    ops: &[Op],
    node_id: &str,
) -> BatchResult {
    let now = unix_ms() as i64;
    let mut tx = conn.begin().await?;
    insert_threads(&mut tx, ops, now).await?;
    let mut next = reserve_seqs(&mut tx, ops, now).await?;
    let (rows, results) = plan(ops, &mut next, now);
    insert_events(&mut tx, &rows.events, now).await?;
    insert_messages(&mut tx, &rows.messages, now).await?;
    insert_runs(&mut tx, &rows.runs, now).await?;
    finish_runs(&mut tx, &rows.finishes, now).await?;
    insert_opens(&mut tx, &rows.opens, node_id).await?;
    close_connections(&mut tx, &rows.closes).await?;
    tx.commit().await?;
    Ok(results)
}

async fn insert_threads(tx: &mut AnyConnection, ops: &[Op], now: i64) -> Result<(), StoreError> {
    let new_threads = new_threads(ops);
    execute_chunks!(
        tx,
        new_threads,
        |n| values_sql(
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
    Ok(())
}

/// Reserve the seqs each thread of the batch needs, one `UPDATE .. RETURNING` per chunk of
/// threads: the next seq of each thread whose user owns it.
async fn reserve_seqs<'a>(
    tx: &mut AnyConnection,
    ops: &'a [Op],
    now: i64,
) -> Result<NextSeqs<'a>, StoreError> {
    let wanted = seq_requests(ops);
    let mut next: NextSeqs<'a> = NextSeqs::with_capacity(wanted.len());
    for chunk in pow2_chunks(&wanted) {
        let sql = format!(
            "UPDATE threads SET last_seq = GREATEST(threads.last_seq, 0) + v.n, updated_at = $1 FROM {} \
             WHERE threads.thread_id = v.tid AND threads.user_id = v.uid RETURNING thread_id, user_id, last_seq",
            inline_table(&[("tid", "TEXT"), ("uid", "TEXT"), ("n", "BIGINT")], chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).bind(now);
        for (t, u, n) in chunk {
            q = q.bind(*t).bind(*u).bind(*n);
        }
        for row in q.fetch_all(&mut *tx).await? {
            let thread: String = row.try_get(0)?;
            let user: String = row.try_get(1)?;
            let last = u64_of(&row, 2)?;
            if let Some(&(t, u, n)) = chunk.iter().find(|(t, u, _)| *t == thread && *u == user) {
                // `last_seq` is at least `n` (a negative one edited by hand counts as 0, as
                // on SQLite), so this cannot underflow.
                next.insert(t, (u, last + 1 - n as u64));
            }
        }
    }
    Ok(next)
}

async fn insert_events(
    tx: &mut AnyConnection,
    events: &[EventRow<'_>],
    now: i64,
) -> Result<(), StoreError> {
    execute_chunks!(
        tx,
        events,
        |n| values_sql(
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
    Ok(())
}

async fn insert_messages(
    tx: &mut AnyConnection,
    messages: &[MessageRow<'_>],
    now: i64,
) -> Result<(), StoreError> {
    execute_chunks!(
        tx,
        messages,
        |n| {
            values_sql(
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
    Ok(())
}

/// Insert the runs started in this batch as running ([`finish_runs`] follows).
async fn insert_runs(
    tx: &mut AnyConnection,
    runs: &[&UserExecutionContext],
    now: i64,
) -> Result<(), StoreError> {
    execute_chunks!(
        tx,
        runs,
        |n| {
            values_sql(
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
    Ok(())
}

/// Finish runs, of this batch or earlier ones.
async fn finish_runs(
    tx: &mut AnyConnection,
    finishes: &[RunFinish<'_>],
    now: i64,
) -> Result<(), StoreError> {
    for chunk in pow2_chunks(finishes) {
        let sql = format!(
            "UPDATE runs SET status = v.status, finished_at = $1, duration_ms = v.dur, error_code = v.err FROM {} WHERE runs.run_id = v.rid",
            inline_table(&[("rid", "TEXT"), ("status", "TEXT"), ("dur", "BIGINT"), ("err", "TEXT")], chunk.len(), 2)
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
    Ok(())
}

async fn insert_opens(
    tx: &mut AnyConnection,
    opens: &[(&UserExecutionContext, i64)],
    node_id: &str,
) -> Result<(), StoreError> {
    execute_chunks!(
        tx,
        opens,
        |n| {
            values_sql(
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
    Ok(())
}

async fn close_connections(
    tx: &mut AnyConnection,
    closes: &[(&str, i64, &str, i64)],
) -> Result<(), StoreError> {
    execute_chunks!(
        tx,
        closes,
        |n| {
            format!(
                "UPDATE connections SET closed_at = v.at, close_code = v.code, close_reason = v.reason FROM {} \
                 WHERE connections.connection_id = v.cid AND connections.closed_at IS NULL",
                inline_table(&[("cid", "TEXT"), ("at", "BIGINT"), ("reason", "TEXT"), ("code", "BIGINT")], n, 1)
            )
        },
        |q, (cid, at, reason, code)| q.bind(*cid).bind(*at).bind(*reason).bind(*code),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn placeholders_are_numbered_in_bind_order() {
        assert_eq!(values_sql("V ", 2, 2, 3), "V ($3, $4), ($5, $6)");
        assert_eq!(
            inline_table(&[("a", "TEXT")], 2, 1),
            "(SELECT CAST($1 AS TEXT) AS a UNION ALL SELECT CAST($2 AS TEXT)) AS v"
        );
    }
}
