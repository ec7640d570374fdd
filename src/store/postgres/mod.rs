//! The PostgreSQL backend: the writer is a task with a connection of its own, which it
//! replaces when a batch fails on a broken one (a database restart). Each batch is one
//! transaction of a few multi-row statements (`write`): each statement is a network round
//! trip, so fewer is faster.
//!
//! The queue, batching and publishing order are the writer's (`store::writer`); the pool and
//! the schema are the store's.

mod write;

use sqlx::{AnyConnection, AnyPool, Connection};
use tokio::sync::mpsc;

use super::writer::{BatchResult, BatchWriter, Op, Writer};
use super::StoreError;

/// Start the writer task on a connection of its own from `pool`; `url` is for reconnecting.
pub(super) async fn start(pool: &AnyPool, url: String, w: Writer) -> Result<(), StoreError> {
    let conn = pool.acquire().await?.detach();
    // Not on a TaskTracker: the writer lives as long as the store, and `Store::close` sends it
    // `Shutdown` and waits for its reply, after the server's tasks are done.
    #[expect(
        clippy::disallowed_methods,
        reason = "the store's writer; Store::close stops it and waits"
    )]
    tokio::spawn(w.run(PgWriter { conn, url }));
    Ok(())
}

/// The writer task's side of a batch: its connection, and the URL to replace it.
struct PgWriter {
    conn: AnyConnection,
    url: String,
}

impl BatchWriter for PgWriter {
    async fn recv(&mut self, rx: &mut mpsc::Receiver<Op>) -> Option<Op> {
        rx.recv().await
    }

    async fn write(&mut self, ops: &[Op], node_id: &str) -> BatchResult {
        write::write_batch(&mut self.conn, ops, node_id).await
    }

    /// Reconnect if the connection broke (a database restart).
    async fn recover(&mut self) {
        if self.conn.ping().await.is_err() {
            match AnyConnection::connect(&self.url).await {
                Ok(c) => self.conn = c,
                Err(e) => {
                    tracing::error!(error = %StoreError::from(e), "store writer cannot reconnect")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{AnyConnection, Connection};

    use crate::session::{SessionFactory, StagedWrite};
    use crate::store::tests::{
        a_rejected_session_fails_alone_on, commit_events, ctx, pg_url, store_on,
    };
    use crate::store::{Store, StoreError};

    #[tokio::test]
    async fn a_session_the_database_rejects_fails_alone_and_fails_its_gate_on_postgres() {
        let Some(url) = pg_url() else { return };
        let store = store_on(&url).await;
        a_rejected_session_fails_alone_on(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn the_writer_reconnects_when_its_connection_is_cut_on_postgres() {
        let Some(url) = pg_url() else { return };
        // A name of its own, so only this store's connections are cut.
        let app = crate::ids::connection_id();
        let sep = if url.contains('?') { '&' } else { '?' };
        let store = store_on(&format!("{url}{sep}application_name={app}")).await;
        let sessions = SessionFactory::new(store.clone());
        let a = ctx("alice");
        let mut s = sessions.create_session_from_context(&a);
        s.stage(StagedWrite::CreateThread);
        s.commit().await.unwrap();
        assert_eq!(commit_events(&sessions, &a, 0..1).await, vec![1]);
        // Every connection of the store, the writer's among them, ends as in a database
        // restart; each termination is waited for. One more under the same name shows what
        // the writer's failed batch saw.
        sqlx::any::install_default_drivers();
        let mut admin = AnyConnection::connect(&url).await.unwrap();
        let mut doomed = AnyConnection::connect(&format!("{url}{sep}application_name={app}"))
            .await
            .unwrap();
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(cut.len() >= 3 && cut.iter().all(|c| *c), "{cut:?}");
        let lost = StoreError::from(
            sqlx::query("SELECT 1")
                .execute(&mut doomed)
                .await
                .unwrap_err(),
        );
        assert!(lost.is_connection_lost(), "{lost:?}");
        // The writer's batch fails on the dead connection, and the retry runs on a new one.
        assert_eq!(commit_events(&sessions, &a, 1..3).await, vec![2, 3]);
        store.close().await;
    }
}
