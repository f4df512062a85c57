//! How long the metadata lock is held, by what for: the figure that says whether guest I/O waits on metadata.
//!
//! Off unless [`Config::time_locks`](super::Config::time_locks) is set, since each acquisition then costs two
//! clock reads. Hold times go into histograms with four buckets per power of two (at most 19% apart), from
//! which [`Image::lock_hold_times`] answers medians and 99th percentiles.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::meta::Meta;
use super::Image;
use crate::block::BlockDevice;

/// Why the metadata lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LockUse {
    /// Mapping a guest range for a read, a map query or an overwrite in place.
    Lookup,
    /// Planning and committing an allocating write.
    Allocation,
    /// Writing metadata back for a flush or a cache over budget.
    Writeback,
    /// Anything else (structural changes, maintenance).
    Other,
}

const BUCKETS: usize = 256;

/// A histogram of durations in nanoseconds, four buckets per power of two.
#[derive(Debug)]
struct Histogram([AtomicU64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let log = 63 - u64::from(ns.leading_zeros());
    // The two bits below the leading one split each power of two in four.
    let quarter = (ns >> (log - 2)) & 3;
    ((log * 4 + quarter) as usize).min(BUCKETS - 1)
}

/// The largest duration a bucket holds, in nanoseconds.
fn bucket_ceiling(bucket: usize) -> u64 {
    if bucket < 8 {
        // 0 to 3 ns have a bucket each; 4 ns and up start at bucket 8 (4 x log2 of 4).
        return bucket.min(3) as u64;
    }
    let (log, quarter) = ((bucket / 4) as u32, (bucket % 4) as u64);
    let ceiling = (u128::from(4 + quarter + 1) << (log - 2)).saturating_sub(1);
    u64::try_from(ceiling).unwrap_or(u64::MAX)
}

impl Histogram {
    fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(b) = self.0.get(bucket_of(ns)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn summary(&self) -> HoldTimes {
        let counts: Vec<u64> = self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let at = |fraction: f64| -> Duration {
            let want = ((total as f64 * fraction).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, &n) in counts.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return Duration::from_nanos(bucket_ceiling(bucket));
                }
            }
            Duration::ZERO
        };
        if total == 0 {
            return HoldTimes::default();
        }
        HoldTimes { count: total, median: at(0.5), p99: at(0.99) }
    }
}

/// Hold times of the metadata lock for one use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldTimes {
    /// Acquisitions recorded.
    pub count: u64,
    /// Median hold time (the upper end of its histogram bucket).
    pub median: Duration,
    /// 99th percentile hold time (likewise).
    pub p99: Duration,
}

/// Hold times of the metadata lock since open, by use ([`Config::time_locks`](super::Config::time_locks)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockHoldTimes {
    /// Mapping for reads, map queries and overwrites in place.
    pub lookup: HoldTimes,
    /// Planning and committing allocating writes.
    pub allocation: HoldTimes,
    /// Writeback for flushes and for a cache over budget.
    pub writeback: HoldTimes,
}

/// The histograms of an open image.
#[derive(Debug, Default)]
pub(super) struct LockTimes {
    lookup: Histogram,
    allocation: Histogram,
    writeback: Histogram,
}

impl LockTimes {
    fn record(&self, what: LockUse, d: Duration) {
        match what {
            LockUse::Lookup => self.lookup.record(d),
            LockUse::Allocation => self.allocation.record(d),
            LockUse::Writeback => self.writeback.record(d),
            LockUse::Other => {}
        }
    }
}

/// The metadata lock, held (exclusively or shared, as `G` says); records its hold time when dropped if timing
/// is on.
pub(super) struct Timed<'a, G> {
    guard: G,
    timing: Option<(&'a LockTimes, LockUse, Instant)>,
}

/// The metadata lock, held exclusively.
pub(super) type MetaGuard<'a> = Timed<'a, RwLockWriteGuard<'a, Meta>>;
/// The metadata lock, held shared: lookups of cached pieces.
pub(super) type MetaReadGuard<'a> = Timed<'a, RwLockReadGuard<'a, Meta>>;

impl<'a, G> Timed<'a, G> {
    pub(super) fn new(guard: G, times: Option<&'a LockTimes>, what: LockUse) -> Self {
        Timed { guard, timing: times.map(|t| (t, what, Instant::now())) }
    }
}

impl<G: Deref<Target = Meta>> Deref for Timed<'_, G> {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.guard
    }
}

impl<G: DerefMut<Target = Meta>> DerefMut for Timed<'_, G> {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.guard
    }
}

impl<G> Drop for Timed<'_, G> {
    fn drop(&mut self) {
        if let Some((times, what, since)) = self.timing {
            times.record(what, since.elapsed());
        }
    }
}

impl<D: BlockDevice> Image<D> {
    /// How long the metadata lock has been held since open, by use: medians and 99th percentiles. All zero unless
    /// the image was opened with [`Config::time_locks`](super::Config::time_locks).
    pub fn lock_hold_times(&self) -> LockHoldTimes {
        LockHoldTimes {
            lookup: self.lock_times.lookup.summary(),
            allocation: self.lock_times.allocation.summary(),
            writeback: self.lock_times.writeback.summary(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_what_their_ceilings_say() {
        for ns in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 12345, 1 << 40, u64::MAX / 2] {
            let b = bucket_of(ns);
            assert!(bucket_ceiling(b) >= ns, "{ns} in bucket {b} above its ceiling {}", bucket_ceiling(b));
            if b > 4 {
                assert!(bucket_ceiling(b - 1) < ns, "{ns} belongs in a lower bucket than {b}");
            }
        }
    }

    #[test]
    fn medians_and_percentiles_come_from_the_recorded_times() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(Duration::from_nanos(1000));
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(5));
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!(s.median >= Duration::from_nanos(1000) && s.median < Duration::from_nanos(1200), "{s:?}");
        assert!(s.p99 >= Duration::from_millis(5) && s.p99 < Duration::from_millis(6), "{s:?}");
    }
}
