//! Per-cluster locks on guest clusters: a writer owns the clusters it touches until its L2 update is in the
//! cache.
//!
//! A writer that only overwrites clusters in place takes them shared: such writers do not exclude each other
//! (their data goes to fixed places, as concurrent writes to a disk do), but they exclude anyone who could move or
//! free those places meanwhile (allocating writes, discards, the reclaimer), who take clusters exclusively. A
//! range is taken whole or not at all, so two owners can never hold parts of each other's ranges and deadlock.
//! Held ranges are few (one per in-flight write), so a list beats a set of cluster numbers.

use std::sync::Mutex;
use std::thread::Thread;

/// A thread waiting for a range; woken only when a range it overlaps is released.
struct Waiter {
    start: u64,
    end: u64,
    id: u64,
    thread: Thread,
}

#[derive(Default)]
struct Held {
    /// (start, end, shared)
    ranges: Vec<(u64, u64, bool)>,
    waiters: Vec<Waiter>,
    next_id: u64,
}

impl Held {
    fn conflicts(&self, start: u64, end: u64, shared: bool) -> bool {
        self.ranges.iter().any(|&(s, e, sh)| s < end && start < e && !(shared && sh))
    }
}

/// The guest-cluster ranges currently owned by writers.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Held>,
}

/// Ownership of a range of guest clusters; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64, bool),
}

impl RangeLocks {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, start: u64, end: u64, shared: bool) -> RangeGuard<'_> {
        let mut held = self.held();
        if held.conflicts(start, end, shared) {
            // Waiting threads park and are unparked only by releases that overlap them: with many writers in
            // flight, waking every waiter on every release costs more than the writes.
            let id = held.next_id;
            held.next_id += 1;
            held.waiters.push(Waiter { start, end, id, thread: std::thread::current() });
            while held.conflicts(start, end, shared) {
                drop(held);
                std::thread::park();
                held = self.held();
            }
            held.waiters.retain(|w| w.id != id);
        }
        held.ranges.push((start, end, shared));
        RangeGuard { locks: self, range: (start, end, shared) }
    }

    /// Waits until no one else holds any cluster in `start..end`, then takes them all.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.take(start, end, false)
    }

    /// Waits until no one holds any cluster in `start..end` exclusively, then takes them all, shared with other
    /// shared owners.
    pub fn lock_shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.take(start, end, true)
    }

    /// Takes `start..end` exclusively if no one holds any of it, without waiting.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let mut held = self.held();
        if held.conflicts(start, end, false) {
            return None;
        }
        held.ranges.push((start, end, false));
        Some(RangeGuard { locks: self, range: (start, end, false) })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        if let Some(i) = held.ranges.iter().position(|r| *r == self.range) {
            held.ranges.swap_remove(i);
        }
        let (start, end, _) = self.range;
        let wake: Vec<Thread> =
            held.waiters.iter().filter(|w| w.start < end && start < w.end).map(|w| w.thread.clone()).collect();
        drop(held);
        for thread in wake {
            thread.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other_and_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let locks = locks.clone();
                let inside = inside.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = locks.lock(i % 3, i % 3 + 2);
                        let n = inside.fetch_add(1, Ordering::SeqCst);
                        assert!(n < 2, "at most two non-overlapping ranges of width 2 among 0..4");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        let _a = locks.lock(0, 1);
        let _b = locks.lock(1, 2);
        assert!(locks.try_lock(1, 3).is_none(), "a held cluster is not taken");
        assert!(locks.try_lock(2, 3).is_some());
    }

    #[test]
    fn shared_owners_share_and_exclusive_ones_wait_for_them() {
        let locks = RangeLocks::default();
        let a = locks.lock_shared(0, 4);
        let b = locks.lock_shared(2, 6);
        assert!(locks.try_lock(3, 4).is_none(), "exclusive waits for shared owners");
        assert!(locks.try_lock(6, 7).is_some());
        drop((a, b));
        let x = locks.lock(0, 1);
        assert!(locks.try_lock(0, 1).is_none());
        drop(x);
        assert!(locks.try_lock(0, 1).is_some());
    }
}
