//! Per-cluster write locks: a writer owns the guest clusters it touches until its L2 update is in the cache.
//!
//! A range is taken whole or not at all, so two writers can never hold parts of each other's ranges and
//! deadlock. Held ranges are few (one per in-flight write), so a list beats a set of cluster numbers.

use std::sync::{Condvar, Mutex};

/// The guest-cluster ranges currently owned by writers.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// Ownership of a range of guest clusters; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no other writer holds any cluster in `start..end`, then takes them all.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((start, end));
        RangeGuard { locks: self, range: (start, end) }
    }

    /// Takes `start..end` if no writer holds any of it, without waiting.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        held.push((start, end));
        Some(RangeGuard { locks: self, range: (start, end) })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
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
}
