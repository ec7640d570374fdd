//! Tether: a WebSocket gateway for multi-user real-time chat with AI agents.
//!
//! One context per connection, isolation keys only from that context, and cleanup owned by
//! guards, so a connection can never leak its registry slot, session or audit row.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | `ids` | the one generator (and parser) of every id the server mints |
//! | `context` | [`UserExecutionContext`], built once per connection; the [`IsolationKey`] |
//! | `registry` | live connections per (user, thread) manager, per-user limits, delivery lookups, the backstop reaper |
//! | `session` | request-scoped database sessions (units of work) created from a context |
//! | `store` | the [`Store`] seam, SQLite and PostgreSQL, the group-commit writer, the audit trail |
//! | `broker` | fan-out of committed frames ([`Broker`]: in-process) |
//! | `agent` | the [`Agent`] seam, the run lifecycle, active runs, the demo agent |
//! | `protocol` | the wire format `tether.v1`: envelopes, error codes, the close-code table |
//! | `auth` | JWT verification and minting, single-use tickets, bearer parsing |
//! | `gateway` | the route table, HTTP API, the WebSocket accept path and the connection task |
//! | `client` | a `tether.v1` client for tests, the load tool and Rust front-ends |
//! | `server` | assembly from [`Config`], serving, graceful shutdown |
//! | `metrics` | every metric, Prometheus text format |
//! | `config` | flags and `TETHER_*` variables in sections, secrets |
//!
//! Modules are private; what the crate offers is re-exported here by name. Three modules are
//! public as a whole, because all of them is contract: [`protocol`] (the wire format), [`ids`]
//! (the id format) and [`client`] (a client of that protocol). The load tool is its own package
//! (`bench/`).
//!
//! The wire protocol is specified in `docs/PROTOCOL.md` (the contract with clients); decisions
//! where it is silent are in `docs/protocol-notes.md`.

#![warn(missing_docs)]
// clippy.toml: every task on the server's TaskTracker (tests and tools are exempt).
#![deny(clippy::disallowed_methods)]

mod agent;
mod auth;
mod broker;
pub mod client;
mod config;
mod context;
mod gateway;
pub mod ids;
mod metrics;
pub mod protocol;
mod registry;
mod server;
mod session;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use agent::{Agent, AgentError, DemoAgent, EventSink, RunInput};
pub use auth::{Auth, AuthError, TICKET_TTL};
pub use broker::{Broker, Delivery, LocalBroker};
pub use config::{
    parse_ttl, AgentConfig, AuthConfig, ClusterConfig, Config, JwtAlg, LimitsConfig, ListenConfig,
    LogFormat, Secret, SqliteSynchronous, StoreConfig,
};
pub use context::{ContextError, IsolationKey, OwnedThread, ThreadChoice, UserExecutionContext};
pub use gateway::{ApiError, AppState, MAX_HEAD_BYTES};
pub use metrics::{metrics, Counter, Gauge, Histogram, Metrics};
pub use registry::{
    ConnHandle, LimitError, Limits, OutFrame, Registry, RegistryGuard, RegistryStats, Scope,
};
pub use server::{shutdown_signal, Server, ServerError};
pub use session::{AckTo, DbSession, Gate, NewEvent, Role, SessionFactory, StagedWrite};
pub use store::{DbErrorKind, EventPage, SqlStore, Store, StoreError, StoreOptions, ThreadSummary};
