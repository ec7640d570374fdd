//! What a test needs from outside the process (a database, a browser): it runs when that is
//! there, and otherwise says so in one `SKIPPED` line instead of passing in silence.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Mutex;

/// The value of `var`, or `None` after one `SKIPPED` line: `what` does not run without it.
pub(crate) fn require_env(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skipped(what, &format!("set {var} to run them"));
            None
        }
    }
}

/// `SKIPPED: {what} ({why})`, once per `what` in this test binary, written to the real stderr
/// (the harness captures `eprintln!` of a passing test, so that line would never show).
pub(crate) fn skipped(what: &str, why: &str) {
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = SAID
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(what.to_string());
    if first {
        writeln!(std::io::stderr(), "SKIPPED: {what} ({why})").ok();
    }
}
