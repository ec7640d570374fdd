//! The broker: how committed frames reach the connections that should see them.
//!
//! The store's writer hands every committed thread event to [`Broker::publish`], in `seq`
//! order; admin events go through [`Broker::publish_to_user`]. [`LocalBroker`] delivers on this
//! node through the registry; a cross-node broker (Redis) delivers on every node, each through
//! its own registry.
//!
//! Delivery addresses come from the run's (or connection's) context: the isolation key, and
//! the user and thread it was derived from. A frame is never put on another user's connection
//! (DESIGN-NOTES invariant 6).

use std::sync::Arc;

use async_trait::async_trait;

use crate::context::{IsolationKey, UserExecutionContext};
use crate::protocol::CloseReason;
use crate::registry::{OutFrame, Registry};

/// One committed frame on its way to a manager's connections.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The (user, thread) the frame goes to.
    pub key: IsolationKey,
    /// The committed frame.
    pub frame: OutFrame,
    /// The connection that gets `ack` instead of `frame` (the sender of a user message).
    pub ack: Option<(Arc<str>, OutFrame)>,
}

impl Delivery {
    /// A frame for every connection of the context's (user, thread).
    pub fn thread(
        ctx: &UserExecutionContext,
        frame: OutFrame,
        ack: Option<(Arc<str>, OutFrame)>,
    ) -> Self {
        Self {
            key: ctx.isolation_key().clone(),
            frame,
            ack,
        }
    }
}

/// Fan-out of committed frames.
///
/// Guarantee: frames published one after the other reach each connection in that order;
/// publishing never waits on a connection (a full queue closes that connection with 4009).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Deliver a committed thread frame to its (user, thread) on every node.
    fn publish(&self, delivery: Delivery);

    /// Deliver a frame to all connections of a user (or of one of their threads) on every node.
    /// Returns how many connections took it (on this node, for a cross-node broker).
    async fn publish_to_user(
        &self,
        user_id: &str,
        thread_id: Option<&str>,
        frame: OutFrame,
    ) -> usize;

    /// Close all connections of a user on every node, with `reason`.
    async fn disconnect_user(&self, user_id: &str, reason: CloseReason) -> usize;

    /// Whether the broker answers.
    async fn ping(&self) -> bool;
}

/// In-process delivery through this node's registry.
#[derive(Clone)]
pub struct LocalBroker {
    registry: Registry,
}

impl LocalBroker {
    /// A broker that delivers through this node's `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    fn publish(&self, d: Delivery) {
        let except = d.ack.as_ref().map(|(conn, _)| conn.clone());
        self.registry.deliver(&d.key, &d.frame, except.as_deref());
        if let Some((conn, ack)) = d.ack {
            self.registry.deliver_to(&d.key, &conn, ack);
        }
    }

    async fn publish_to_user(
        &self,
        user_id: &str,
        thread_id: Option<&str>,
        frame: OutFrame,
    ) -> usize {
        self.registry.deliver_to_user(user_id, thread_id, &frame)
    }

    async fn disconnect_user(&self, user_id: &str, reason: CloseReason) -> usize {
        self.registry.close_user(user_id, &reason)
    }

    async fn ping(&self) -> bool {
        true
    }
}
