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

/// A thread waiting for a range; woken only when a change to a range it overlaps lets it in.
struct Waiter {
    start: u64,
    end: u64,
    shared: bool,
    /// Whether it gives up when an overlapping owner turns shared ([`RangeLocks::lock_to_allocate`]).
    yields: bool,
    id: u64,
    thread: Thread,
    /// Set when an overlapping owner turned shared (it linked its clusters): a waiter that asked for the range
    /// only in order to allocate it may find it allocated now.
    shared_since: bool,
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

    /// Takes the range once nothing conflicts; `None` instead when `yield_to_sharing` and an overlapping owner
    /// turned shared meanwhile.
    fn take(&self, start: u64, end: u64, shared: bool, yield_to_sharing: bool) -> Option<RangeGuard<'_>> {
        let mut held = self.held();
        if held.conflicts(start, end, shared) {
            // Waiting threads park and are unparked only by releases that overlap them: with many writers in
            // flight, waking every waiter on every release costs more than the writes.
            let id = held.next_id;
            held.next_id += 1;
            let thread = std::thread::current();
            let yields = yield_to_sharing;
            held.waiters.push(Waiter { start, end, shared, yields, id, thread, shared_since: false });
            while held.conflicts(start, end, shared) {
                drop(held);
                std::thread::park();
                held = self.held();
                if yield_to_sharing && held.waiters.iter().any(|w| w.id == id && w.shared_since) {
                    held.waiters.retain(|w| w.id != id);
                    return None;
                }
            }
            held.waiters.retain(|w| w.id != id);
        }
        held.ranges.push((start, end, shared));
        Some(RangeGuard { locks: self, range: (start, end, shared) })
    }

    /// Waits until no one else holds any cluster in `start..end`, then takes them all.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        // Not yielding, `take` answers only once it holds the range: the loop runs once.
        loop {
            if let Some(guard) = self.take(start, end, false, false) {
                return guard;
            }
        }
    }

    /// As [`lock`](Self::lock), for a writer that needs the range only to allocate it: `None` as soon as an
    /// overlapping owner links what it allocated and shares its range ([`RangeGuard::share`]), so that the writer
    /// can try again as an overwrite beside it, rather than queue for exclusive ownership it no longer needs.
    pub fn lock_to_allocate(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        self.take(start, end, false, true)
    }

    /// Waits until no one holds any cluster in `start..end` exclusively, then takes them all, shared with other
    /// shared owners.
    pub fn lock_shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            if let Some(guard) = self.take(start, end, true, false) {
                return guard;
            }
        }
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

impl RangeGuard<'_> {
    /// Turns exclusive ownership into shared ownership of the same range, waking the waiters it now admits.
    pub fn share(self) -> Self {
        let mut held = self.locks.held();
        let (start, end, _) = self.range;
        if let Some(r) = held.ranges.iter_mut().find(|r| **r == self.range) {
            r.2 = true;
        }
        for w in held.waiters.iter_mut().filter(|w| w.yields && w.start < end && start < w.end) {
            w.shared_since = true;
        }
        wake_overlapping(held, start, end);
        let shared = RangeGuard { locks: self.locks, range: (start, end, true) };
        // The entry now reads shared: this guard must not release it under its old key.
        std::mem::forget(self);
        shared
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        if let Some(i) = held.ranges.iter().position(|r| *r == self.range) {
            held.ranges.swap_remove(i);
        }
        let (start, end, _) = self.range;
        wake_overlapping(held, start, end);
    }
}

/// Wakes the waiters overlapping `start..end` that the change to it lets in (or that yield), after letting go of
/// the table. Waking the others would only have them look and sleep again: with many writers queued on the same
/// clusters, that costs more than the writes.
fn wake_overlapping(held: std::sync::MutexGuard<'_, Held>, start: u64, end: u64) {
    let wake: Vec<Thread> = held
        .waiters
        .iter()
        .filter(|w| w.start < end && start < w.end)
        .filter(|w| w.shared_since || !held.conflicts(w.start, w.end, w.shared))
        .map(|w| w.thread.clone())
        .collect();
    drop(held);
    for thread in wake {
        thread.unpark();
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

    #[test]
    fn an_exclusive_owner_that_shares_admits_shared_waiters_and_still_holds_off_exclusive_ones() {
        let locks = Arc::new(RangeLocks::default());
        let owner = locks.lock(0, 2);
        let entered = Arc::new(AtomicU32::new(0));
        let waiter = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = locks.lock_shared(1, 2);
                entered.store(1, Ordering::SeqCst);
            })
        };
        let shared = owner.share();
        assert!(waiter.join().is_ok());
        assert_eq!(entered.load(Ordering::SeqCst), 1, "the shared waiter got in beside the owner");
        assert!(locks.try_lock(0, 1).is_none(), "the shared owner still holds off an exclusive one");
        drop(shared);
        assert!(locks.try_lock(0, 2).is_some(), "released under its shared key");
    }
}
