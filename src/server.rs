//! Assembly and lifecycle: builds the registry, broker, store, agent and routes from a
//! [`Config`], serves them, and shuts down gracefully.
//!
//! Shutdown (SIGTERM/SIGINT, or the future given to [`Server::run`]): the node starts draining
//! (`/readyz` 503, new upgrades 503, every connection closed with 1001), connection tasks and runs
//! get the grace period, runs still going are then cancelled, HTTP stops, the store's writer
//! commits what is queued (including every audit close) and the process exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, DemoAgent};
use crate::auth::{Auth, AuthError};
use crate::broker::{Broker, LocalBroker};
use crate::config::Config;
use crate::gateway::{router, AppState};
use crate::metrics::metrics;
use crate::registry::{Limits, Registry};
use crate::store::{SqlStore, Store, StoreError, StoreOptions};

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The JWT keys could not be loaded.
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    /// The admin token could not be read or created.
    #[error("cannot read or create the admin token: {0}")]
    AdminToken(std::io::Error),
    /// Any other I/O failure while serving.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
}

/// How often the backstop reaper and other housekeeping run.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

impl Server {
    /// Open the store, recover audit rows left open by an earlier process, and bind.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&config.store.data_dir).map_err(|source| ServerError::DataDir {
            path: config.store.data_dir.display().to_string(),
            source,
        })?;
        let auth = Auth::from_config(&config)?;
        let admin_token = config
            .resolve_admin_token()
            .map_err(ServerError::AdminToken)?;
        let registry = Registry::new(Limits::from(&config.limits));
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new(registry.clone()));
        let mut opts = StoreOptions::sqlite_in(&std::fs::canonicalize(&config.store.data_dir)?);
        if let Some(url) = &config.store.database_url {
            opts.url = url.expose().to_string();
        }
        opts.node_id = config.cluster.node_id.clone();
        opts.sqlite_synchronous = config.store.sqlite_synchronous;
        let store: Arc<dyn Store> = SqlStore::open(opts, broker.clone()).await?;
        let recovered = store.recover_open_audit_rows().await?;
        if recovered > 0 {
            metrics().audit_rows_recovered.add(recovered);
            tracing::warn!(
                recovered,
                "closed audit rows left open by an earlier process"
            );
        }
        let agent: Arc<dyn Agent> = Arc::new(DemoAgent {
            delay: config.agent.delay,
        });
        let listener = TcpListener::bind(config.listen.addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen.addr,
                source,
            })?;
        let state = AppState::new(
            config,
            registry,
            store,
            broker,
            agent,
            auth,
            admin_token,
            TaskTracker::new(),
        );
        Ok(Self { listener, state })
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The state the routes share.
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serve until `signal` resolves, then drain and shut down within the grace period.
    pub async fn run(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let st = self.state;
        let http_stop = CancellationToken::new();
        // The node's own tasks, apart from the connections and runs on `st.tracker()`: they
        // stop after those, in the order below.
        let node_tasks = TaskTracker::new();
        let http = node_tasks.spawn(accept_loop(
            self.listener,
            router(st.clone()),
            st.config().listen.header_read_timeout,
            http_stop.clone(),
        ));
        let hk_state = st.clone();
        let housekeeping = node_tasks.spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = hk_state.shutdown_token().cancelled() => break,
                    _ = tick.tick() => hk_state.housekeeping(),
                }
            }
        });
        tracing::info!(addr = %st.config().listen.addr, "tether listening");
        signal.await;
        tracing::info!("draining: closing connections with 1001");
        st.start_drain();
        st.tracker().close();
        let grace = st.config().listen.shutdown_grace;
        if tokio::time::timeout(grace, st.tracker().wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over: cancelling runs still in progress");
            st.cancel_runs();
            if tokio::time::timeout(Duration::from_secs(2), st.tracker().wait())
                .await
                .is_err()
            {
                tracing::warn!("tasks still running after their runs were cancelled");
            }
        }
        http_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(3), http)
            .await
            .is_err()
        {
            tracing::warn!("HTTP connections still open at exit");
        }
        housekeeping.abort();
        st.store().close().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Accept TCP connections and serve HTTP/1.1 on each (WebSocket upgrades included) until
/// `stop`, then let in-flight requests finish. Unlike `axum::serve`, this bounds how long a
/// request head may take and how large it may be, so half-open handshakes cannot pile up.
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let conns = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(crate::gateway::MAX_HEAD_BYTES);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                app.clone().oneshot(req)
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        let stop = stop.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let res = tokio::select! {
                res = conn.as_mut() => res,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close (keep-alive ends).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    conns.close();
    if tokio::time::timeout(Duration::from_secs(2), conns.wait())
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still finishing at exit");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        // A handler that cannot be installed must not read as a signal: wait for the other.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
