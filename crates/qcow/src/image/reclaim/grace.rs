//! A grace period for readers, so that a host cluster is reused only after every read that may still be reading
//! it has finished.
//!
//! Readers map a guest range under the metadata lock and read the data after releasing it. When a move, a
//! discard or a copy-on-write unlinks a cluster in between, such a reader still reads the old place, which is
//! fine as long as nothing else has been written there yet. So a reader registers before it releases the lock
//! that mapped it, and writeback, before it applies deferred refcount decrements (which make clusters
//! allocatable), switches the epoch and waits until no reader of the previous epoch is left. Readers never wait
//! for that: registering is two atomic increments at most, and a registered reader takes no lock the waiter
//! holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Readers in flight, counted per epoch (even and odd).
#[derive(Debug, Default)]
pub struct ReadGrace {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    /// One waiter at a time: a second one switching the epoch again would skip the first one's readers.
    waiters: Mutex<()>,
}

/// A reader in flight; leaves on drop.
pub struct Reader<'a> {
    grace: &'a ReadGrace,
    slot: usize,
}

impl ReadGrace {
    fn slot(&self, epoch: u64) -> &AtomicU64 {
        let [even, odd] = &self.active;
        if epoch % 2 == 0 {
            even
        } else {
            odd
        }
    }

    /// Enters a read.
    pub fn enter(&self) -> Reader<'_> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            self.slot(epoch).fetch_add(1, Ordering::SeqCst);
            // Counted under the epoch that is still current: a mover that switches after this point waits for
            // us. If it switched in between, count again under the new one.
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return Reader { grace: self, slot: (epoch % 2) as usize };
            }
            self.slot(epoch).fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until every read that entered before this call has left.
    pub fn wait_for_readers(&self) {
        let _one = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut pause = Duration::from_micros(10);
        while self.slot(old).load(Ordering::SeqCst) != 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        self.grace.slot(self.slot as u64).fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn the_mover_waits_for_a_reader_that_entered_before_it_and_not_for_later_ones() {
        let grace = Arc::new(ReadGrace::default());
        let reader = grace.enter();
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (grace, done) = (grace.clone(), done.clone());
            std::thread::spawn(move || {
                grace.wait_for_readers();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "the mover must wait for the earlier reader");
        drop(reader);
        assert!(waiter.join().is_ok());
        assert!(done.load(Ordering::SeqCst));
        let _late = grace.enter();
        // A reader that entered after the switch belongs to the new epoch; the next wait is for it, so only
        // check that the previous epoch drained.
        assert_eq!(grace.slot(0).load(Ordering::SeqCst), 0);
    }
}
