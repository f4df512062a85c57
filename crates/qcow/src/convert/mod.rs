//! Copying between block devices: the engine behind `qcow-tool convert`.
//!
//! - [`AllocationMap`] answers "which byte ranges of a source may hold nonzero data": a qcow2 [`Image`] from its
//!   mapping, a [`FileDevice`] from the file system's holes (`SEEK_DATA`/`SEEK_HOLE`), [`Whole`] "all of it" for
//!   sources that cannot tell, and [`Union`] both a source's and a backing file's data, for overlays.
//! - [`run`] copies in parallel with bounded memory: worker threads take the next chunk of data (at most
//!   [`Options::chunk_size`] bytes) in guest order, read it, find its all-zero granules and compress its clusters,
//!   and the calling thread stores the results strictly in guest order through a [`Target`]. At most
//!   [`Options::in_flight`] chunks are read but not yet stored, whatever the thread timing, and because one thread
//!   stores everything in guest order, a qcow2 output allocates its clusters in the same order on every run: the
//!   same input gives the same file, byte for byte.
//! - [`convert`] is the simple form: every thread, no compression, to a device that reads as zeros.
//!
//! Invariants: a range the map leaves out is never read from the source. Unless [`Options::target_is_zero`] is
//! false, it is never written either, so the destination must already read as zeros there (a new image or a new
//! sparse file does). Every transfer is whole sectors: a source whose size is not a sector multiple has its last
//! sector read as one whole, zero padded, sector. Sources are read into the workers' buffers, never mapped
//! (see [`Watch`]).
//!
//! [`Image`]: crate::Image
//! [`FileDevice`]: crate::block::FileDevice

mod map;
mod pipeline;
mod target;
mod tasks;
#[cfg(test)]
mod tests;
mod watch;
mod work;

pub use map::{AllocationMap, Union, Whole};
pub use pipeline::run;
pub use target::{DeviceTarget, ImageTarget, Target};
pub use watch::Watch;
pub use work::is_zero;

use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::CompressionType;

/// The default size of the chunks the workers read: 2 MiB.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// The default unit checked for zeros: a piece of this size (aligned to it) that reads as zeros is not written.
/// 4 KiB, a file system block, so that a raw output keeps every hole a file system could keep.
pub const ZERO_GRANULE: u64 = 4 << 10;

/// How clusters are compressed when the output stores compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// The codec: the output image's compression type.
    pub kind: CompressionType,
    /// The codec's level; `None` for QEMU's choice (deflate 6, zstd 3).
    pub level: Option<i32>,
    /// The output's cluster size: each cluster is compressed on its own.
    pub cluster_size: u64,
}

/// How [`run`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Worker threads reading, checking and compressing; at least one is used.
    pub threads: usize,
    /// At most this many chunks are read but not yet stored (at least one per thread is used), which bounds
    /// memory to about `in_flight * chunk_size`, twice that when compressing.
    pub in_flight: usize,
    /// The largest read; rounded up to whole granules (and whole clusters when compressing).
    pub chunk_size: u64,
    /// The unit checked for zeros (a power of two; rounded up to whole sectors).
    pub zero_granule: u64,
    /// Compress every cluster that holds data, or store data as it is.
    pub compression: Option<Compression>,
    /// Whether the destination reads as zeros where it is not written. When false, everything the source does
    /// not hold as data is explicitly zeroed through [`Target::write_zeroes`].
    pub target_is_zero: bool,
}

impl Default for Options {
    /// One worker per core, two chunks in flight per worker, [`CHUNK_SIZE`] and [`ZERO_GRANULE`], no compression,
    /// a destination that reads as zeros.
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Options {
            threads,
            in_flight: threads.saturating_mul(2).saturating_add(2),
            chunk_size: CHUNK_SIZE,
            zero_granule: ZERO_GRANULE,
            compression: None,
            target_is_zero: true,
        }
    }
}

/// What [`run`] copies from.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// The data.
    pub device: &'a dyn BlockDevice,
    /// Where the data may be: ranges outside it read as zeros.
    pub map: &'a dyn AllocationMap,
    /// How many bytes to copy, from offset 0.
    pub size: u64,
    /// For an overlay output: what its backing file reads. Only what differs from it is stored, and ranges that
    /// read as zeros in the source but not in the backing file are stored as zeros. `map` should then cover the
    /// backing file's data too ([`Union`]), and reads past the backing file's end must return zeros (wrap it in
    /// [`Padded`](crate::block::Padded)).
    pub base: Option<&'a dyn BlockDevice>,
    /// The file the source's data lives in, checked after every read: a file that shrinks during the copy
    /// stops it with an error instead of passing for holes.
    pub watch: Option<&'a Watch<'a>>,
}

/// Copies the first `size` bytes of `src` to the same offsets of `dst`, with [`Options::default`].
///
/// Only the ranges `map` reports as data are read; of those, only the [`ZERO_GRANULE`] pieces that are not
/// entirely zero are written. `dst` must therefore read as zeros wherever it is not written (a new image or a new
/// sparse file). When `size` is not a sector multiple, the last sector is copied whole: both devices must be at
/// least `size` rounded up to a sector long. `progress(done, total)` is called as the copy advances, with
/// `total == size`, and a last time with `done == total`. `dst` is flushed at the end.
///
/// # Errors
/// `InvalidArgument` when either device is shorter than `size` (rounded up to a sector); otherwise whatever
/// the map, the source or the destination report, after which `dst` holds part of the data.
pub fn convert(
    src: &dyn BlockDevice,
    map: &dyn AllocationMap,
    size: u64,
    dst: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let source = Source { device: src, map, size, base: None, watch: None };
    run(&source, &DeviceTarget(dst), &Options::default(), progress)
}
