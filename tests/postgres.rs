//! The gateway on PostgreSQL (`TETHER_TEST_POSTGRES_URL`): the same store code, a real server.
//! Skipped, with one visible line, when the variable is unset.

mod common;

use std::io::Write as _;

use common::*;

fn pg_url() -> Option<String> {
    match std::env::var("TETHER_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            // Written to the real stderr (not captured by the test harness), so it shows.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: PostgreSQL tests (set TETHER_TEST_POSTGRES_URL to run them)"
            );
            None
        }
    }
}

#[tokio::test]
async fn runs_resume_and_audit_work_on_postgres() {
    let Some(url) = pg_url() else { return };
    let node = tether::ids::connection_id();
    let app = spawn_with(|c| {
        c.database_url = Some(tether::config::Secret::new(url.clone()));
        c.node_id = node.clone();
    })
    .await;
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
    use sqlx::Connection as _;
    let Some(url) = pg_url() else { return };
    let node = tether::ids::connection_id();
    let app = spawn_with(|c| {
        c.database_url = Some(tether::config::Secret::new(url.clone()));
        c.node_id = node.clone();
    })
    .await;
    let (mut c, est) = app.connect("pg-bob").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    // The thread's row is written by the store's writer; wait for it, then break it by hand.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let moved = sqlx::query("UPDATE threads SET last_seq = -5 WHERE thread_id = $1")
            .bind(&thread)
            .execute(&mut db)
            .await
            .unwrap()
            .rows_affected();
        if moved == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "thread row never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let frames = chat(&mut c, "a", "hello again").await;
    assert_eq!(seqs(&frames), vec![1, 2, 3, 4, 5, 6]);
    c.close().await.unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn nodes_starting_together_on_an_older_schema_all_start_on_postgres() {
    use sqlx::Connection as _;
    let Some(url) = pg_url() else { return };
    let pg = |c: &mut tether::config::Config| {
        c.database_url = Some(tether::config::Secret::new(url.clone()));
        c.node_id = tether::ids::connection_id();
    };
    // The schema exists (a first node made it); then the older thread index is put back, under
    // the lock the nodes take, so this does not race the other tests' nodes either.
    spawn_with(pg).await.shutdown().await;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    for sql in [
        "SELECT pg_advisory_lock(7464657468)",
        "DROP INDEX IF EXISTS threads_of_user",
        "CREATE INDEX IF NOT EXISTS threads_by_user ON threads (user_id, updated_at)",
        "SELECT pg_advisory_unlock(7464657468)",
    ] {
        sqlx::query(sql).execute(&mut db).await.unwrap();
    }
    // Three nodes migrate it at once: every one starts (`spawn_with` panics otherwise).
    let (a, b, c) = tokio::join!(spawn_with(pg), spawn_with(pg), spawn_with(pg));
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
