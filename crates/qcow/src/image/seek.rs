//! Seeking through the allocation map: the next region that may hold data, the next region that surely reads as
//! zeros, and the list of mapped extents. The map is walked a bounded window at a time, so a 1 PiB image with
//! a few clusters written costs what its metadata costs, never its virtual size in memory.

use super::{ExtentKind, Image};
use crate::block::BlockDevice;
use crate::error::Result;

/// Guest bytes mapped per step: 64 L2 tables' worth at 64 KiB clusters.
const WINDOW: u64 = 32 << 30;

/// What a guest range is, as `mapped` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappedKind {
    /// Data stored in this image (plain or compressed).
    Data,
    /// Described by this image as reading zeros (zero flag or zero subclusters).
    Zero,
}

/// One extent of [`Image::mapped_extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedExtent {
    /// Guest offset in bytes.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it holds.
    pub kind: MappedKind,
}

impl<D: BlockDevice> Image<D> {
    /// Whether an extent may hold data: stored in this image, or left to a backing file.
    fn may_hold_data(&self, kind: &ExtentKind) -> bool {
        match kind {
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => true,
            ExtentKind::Unallocated => self.backing.is_some(),
            ExtentKind::Zero => false,
        }
    }

    /// Walks the map from `from` and returns the first offset whose extent satisfies `want`.
    fn seek(&self, from: u64, want: &dyn Fn(&ExtentKind) -> bool) -> Result<Option<u64>> {
        let size = self.virtual_size();
        let mut pos = from;
        while pos < size {
            let len = WINDOW.min(size - pos);
            for extent in self.map(pos, len)? {
                if want(&extent.kind) {
                    return Ok(Some(extent.guest.0.max(from)));
                }
            }
            pos += len;
        }
        Ok(None)
    }

    /// The first guest offset at or after `from` that may hold data (allocated here, or falling through to a
    /// backing file); `None` when everything from there on reads as zeros.
    ///
    /// # Errors
    /// `Corrupt` for metadata that cannot be followed, `Io`, `Disconnected`.
    pub fn seek_mapped(&self, from: u64) -> Result<Option<u64>> {
        self.seek(from, &|k| self.may_hold_data(k))
    }

    /// The first guest offset at or after `from` that surely reads as zeros (zero clusters, and unallocated
    /// clusters without a backing file); `None` when there is none before the end of the disk.
    ///
    /// # Errors
    /// As [`seek_mapped`](Self::seek_mapped).
    pub fn seek_unmapped(&self, from: u64) -> Result<Option<u64>> {
        self.seek(from, &|k| !self.may_hold_data(k))
    }

    /// The extents this image itself maps, merged: data (plain or compressed) and, unless `ignore_zeroes`,
    /// ranges its metadata marks as zeros. Unallocated ranges are left out.
    ///
    /// # Errors
    /// As [`seek_mapped`](Self::seek_mapped).
    pub fn mapped_extents(&self, ignore_zeroes: bool) -> Result<Vec<MappedExtent>> {
        let size = self.virtual_size();
        let mut out: Vec<MappedExtent> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let len = WINDOW.min(size - pos);
            for extent in self.map(pos, len)? {
                let kind = match extent.kind {
                    ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => MappedKind::Data,
                    ExtentKind::Zero if !ignore_zeroes => MappedKind::Zero,
                    _ => continue,
                };
                match out.last_mut() {
                    Some(last) if last.kind == kind && last.start + last.length == extent.guest.0 => {
                        last.length += extent.len;
                    }
                    _ => out.push(MappedExtent { start: extent.guest.0, length: extent.len, kind }),
                }
            }
            pos += len;
        }
        Ok(out)
    }
}
