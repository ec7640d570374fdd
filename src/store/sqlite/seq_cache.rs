//! [`SeqCache`]: the SQLite writer's guess of each thread's `last_seq`, behind the
//! compare-and-set that decides (see `write`). It only saves reads; it is never the truth.

/// The SQLite writer's memory of each thread's owner and `last_seq`, as of its last commit, so
/// a batch does not read them back. Each reservation still goes through the database as a
/// compare-and-set (`WHERE thread_id = ? AND user_id = ? AND last_seq = remembered`): if
/// anything else moved the row, the update changes nothing, the thread is read afresh, and the
/// reservation is made again. So the cache is only ever a guess, and it keeps 64-bit hashes of
/// the ids instead of the ids: a collision costs one read, never a wrong `seq`. Entries only
/// change after a commit succeeds; a rolled-back batch leaves them as they were.
///
/// Bounded by generations, not by time: threads committed to since the last rotation are in
/// `current`, the generation before in `previous`; when `current` holds [`Self::GENERATION`]
/// threads it becomes `previous` and the old `previous` is dropped. A thread that keeps
/// chatting stays remembered, a thread that went quiet is forgotten after two generations, and
/// the memory stays flat however many threads a node sees over its life (remembering every
/// thread grew a node's resident memory with every new thread: BENCHMARKS.md, "Churn").
#[derive(Default)]
pub(super) struct SeqCache {
    current: std::collections::HashMap<u64, (u64, i64)>,
    previous: std::collections::HashMap<u64, (u64, i64)>,
    ids: std::collections::hash_map::RandomState,
}

impl SeqCache {
    /// Threads per generation: at most twice this many are remembered, in two maps of at most
    /// 8,192 slots of 25 bytes (about 400 KB in all). A batch touches at most a few hundred
    /// threads, so a thread still chatting is always in one of the two.
    pub(super) const GENERATION: usize = 4_096;

    fn key(&self, id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.ids.hash_one(id)
    }

    /// The remembered `last_seq` of `thread_id`, if it is remembered as `user_id`'s.
    pub(super) fn get(&self, thread_id: &str, user_id: &str) -> Option<i64> {
        let k = self.key(thread_id);
        let (owner, last) = self.current.get(&k).or_else(|| self.previous.get(&k))?;
        (*owner == self.key(user_id)).then_some(*last)
    }

    /// Forget `thread_id` (gone, or not the user's the batch thought).
    pub(super) fn forget(&mut self, thread_id: &str) {
        let k = self.key(thread_id);
        self.current.remove(&k);
        self.previous.remove(&k);
    }

    /// Remember the `(thread, user, last_seq)` a batch reserved, once it has committed.
    pub(super) fn committed(&mut self, reserved: Vec<(&str, &str, i64)>) {
        for (thread, user, last) in reserved {
            let entry = (self.key(user), last);
            self.current.insert(self.key(thread), entry);
        }
        if self.current.len() >= Self::GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seq_cache_stays_bounded_and_keeps_threads_that_keep_chatting() {
        let mut cache = SeqCache::default();
        let mut busy_last = 0;
        for i in 0..SeqCache::GENERATION * 5 {
            let thread = format!("thread_{i}");
            cache.committed(vec![(thread.as_str(), "bob", 1)]);
            if i % 1_000 == 0 {
                busy_last = i as i64;
                cache.committed(vec![("thread_busy", "alice", busy_last)]);
            }
            assert!(cache.len() <= 2 * SeqCache::GENERATION, "{}", cache.len());
        }
        assert_eq!(cache.get("thread_busy", "alice"), Some(busy_last));
        // Another user's guess is no guess; a thread quiet for two generations is forgotten.
        assert_eq!(cache.get("thread_busy", "bob"), None);
        assert_eq!(cache.get("thread_0", "bob"), None);
        let recent = format!("thread_{}", SeqCache::GENERATION * 5 - 1);
        assert_eq!(cache.get(&recent, "bob"), Some(1));
        cache.forget(&recent);
        assert_eq!(cache.get(&recent, "bob"), None);
    }
}
