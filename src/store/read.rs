//! The queries that go straight to the pool, beside the writer: ownership checks, thread lists,
//! history, and the audit rows a node left open. Portable SQL, the same on both backends.
//!
//! Everything a session writes goes through the writer instead; how a stored row of events
//! reads back is the codec's.

use std::time::Instant;

use sqlx::{AnyPool, Row};

use super::codec::{self, u64_of};
use super::{EventPage, StoreError, ThreadSummary};
use crate::context::OwnedThread;
use crate::ids::unix_ms;
use crate::metrics::{metrics, StoreOp};
use crate::protocol;
use crate::protocol::CloseCode;

/// Observes a read's latency when dropped.
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

/// See [`super::Store::find_thread`].
pub(super) async fn find_thread(
    pool: &AnyPool,
    user_id: &str,
    thread_id: &str,
) -> Result<Option<(OwnedThread, u64)>, StoreError> {
    let _t = read_timer();
    let row = sqlx::query("SELECT user_id, last_seq FROM threads WHERE thread_id = $1")
        .bind(thread_id)
        .fetch_optional(pool)
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

/// See [`super::Store::list_threads`].
pub(super) async fn list_threads(
    pool: &AnyPool,
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
    .fetch_all(pool)
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

/// See [`super::Store::events_since`].
pub(super) async fn events_since(
    pool: &AnyPool,
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
    .fetch_all(pool)
    .await?;
    let last = sqlx::query("SELECT last_seq FROM threads WHERE thread_id = $1")
        .bind(thread_id)
        .fetch_optional(pool)
        .await?;
    let last_seq = match last {
        Some(r) => u64_of(&r, 0)?,
        None => 0,
    };
    // A row holds one or more events (see `codec`); `limit` rows hold at least `limit`.
    let mut events = Vec::with_capacity(rows.len());
    'rows: for r in &rows {
        let last = u64_of(r, 0)?;
        let text = codec::unpack(r, 1, last)?;
        for (seq, frame) in codec::events_of(&text, last) {
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

/// See [`super::Store::recover_open_audit_rows`].
pub(super) async fn recover_open_audit_rows(
    pool: &AnyPool,
    node_id: &str,
) -> Result<u64, StoreError> {
    let res = sqlx::query(
        "UPDATE connections SET closed_at = $1, close_code = $2,
         close_reason = 'closed at restart: left open by an earlier process'
         WHERE node_id = $3 AND closed_at IS NULL",
    )
    .bind(unix_ms() as i64)
    // No close handshake happened: recorded as abnormal, as a lost connection is.
    .bind(i64::from(CloseCode::Abnormal.as_u16()))
    .bind(node_id)
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// See [`super::Store::open_audit_rows`].
pub(super) async fn open_audit_rows(pool: &AnyPool, node_id: &str) -> Result<u64, StoreError> {
    let row =
        sqlx::query("SELECT COUNT(*) FROM connections WHERE node_id = $1 AND closed_at IS NULL")
            .bind(node_id)
            .fetch_one(pool)
            .await?;
    u64_of(&row, 0)
}

/// See [`super::Store::ping`].
pub(super) async fn ping(pool: &AnyPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").fetch_one(pool).await?;
    Ok(())
}
