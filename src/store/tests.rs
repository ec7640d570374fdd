//! Tests of a whole store (SQLite): gates, ownership, seqs, reads. The helpers here are shared
//! with the tests of the parts (codec, SQLite writer, checkpoints) that need a whole store too.

use std::sync::Arc;

use super::{DbErrorKind, EventPage, SqlStore, Store, StoreError, StoreOptions};
use crate::broker::LocalBroker;
use crate::context::ThreadChoice;
use crate::context::{OwnedThread, UserExecutionContext};
use crate::registry::{Limits, Registry};
use crate::session::StagedWrite;
use crate::session::{CommitReceipt, NewEvent, SessionFactory};

/// A connection's context for `user` on a new thread.
pub(super) fn ctx(user: &str) -> UserExecutionContext {
    UserExecutionContext::from_websocket_request(
        user,
        &crate::ids::connection_id(),
        ThreadChoice::New,
    )
    .unwrap()
}

/// An event whose data is `{"n": n}`.
pub(super) fn event(n: u64) -> StagedWrite {
    StagedWrite::Event(NewEvent {
        kind: "agent_thinking",
        run_id: None,
        reply_to: None,
        data: serde_json::json!({ "n": n }),
        ack: None,
        prepared: None,
    })
}

/// A store and a session factory, with a new thread of `user` already created.
pub(super) async fn store_with_thread(
    user: &str,
) -> (
    Arc<SqlStore>,
    std::path::PathBuf,
    SessionFactory,
    UserExecutionContext,
) {
    let (store, dir) = store().await;
    let sessions = SessionFactory::new(store.clone());
    let c = ctx(user);
    let mut s = sessions.create_session_from_context(&c);
    s.stage(StagedWrite::CreateThread);
    s.commit().await.unwrap();
    (store, dir, sessions, c)
}

/// Commit one session of the events `ns` (see [`event`]) on `c`'s thread; their seqs.
pub(super) async fn commit_events(
    sessions: &SessionFactory,
    c: &UserExecutionContext,
    ns: std::ops::Range<u64>,
) -> Vec<u64> {
    let mut s = sessions.create_session_from_context(c);
    for n in ns {
        s.stage(event(n));
    }
    s.commit().await.unwrap()
}

/// Write a `thread_events` row by hand, as an older binary or a damaged file left it.
pub(super) async fn insert_row<'q, F>(store: &SqlStore, thread_id: &'q str, seq: i64, frame: F)
where
    F: 'q + Send + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    sqlx::query("INSERT INTO thread_events (thread_id, seq, kind, run_id, created_at, frame) VALUES ($1, $2, 'x', NULL, 0, $3)")
        .bind(thread_id)
        .bind(seq)
        .bind(frame)
        .execute(&store.pool)
        .await
        .unwrap();
}

/// Submit one event as "bob" on `owner`'s thread (a forged ownership proof).
pub(super) async fn submit_as_intruder(
    sessions: &SessionFactory,
    owner: &UserExecutionContext,
) -> CommitReceipt {
    let bob_on_owner = UserExecutionContext::from_websocket_request(
        "bob",
        &crate::ids::connection_id(),
        ThreadChoice::Resume(OwnedThread::new("bob", owner.thread_id())),
    )
    .unwrap();
    let mut s = sessions.create_session_from_context(&bob_on_owner);
    s.stage(event(0));
    s.submit().await.unwrap()
}

/// Close the store and remove its directory.
pub(super) async fn close(store: Arc<SqlStore>, dir: std::path::PathBuf) {
    store.close().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A new SQLite store in a directory of its own (`synchronous=NORMAL`: these tests need no
/// durability).
pub(super) async fn store() -> (Arc<SqlStore>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tether-store-{}", crate::ids::connection_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut opts = StoreOptions::sqlite_in(&dir);
    opts.sqlite_synchronous = crate::config::SqliteSynchronous::Normal;
    let reg = Registry::new(Limits::default());
    (
        SqlStore::open(opts, Arc::new(LocalBroker::new(reg)))
            .await
            .unwrap(),
        dir,
    )
}

/// `TETHER_TEST_POSTGRES_URL`, or `None` with one SKIPPED line (once for all these tests).
pub(super) fn pg_url() -> Option<String> {
    match std::env::var("TETHER_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            // The real stderr, not captured by the test harness, so it shows.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write as _;
                writeln!(
                    std::io::stderr(),
                    "SKIPPED: store tests on PostgreSQL (set TETHER_TEST_POSTGRES_URL to run them)"
                )
                .ok();
            });
            None
        }
    }
}

/// A new store on `url` (a node of its own).
pub(super) async fn store_on(url: &str) -> Arc<SqlStore> {
    let opts = StoreOptions {
        url: url.to_string(),
        node_id: crate::ids::connection_id(),
        sqlite_synchronous: crate::config::SqliteSynchronous::Normal,
        read_pool_size: 1,
    };
    let reg = Registry::new(Limits::default());
    SqlStore::open(opts, Arc::new(LocalBroker::new(reg)))
        .await
        .unwrap()
}

/// The seqs of a page's events.
fn seqs(page: EventPage) -> Vec<u64> {
    page.events.iter().map(|(s, _)| *s).collect()
}

/// Queue one session of `writes` on `c`.
async fn submit(
    sessions: &SessionFactory,
    c: &UserExecutionContext,
    writes: impl IntoIterator<Item = StagedWrite>,
) -> CommitReceipt {
    let mut s = sessions.create_session_from_context(c);
    for w in writes {
        s.stage(w);
    }
    s.submit().await.unwrap()
}

/// One batch in which the database rejects a session (it creates a thread that exists): the
/// batch rolls back and each session is retried alone, so the others commit with gap-free
/// seqs, the rejected one fails with a database error, and the session behind its gate fails
/// without writing. The same outcome if the sessions land in separate batches.
pub(super) async fn a_rejected_session_fails_alone_on(store: &Arc<SqlStore>) {
    let sessions = SessionFactory::new(store.clone());
    let a = ctx("alice");
    submit(&sessions, &a, [StagedWrite::CreateThread])
        .await
        .await
        .unwrap()
        .unwrap();
    // Back to back, so usually one batch.
    let before = submit(&sessions, &a, [event(0)]).await;
    let gate = crate::session::Gate::new(&a);
    let again = submit(
        &sessions,
        &a,
        [
            StagedWrite::CreateThread,
            event(1),
            StagedWrite::Opens(gate.clone()),
        ],
    )
    .await;
    let gated = submit(
        &sessions,
        &a,
        [StagedWrite::Requires(gate.clone()), event(2)],
    )
    .await;
    let after = submit(&sessions, &a, [event(3)]).await;
    assert_eq!(before.await.unwrap().unwrap(), vec![1]);
    let rejected = again.await.unwrap().unwrap_err();
    assert_eq!(
        rejected.db_kind(),
        Some(DbErrorKind::Constraint),
        "{rejected:?}"
    );
    assert!(matches!(
        gated.await.unwrap(),
        Err(StoreError::MessageNotStored)
    ));
    assert!(gate.failed());
    assert_eq!(after.await.unwrap().unwrap(), vec![2]);
    let page = store.events_since(a.thread_id(), 0, 10).await.unwrap();
    assert_eq!(seqs(page), vec![1, 2]);
}

#[tokio::test]
async fn a_session_the_database_rejects_fails_alone_and_fails_its_gate() {
    let (store, dir) = store().await;
    a_rejected_session_fails_alone_on(&store).await;
    close(store, dir).await;
}

#[tokio::test]
async fn a_run_whose_message_fails_stores_nothing_and_leaves_no_seq_gap() {
    let (store, dir, sessions, a) = store_with_thread("alice").await;
    // The message fails (its thread does not exist); its run, queued right behind it
    // (usually in the same batch), is refused.
    let bob = ctx("bob");
    let gate = crate::session::Gate::new(&bob);
    let mut msg = sessions.create_session_from_context(&bob);
    msg.stage(event(0)).stage(StagedWrite::Opens(gate.clone()));
    let msg = msg.submit().await.unwrap();
    let mut run = sessions.create_session_from_context(&bob);
    run.stage(StagedWrite::Requires(gate.clone()))
        .stage(event(1));
    let run = run.submit().await.unwrap();
    assert!(matches!(
        msg.await.unwrap(),
        Err(StoreError::ThreadNotFound)
    ));
    assert!(matches!(
        run.await.unwrap(),
        Err(StoreError::MessageNotStored)
    ));
    assert!(gate.failed());
    // A gate never admits another thread's session, even open: here alice's, which must
    // not reserve a seq it then leaves unused.
    let open = crate::session::Gate::new(&bob);
    let mut stray = sessions.create_session_from_context(&a);
    stray.stage(StagedWrite::Requires(open)).stage(event(2));
    let stray = stray.submit().await.unwrap();
    let mut late = sessions.create_session_from_context(&bob);
    late.stage(StagedWrite::Requires(gate)).stage(event(2));
    assert!(matches!(
        late.commit().await,
        Err(StoreError::MessageNotStored)
    ));
    assert!(matches!(
        stray.await.unwrap(),
        Err(StoreError::MessageNotStored)
    ));
    let mut other = sessions.create_session_from_context(&a);
    other.stage(event(3));
    assert_eq!(other.commit().await.unwrap(), vec![1]);
    close(store, dir).await;
}

#[tokio::test]
async fn an_intruder_first_in_a_batch_does_not_fail_the_owner() {
    let (store, dir, sessions, a) = store_with_thread("alice").await;
    // Back to back, so usually one batch, the intruder first.
    let intruder = submit_as_intruder(&sessions, &a).await;
    let mut owner = sessions.create_session_from_context(&a);
    owner.stage(event(1));
    let owner = owner.submit().await.unwrap();
    assert!(matches!(
        intruder.await.unwrap(),
        Err(StoreError::ThreadNotFound)
    ));
    assert_eq!(owner.await.unwrap().unwrap(), vec![1]);
    close(store, dir).await;
}

#[tokio::test]
async fn events_committed_together_share_a_row_and_read_back_one_by_one() {
    let (store, dir, sessions, a) = store_with_thread("alice").await;
    assert_eq!(
        commit_events(&sessions, &a, 0..5).await,
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(commit_events(&sessions, &a, 5..7).await, vec![6, 7]);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM thread_events")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    let seqs = |p: EventPage| p.events.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    let all = store.events_since(a.thread_id(), 0, 100).await.unwrap();
    assert_eq!(all.last_seq, 7);
    for (seq, frame) in &all.events {
        let v: serde_json::Value = serde_json::from_str(frame).unwrap();
        assert_eq!(v["seq"], *seq);
        assert_eq!(v["data"]["n"], *seq - 1);
    }
    assert_eq!(seqs(all), (1..=7).collect::<Vec<_>>());
    // `since` and `limit` inside a row, and paging across rows.
    assert_eq!(
        seqs(store.events_since(a.thread_id(), 2, 2).await.unwrap()),
        vec![3, 4]
    );
    assert_eq!(
        seqs(store.events_since(a.thread_id(), 4, 100).await.unwrap()),
        vec![5, 6, 7]
    );
    assert_eq!(
        seqs(store.events_since(a.thread_id(), 6, 1).await.unwrap()),
        vec![7]
    );
    assert!(store
        .events_since(a.thread_id(), 7, 10)
        .await
        .unwrap()
        .events
        .is_empty());
    close(store, dir).await;
}

#[tokio::test]
async fn a_run_behind_a_stored_message_commits_with_it() {
    let (store, dir) = store().await;
    let sessions = SessionFactory::new(store.clone());
    let a = ctx("alice");
    let gate = crate::session::Gate::new(&a);
    let mut msg = sessions.create_session_from_context(&a);
    msg.stage(StagedWrite::CreateThread)
        .stage(event(0))
        .stage(StagedWrite::Opens(gate.clone()));
    let msg = msg.submit().await.unwrap();
    let mut run = sessions.create_session_from_context(&a);
    run.stage(StagedWrite::Requires(gate.clone()))
        .stage(event(1));
    assert_eq!(run.commit().await.unwrap(), vec![2]);
    assert_eq!(msg.await.unwrap().unwrap(), vec![1]);
    assert!(!gate.failed());
    close(store, dir).await;
}

#[tokio::test]
async fn concurrent_sessions_get_gap_free_seqs_and_a_bad_one_fails_alone() {
    let (store, dir, sessions, a) = store_with_thread("alice").await;
    // Submitted back to back, so the writer takes them as one batch.
    let mut receipts = Vec::new();
    for i in 0..50 {
        let mut s = sessions.create_session_from_context(&a);
        s.stage(event(i)).stage(event(i));
        receipts.push(s.submit().await.unwrap());
    }
    // A session on a thread that does not exist, and one by another user on alice's thread.
    let mut ghost = sessions.create_session_from_context(&ctx("bob"));
    ghost.stage(event(0));
    let ghost = ghost.submit().await.unwrap();
    let intruder = submit_as_intruder(&sessions, &a).await;
    let mut all = Vec::new();
    for r in receipts {
        all.extend(r.await.unwrap().unwrap());
    }
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
    assert!(matches!(
        ghost.await.unwrap(),
        Err(StoreError::ThreadNotFound)
    ));
    assert!(matches!(
        intruder.await.unwrap(),
        Err(StoreError::ThreadNotFound)
    ));
    let page = store.events_since(a.thread_id(), 98, 10).await.unwrap();
    assert_eq!(page.last_seq, 100);
    assert_eq!(
        page.events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![99, 100]
    );
    close(store, dir).await;
}

#[tokio::test]
async fn a_dropped_session_writes_nothing() {
    let (store, dir) = store().await;
    let sessions = SessionFactory::new(store.clone());
    let a = ctx("alice");
    let mut s = sessions.create_session_from_context(&a);
    s.stage(StagedWrite::CreateThread);
    drop(s);
    assert!(store
        .find_thread("alice", a.thread_id())
        .await
        .unwrap()
        .is_none());
    close(store, dir).await;
}

#[tokio::test]
async fn a_lost_connection_is_told_from_a_rejected_row() {
    let (store, dir, _sessions, a) = store_with_thread("alice").await;
    let dup = sqlx::query("INSERT INTO threads (thread_id, user_id, created_at, updated_at) VALUES ($1, 'alice', 0, 0)")
        .bind(a.thread_id())
        .execute(&store.pool)
        .await
        .map_err(StoreError::from)
        .unwrap_err();
    assert_eq!(dup.db_kind(), Some(DbErrorKind::Constraint), "{dup:?}");
    assert!(!dup.is_connection_lost());
    store.pool.close().await;
    let lost = store.ping().await.unwrap_err();
    assert!(lost.is_connection_lost(), "{lost:?}");
    close(store, dir).await;
}

#[tokio::test]
async fn a_bad_database_url_is_refused_without_showing_it() {
    let reg = Registry::new(Limits::default());
    for url in [
        "postgres://tether:hunter2@127.0.0.1:5432/tether?sslmode=hunter2",
        "mysql://tether:hunter2@127.0.0.1/tether",
    ] {
        let mut opts = StoreOptions::sqlite_in(std::path::Path::new("/nonexistent"));
        opts.url = url.into();
        let err = SqlStore::open(opts, Arc::new(LocalBroker::new(reg.clone())))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
