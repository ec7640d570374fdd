//! The gateway on PostgreSQL (`TETHER_TEST_POSTGRES_URL`): the same store code, a real server.
//! Skipped, with one visible line, when the variable is unset.

mod common;

use common::*;

fn pg_url() -> Option<String> {
    env::require_env("TETHER_TEST_POSTGRES_URL", "PostgreSQL tests")
}

/// A node on `url`, with a node id of its own.
async fn spawn_on(url: &str) -> TestApp {
    spawn_with(|c| {
        c.store.database_url = Some(tether::Secret::new(url.to_string()));
        c.cluster.node_id = tether::ids::connection_id();
    })
    .await
}

/// A direct connection, to look at or damage what the nodes wrote.
async fn db(url: &str) -> sqlx::AnyConnection {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url).await.unwrap()
}

#[tokio::test]
async fn runs_resume_and_audit_work_on_postgres() {
    let Some(url) = pg_url() else { return };
    let app = spawn_on(&url).await;
    let (mut c, est) = app.connect("pg-alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    let frames = chat(&mut c, "a", "hello postgres").await;
    assert_eq!(seqs(&frames), vec![1, 2, 3, 4, 5, 6]);
    let (mut tab, _) = app.connect_thread("pg-alice", &thread, Some(2)).await;
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(tab.next_json(T).await.unwrap());
    }
    assert_eq!(seqs(&replayed), vec![3, 4, 5, 6]);
    c.abort();
    tab.close().await.unwrap();
    app.wait_stats("released", |s| {
        s["connections"] == 0 && s["audit_rows_open"] == 0
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_negative_last_seq_edited_by_hand_counts_as_zero_on_postgres() {
    let Some(url) = pg_url() else { return };
    let app = spawn_on(&url).await;
    let (mut c, est) = app.connect("pg-bob").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    // The thread's row is committed before `connection_established`; break it by hand.
    let moved = sqlx::query("UPDATE threads SET last_seq = -5 WHERE thread_id = $1")
        .bind(&thread)
        .execute(&mut db(&url).await)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(moved, 1);
    let frames = chat(&mut c, "a", "hello again").await;
    assert_eq!(seqs(&frames), vec![1, 2, 3, 4, 5, 6]);
    c.close().await.unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn nodes_starting_together_on_an_older_schema_all_start_on_postgres() {
    use sqlx::Connection as _;
    let Some(url) = pg_url() else { return };
    // The schema exists (a first node made it); then the older thread index is put back, under
    // the lock the nodes take, so this does not race the other tests' nodes either.
    spawn_on(&url).await.shutdown().await;
    let mut db = db(&url).await;
    let mut tx = db.begin().await.unwrap();
    for sql in [
        format!(
            "SELECT pg_advisory_xact_lock({})",
            tether::testing::SCHEMA_LOCK
        ),
        "DROP INDEX IF EXISTS threads_of_user".into(),
        "CREATE INDEX IF NOT EXISTS threads_by_user ON threads (user_id, updated_at)".into(),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    // Three nodes migrate it at once: every one starts (`spawn_on` panics otherwise).
    let (a, b, c) = tokio::join!(spawn_on(&url), spawn_on(&url), spawn_on(&url));
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'threads' ORDER BY indexname",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(
        indexes.contains(&"threads_of_user".to_string()),
        "{indexes:?}"
    );
    assert!(
        !indexes.contains(&"threads_by_user".to_string()),
        "{indexes:?}"
    );
    for app in [a, b, c] {
        app.shutdown().await;
    }
}

#[tokio::test]
async fn nodes_starting_together_on_an_empty_database_all_start_on_postgres() {
    let Some(url) = pg_url() else { return };
    // A database of its own, empty: the nodes create every table and index at once. A fixed
    // name, dropped first, so a run that failed half-way leaves nothing behind for long.
    let name = "tether_test_fresh";
    let mut admin = db(&url).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, rest) = url.rsplit_once('/').unwrap();
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    let fresh = format!("{base}/{name}{query}");
    let (a, b, c) = tokio::join!(spawn_on(&fresh), spawn_on(&fresh), spawn_on(&fresh));
    for app in [a, b, c] {
        app.shutdown().await;
    }
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
