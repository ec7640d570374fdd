//! Helpers for tests and benchmarks, compiled only for the crate's own tests or with the
//! `testing` feature (the integration tests, benches and examples turn it on through the
//! crate's dev-dependency on itself). Not part of the public API; `Config::for_tests` is gated
//! the same way.

use serde_json::Value;

use crate::ContextError;

/// The advisory-lock key the PostgreSQL schema is created under.
pub const SCHEMA_LOCK: i64 = crate::store::SCHEMA_LOCK;

/// The demo agent's tool: words and characters of a text.
pub fn word_count(text: &str) -> Value {
    crate::agent::word_count(text)
}

/// The demo agent's reply to `content`, given its word count.
pub fn demo_reply(content: &str, count: &Value) -> String {
    crate::agent::demo_reply(content, count)
}

/// A text cut in two on a character boundary, as the demo agent streams it.
pub fn halves(text: &str) -> (&str, &str) {
    crate::agent::halves(text)
}

/// Whether a user id is acceptable (what the JWT `sub` is checked with).
pub fn validate_user_id(user_id: &str) -> Result<(), ContextError> {
    crate::context::validate_user_id(user_id)
}
