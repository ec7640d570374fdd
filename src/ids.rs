//! Identifiers: the one generator for every id the server mints.
//!
//! Formats (PROTOCOL.md section 4):
//!
//! | id | format |
//! |---|---|
//! | thread | `thread_{operation}_{unix_ms}_{counter}_{hex8}` |
//! | run | `run_{operation}_{unix_ms}_{counter}_{hex8}` (a thread's root run shares its root) |
//! | request | `req_{operation}_{unix_ms}_{counter}_{hex8}` (always a fresh root) |
//! | connection | `conn_{unix_ms}_{counter}_{hex8}` |
//! | message | `msg_{unix_ms}_{counter}_{hex8}` |
//! | tool call | `call_{unix_ms}_{counter}_{hex8}` |
//!
//! The counter is one process-wide atomic, so two ids minted in the same millisecond still
//! differ; the hex part is 32 bits from a cryptographically secure generator (`rand`'s
//! thread-local ChaCha), so ids minted by two processes (nodes) in the same millisecond with
//! the same counter still differ with overwhelming probability, and ids cannot be guessed.
//!
//! This module owns formatting and parsing only. Which id a connection gets is decided in
//! the `context` module, the only place that calls [`generate_user_context_ids`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// The operation name of WebSocket connection contexts.
pub const OP_WEBSOCKET_SESSION: &str = "websocket_session";
/// The operation name of agent run (child) contexts.
pub const OP_AGENT_RUN: &str = "agent_run";

/// Longest id the server accepts from outside (query strings, frames). Server-minted ids are
/// far shorter; the limit only bounds hostile input.
pub const MAX_ID_BYTES: usize = 256;

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Decimal digits of `n`, without the formatting machinery (ids are minted per connection and
/// per run; this keeps context creation well under a microsecond).
fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
}

fn push_hex8(out: &mut String, v: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..8).rev() {
        out.push(char::from(HEX[((v >> (shift * 4)) & 0xf) as usize]));
    }
}

/// `{unix_ms}_{counter}_{hex8}`: the unique tail every id ends with.
fn push_tail_with(out: &mut String, ms: u64, hex: u32) {
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    push_u64(out, ms);
    out.push('_');
    push_u64(out, counter);
    out.push('_');
    push_hex8(out, hex);
}

fn push_tail(out: &mut String) {
    push_tail_with(out, unix_ms(), rand::rng().random());
}

fn mint(prefix: &str, operation: Option<&str>) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(prefix);
    s.push('_');
    if let Some(op) = operation {
        s.push_str(op);
        s.push('_');
    }
    push_tail(&mut s);
    s
}

/// Mint the ids of a new user context: `(thread_id, run_id, request_id)`.
///
/// The thread and its root run share one `{operation}_{unix_ms}_{counter}_{hex8}` root, so
/// [`ids_consistent`] holds for them; the request id gets a fresh root.
pub fn generate_user_context_ids(operation: &str) -> (String, String, String) {
    // One clock read and one draw of randomness serve all three ids.
    let ms = unix_ms();
    let random: u64 = rand::rng().random();
    let mut thread_id = String::with_capacity(operation.len() + 48);
    thread_id.push_str("thread_");
    thread_id.push_str(operation);
    thread_id.push('_');
    push_tail_with(&mut thread_id, ms, random as u32);
    let root = &thread_id["thread_".len()..];
    let mut run_id = String::with_capacity(root.len() + 4);
    run_id.push_str("run_");
    run_id.push_str(root);
    let mut request_id = String::with_capacity(operation.len() + 44);
    request_id.push_str("req_");
    request_id.push_str(operation);
    request_id.push('_');
    push_tail_with(&mut request_id, ms, (random >> 32) as u32);
    (thread_id, run_id, request_id)
}

/// The root run id of a thread: `run_` + the thread's root. Every connection that resumes a
/// thread gets this same run id.
pub fn root_run_id(thread_id: &str) -> Option<String> {
    thread_id
        .strip_prefix("thread_")
        .map(|root| format!("run_{root}"))
}

/// A fresh run id for `operation` (child contexts).
pub fn run_id(operation: &str) -> String {
    mint("run", Some(operation))
}

/// A fresh request id for `operation`.
pub fn request_id(operation: &str) -> String {
    mint("req", Some(operation))
}

/// A fresh connection id.
pub fn connection_id() -> String {
    mint("conn", None)
}

/// A fresh message id (user messages and agent replies).
pub fn message_id() -> String {
    mint("msg", None)
}

/// A fresh tool call id.
pub fn tool_call_id() -> String {
    mint("call", None)
}

/// The parts of a server-minted id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedId<'a> {
    /// `thread`, `run`, `req`, `conn`, `msg` or `call`.
    pub prefix: &'a str,
    /// The operation (`websocket_session`, `agent_run`, ...); empty for ids without one.
    pub operation: &'a str,
    /// Unix time in ms when the id was minted.
    pub unix_ms: u64,
    /// The process-wide counter at minting.
    pub counter: u64,
    /// The random part, in hex.
    pub hex: &'a str,
    /// `{operation}_{unix_ms}_{counter}_{hex8}` (or without the operation).
    pub root: &'a str,
}

/// Why a string is not a well-formed id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("id is empty")]
    Empty,
    /// The id is longer than `MAX_ID_BYTES`.
    #[error("id is longer than {MAX_ID_BYTES} bytes")]
    TooLong,
    /// The prefix is not one this server mints.
    #[error("id has an unknown prefix")]
    UnknownPrefix,
    /// The id does not have the `{prefix}_{ms}_{counter}_{hex}` shape.
    #[error("id is not of the form prefix_[operation_]unixms_counter_hex8")]
    Malformed,
}

const PREFIXES_WITH_OP: [&str; 3] = ["thread", "run", "req"];
const PREFIXES_WITHOUT_OP: [&str; 3] = ["conn", "msg", "call"];

/// Parse a server-minted id. Operations may contain underscores (`websocket_session`), so the
/// three numeric parts are taken from the right.
pub fn parse(id: &str) -> Result<ParsedId<'_>, IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong);
    }
    let (prefix, rest) = id.split_once('_').ok_or(IdError::Malformed)?;
    let with_op = if PREFIXES_WITH_OP.contains(&prefix) {
        true
    } else if PREFIXES_WITHOUT_OP.contains(&prefix) {
        false
    } else {
        return Err(IdError::UnknownPrefix);
    };
    let mut parts = rest.rsplitn(4, '_');
    let hex = parts.next().ok_or(IdError::Malformed)?;
    let counter = parts.next().ok_or(IdError::Malformed)?;
    let ms = parts.next().ok_or(IdError::Malformed)?;
    let operation = parts.next().unwrap_or("");
    if hex.len() != 8
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(IdError::Malformed);
    }
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(counter) || !all_digits(ms) {
        return Err(IdError::Malformed);
    }
    let op_ok = operation
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if with_op == operation.is_empty() || !op_ok {
        return Err(IdError::Malformed);
    }
    Ok(ParsedId {
        prefix,
        operation,
        unix_ms: ms.parse().map_err(|_| IdError::Malformed)?,
        counter: counter.parse().map_err(|_| IdError::Malformed)?,
        hex,
        root: rest,
    })
}

/// Whether `thread_id` and `run_id` belong to one context: both well formed and sharing one
/// `{operation}_{unix_ms}_{counter}_{hex8}` root. Holds for a connection's root run, not for
/// child (agent run) contexts, which get fresh roots.
pub fn ids_consistent(thread_id: &str, run_id: &str) -> bool {
    match (parse(thread_id), parse(run_id)) {
        (Ok(t), Ok(r)) => t.prefix == "thread" && r.prefix == "run" && t.root == r.root,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn context_ids_share_one_root_and_parse() {
        let (t, r, q) = generate_user_context_ids(OP_WEBSOCKET_SESSION);
        assert!(t.starts_with("thread_websocket_session_"), "{t}");
        assert!(r.starts_with("run_websocket_session_"), "{r}");
        assert!(q.starts_with("req_websocket_session_"), "{q}");
        assert!(ids_consistent(&t, &r));
        assert_eq!(root_run_id(&t).as_deref(), Some(r.as_str()));
        let p = parse(&t).unwrap();
        assert_eq!(p.operation, OP_WEBSOCKET_SESSION);
        assert_eq!(p.hex.len(), 8);
        // The request id has its own root.
        assert_ne!(parse(&q).unwrap().counter, p.counter);
    }

    #[test]
    fn ids_of_different_contexts_are_not_consistent() {
        let (t1, _, _) = generate_user_context_ids(OP_WEBSOCKET_SESSION);
        let (_, r2, _) = generate_user_context_ids(OP_WEBSOCKET_SESSION);
        assert!(!ids_consistent(&t1, &r2));
        assert!(!ids_consistent(&t1, "run_x"));
    }

    #[test]
    fn connection_and_message_ids_have_no_operation() {
        let c = connection_id();
        let p = parse(&c).unwrap();
        assert_eq!(p.prefix, "conn");
        assert_eq!(p.operation, "");
        assert_eq!(parse(&message_id()).unwrap().prefix, "msg");
    }

    #[test]
    fn parse_rejects_malformed_ids() {
        for bad in [
            "",
            "thread",
            "thread_",
            "thread_websocket_session_1_2",
            "thread_websocket_session_1_2_XYZ12345",
            "thread_websocket_session_a_2_0123abcd",
            "thread_1_2_0123abcd", // thread ids need an operation
            "conn_op_1_2_0123abcd",
            "bogus_op_1_2_0123abcd",
            "thread_Web_1_2_0123abcd",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse(&"x".repeat(300)), Err(IdError::TooLong));
    }

    #[test]
    fn ids_are_unique_across_threads_under_contention() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..20_000)
                        .map(|_| generate_user_context_ids(OP_WEBSOCKET_SESSION).0)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id), "duplicate id");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _any_outcome = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_id_shaped_input(s in "(thread|run|req|conn|msg)_[a-z_]{0,20}_[0-9]{0,20}_[0-9]{0,22}_[0-9a-f]{0,9}") {
            let _any_outcome = parse(&s);
        }
    }
}
