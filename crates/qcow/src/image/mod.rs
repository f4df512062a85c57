//! The qcow2 image engine: [`Image`] opens, creates, reads, writes, resizes and flushes qcow2 images on any
//! [`BlockDevice`].
//!
//! # Locking
//! All metadata (header, refcount table, and the cache of L1, L2 and refcount clusters) sits behind one
//! read-write lock, `meta`. Reads whose tables are cached map a guest range under it shared; it is held
//! exclusively to map what is not cached, to allocate, and to update tables; a cache miss reads one piece under
//! it. Guest data is never read or written while it is held, and neither is the metadata
//! a flush writes back: the [`writeback_queue`] copies the dirty pieces under it and writes them outside it, so
//! a flush never stalls other requests. Structural changes that write metadata themselves wait, lock held, until
//! no copies are being written. Writers serialise per guest cluster through [`RangeLocks`](ranges::RangeLocks), taken before
//! `meta` and never while `meta` is held, so a cluster being allocated or copied cannot be raced. A resize
//! takes `resize` for writing; every other operation takes it for reading. What writes need to know about the
//! persistent bitmaps lives inside `resize` and changes only while it is held for writing; the bitmap set has a
//! lock of its own, taken after those and before `meta` (see [`bitmaps`]).
//!
//! # Durability
//! Metadata changes are write-back: [`Image::flush`] (and a cache running over budget) writes them in the
//! order refcount blocks, refcount table, L2 tables, L1 table and header, then applies deferred refcount
//! decrements, with a device flush between each step. So a crash at any instant may leak clusters but never
//! leaves a reference to a cluster whose refcount is zero.
//!
//! # Corruption met during I/O
//! A write that would land on metadata (a guest write through an L2 entry naming it, a table written back over
//! another), a table loaded on top of other metadata, and a misaligned L1 or L2 offset are refused with
//! `Corrupt`; a writable image gets the corrupt bit on disk and refuses every later write, flush included, while
//! sane reads go on (see [`overlap`]). Any other corruption a read, write, discard or flush meets is recorded the
//! same way where the operation returns, and halts the background reclaimer (see [`trust`]).
//!
//! # Giving space back
//! Truncation, junk erasing and compaction act on a refcount of zero only once the refcounts are known to agree
//! with the metadata (see [`trust`]): an image whose refcounts are damaged is refused before anything changes.

mod allocator;
mod amend;
mod backing;
mod backing_change;
mod bitmaps;
mod cache;
mod commit;
mod compact;
mod compressed;
mod config;
mod create;
mod device;
mod discard;
mod empty;
mod io;
mod iov;
mod lock_timing;
mod mapping;
mod meta;
mod metrics;
mod offset_hash;
mod open;
mod options;
mod overlap;
mod precompressed;
mod ranges;
mod rebase;
mod rebuild;
mod reclaim;
mod refcount_width;
mod refusal;
mod resize;
mod seek;
mod snapshot;
mod snapshots;
mod subcluster;
mod trust;
mod version;
mod writeback;
mod writeback_queue;
mod zeroing;

pub use amend::AmendOptions;
pub use backing::{Backing, BackingPolicy, BackingResolver, DepthRun, FileResolver, LayeredDevice, NoBacking};
pub use bitmaps::{BitmapInfo, BitmapRun, DirtyRanges};
pub use commit::{CommitRange, CommitSummary};
pub use compact::{CompactProgress, CompactSummary};
pub use config::Config;
pub use discard::DiscardStats;
pub use lock_timing::{HoldTimes, LockHoldTimes};
pub use mapping::{Extent, ExtentKind};
pub use metrics::{failed_drops, Metrics};
pub use options::{parse_size, Compat, CreateOptions, Preallocation};
pub use rebase::{NewBacking, RebaseOptions, RebaseSummary};
pub use reclaim::{ClusterState, OnlineCompaction, ReclaimPass, ReclaimerOptions};
pub use refusal::Refusal;
pub use seek::{MappedExtent, MappedKind};
pub use snapshots::{SnapshotRefusal, MAX_SNAPSHOTS, MAX_SNAPSHOT_NAME};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::block::{BlockDevice, Padded};
use crate::error::{Error, Result};
use crate::format::{feature, CompressionType, Geometry};
use lock_timing::{LockTimes, LockUse, MetaGuard, MetaReadGuard};
use meta::Meta;
use overlap::Corruption;
use ranges::RangeLocks;

/// An open qcow2 image. It is itself a [`BlockDevice`] with 512-byte sectors.
///
/// `Image` is `Send + Sync` and every operation takes `&self`, so many threads may use one image at once.
/// Dropping an image writes back its metadata on a best-effort basis; call [`Image::close`] to see errors.
pub struct Image<D: BlockDevice> {
    dev: Padded<D>,
    meta: RwLock<Meta>,
    ranges: RangeLocks,
    /// Held for reading by every operation, for writing by a resize; it also holds what writes need to know
    /// about the persistent bitmaps, which change only while it is held for writing.
    resize: RwLock<bitmaps::Tracking>,
    geo: Geometry,
    size: AtomicU64,
    read_only: bool,
    disconnected: AtomicBool,
    /// Corruption found while open: once set, every write is refused.
    corruption: Arc<Corruption>,
    config: Config,
    zeros: Box<[u8]>,
    backing: Option<backing::Backing>,
    compression: CompressionType,
    data_file: Option<Box<dyn BlockDevice>>,
    counters: metrics::Counters,
    /// Reads in flight, so that moved clusters are reused only after the reads that may see them.
    read_grace: Arc<reclaim::ReadGrace>,
    /// The background reclaimer, while it runs.
    reclaimer: Mutex<Option<reclaim::WorkerSlot>>,
    /// Why the background reclaimer stopped on its own.
    reclaimer_error: Mutex<Option<String>>,
    /// What the reclaimer remembers between passes.
    reclaim_memo: Mutex<reclaim::ReclaimMemo>,
    /// When the oldest change not yet flushed was made ([`Image::clock_ms`]), or 0.
    unflushed_since: AtomicU64,
    /// When the image was opened.
    opened: std::time::Instant,
    /// The persistent dirty bitmaps, kept in memory while open and stored at close.
    bitmaps: bitmaps::Bitmaps,
    /// The writeback that runs outside the metadata lock (shared with [`Meta`]).
    writeback_queue: Arc<writeback_queue::WritebackQueue>,
    /// Serialises growing an external data file (the image file's growth is serialised by [`Padded`]).
    data_sizing: Mutex<()>,
    /// How long the metadata lock is held, when [`Config::time_locks`] asks.
    lock_times: LockTimes,
}

/// What `qemu-img info` says about an image, in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: &'static str,
    /// Whether the lazy refcounts feature is on.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// Whether the corrupt bit is set.
    pub corrupt: bool,
    /// Whether the dirty bit is set.
    pub dirty: bool,
    /// Whether L2 entries are extended (subclusters).
    pub extended_l2: bool,
    /// "zlib" or "zstd", as qemu-img names them.
    pub compression_type: &'static str,
    /// Bytes the image file occupies as a device (its length).
    pub file_length: u64,
}

impl<D: BlockDevice> Image<D> {
    /// The metadata, for anything that may write metadata to the device: it waits, with the lock held, until no
    /// writeback outside the lock is writing copies.
    fn meta(&self) -> MetaGuard<'_> {
        self.meta_waiting(LockUse::Other)
    }

    /// [`meta`](Self::meta), with its hold time recorded as `what`.
    fn meta_waiting(&self, what: LockUse) -> MetaGuard<'_> {
        let m = self.meta_for(what);
        m.queue.wait_idle();
        m
    }

    /// The metadata, for lookups and allocation on the guest I/O paths, which never wait for a writeback: what
    /// they write to the device themselves (a header, a writeback under the lock) waits on its own.
    fn meta_for(&self, what: LockUse) -> MetaGuard<'_> {
        let guard = self.meta.write().unwrap_or_else(|e| e.into_inner());
        MetaGuard::new(guard, self.config.time_locks.then_some(&self.lock_times), what)
    }

    /// The metadata, shared: for lookups of cached pieces, which many threads make at once.
    fn meta_shared(&self, what: LockUse) -> MetaReadGuard<'_> {
        let guard = self.meta.read().unwrap_or_else(|e| e.into_inner());
        MetaReadGuard::new(guard, self.config.time_locks.then_some(&self.lock_times), what)
    }

    fn check_connected(&self) -> Result<()> {
        if self.disconnected.load(Ordering::Acquire) {
            return Err(Error::Disconnected);
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        self.check_connected()?;
        if self.read_only {
            return Err(Error::ReadOnly { op });
        }
        self.corruption.check()
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The runtime configuration the image was opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the image refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// A copy of the current header.
    pub fn header(&self) -> crate::format::Header {
        self.meta().header.clone()
    }

    /// Whether the image has a backing file (opened).
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// The device the image is stored on.
    pub fn device(&self) -> &D {
        self.dev.inner()
    }

    /// What `qemu-img info` reports.
    pub fn info(&self) -> ImageInfo {
        let m = self.meta();
        let h = &m.header;
        ImageInfo {
            virtual_size: self.virtual_size(),
            cluster_size: self.geo.cluster_size(),
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            lazy_refcounts: h.compatible_features & feature::LAZY_REFCOUNTS != 0,
            refcount_bits: self.geo.refcount_bits(),
            corrupt: h.incompatible_features & feature::CORRUPT != 0,
            dirty: h.incompatible_features & feature::DIRTY != 0,
            extended_l2: self.geo.extended_l2,
            compression_type: match h.compression_type {
                CompressionType::Zstd => "zstd",
                _ => "zlib",
            },
            file_length: self.dev.info().size_bytes(),
        }
    }

    /// Runs `f` on the device with every metadata change written back and the metadata lock held, so that the
    /// device shows one consistent image for as long as `f` runs (a check reads it directly).
    pub(crate) fn with_settled_metadata<R>(&self, f: impl FnOnce(&dyn BlockDevice) -> R) -> Result<R> {
        self.check_connected()?;
        let _no_resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        if !self.read_only {
            m.writeback(&self.dev)?;
            self.dev.flush()?;
        }
        Ok(f(&self.dev))
    }

    /// Checks this open image without repairing anything: its metadata is written back first, and no metadata
    /// changes while the check runs (guest reads and writes in place go on).
    ///
    /// # Errors
    /// As [`crate::check::check`].
    pub fn check(&self) -> Result<crate::check::CheckReport> {
        self.with_settled_metadata(crate::check::check_dyn)?
    }

    /// Makes every write completed before this call durable, metadata included.
    ///
    /// # Errors
    /// `Disconnected`, or `Io` when the device fails.
    pub fn flush(&self) -> Result<()> {
        self.observe(self.flush_all())
    }

    fn flush_all(&self) -> Result<()> {
        self.check_connected()?;
        if self.read_only {
            return Ok(());
        }
        let generation = if self.config.runtime_asserts || self.config.writeback_under_lock {
            let mut m = self.meta_waiting(LockUse::Writeback);
            self.unflushed_since.store(0, Ordering::Release);
            let generation = m.reclaim.begin_flush();
            if let Err(e) = m.writeback(&self.dev) {
                self.note_unflushed();
                return Err(e);
            }
            if self.config.runtime_asserts {
                // The device now holds the whole image, and the lock keeps it so: the checker judges it as
                // `qemu-img check` would, and every stored refcount must equal the references, leaks included.
                let report = crate::check::check(&self.dev, crate::check::Repair::None)?;
                if !report.is_clean() {
                    return Err(runtime_assert_failure(&report, self.geo.cluster_size()));
                }
            }
            generation
        } else {
            // Lookups, overwrites and allocations go on while the metadata is written (see `writeback_queue`).
            let generation = {
                let mut m = self.meta_for(LockUse::Writeback);
                self.unflushed_since.store(0, Ordering::Release);
                m.reclaim.begin_flush()
            };
            if let Err(e) = self.write_back_unlocked(true) {
                self.note_unflushed();
                return Err(e);
            }
            generation
        };
        if let Err(e) = self.dev.flush() {
            self.note_unflushed();
            return Err(e);
        }
        // Clusters erased before this flush began are durably zero now.
        self.meta().reclaim.flushed(generation);
        Ok(())
    }

    /// Stores the persistent bitmaps, writes everything back, marks a lazy-refcount image clean, flushes, and
    /// releases the device: what dropping the image does, with the first failure returned instead of lost. Call it
    /// wherever an error in that last writeback must be seen (a command's exit status); dropping the image
    /// afterwards does nothing more.
    ///
    /// # Errors
    /// As [`flush`](Self::flush), for the first step that failed (the later steps still run, except that an image
    /// whose metadata was not all written back is not marked clean); the device is released either way.
    pub fn close(self) -> Result<()> {
        self.stop_reclaimer();
        let result = self.shutdown();
        self.disconnected.store(true, Ordering::Release);
        self.dev.disconnect();
        result
    }

    fn shutdown(&self) -> Result<()> {
        self.check_connected()?;
        if self.read_only {
            return Ok(());
        }
        // Bitmaps first, as QEMU stores them before it flushes at close; whatever happens to them, the rest of
        // the metadata is still written back.
        let stored = self.observe(self.store_bitmaps_now());
        let written = {
            let mut m = self.meta();
            // Marked clean only once everything it covers is written back.
            m.writeback(&self.dev).and_then(|()| m.mark_clean(&self.dev))
        };
        // Flushed even after a failed writeback, so that whatever did reach the device is durable.
        let flushed = self.dev.flush();
        // The first failure is the one to report: the later ones usually follow from it.
        stored.and(written).and(flushed)
    }
}

impl<D: BlockDevice> Drop for Image<D> {
    /// Best effort: what [`Image::close`] does, unless it (or a disconnect) already ran. The crate does not log,
    /// and nobody is left to hand the error to, so a failure is only counted: see [`failed_drops`](crate::failed_drops).
    fn drop(&mut self) {
        self.stop_reclaimer();
        if !self.disconnected.load(Ordering::Acquire) && self.shutdown().is_err() {
            metrics::note_failed_drop();
        }
    }
}

/// The error a failed runtime assert reports: the first refcount mismatch, or the first finding.
fn runtime_assert_failure(report: &crate::check::CheckReport, cluster_size: u64) -> Error {
    use crate::check::Problem;
    let first = report.problems.iter().find_map(|p| match *p {
        Problem::RefcountMismatch { cluster, stored, references } if stored < references => {
            Some(Error::corrupt("runtime assert: refcount lower than the number of references", cluster * cluster_size))
        }
        Problem::RefcountMismatch { cluster, .. } => Some(Error::corrupt(
            "runtime assert: refcount higher than the number of references",
            cluster * cluster_size,
        )),
        _ => None,
    });
    first.unwrap_or_else(|| Error::corrupt("runtime assert: the image does not check clean", 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn image_is_send_and_sync() {
        assert_send_sync::<Image<crate::block::MemoryDevice>>();
        assert_send_sync::<Image<crate::block::FileDevice>>();
    }
}
