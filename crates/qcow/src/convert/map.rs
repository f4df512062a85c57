//! Which byte ranges of a source may hold nonzero data: [`AllocationMap`] and its answers for qcow2 images
//! (their mapping), files (`SEEK_DATA`/`SEEK_HOLE`), sources that cannot tell ([`Whole`]) and overlays
//! ([`Union`] of the source's and the backing file's maps).

use std::os::unix::io::AsRawFd;

use crate::block::{BlockDevice, FileDevice};
use crate::error::{Error, Result};
use crate::image::{ExtentKind, Image};

/// Which parts of a source may hold nonzero data.
pub trait AllocationMap: Sync {
    /// The ranges, as `(offset, length)` in bytes, inside `offset..offset + len` that may hold nonzero data.
    /// Everything outside them reads as zeros. Reporting too much is always correct, only slower.
    ///
    /// # Errors
    /// Whatever the source reports when it cannot tell: `Io`, `Corrupt`, `Disconnected`.
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>>;
}

/// An allocation map that reports everything as data, for sources that cannot tell holes from data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Whole;

impl AllocationMap for Whole {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(if len == 0 { Vec::new() } else { vec![(offset, len)] })
    }
}

/// Appends `(start, len)` to `ranges`, merging it into the last range when they touch.
pub(super) fn push_range(ranges: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut() {
        if last.0.saturating_add(last.1) == start {
            last.1 = last.1.saturating_add(len);
            return;
        }
    }
    ranges.push((start, len));
}

/// Data and compressed clusters count as data; zero and unallocated ones do not.
impl<D: BlockDevice> AllocationMap for Image<D> {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut ranges = Vec::new();
        for extent in self.map(offset, len)? {
            match extent.kind {
                ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
                    push_range(&mut ranges, extent.guest.0, extent.len)
                }
                // Unallocated clusters show the backing file, which may hold data.
                ExtentKind::Unallocated if self.has_backing() => push_range(&mut ranges, extent.guest.0, extent.len),
                ExtentKind::Zero | ExtentKind::Unallocated => {}
            }
        }
        Ok(ranges)
    }
}

/// Where `lseek` with `whence` lands from `pos`: `Ok(Some(offset))`, `Ok(None)` for `ENXIO` (no data, or no
/// hole, at or after `pos`), or the operating system's error.
fn seek(file: &std::fs::File, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    // SAFETY: lseek only reads and moves the descriptor's file offset; the descriptor stays open for as long as
    // `file` is borrowed, and `FileDevice` never uses the file offset (all its I/O is positional).
    let result = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if result < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    // A non-negative off_t always fits in u64.
    Ok(Some(u64::try_from(result).unwrap_or(0)))
}

/// Holes as the file system reports them (`SEEK_DATA`/`SEEK_HOLE`). Where the file system cannot tell
/// (`EINVAL`), the rest of the range counts as data. Bytes past the end of the file read as zeros and are never
/// data.
impl AllocationMap for FileDevice {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len).min(self.len_bytes());
        let file = self.file();
        let mut ranges = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(file, pos, libc::SEEK_DATA) {
                Ok(Some(data)) => data,
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    push_range(&mut ranges, pos, end - pos);
                    break;
                }
                Err(e) => return Err(Error::io("seek data", pos, e)),
            };
            if data >= end {
                break;
            }
            let data = data.max(pos);
            let hole = match seek(file, data, libc::SEEK_HOLE) {
                Ok(Some(hole)) => hole,
                // The file shrank under us, or the file system cannot tell: count the rest as data.
                Ok(None) => end,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
                Err(e) => return Err(Error::io("seek hole", data, e)),
            };
            let hole = hole.clamp(data, end);
            if hole == data {
                // A hole at a data offset makes no sense; never loop on it.
                push_range(&mut ranges, data, end - data);
                break;
            }
            push_range(&mut ranges, data, hole - data);
            pos = hole;
        }
        Ok(ranges)
    }
}

/// Data wherever either map has data: what an overlay must look at, since a range that is a hole in the source
/// but data in the backing file must be written (as zeros) to hide it.
pub struct Union<'a>(pub &'a dyn AllocationMap, pub &'a dyn AllocationMap);

impl AllocationMap for Union<'_> {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut ranges = self.0.data_ranges(offset, len)?;
        ranges.extend(self.1.data_ranges(offset, len)?);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            let end = start.saturating_add(len);
            match merged.last_mut() {
                Some(last) if last.0.saturating_add(last.1) >= start => {
                    last.1 = end.max(last.0.saturating_add(last.1)) - last.0;
                }
                _ => merged.push((start, len)),
            }
        }
        Ok(merged)
    }
}
