//! Persistent dirty bitmaps, maintained as QEMU maintains them (`block/qcow2-bitmap.c`).
//!
//! - **Load** (`load`): a read-write open reads the bitmap directory, validates every entry as QEMU does, reads
//!   the data of each consistent bitmap into memory, and marks those bitmaps in use on disk, in place, in QEMU's
//!   flushed order: header with the bitmaps autoclear bit clear, directory, header with the bit set again. A
//!   bitmap already in use on disk is *inconsistent*: listed, never read, used, changed or stored. Read-only
//!   opens read the bitmaps on first need and change nothing.
//! - **Dirtying** (`dirty`): every guest write, zero write and discard sets, for its guest range, the bits of each
//!   enabled consistent bitmap: an atomic OR on the bitmap's words, found through the resize lock that every
//!   write holds shared anyway, so tracking adds no lock and writers never wait for one another.
//! - **Store** (`store`): closing the image (or [`Image::store_bitmaps`]) writes each consistent bitmap anew: data
//!   clusters for the parts with set bits, a new table, a new directory; then the header points at the directory
//!   (the commit point), and only then are the old clusters freed. A crash before the header leaves the old
//!   directory, whose bitmaps say in use (QEMU's "inconsistent"); after it, the new one. A write after a store
//!   marks the bitmaps in use again before it changes anything.
//!
//! # Locking
//! What writes need, the bits of the enabled bitmaps and whether the directory must be marked in use first
//! ([`Tracking`]), lives inside the image's resize lock: a write takes it shared for its whole duration and sets
//! its bits before its data moves. Everything that changes it (add, remove, clear, enable, disable, resize,
//! store, marking in use) holds the resize lock exclusively, so it runs between writes: a store sees every bit of
//! every write that may reach the disk before the directory stops saying "in use", and a write that comes after
//! a store finds that it must mark the bitmaps in use first. The full set of bitmaps (names, directory entries)
//! has its own `RwLock`, taken after the resize lock and before the metadata lock, never the other way round.

mod api;
mod bits;
mod dirty;
mod load;
mod store;

pub use api::{BitmapInfo, BitmapRun, DirtyRanges};

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::format::{BitmapEntry, BITMAP_FLAG_IN_USE};
use bits::DirtyBits;

/// The most bitmap data, summed over every consistent bitmap, that an image may make this library hold in memory
/// (QEMU's only limit is 512 MiB per bitmap, times 65535 bitmaps).
const MAX_TOTAL_BITMAP_BYTES: u64 = 1 << 30;

/// One persistent bitmap as the open image knows it.
#[derive(Debug)]
struct Live {
    name: String,
    granularity_bits: u8,
    /// Whether writes set its bits.
    enabled: bool,
    /// Its bits, one per granule of the disk; `None` for an inconsistent bitmap (found in use on disk), whose data
    /// is never read.
    bits: Option<Arc<DirtyBits>>,
    /// Its entry in the directory the header points at, if it has one, with the data clusters its table names.
    on_disk: Option<OnDisk>,
}

/// A bitmap's place in the image as the current directory records it.
#[derive(Debug, Clone)]
struct OnDisk {
    entry: BitmapEntry,
    /// Host offsets of the data clusters its table names (read at load for consistent bitmaps, on demand for
    /// others).
    data: Option<Vec<u64>>,
}

impl Live {
    fn consistent(&self) -> bool {
        self.bits.is_some()
    }

    fn tracks_writes(&self) -> bool {
        self.enabled && self.consistent()
    }

    fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
}

/// Every bitmap of the image, in directory order (bitmaps added while open at the end).
#[derive(Debug, Default)]
struct BitmapSet {
    /// Whether the image's bitmaps were read yet (read-only opens read them on first need).
    loaded: bool,
    list: Vec<Live>,
    /// Whether a write must mark the bitmaps in use on disk before it may dirty them: true after a store left
    /// consistent entries in the directory, until the next write marks them again.
    needs_mark: bool,
}

impl BitmapSet {
    fn find(&self, name: &str) -> Option<&Live> {
        self.list.iter().find(|b| b.name == name)
    }

    fn find_mut(&mut self, name: &str) -> Option<&mut Live> {
        self.list.iter_mut().find(|b| b.name == name)
    }

    /// Whether some consistent bitmap's entry in the directory lacks the in-use flag.
    fn has_unmarked_entries(&self) -> bool {
        self.list.iter().any(|b| b.consistent() && b.on_disk.as_ref().is_some_and(|d| !d.entry.in_use()))
    }
}

/// What a write needs to know about the bitmaps, kept inside the image's resize lock (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Tracking {
    /// The bits of every enabled consistent bitmap, with the bitmap's granularity bits; empty when writes have
    /// nothing to record.
    bits: Vec<(Arc<DirtyBits>, u8)>,
    /// Whether the directory must be marked in use before a write may dirty the bitmaps (after a store).
    needs_mark: bool,
}

/// The image's bitmaps.
#[derive(Debug, Default)]
pub(super) struct Bitmaps {
    set: RwLock<BitmapSet>,
}

impl Bitmaps {
    fn read(&self) -> RwLockReadGuard<'_, BitmapSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BitmapSet> {
        self.set.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Makes `tracking` what `set` says writes must do; called, with the resize lock held exclusively, after any
/// change to the set.
fn retrack(set: &BitmapSet, tracking: &mut Tracking) {
    tracking.bits = set
        .list
        .iter()
        .filter(|b| b.enabled)
        .filter_map(|b| b.bits.as_ref().map(|bits| (Arc::clone(bits), b.granularity_bits)))
        .collect();
    tracking.needs_mark = set.needs_mark;
}

/// The entry `entry` with the in-use flag set or cleared.
fn with_in_use(entry: &BitmapEntry, in_use: bool) -> BitmapEntry {
    let mut e = entry.clone();
    if in_use {
        e.flags |= BITMAP_FLAG_IN_USE;
    } else {
        e.flags &= !BITMAP_FLAG_IN_USE;
    }
    e
}
