//! Tether: a WebSocket gateway for multi-user real-time chat with AI agents.
//!
//! One context per connection, isolation keys only from that context, and cleanup owned by
//! guards, so a connection can never leak its registry slot, session or audit row.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | [`ids`] | the one generator (and parser) of every id the server mints |
//! | [`context`] | [`context::UserExecutionContext`], built once per connection; the [`context::IsolationKey`] |
//! | [`registry`] | live connections per (user, thread) manager, per-user limits, delivery lookups, the backstop reaper |
//! | [`session`] | request-scoped database sessions (units of work) created from a context |
//! | [`store`] | the `Store` trait, SQLite/PostgreSQL, the group-commit writer, the audit trail |
//! | [`broker`] | fan-out of committed frames (`Broker`: in-process) |
//! | [`agent`] | the `Agent` trait, run lifecycle, the demo agent |
//! | [`protocol`] | the wire format `tether.v1`: envelopes, error codes, the close-code table |
//! | [`auth`] | JWT verification and minting, single-use tickets |
//! | [`gateway`] | HTTP routes, the WebSocket accept path and the connection task |
//! | [`client`] | a `tether.v1` client for tests and the load tool |
//! | [`bench`] | the load tool (`tether bench`): chat, idle and churn modes, protocol checks, reports |
//! | [`server`] | assembly from [`config::Config`], serving, graceful shutdown |
//! | [`metrics`] | every metric, Prometheus text format |
//! | [`config`] | flags and `TETHER_*` variables, secrets |
//!
//! The wire protocol is specified in `docs/PROTOCOL.md` (the contract with clients); decisions where it
//! is silent are in `docs/protocol-notes.md`.

pub mod agent;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod client;
pub mod config;
pub mod context;
pub mod gateway;
pub mod ids;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
