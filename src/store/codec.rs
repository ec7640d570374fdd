//! The `thread_events` row format. A row holds the consecutive events of one thread committed
//! in one batch: their frames joined by newlines (compact JSON has no raw newline), its `seq`
//! that of the last one. SQLite stores the text LZ4-packed as a BLOB ([`pack`]); PostgreSQL
//! stores it as TEXT. [`unpack`] reads either, [`events_of`] splits a row into its events.
//!
//! Which rows a batch writes is the plan's; the statements that write and read them are the
//! backends' and `read`'s.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{DbErrorKind, StoreError};

/// Append `frame` to a row's text.
pub(super) fn push_frame(row: &mut String, frame: &str) {
    row.push('\n');
    row.push_str(frame);
}

/// The events of a row's text, `(seq, frame)`, oldest first; `last` is the row's `seq`.
pub(super) fn events_of(text: &str, last: u64) -> impl Iterator<Item = (u64, &str)> {
    let n = text.split('\n').count() as u64;
    text.split('\n')
        .enumerate()
        .map(move |(i, frame)| ((last + 1 + i as u64).saturating_sub(n), frame))
}

/// The SQLite form of a `thread_events.frame` value: LZ4 (block format, length prefix). A
/// run's frames repeat their thread, run and reply ids, so they shrink well (BENCHMARKS.md has
/// by how much), and the WAL, the checkpoints and the database file all write that much less.
/// (PostgreSQL compresses values over about 2 KB itself, TOAST, and keeps the rows as text.)
pub(super) fn pack(frames: &str) -> Vec<u8> {
    lz4_flex::compress_prepend_size(frames.as_bytes())
}

/// A stored frame row as text: SQLite rows written by [`pack`] are BLOBs, older SQLite rows
/// and PostgreSQL rows are TEXT (told apart by the value's own type, not by its bytes).
/// `seq` only names the row in an error.
pub(super) fn unpack(row: &AnyRow, idx: usize, seq: u64) -> Result<String, StoreError> {
    let blob = sqlx::ValueRef::type_info(&row.try_get_raw(idx)?).kind()
        == sqlx::any::AnyTypeInfoKind::Blob;
    if !blob {
        return Ok(row.try_get(idx)?);
    }
    let bytes: &[u8] = row.try_get(idx)?;
    let corrupt = |why: &str| {
        StoreError::database(
            DbErrorKind::Corrupt,
            format!("corrupt thread_events row (seq {seq}): {why}"),
        )
    };
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

/// A `BIGINT` column as `u64` (a negative value counts as 0).
pub(super) fn u64_of(row: &AnyRow, idx: usize) -> Result<u64, StoreError> {
    Ok(row.try_get::<i64, _>(idx)?.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use crate::store::tests::{close, commit_events, ctx, insert_row, store, store_with_thread};
    use crate::store::{DbErrorKind, Store};

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
            assert_eq!(err.db_kind(), Some(DbErrorKind::Corrupt), "{err:?}");
            let err = err.to_string();
            assert!(err.contains("corrupt thread_events row"), "{err}");
            assert!(err.contains(why), "{err}");
        }
        close(store, dir).await;
    }
}
