//! The execution context: the single source of a connection's ids.
//!
//! A [`UserExecutionContext`] is built once per WebSocket connection, at accept, by
//! [`UserExecutionContext::from_websocket_request`]. The registry slot, the database
//! sessions, the agent runs, the connection's tracing span and its audit row all read their ids
//! from it; none of them mints or rebuilds an id. Agent runs get a [`child`] context: same
//! user, thread and connection, a new run and request id.
//!
//! Contexts are immutable and cheap to clone (one `Arc`). Construction validates every id, so a
//! context that exists is well formed: no empty ids, no placeholder values, a user id of at
//! most 256 bytes of printable text.
//!
//! [`child`]: UserExecutionContext::child

use std::fmt;
use std::sync::Arc;

use crate::ids;

/// Longest user id accepted (bytes), PROTOCOL.md section 1.
pub(crate) const MAX_USER_ID_BYTES: usize = 256;
/// How deep agent runs may nest (a run starting a sub-run ...).
pub(crate) const MAX_CONTEXT_DEPTH: u8 = 8;

/// Values that are placeholders, not ids. Compared case-insensitively against every id.
const PLACEHOLDERS: &[&str] = &[
    "default",
    "temp",
    "tmp",
    "test",
    "none",
    "null",
    "nil",
    "placeholder",
    "undefined",
    "unknown",
    "anonymous",
    "0",
    "-1",
    "n/a",
    "na",
    "todo",
    "xxx",
    "example",
    "changeme",
];

const LONGEST_PLACEHOLDER: usize = 11;

/// Why a context could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// An id is empty.
    #[error("{field} is empty")]
    Empty {
        /// Which id.
        field: &'static str,
    },
    /// An id is a placeholder (such as `undefined`).
    #[error("{field} is a placeholder value, not an id")]
    Placeholder {
        /// Which id.
        field: &'static str,
    },
    /// The user id is longer than `MAX_USER_ID_BYTES`.
    #[error("user id is longer than {MAX_USER_ID_BYTES} bytes")]
    UserIdTooLong,
    /// The user id has characters that are not printable.
    #[error("user id contains control characters")]
    UserIdNotPrintable,
    /// An id does not parse.
    #[error("{field} is malformed: {source}")]
    Malformed {
        /// Which id.
        field: &'static str,
        /// Why it does not parse.
        source: ids::IdError,
    },
    /// Runs nested deeper than `MAX_CONTEXT_DEPTH`.
    #[error("context nesting is deeper than {MAX_CONTEXT_DEPTH}")]
    TooDeep,
    /// The thread belongs to another user.
    #[error("the thread's ownership was proven for another user")]
    NotOwner,
}

/// Validate a user id: 1 to 256 bytes, no control characters, not a placeholder.
pub(crate) fn validate_user_id(user_id: &str) -> Result<(), ContextError> {
    check_not_placeholder("user_id", user_id)?;
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(ContextError::UserIdTooLong);
    }
    if user_id.chars().any(char::is_control) {
        return Err(ContextError::UserIdNotPrintable);
    }
    Ok(())
}

fn check_not_placeholder(field: &'static str, value: &str) -> Result<(), ContextError> {
    if value.trim().is_empty() {
        return Err(ContextError::Empty { field });
    }
    // Every placeholder is short; real ids are not, so most values skip the list.
    let v = value.trim();
    if v.len() <= LONGEST_PLACEHOLDER && PLACEHOLDERS.iter().any(|p| p.eq_ignore_ascii_case(v)) {
        return Err(ContextError::Placeholder { field });
    }
    Ok(())
}

fn check_id(field: &'static str, value: &str, prefix: &str) -> Result<(), ContextError> {
    check_not_placeholder(field, value)?;
    let parsed = ids::parse(value).map_err(|source| ContextError::Malformed { field, source })?;
    if parsed.prefix != prefix {
        return Err(ContextError::Malformed {
            field,
            source: ids::IdError::UnknownPrefix,
        });
    }
    Ok(())
}

/// A thread the caller has proven the user owns (the store's ownership check returns it).
/// The only way to resume a thread in a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedThread {
    user_id: Arc<str>,
    thread_id: Arc<str>,
}

impl OwnedThread {
    /// Only the store builds these, after it found the thread under this user.
    pub(crate) fn new(user_id: &str, thread_id: &str) -> Self {
        Self {
            user_id: user_id.into(),
            thread_id: thread_id.into(),
        }
    }

    /// The thread's id.
    pub fn thread_id(&self) -> &str {
        &self.thread_id
    }
}

/// Which thread a new connection is on.
#[derive(Debug, Clone)]
pub enum ThreadChoice {
    /// Mint a new thread (and its root run) for this connection.
    New,
    /// Resume a thread the user owns.
    Resume(OwnedThread),
}

struct Inner {
    user_id: Arc<str>,
    thread_id: Arc<str>,
    // Minted per context and not shared: plain strings, no second copy into an Arc.
    run_id: String,
    request_id: String,
    connection_id: Arc<str>,
    /// `{user_id}:{thread_id}`, computed once.
    isolation_key: IsolationKey,
    /// The run this context was derived from (child contexts only).
    parent_run_id: Option<String>,
    depth: u8,
    resumed: bool,
}

/// One connection's (or one run's) identity. Immutable; clone is one `Arc` increment.
#[derive(Clone)]
pub struct UserExecutionContext {
    inner: Arc<Inner>,
}

impl UserExecutionContext {
    /// The one constructor for WebSocket connections. Mints the thread (unless resuming a thread
    /// the user owns), root run and request ids in one call, so they are consistent.
    pub fn from_websocket_request(
        user_id: &str,
        connection_id: &str,
        thread: ThreadChoice,
    ) -> Result<Self, ContextError> {
        validate_user_id(user_id)?;
        check_id("connection_id", connection_id, "conn")?;
        let (thread_id, run_id, request_id, resumed) = match thread {
            ThreadChoice::New => {
                let (t, r, q) = ids::generate_user_context_ids(ids::OP_WEBSOCKET_SESSION);
                (t, r, q, false)
            }
            ThreadChoice::Resume(owned) => {
                if &*owned.user_id != user_id {
                    // An OwnedThread proves ownership for one user only.
                    return Err(ContextError::NotOwner);
                }
                check_id("thread_id", owned.thread_id(), "thread")?;
                let run = ids::root_run_id(owned.thread_id()).ok_or(ContextError::Malformed {
                    field: "thread_id",
                    source: ids::IdError::UnknownPrefix,
                })?;
                let req = ids::request_id(ids::OP_WEBSOCKET_SESSION);
                (owned.thread_id.to_string(), run, req, true)
            }
        };
        let user_id: Arc<str> = user_id.into();
        let thread_id: Arc<str> = thread_id.into();
        Ok(Self {
            inner: Arc::new(Inner {
                isolation_key: IsolationKey::derive(&user_id, &thread_id),
                user_id,
                thread_id,
                run_id,
                request_id,
                connection_id: connection_id.into(),
                parent_run_id: None,
                depth: 0,
                resumed,
            }),
        })
    }

    /// A child context for an agent run: same user, thread and connection; a new run id and
    /// request id (operation `agent_run`). Depth is limited (8 levels).
    pub fn child(&self) -> Result<Self, ContextError> {
        let depth = self.inner.depth + 1;
        if depth > MAX_CONTEXT_DEPTH {
            return Err(ContextError::TooDeep);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                user_id: self.inner.user_id.clone(),
                thread_id: self.inner.thread_id.clone(),
                run_id: ids::run_id(ids::OP_AGENT_RUN),
                request_id: ids::request_id(ids::OP_AGENT_RUN),
                connection_id: self.inner.connection_id.clone(),
                isolation_key: self.inner.isolation_key.clone(),
                parent_run_id: Some(self.inner.run_id.clone()),
                depth,
                resumed: self.inner.resumed,
            }),
        })
    }

    /// The user this context acts for.
    pub fn user_id(&self) -> &str {
        &self.inner.user_id
    }
    /// The thread (conversation) of the connection.
    pub fn thread_id(&self) -> &str {
        &self.inner.thread_id
    }
    /// The run: the connection's root run, or an agent run of a child context.
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }
    /// The request that created this context.
    pub fn request_id(&self) -> &str {
        &self.inner.request_id
    }
    /// The WebSocket connection the context belongs to.
    pub fn connection_id(&self) -> &str {
        &self.inner.connection_id
    }
    /// The run this one was derived from (`None` for a connection's root context).
    pub fn parent_run_id(&self) -> Option<&str> {
        self.inner.parent_run_id.as_deref()
    }
    /// How many `child()` steps from the connection's context (0 for it).
    pub fn depth(&self) -> u8 {
        self.inner.depth
    }
    /// Whether the connection resumed an existing thread.
    pub fn resumed(&self) -> bool {
        self.inner.resumed
    }
    pub(crate) fn user_id_arc(&self) -> &Arc<str> {
        &self.inner.user_id
    }
    pub(crate) fn connection_id_arc(&self) -> &Arc<str> {
        &self.inner.connection_id
    }

    /// The isolation key `{user_id}:{thread_id}`: the same value every time.
    pub fn isolation_key(&self) -> &IsolationKey {
        &self.inner.isolation_key
    }

    /// The tracing span of a connection: every log line inside it carries the context's ids.
    pub fn connection_span(&self) -> tracing::Span {
        tracing::info_span!(
            "conn",
            user_id = %self.user_id(),
            thread_id = %self.thread_id(),
            run_id = %self.run_id(),
            request_id = %self.request_id(),
            connection_id = %self.connection_id(),
        )
    }

    /// The tracing span of an agent run (a child of the connection span when entered inside it).
    pub fn run_span(&self) -> tracing::Span {
        tracing::info_span!(
            "run",
            user_id = %self.user_id(),
            thread_id = %self.thread_id(),
            run_id = %self.run_id(),
            request_id = %self.request_id(),
            connection_id = %self.connection_id(),
        )
    }
}

impl fmt::Debug for UserExecutionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserExecutionContext")
            .field("user_id", &self.user_id())
            .field("thread_id", &self.thread_id())
            .field("run_id", &self.run_id())
            .field("request_id", &self.request_id())
            .field("connection_id", &self.connection_id())
            .field("depth", &self.depth())
            .finish()
    }
}

/// `{user_id}:{thread_id}`: the key of a user's isolated manager for one thread.
///
/// It has no public constructor: the only way to get one is
/// [`UserExecutionContext::isolation_key`], so no code path can build it from anything else.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IsolationKey(Arc<str>);

impl IsolationKey {
    fn derive(user_id: &str, thread_id: &str) -> Self {
        let mut s = String::with_capacity(user_id.len() + 1 + thread_id.len());
        s.push_str(user_id);
        s.push(':');
        s.push_str(thread_id);
        Self(s.into())
    }

    /// The key as text: `{user_id}:{thread_id}`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The thread part (thread ids never contain `:`, user ids may).
    pub fn thread_id(&self) -> &str {
        self.0.rsplit_once(':').map(|(_, t)| t).unwrap_or("")
    }
}

impl fmt::Debug for IsolationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IsolationKey({})", self.0)
    }
}

impl fmt::Display for IsolationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(user: &str) -> UserExecutionContext {
        UserExecutionContext::from_websocket_request(user, &ids::connection_id(), ThreadChoice::New)
            .unwrap()
    }

    /// Fix guide test 1: the ids generated for one context are consistent.
    #[test]
    fn consistent_thread_id_generation() {
        let c1 = ctx("user-123");
        let c2 = ctx("user-123");
        assert_ne!(c1.thread_id(), c2.thread_id());
        assert!(ids::ids_consistent(c1.thread_id(), c1.run_id()));
        assert!(ids::ids_consistent(c2.thread_id(), c2.run_id()));
        assert!(!ids::ids_consistent(c1.thread_id(), c2.run_id()));
    }

    /// Fix guide test 2: the isolation key of a context is the same every time.
    #[test]
    fn isolation_key_consistency() {
        let c = ctx("alice");
        let k1 = c.isolation_key().clone();
        let k2 = c.clone().isolation_key().clone();
        assert_eq!(k1, k2);
        assert_eq!(k1.as_str(), format!("alice:{}", c.thread_id()));
        assert_eq!(k1.thread_id(), c.thread_id());
        // A child (agent run) context keeps the key.
        assert_eq!(c.child().unwrap().isolation_key(), &k1);
    }

    #[test]
    fn longest_placeholder_is_up_to_date() {
        assert_eq!(
            PLACEHOLDERS.iter().map(|p| p.len()).max(),
            Some(LONGEST_PLACEHOLDER)
        );
    }

    #[test]
    fn placeholders_and_bad_user_ids_are_rejected() {
        let conn = ids::connection_id();
        for bad in [
            "",
            "  ",
            "default",
            "TEST",
            "null",
            "undefined",
            "0",
            "placeholder",
        ] {
            assert!(
                UserExecutionContext::from_websocket_request(bad, &conn, ThreadChoice::New)
                    .is_err(),
                "{bad:?} accepted"
            );
        }
        let long = "u".repeat(257);
        assert_eq!(validate_user_id(&long), Err(ContextError::UserIdTooLong));
        assert!(validate_user_id(&"u".repeat(256)).is_ok());
        assert_eq!(
            validate_user_id("a\nb"),
            Err(ContextError::UserIdNotPrintable)
        );
        assert!(validate_user_id("Jürgen 👩‍💻").is_ok());
        for bad_conn in [
            "",
            "temp",
            "conn_x",
            "thread_websocket_session_1_2_0123abcd",
        ] {
            assert!(UserExecutionContext::from_websocket_request(
                "alice",
                bad_conn,
                ThreadChoice::New
            )
            .is_err());
        }
    }

    #[test]
    fn resume_gets_the_threads_root_run_and_a_new_request() {
        let first = ctx("alice");
        let owned = OwnedThread::new("alice", first.thread_id());
        let again = UserExecutionContext::from_websocket_request(
            "alice",
            &ids::connection_id(),
            ThreadChoice::Resume(owned.clone()),
        )
        .unwrap();
        assert_eq!(again.thread_id(), first.thread_id());
        assert_eq!(again.run_id(), first.run_id());
        assert_ne!(again.request_id(), first.request_id());
        assert_ne!(again.connection_id(), first.connection_id());
        assert!(again.resumed());
        // Ownership proven for alice does not let bob in.
        assert!(UserExecutionContext::from_websocket_request(
            "bob",
            &ids::connection_id(),
            ThreadChoice::Resume(owned)
        )
        .is_err());
    }

    #[test]
    fn child_contexts_keep_user_and_thread_and_are_depth_limited() {
        let root = ctx("alice");
        let child = root.child().unwrap();
        assert_eq!(child.user_id(), root.user_id());
        assert_eq!(child.thread_id(), root.thread_id());
        assert_eq!(child.connection_id(), root.connection_id());
        assert_ne!(child.run_id(), root.run_id());
        assert!(child.run_id().starts_with("run_agent_run_"));
        assert!(child.request_id().starts_with("req_agent_run_"));
        assert_eq!(child.parent_run_id(), Some(root.run_id()));
        let mut c = root;
        for _ in 0..MAX_CONTEXT_DEPTH {
            c = c.child().unwrap();
        }
        assert_eq!(c.child().unwrap_err(), ContextError::TooDeep);
    }
}
