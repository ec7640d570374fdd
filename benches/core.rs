//! Micro-benchmarks of the core: context creation, registry register+release under contention,
//! per-message gateway overhead, and a user message's group commit on SQLite.
//!
//! `cargo bench --bench core`. Figures and their baselines are in BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use tether::ids;
use tether::protocol::{self, FrameMeta};
use tether::LocalBroker;
use tether::{ConnHandle, Limits, OutFrame, Registry};
use tether::{NewEvent, SessionFactory, StagedWrite};
use tether::{SqlStore, StoreOptions};
use tether::{ThreadChoice, UserExecutionContext};

fn ctx(user: &str) -> UserExecutionContext {
    UserExecutionContext::from_websocket_request(user, &ids::connection_id(), ThreadChoice::New)
        .unwrap()
}

fn ids_and_context(c: &mut Criterion) {
    let mut g = c.benchmark_group("context");
    g.throughput(Throughput::Elements(1));
    g.bench_function("generate_user_context_ids", |b| {
        b.iter(|| black_box(ids::generate_user_context_ids(ids::OP_WEBSOCKET_SESSION)))
    });
    let conn = ids::connection_id();
    g.bench_function("from_websocket_request", |b| {
        b.iter(|| {
            black_box(
                UserExecutionContext::from_websocket_request("alice", &conn, ThreadChoice::New)
                    .unwrap(),
            )
        })
    });
    let root = ctx("alice");
    g.bench_function("child_context", |b| {
        b.iter(|| black_box(root.child().unwrap()))
    });
    g.finish();
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    g.throughput(Throughput::Elements(1));
    let reg = Registry::new(Limits {
        max_connections_per_user: 1 << 20,
        max_managers_per_user: 1 << 20,
    });
    let (handle, _rx, _) = ConnHandle::channel(16);
    // Contexts made up front: only the registry is measured.
    let pools: Vec<Vec<UserExecutionContext>> = (0..2)
        .map(|t| {
            (0..4096)
                .map(|i| ctx(&format!("user-{t}-{}", i % 64)))
                .collect()
        })
        .collect();
    g.bench_function("register_release_single_thread", |b| {
        let pool = &pools[0];
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % pool.len();
            drop(reg.register(&pool[i], handle.clone()).unwrap());
        })
    });
    g.bench_function("register_release_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for pool in &pools {
                    let reg = reg.clone();
                    let handle = handle.clone();
                    s.spawn(move || {
                        for n in 0..iters.div_ceil(2) {
                            let c = &pool[n as usize % pool.len()];
                            drop(reg.register(c, handle.clone()).unwrap());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn per_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("message");
    g.throughput(Throughput::Elements(1));
    let reg = Registry::new(Limits::default());
    let a = ctx("alice");
    let (h1, mut rx1, _) = ConnHandle::channel(1024);
    let (h2, mut rx2, _) = ConnHandle::channel(1024);
    let _g1 = reg.register(&a, h1).unwrap();
    let other_thread = UserExecutionContext::from_websocket_request(
        "alice",
        &ids::connection_id(),
        ThreadChoice::New,
    )
    .unwrap();
    let _g2 = reg.register(&other_thread, h2).unwrap();
    let text = r#"{"type":"user_message","id":"c-17","data":{"content":"hello there, how are you today?"}}"#;
    g.bench_function("parse_client_frame", |b| {
        b.iter(|| black_box(protocol::parse_client_frame(black_box(text)).unwrap()))
    });
    g.bench_function("build_event_frame", |b| {
        let data = json!({"thought": "counting the words of your message"});
        b.iter(|| {
            black_box(protocol::frame(
                "agent_thinking",
                FrameMeta {
                    thread_id: Some(a.thread_id()),
                    run_id: Some(a.run_id()),
                    seq: Some(42),
                    reply_to: Some("c-17"),
                    ts_ms: None,
                },
                &data,
            ))
        })
    });
    // Parse a client frame, build a reply frame, deliver it to the manager's connections.
    g.bench_function("parse_build_deliver", |b| {
        let data = json!({"thought": "hm"});
        b.iter(|| {
            let f = protocol::parse_client_frame(text).unwrap();
            let out = protocol::frame(
                "agent_thinking",
                FrameMeta {
                    thread_id: Some(a.thread_id()),
                    seq: Some(1),
                    reply_to: f.id.as_deref(),
                    ..Default::default()
                },
                &data,
            );
            reg.deliver(a.isolation_key(), &OutFrame::new(1, out), None);
            while rx1.try_recv().is_some() {}
            while rx2.try_recv().is_some() {}
        })
    });
    g.finish();
}

fn store_commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tether-bench-{}", ids::connection_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let reg = Registry::new(Limits::default());
    let store = rt.block_on(async {
        let mut opts = StoreOptions::sqlite_in(&dir);
        opts.sqlite_synchronous = tether::SqliteSynchronous::Normal;
        SqlStore::open(opts, Arc::new(LocalBroker::new(reg.clone())))
            .await
            .unwrap()
    });
    let sessions = SessionFactory::new(store.clone());
    // 50 threads, one per concurrent writer, as 50 chat connections would have.
    let contexts: Vec<UserExecutionContext> = (0..50).map(|i| ctx(&format!("bench-{i}"))).collect();
    rt.block_on(async {
        for c in &contexts {
            let mut s = sessions.create_session_from_context(c);
            s.stage(StagedWrite::CreateThread);
            s.commit().await.unwrap();
        }
    });
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));
    let event = |i: u64| {
        StagedWrite::Event(NewEvent {
            kind: "agent_thinking",
            run_id: None,
            reply_to: None,
            data: json!({"thought": i}),
            ack: None,
            prepared: None,
        })
    };
    g.bench_function("commit_one_event_alone", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = sessions.create_session_from_context(&contexts[0]);
            s.stage(event(1));
            s.commit().await.unwrap()
        })
    });
    g.bench_function("commit_one_event_50_concurrent_writers", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let sessions = sessions.clone();
            let contexts = contexts.clone();
            async move {
                let start = Instant::now();
                let per = iters.div_ceil(50);
                let tasks: Vec<_> = contexts
                    .into_iter()
                    .map(|c| {
                        let sessions = sessions.clone();
                        tokio::spawn(async move {
                            for i in 0..per {
                                let mut s = sessions.create_session_from_context(&c);
                                s.stage(event(i));
                                s.commit().await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            }
        })
    });
    g.finish();
    std::fs::remove_dir_all(dir).ok();
}

criterion_group!(
    benches,
    ids_and_context,
    registry,
    per_message,
    store_commit
);
criterion_main!(benches);
