//! The PostgreSQL backend: the writer is a task with a connection of its own, which it
//! replaces when a batch fails on a broken one (a database restart). Each batch is one
//! transaction of a few multi-row statements (`write`): each statement is a network round
//! trip, so fewer is faster.
//!
//! The queue, batching and publishing order are the writer's (`store::writer`); the pool and
//! the schema are the store's.

mod write;

use std::time::Instant;

use sqlx::{AnyConnection, AnyPool, Connection};

use super::writer::{alone, Writer};
use super::StoreError;

/// Start the writer task on a connection of its own from `pool`; `url` is for reconnecting.
pub(super) async fn start(pool: &AnyPool, url: String, w: Writer) -> Result<(), StoreError> {
    let conn = pool.acquire().await?.detach();
    tokio::spawn(pg_writer(w, conn, url));
    Ok(())
}

/// The PostgreSQL writer: a task with its own connection. Each batch is one transaction of a few
/// multi-row statements (each one a network round trip, so fewer is faster).
async fn pg_writer(mut w: Writer, mut conn: AnyConnection, url: String) {
    while w.shutdown.is_none() {
        let Some(first) = w.rx.recv().await else {
            break;
        };
        let batch = w.batch(first);
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let results = match write::write_batch(&mut conn, &batch, &w.node_id).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, ops = batch.len(), "group commit failed; retrying each session alone");
                // Reconnect if the connection broke (a database restart).
                if conn.ping().await.is_err() {
                    match sqlx::AnyConnection::connect(&url).await {
                        Ok(c) => conn = c,
                        Err(e) => {
                            tracing::error!(error = %StoreError::from(e), "store writer cannot reconnect")
                        }
                    }
                }
                let mut results = Vec::with_capacity(batch.len());
                for op in batch.chunks(1) {
                    let r = write::write_batch(&mut conn, op, &w.node_id).await;
                    results.push(alone(r, op));
                }
                results
            }
        };
        w.finish(batch, results, started);
    }
    w.close();
}
