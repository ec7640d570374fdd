//! The gateway: the route table, the state every route shares, and the HTTP side of the node.
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` | [`AppState`] and [`router`]: which path goes to which handler |
//! | `error` | [`ApiError`]: every refusal before the upgrade, as a JSON body with a status |
//! | `extract` | the user and admin extractors, JSON and query extractors with JSON rejections |
//! | `api` | the `/api/*` handlers |
//! | `ops` | `/healthz`, `/readyz`, `/metrics`, the two pages, 404/405, the request-head limit |
//! | `ws` | the WebSocket accept path and the connection task |
//!
//! Every request: a head over [`MAX_HEAD_BYTES`] gets 431; every refusal is an [`ApiError`]
//! (JSON body), 405 and 404 included. Authentication of the `/api` and ops routes is an extractor
//! ([`extract::AuthUser`], [`extract::Admin`]), so none of those handlers checks a token by hand
//! (the WebSocket handshake has its own order of credential sources: `ws`); errors are logged
//! once, where they are handled, never in a conversion.

mod api;
mod error;
mod extract;
mod ops;
mod ws;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{ActiveRuns, Agent};
use crate::auth::Auth;
use crate::broker::Broker;
use crate::config::{Config, Secret};
use crate::metrics::{metrics, RunOutcome};
use crate::registry::Registry;
use crate::session::SessionFactory;
use crate::store::Store;

pub use error::ApiError;
pub use ops::MAX_HEAD_BYTES;
use ws::ConnectRate;

/// Everything the routes and connection tasks share; one per node.
///
/// Its fields are private: the gateway's handlers read them directly, the rest of the crate
/// (assembly and shutdown in `server`) and the tests go through the methods, so what
/// can change the state from outside is listed here.
pub struct AppState {
    /// The node's configuration, parsed once at start.
    config: Config,
    /// Live connections per (user, thread), the per-user limits, delivery lookups.
    registry: Registry,
    /// Threads, events, runs and the audit trail.
    store: Arc<dyn Store>,
    /// Opens the units of work of a context (connection or run) on the store.
    sessions: SessionFactory,
    /// Fan-out of committed frames and admin publishes to connections.
    broker: Arc<dyn Broker>,
    /// The agent every run is handed to.
    agent: Arc<dyn Agent>,
    /// JWT verification and minting, single-use tickets.
    auth: Auth,
    /// The admin API's bearer token.
    admin_token: Secret,
    /// Runs in progress on this node, so `cancel_run` can reach them.
    runs: Arc<ActiveRuns>,
    /// Per-IP windows of new connections.
    connect_rate: ConnectRate,
    /// Cancelled when the node starts draining.
    shutdown: CancellationToken,
    /// Cancelled at the end of the grace period: runs still going are cancelled.
    runs_cancel: CancellationToken,
    /// Every connection task and run: shutdown waits for them.
    tracker: TaskTracker,
    /// Set once when the node starts draining.
    draining: AtomicBool,
    /// When the node started (`uptime_s`).
    started: Instant,
}

impl AppState {
    /// The state of a node: `sessions`, the active runs and the rate windows are made here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        registry: Registry,
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        agent: Arc<dyn Agent>,
        auth: Auth,
        admin_token: Secret,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            connect_rate: ConnectRate::new(config.limits.connect_rate_per_ip),
            config,
            registry,
            sessions: SessionFactory::new(store.clone()),
            store,
            broker,
            agent,
            auth,
            admin_token,
            runs: Arc::new(ActiveRuns::default()),
            shutdown: CancellationToken::new(),
            runs_cancel: CancellationToken::new(),
            tracker,
            draining: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The node's registry of live connections.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The node's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The node's JWT keys and tickets (tests mint tokens with it).
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The task tracker every connection and run is spawned on.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Resolves when the node starts draining.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Start draining: `/readyz` turns 503, new upgrades get 503, connections close with 1001.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// End of the grace period: cancel the runs still going.
    pub(crate) fn cancel_runs(&self) {
        self.runs_cancel.cancel();
    }

    /// Periodic housekeeping: the registry backstop, expired tickets, old rate windows.
    pub(crate) fn housekeeping(&self) {
        self.registry.reap();
        self.auth.prune_tickets();
        self.connect_rate.prune();
    }

    /// The figures of `/api/stats`.
    pub async fn stats_json(&self) -> Value {
        let audit_rows_open = self.store.open_audit_rows().await.ok();
        let s = self.registry.stats(10);
        let m = metrics();
        let q = |p: f64| {
            m.run_duration
                .quantile(p)
                .map(|s| (s * 1000.0 * 10.0).round() / 10.0)
        };
        json!({
            "connections": s.connections,
            "managers": s.managers,
            "users": s.users,
            "sessions_open": m.sessions_open.get(),
            "managers_per_user": {"max": s.managers_per_user_max, "avg": s.managers_per_user_avg, "top": s.top},
            "cleanups": {"attempted": m.cleanups_attempted.get(), "completed": m.cleanups_completed.get()},
            "emergency_cleanups": m.emergency_cleanups.get(),
            "thread_mismatches": m.thread_mismatch_total(),
            "limit_rejections": m.limit_rejection_total(),
            "draining": self.is_draining(),
            "runs": {
                "started": m.runs_started.get(),
                "completed": m.runs_finished(RunOutcome::Completed),
                "failed": m.runs_finished(RunOutcome::Failed) + m.runs_finished(RunOutcome::Cancelled),
                "active": m.runs_active.get(),
                "p50_ms": q(0.5),
                "p99_ms": q(0.99),
            },
            "messages": {"in": m.message_in_total(), "out": m.message_out_total()},
            "sessions": {
                "opened": m.sessions_opened.get(),
                "committed": m.sessions_committed.get(),
                "rolled_back": m.sessions_rolled_back.get(),
            },
            "audit_rows_open": audit_rows_open,
            // Live tokio tasks (connections, runs, HTTP connections, housekeeping) and the ones
            // the shutdown waits for: after churn both return to their idle level.
            "tasks": {
                "alive": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
                "tracked": self.tracker.len(),
            },
            "uptime_s": self.started.elapsed().as_secs(),
            "node_id": self.config.cluster.node_id,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// All routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(ops::dashboard))
        .route("/chat", get(ops::chat))
        .route("/ws", get(ws::ws_handler))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/api/tickets", post(api::create_ticket))
        .route("/api/threads", get(api::list_threads))
        .route("/api/threads/{id}/events", get(api::thread_events))
        .route("/api/users/{user_id}/events", post(api::publish_user_event))
        .route(
            "/api/users/{user_id}/connections",
            delete(api::disconnect_user),
        )
        .route("/api/stats", get(api::stats))
        .route("/api/dev/token", post(api::dev_token))
        // After every route: it applies to the routes already added.
        .method_not_allowed_fallback(ops::method_not_allowed)
        .fallback(ops::no_route)
        .layer(axum::middleware::from_fn(ops::limit_head))
        .with_state(state)
}
