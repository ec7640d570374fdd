//! The isolation registry: which connections are live, per user and per thread.
//!
//! A *manager* holds the connections of one user on one thread (several tabs share it); it is
//! keyed by the [`IsolationKey`] of their contexts, which can only come from a context. The
//! registry owns the per-user limits and the delivery lookups (all connections of a (user,
//! thread), all connections of a user).
//!
//! Cleanup is owned: [`Registry::register`] returns a [`RegistryGuard`], and dropping it
//! releases the slot (and the manager, when it was the last one) on every path: close, reset,
//! error, panic in the connection task (unwinding drops it), shutdown. [`Registry::reap`] is a
//! backstop that finds entries whose guard vanished without running its Drop (only possible with
//! `mem::forget` or an aborted process); it counts them as emergency cleanups and is expected to
//! find none.
//!
//! Concurrency: one sharded map keyed by user id. A user's managers and counts live in one
//! entry, so the limit check and the insert are one atomic step under that shard's lock; no lock
//! is ever held across an `.await` (delivery uses `try_send`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::context::{IsolationKey, UserExecutionContext};
use crate::metrics::{metrics, LimitKind, MismatchSource};
use crate::protocol::CloseReason;

/// Whose live connections or managers [`Registry::connection_count`] and
/// [`Registry::manager_count`] count.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The whole node.
    Node,
    /// One user, over all threads.
    User(&'a str),
    /// One (user, thread) manager.
    Manager(&'a IsolationKey),
}

/// Per-user limits (PROTOCOL.md section 7, close code 4008).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections one user may hold, over all threads.
    pub max_connections_per_user: usize,
    /// Most managers (threads with live connections) one user may hold.
    pub max_managers_per_user: usize,
}

impl From<&crate::config::LimitsConfig> for Limits {
    fn from(c: &crate::config::LimitsConfig) -> Self {
        Self {
            max_connections_per_user: c.max_connections_per_user.get(),
            max_managers_per_user: c.max_managers_per_user.get(),
        }
    }
}

impl Default for Limits {
    /// The configuration's defaults (`TETHER_MAX_*_PER_USER`).
    fn default() -> Self {
        Self::from(&crate::config::Config::default().limits)
    }
}

/// A per-user limit was reached; the connection is refused with 4008.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many connections.
    #[error("too many connections for user ({current}/{max})")]
    Connections {
        /// The user's connections now.
        current: usize,
        /// The limit.
        max: usize,
    },
    /// Too many managers.
    #[error("too many managers for user ({current}/{max})")]
    Managers {
        /// The user's managers now.
        current: usize,
        /// The limit.
        max: usize,
    },
}

/// One frame on its way to a connection. `seq` is the thread event's (0 for frames without one),
/// so a resuming connection can drop live frames its replay already sent.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// The thread event's `seq` (0 for frames without one).
    pub seq: u64,
    /// The frame's JSON text.
    pub text: Utf8Bytes,
    /// Droppable frames (text deltas) are skipped, not fatal, when the queue is full.
    pub droppable: bool,
}

impl OutFrame {
    /// A frame that is not droppable.
    pub fn new(seq: u64, text: impl Into<Utf8Bytes>) -> Self {
        Self {
            seq,
            text: text.into(),
            droppable: false,
        }
    }
}

/// State shared between a connection task and everyone who delivers to it: the bounded
/// outbound queue and the close signal, under one small lock that is never held across an
/// `.await`.
///
/// The queue is a `VecDeque` that allocates only while frames wait and gives its memory back
/// once drained, so an idle connection's queue costs nothing (a channel would keep a block of
/// slots per connection).
#[derive(Debug)]
pub struct ConnShared {
    state: Mutex<SharedState>,
    capacity: usize,
    /// Frames are waiting.
    ready: Notify,
    /// A close was requested.
    notify: Notify,
}

#[derive(Debug, Default)]
struct SharedState {
    queue: VecDeque<OutFrame>,
    /// The close asked for (slow consumer, admin disconnect); the first request wins.
    close: Option<CloseReason>,
    /// The connection task is gone (its [`OutQueue`] was dropped).
    receiver_gone: bool,
}

impl ConnShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask the connection to close; the first request wins.
    pub fn request_close(&self, reason: CloseReason) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.close = Some(reason);
            drop(st);
            self.notify.notify_one();
        }
    }

    pub fn close_requested(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Resolves once a close was requested.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.notify.notified();
            if let Some(c) = self.close_requested() {
                return c;
            }
            notified.await;
        }
    }

    fn receiver_gone(&self) -> bool {
        self.lock().receiver_gone
    }
}

/// The receiving end of a connection's outbound queue, owned by the connection task. Dropping
/// it marks the connection gone: later deliveries are refused and the queue is freed.
#[derive(Debug)]
pub struct OutQueue {
    shared: Arc<ConnShared>,
}

impl OutQueue {
    /// The next frame, waiting until one is queued.
    pub async fn recv(&mut self) -> OutFrame {
        loop {
            {
                let mut st = self.shared.lock();
                if let Some(f) = st.queue.pop_front() {
                    if st.queue.is_empty() && st.queue.capacity() > 8 {
                        // A burst is over: give the memory back.
                        st.queue = VecDeque::new();
                    }
                    return f;
                }
            }
            // `notify_one` stores a permit when no one waits, so a frame queued between the
            // check above and this await is not missed.
            self.shared.ready.notified().await;
        }
    }

    /// A frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<OutFrame> {
        let mut st = self.shared.lock();
        let f = st.queue.pop_front();
        if st.queue.is_empty() && st.queue.capacity() > 8 {
            st.queue = VecDeque::new();
        }
        f
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receiver_gone = true;
        st.queue = VecDeque::new();
    }
}

/// The sending side of a connection: its bounded outbound queue and its close signal.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    shared: Arc<ConnShared>,
}

impl ConnHandle {
    /// A handle and the receiving end the connection task reads from; the queue holds at most
    /// `capacity` frames.
    pub fn channel(capacity: usize) -> (Self, OutQueue, Arc<ConnShared>) {
        let shared = Arc::new(ConnShared {
            state: Mutex::new(SharedState::default()),
            capacity: capacity.max(1),
            ready: Notify::new(),
            notify: Notify::new(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            OutQueue {
                shared: shared.clone(),
            },
            shared,
        )
    }

    /// Queue a frame without waiting. A full queue closes the connection with 4009 (unless the
    /// frame is droppable), so one slow client never slows delivery to others.
    pub fn deliver(&self, frame: OutFrame) -> bool {
        let mut st = self.shared.lock();
        if st.receiver_gone {
            return false;
        }
        if st.queue.len() >= self.shared.capacity {
            metrics().outbound_drops.inc();
            if !frame.droppable && st.close.is_none() {
                metrics().slow_consumer_closes.inc();
                st.close = Some(CloseReason::SlowConsumer);
                drop(st);
                self.shared.notify.notify_one();
            }
            return false;
        }
        st.queue.push_back(frame);
        drop(st);
        self.shared.ready.notify_one();
        true
    }

    /// Ask the connection to close with `reason`; the first request wins.
    pub fn request_close(&self, reason: CloseReason) {
        self.shared.request_close(reason);
    }
}

struct ConnEntry {
    connection_id: Arc<str>,
    handle: ConnHandle,
    /// Dead once the guard is gone; an entry whose guard is gone is a leak the reaper removes.
    alive: Weak<()>,
    /// Seen orphaned by the previous sweep (the reaper removes an entry on its second sighting,
    /// so a connection that is in the middle of its own cleanup is never counted).
    suspect: bool,
}

impl ConnEntry {
    /// The guard is gone, or the connection task is (its queue's receiver was dropped).
    fn orphaned(&self) -> bool {
        self.alive.strong_count() == 0 || self.handle.shared.receiver_gone()
    }
}

struct Manager {
    key: IsolationKey,
    conns: Vec<ConnEntry>,
}

#[derive(Default)]
struct UserSlot {
    managers: Vec<Manager>,
    connections: usize,
}

struct Inner {
    users: DashMap<Arc<str>, UserSlot>,
    limits: Limits,
    connections: AtomicU64,
    managers: AtomicU64,
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// Owns one connection's slot. Dropping it releases the slot, and the manager with its last
/// connection.
#[must_use = "dropping the guard releases the registry slot"]
pub struct RegistryGuard {
    inner: Arc<Inner>,
    user_id: Arc<str>,
    key: IsolationKey,
    connection_id: Arc<str>,
    _alive: Arc<()>,
}

impl std::fmt::Debug for RegistryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryGuard")
            .field("key", &self.key)
            .field("connection_id", &self.connection_id)
            .finish()
    }
}

impl Drop for RegistryGuard {
    fn drop(&mut self) {
        let removed = self
            .inner
            .release(&self.user_id, &self.key, &self.connection_id);
        // Runs inside the connection's span, so this line carries the same ids as its creation.
        if removed {
            tracing::info!(isolation_key = %self.key, "registry slot released");
        } else {
            tracing::warn!(isolation_key = %self.key, "cleanup found no registry entry for its key");
        }
    }
}

/// Live figures for `/api/stats` and `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RegistryStats {
    /// Live connections.
    pub connections: u64,
    /// Live managers.
    pub managers: u64,
    /// Users with at least one manager.
    pub users: u64,
    /// The most managers one user holds.
    pub managers_per_user_max: u64,
    /// Average managers per user with managers.
    pub managers_per_user_avg: f64,
    /// The users with the most managers.
    pub top: Vec<UserFigures>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UserFigures {
    pub user_id: String,
    pub managers: usize,
    pub connections: usize,
}

impl Registry {
    /// An empty registry with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                users: DashMap::new(),
                limits,
                connections: AtomicU64::new(0),
                managers: AtomicU64::new(0),
            }),
        }
    }

    /// The per-user limits.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Register a connection under its context's isolation key. Connections are checked before
    /// managers; at a limit nothing is inserted.
    pub fn register(
        &self,
        ctx: &UserExecutionContext,
        handle: ConnHandle,
    ) -> Result<RegistryGuard, LimitError> {
        let limits = self.inner.limits;
        let key = ctx.isolation_key();
        let alive = Arc::new(());
        let mut slot = self
            .inner
            .users
            .entry(ctx.user_id_arc().clone())
            .or_default();
        if slot.connections >= limits.max_connections_per_user {
            metrics().limit_rejection(LimitKind::Connections);
            let err = LimitError::Connections {
                current: slot.connections,
                max: limits.max_connections_per_user,
            };
            drop(slot);
            self.remove_user_if_empty(ctx.user_id());
            return Err(err);
        }
        let entry = ConnEntry {
            connection_id: ctx.connection_id_arc().clone(),
            handle,
            alive: Arc::downgrade(&alive),
            suspect: false,
        };
        match slot.managers.iter_mut().find(|m| &m.key == key) {
            Some(m) => m.conns.push(entry),
            None => {
                if slot.managers.len() >= limits.max_managers_per_user {
                    metrics().limit_rejection(LimitKind::Managers);
                    let err = LimitError::Managers {
                        current: slot.managers.len(),
                        max: limits.max_managers_per_user,
                    };
                    drop(slot);
                    self.remove_user_if_empty(ctx.user_id());
                    return Err(err);
                }
                slot.managers.push(Manager {
                    key: key.clone(),
                    conns: vec![entry],
                });
                self.inner.managers.fetch_add(1, Relaxed);
            }
        }
        slot.connections += 1;
        drop(slot);
        self.inner.connections.fetch_add(1, Relaxed);
        metrics().connections_opened.inc();
        Ok(RegistryGuard {
            inner: self.inner.clone(),
            user_id: ctx.user_id_arc().clone(),
            key: key.clone(),
            connection_id: ctx.connection_id_arc().clone(),
            _alive: alive,
        })
    }

    fn remove_user_if_empty(&self, user_id: &str) {
        self.inner
            .users
            .remove_if(user_id, |_, slot| slot.managers.is_empty());
    }

    /// Deliver a frame to every connection of the key's manager, except `except` (the sender of
    /// a message, who gets the `ack` instead). Returns how many queues took it.
    pub fn deliver(&self, key: &IsolationKey, frame: &OutFrame, except: Option<&str>) -> usize {
        let user_id = key_user(key);
        let Some(slot) = self.inner.users.get(user_id) else {
            return 0;
        };
        let Some(m) = slot.managers.iter().find(|m| &m.key == key) else {
            return 0;
        };
        m.conns
            .iter()
            .filter(|c| except != Some(&*c.connection_id))
            .filter(|c| c.handle.deliver(frame.clone()))
            .count()
    }

    /// Deliver a frame to one connection of the key's manager.
    pub fn deliver_to(&self, key: &IsolationKey, connection_id: &str, frame: OutFrame) -> bool {
        let Some(slot) = self.inner.users.get(key_user(key)) else {
            return false;
        };
        slot.managers
            .iter()
            .filter(|m| &m.key == key)
            .flat_map(|m| m.conns.iter())
            .find(|c| &*c.connection_id == connection_id)
            .is_some_and(|c| c.handle.deliver(frame))
    }

    /// Deliver a frame to all connections of a user, or of one of their threads.
    pub fn deliver_to_user(
        &self,
        user_id: &str,
        thread_id: Option<&str>,
        frame: &OutFrame,
    ) -> usize {
        let Some(slot) = self.inner.users.get(user_id) else {
            return 0;
        };
        slot.managers
            .iter()
            .filter(|m| thread_id.is_none_or(|t| m.key.thread_id() == t))
            .flat_map(|m| m.conns.iter())
            .filter(|c| c.handle.deliver(frame.clone()))
            .count()
    }

    /// Ask every connection of a user to close. Returns how many were asked.
    pub fn close_user(&self, user_id: &str, reason: &CloseReason) -> usize {
        let Some(slot) = self.inner.users.get(user_id) else {
            return 0;
        };
        let conns = slot.managers.iter().flat_map(|m| m.conns.iter());
        conns
            .map(|c| c.handle.request_close(reason.clone()))
            .count()
    }

    /// Live connections in `scope`.
    pub fn connection_count(&self, scope: Scope<'_>) -> usize {
        match scope {
            Scope::Node => self.inner.connections.load(Relaxed) as usize,
            Scope::User(user_id) => self.inner.users.get(user_id).map_or(0, |s| s.connections),
            Scope::Manager(key) => self.inner.users.get(key_user(key)).map_or(0, |s| {
                s.managers
                    .iter()
                    .find(|m| &m.key == key)
                    .map_or(0, |m| m.conns.len())
            }),
        }
    }

    /// Live managers (threads with live connections) in `scope` (0 or 1 for one manager).
    pub fn manager_count(&self, scope: Scope<'_>) -> usize {
        match scope {
            Scope::Node => self.inner.managers.load(Relaxed) as usize,
            Scope::User(user_id) => self
                .inner
                .users
                .get(user_id)
                .map_or(0, |s| s.managers.len()),
            Scope::Manager(key) => usize::from(self.connection_count(Scope::Manager(key)) > 0),
        }
    }

    /// Live figures; `top` lists the users with the most managers.
    pub fn stats(&self, top: usize) -> RegistryStats {
        let mut users = 0u64;
        let mut max = 0u64;
        let mut managers = 0u64;
        let mut all: Vec<UserFigures> = Vec::new();
        for slot in self.inner.users.iter() {
            if slot.managers.is_empty() {
                continue;
            }
            users += 1;
            managers += slot.managers.len() as u64;
            max = max.max(slot.managers.len() as u64);
            if top > 0 {
                all.push(UserFigures {
                    user_id: slot.key().to_string(),
                    managers: slot.managers.len(),
                    connections: slot.connections,
                });
                if all.len() > top * 4 {
                    sort_top(&mut all);
                    all.truncate(top);
                }
            }
        }
        sort_top(&mut all);
        all.truncate(top);
        RegistryStats {
            connections: self.connection_count(Scope::Node) as u64,
            managers: self.manager_count(Scope::Node) as u64,
            users,
            managers_per_user_max: max,
            managers_per_user_avg: if users == 0 {
                0.0
            } else {
                managers as f64 / users as f64
            },
            top: all,
        }
    }

    /// The backstop: remove entries whose owner is gone (guard leaked, or connection task gone)
    /// on two consecutive sweeps. Counts each as an emergency cleanup. Expected to return 0.
    pub fn reap(&self) -> usize {
        let mut reaped = 0;
        let mut mgrs_removed = 0;
        self.inner.users.retain(|_, slot| {
            for m in slot.managers.iter_mut() {
                let before = m.conns.len();
                m.conns.retain_mut(|c| {
                    let orphaned = c.orphaned();
                    let reap = orphaned && c.suspect;
                    c.suspect = orphaned;
                    !reap
                });
                reaped += before - m.conns.len();
                slot.connections -= before - m.conns.len();
            }
            let before = slot.managers.len();
            slot.managers.retain(|m| !m.conns.is_empty());
            mgrs_removed += before - slot.managers.len();
            !slot.managers.is_empty()
        });
        if reaped > 0 {
            self.inner.connections.fetch_sub(reaped as u64, Relaxed);
            self.inner.managers.fetch_sub(mgrs_removed as u64, Relaxed);
            metrics().emergency_cleanups.add(reaped as u64);
            tracing::error!(reaped, "backstop reaper removed leaked registry entries");
        }
        reaped
    }
}

fn sort_top(v: &mut [UserFigures]) {
    v.sort_by(|a, b| {
        b.managers
            .cmp(&a.managers)
            .then(b.connections.cmp(&a.connections))
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
}

/// The user part of a key (user ids may contain `:`, thread ids never do).
fn key_user(key: &IsolationKey) -> &str {
    key.as_str().rsplit_once(':').map_or("", |(u, _)| u)
}

impl Inner {
    /// Release one connection's slot. Every call is a cleanup attempt; it completes when the
    /// slot was found under the key it was stored under.
    fn release(&self, user_id: &str, key: &IsolationKey, connection_id: &str) -> bool {
        metrics().cleanups_attempted.inc();
        let mut found = false;
        let mut manager_gone = false;
        let mut user_gone = false;
        if let Some(mut slot) = self.users.get_mut(user_id) {
            if let Some(mi) = slot.managers.iter().position(|m| &m.key == key) {
                let m = &mut slot.managers[mi];
                if let Some(ci) = m
                    .conns
                    .iter()
                    .position(|c| &*c.connection_id == connection_id)
                {
                    m.conns.swap_remove(ci);
                    found = true;
                    if m.conns.is_empty() {
                        slot.managers.swap_remove(mi);
                        manager_gone = true;
                    }
                    slot.connections -= 1;
                }
            }
            user_gone = slot.managers.is_empty();
        }
        if user_gone {
            self.users.remove_if(user_id, |_, s| s.managers.is_empty());
        }
        if found {
            self.connections.fetch_sub(1, Relaxed);
            if manager_gone {
                self.managers.fetch_sub(1, Relaxed);
            }
            metrics().cleanups_completed.inc();
        } else {
            metrics().thread_mismatch(MismatchSource::Cleanup);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ThreadChoice;
    use crate::ids;

    fn ctx(user: &str) -> UserExecutionContext {
        UserExecutionContext::from_websocket_request(user, &ids::connection_id(), ThreadChoice::New)
            .unwrap()
    }

    fn tab_of(c: &UserExecutionContext) -> UserExecutionContext {
        let owned = crate::context::OwnedThread::new(c.user_id(), c.thread_id());
        UserExecutionContext::from_websocket_request(
            c.user_id(),
            &ids::connection_id(),
            ThreadChoice::Resume(owned),
        )
        .unwrap()
    }

    fn handle() -> (ConnHandle, OutQueue) {
        let (h, rx, _) = ConnHandle::channel(4);
        (h, rx)
    }

    /// Fix guide test 3: a manager created from a context counts 1 for its user, and 0 after
    /// cleanup by the same context.
    #[test]
    fn manager_creation_and_cleanup_with_one_context() {
        let reg = Registry::new(Limits::default());
        let c = ctx("integration-user");
        let guard = reg.register(&c, handle().0).unwrap();
        assert_eq!(reg.manager_count(Scope::User("integration-user")), 1);
        assert_eq!(reg.connection_count(Scope::User("integration-user")), 1);
        drop(guard);
        assert_eq!(reg.manager_count(Scope::User("integration-user")), 0);
        assert_eq!(reg.stats(10).users, 0);
    }

    #[test]
    fn tabs_share_a_manager_and_the_last_one_removes_it() {
        let reg = Registry::new(Limits::default());
        let a = ctx("alice");
        let g1 = reg.register(&a, handle().0).unwrap();
        let g2 = reg.register(&tab_of(&a), handle().0).unwrap();
        assert_eq!(reg.manager_count(Scope::User("alice")), 1);
        assert_eq!(reg.connection_count(Scope::Manager(a.isolation_key())), 2);
        drop(g1);
        assert_eq!(reg.manager_count(Scope::User("alice")), 1);
        drop(g2);
        assert_eq!(reg.manager_count(Scope::User("alice")), 0);
        assert_eq!(reg.connection_count(Scope::Node), 0);
        assert_eq!(reg.manager_count(Scope::Node), 0);
    }

    #[test]
    fn limits_refuse_new_connections_and_leave_existing_ones() {
        let reg = Registry::new(Limits {
            max_connections_per_user: 3,
            max_managers_per_user: 2,
        });
        let a = ctx("alice");
        let _g1 = reg.register(&a, handle().0).unwrap();
        let _g2 = reg.register(&ctx("alice"), handle().0).unwrap();
        let err = reg.register(&ctx("alice"), handle().0).unwrap_err();
        assert_eq!(err, LimitError::Managers { current: 2, max: 2 });
        assert_eq!(err.to_string(), "too many managers for user (2/2)");
        // A tab on an existing thread needs no new manager.
        let _g3 = reg.register(&tab_of(&a), handle().0).unwrap();
        let err = reg.register(&tab_of(&a), handle().0).unwrap_err();
        assert_eq!(err.to_string(), "too many connections for user (3/3)");
        assert_eq!(reg.connection_count(Scope::User("alice")), 3);
        // Other users are not affected.
        let _b = reg.register(&ctx("bob"), handle().0).unwrap();
    }

    #[test]
    fn delivery_reaches_the_users_thread_and_no_one_else() {
        let reg = Registry::new(Limits::default());
        let a = ctx("alice");
        let a2 = tab_of(&a);
        let other_thread = ctx("alice");
        let b = ctx("bob");
        let (h1, mut r1) = handle();
        let (h2, mut r2) = handle();
        let (h3, mut r3) = handle();
        let (h4, mut r4) = handle();
        let _g = [
            reg.register(&a, h1).unwrap(),
            reg.register(&a2, h2).unwrap(),
            reg.register(&other_thread, h3).unwrap(),
            reg.register(&b, h4).unwrap(),
        ];
        let n = reg.deliver(
            a.isolation_key(),
            &OutFrame::new(1, "x"),
            Some(a.connection_id()),
        );
        assert_eq!(n, 1);
        assert!(r1.try_recv().is_none());
        assert_eq!(r2.try_recv().unwrap().seq, 1);
        assert!(r3.try_recv().is_none());
        assert!(r4.try_recv().is_none());
        assert_eq!(
            reg.deliver_to_user("alice", None, &OutFrame::new(0, "y")),
            3
        );
        assert_eq!(
            reg.deliver_to_user(
                "alice",
                Some(other_thread.thread_id()),
                &OutFrame::new(0, "z")
            ),
            1
        );
        assert!(r4.try_recv().is_none());
    }

    #[test]
    fn a_full_queue_asks_for_a_4009_close() {
        let reg = Registry::new(Limits::default());
        let a = ctx("alice");
        let (h, _rx, shared) = ConnHandle::channel(1);
        let _g = reg.register(&a, h).unwrap();
        assert_eq!(
            reg.deliver(a.isolation_key(), &OutFrame::new(1, "a"), None),
            1
        );
        assert_eq!(
            reg.deliver(a.isolation_key(), &OutFrame::new(2, "b"), None),
            0
        );
        assert_eq!(shared.close_requested(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_panicking_connection_task_still_releases_its_slot() {
        let reg = Registry::new(Limits::default());
        let a = ctx("alice");
        let reg2 = reg.clone();
        let res = std::thread::spawn(move || {
            let _guard = reg2.register(&a, handle().0).unwrap();
            panic!("connection task panicked");
        })
        .join();
        assert!(res.is_err());
        assert_eq!(reg.manager_count(Scope::User("alice")), 0);
        assert_eq!(reg.connection_count(Scope::Node), 0);
    }

    #[test]
    fn the_reaper_finds_nothing_normally_and_a_forgotten_guard_otherwise() {
        let reg = Registry::new(Limits::default());
        let (h, rx) = handle();
        let g = reg.register(&ctx("alice"), h).unwrap();
        assert_eq!(reg.reap(), 0);
        assert_eq!(reg.reap(), 0);
        // The connection task vanishes without running the guard's Drop.
        #[expect(
            clippy::mem_forget,
            clippy::disallowed_methods,
            reason = "a guard whose Drop never ran is what the backstop reaper is for"
        )]
        std::mem::forget(g);
        drop(rx);
        assert_eq!(reg.reap(), 0, "first sighting only marks");
        assert_eq!(reg.reap(), 1);
        assert_eq!(reg.manager_count(Scope::User("alice")), 0);
        assert_eq!(reg.connection_count(Scope::Node), 0);
    }

    #[test]
    fn register_and_release_stay_consistent_under_contention() {
        let reg = Registry::new(Limits {
            max_connections_per_user: 1000,
            max_managers_per_user: 1000,
        });
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let c = ctx(&format!("user-{}", i % 7 + t));
                        let g = reg.register(&c, handle().0).unwrap();
                        drop(g);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(reg.connection_count(Scope::Node), 0);
        assert_eq!(reg.manager_count(Scope::Node), 0);
        assert_eq!(reg.stats(5).users, 0);
    }
}
