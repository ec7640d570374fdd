//! The schema: every table and index, created (and migrated from older versions) when a store
//! opens, in one transaction; on PostgreSQL under an advisory lock ([`SCHEMA_LOCK`]).
//!
//! The DDL is portable: both backends run the same statements. What the rows mean is the
//! writer's and the plan's; how `thread_events.frame` is encoded is the codec's.

use sqlx::{AnyPool, Executor};

use super::{Backend, StoreError};

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
    // SQLite stores the text LZ4-packed, as a BLOB (see `codec`).
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
pub(crate) const SCHEMA_LOCK: i64 = 7_464_657_468;

/// Create or migrate the schema. One transaction, and on PostgreSQL one node at a time: nodes
/// starting together on a fresh or older database would otherwise race on `IF NOT EXISTS` DDL
/// (PostgreSQL reports the loser as a duplicate key in its catalog). The lock is the
/// transaction's: commit, rollback or a dropped connection releases it.
pub(super) async fn create(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    if backend == Backend::Postgres {
        tx.execute(format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK})").as_str())
            .await?;
    }
    for ddl in SCHEMA {
        tx.execute(*ddl).await?;
    }
    tx.commit().await?;
    Ok(())
}
