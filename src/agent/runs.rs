//! The runs in progress on this node, so `cancel_run` can reach them.
//!
//! A run is entered when its task is spawned and removed by its [`RunGuard`] when the task ends,
//! however it ends. Only a connection of the run's own (user, thread) can cancel it: the entry
//! keeps the run's isolation key and [`ActiveRuns::cancel`] compares it.

use std::sync::Arc;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::context::{IsolationKey, UserExecutionContext};

/// Runs in progress on this node, by run id.
#[derive(Debug, Default)]
pub(crate) struct ActiveRuns {
    runs: DashMap<String, RunEntry>,
}

#[derive(Debug)]
struct RunEntry {
    key: IsolationKey,
    cancel: CancellationToken,
}

impl ActiveRuns {
    /// Enter the run of `run_ctx`, cancelled through `cancel`; the guard removes it.
    #[must_use = "the run is removed when the guard drops"]
    pub(crate) fn insert(
        self: &Arc<Self>,
        run_ctx: &UserExecutionContext,
        cancel: CancellationToken,
    ) -> RunGuard {
        let run_id = run_ctx.run_id().to_string();
        self.runs.insert(
            run_id.clone(),
            RunEntry {
                key: run_ctx.isolation_key().clone(),
                cancel,
            },
        );
        RunGuard {
            runs: self.clone(),
            run_id,
        }
    }

    /// Cancel run `run_id` if it is in progress on the (user, thread) of `key`. Returns whether
    /// it was.
    pub(crate) fn cancel(&self, run_id: &str, key: &IsolationKey) -> bool {
        self.runs
            .get(run_id)
            .filter(|r| &r.key == key)
            .map(|r| r.cancel.cancel())
            .is_some()
    }
}

/// Removes a run from [`ActiveRuns`] when the run task ends, however it ends.
#[derive(Debug)]
pub(crate) struct RunGuard {
    runs: Arc<ActiveRuns>,
    run_id: String,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.runs.runs.remove(&self.run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ThreadChoice;

    #[test]
    fn a_run_is_cancelled_only_from_its_own_thread_and_leaves_with_its_guard() {
        let runs = Arc::new(ActiveRuns::default());
        let conn = UserExecutionContext::from_websocket_request(
            "alice",
            &crate::ids::connection_id(),
            ThreadChoice::New,
        )
        .unwrap();
        let other = UserExecutionContext::from_websocket_request(
            "alice",
            &crate::ids::connection_id(),
            ThreadChoice::New,
        )
        .unwrap();
        let run = conn.child().unwrap();
        let cancel = CancellationToken::new();
        let guard = runs.insert(&run, cancel.clone());
        assert!(
            !runs.cancel(run.run_id(), other.isolation_key()),
            "another thread cannot"
        );
        assert!(!cancel.is_cancelled());
        assert!(runs.cancel(run.run_id(), conn.isolation_key()));
        assert!(cancel.is_cancelled());
        drop(guard);
        assert!(runs.runs.is_empty());
        assert!(
            !runs.cancel(run.run_id(), conn.isolation_key()),
            "gone with its guard"
        );
    }
}
