//! Translating a guest range into extents: the one question every reader asks (read, map, convert).
//!
//! The answer is computed under the metadata lock from cached tables; the caller then does the data I/O with
//! the lock released.

use super::meta::Meta;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, HostOffset, L2Entry, L2Kind};

/// What backs a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data at a host offset; contiguous across the extent.
    Data {
        /// Host offset of the extent's first byte.
        host: HostOffset,
    },
    /// Reads as zeros because of the zero flag (possibly with preallocated clusters behind it).
    Zero,
    /// Not allocated: reads as zeros (or from a backing file, when there is one).
    Unallocated,
    /// Part of one compressed cluster.
    Compressed {
        /// First byte of the cluster's compressed data in the image file.
        host: HostOffset,
        /// Bytes of compressed data that may be read (whole sectors from `host`'s sector).
        len: u64,
    },
}

/// A guest range and what backs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub guest: GuestOffset,
    /// Length in bytes.
    pub len: u64,
    /// What backs it.
    pub kind: ExtentKind,
}

impl ExtentKind {
    /// Whether the guest reads zeros here (without a backing file).
    pub fn reads_zero(&self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

impl Extent {
    fn extends(&self, next: &Extent) -> bool {
        if self.guest.0 + self.len != next.guest.0 {
            return false;
        }
        match (self.kind, next.kind) {
            (ExtentKind::Data { host: a }, ExtentKind::Data { host: b }) => a.0 + self.len == b.0,
            (ExtentKind::Compressed { .. }, _) | (_, ExtentKind::Compressed { .. }) => false,
            (a, b) => a == b,
        }
    }
}

fn push(extents: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = extents.last_mut() {
        if last.extends(&e) {
            last.len += e.len;
            return;
        }
    }
    extents.push(e);
}

/// How a mapping looks its entries up: loading and validating what it needs under the exclusive lock, or from
/// cached pieces alone under the shared lock.
trait Lookup {
    /// What stops a mapping: an error, or (shared) anything that needs more than a lookup.
    type Stop;
    fn meta(&self) -> &Meta;
    /// The L2 table of L1 entry `l1_index` (known to be inside the L1 table), if it has one.
    fn l2_table(&mut self, l1_index: u64) -> std::result::Result<Option<HostOffset>, Self::Stop>;
    fn l2_entry(&mut self, l2: HostOffset, index: u64) -> std::result::Result<L2Entry, Self::Stop>;
    /// The kind of a standard entry stored at byte `at`.
    fn decode(&mut self, entry: L2Entry, at: u64) -> std::result::Result<L2Kind, Self::Stop>;
    /// Extents of part of one cluster of an image with extended L2 entries (see `Meta::map_subclusters`).
    fn subclusters(&mut self, extents: &mut Vec<Extent>, at: Subcluster) -> std::result::Result<(), Self::Stop>;
    /// An entry at byte `at` points outside the file.
    fn outside(&self, at: u64) -> Self::Stop;
}

/// Where an extended L2 entry's cluster is being mapped: the entry, its table and index, and the guest range.
#[derive(Clone, Copy)]
struct Subcluster {
    entry: L2Entry,
    l2: HostOffset,
    index: u64,
    pos: u64,
    chunk: u64,
}

/// Lookups under the exclusive lock: pieces are loaded, faults are errors (and signalled as QEMU signals them).
struct Loading<'a> {
    meta: &'a mut Meta,
    dev: &'a dyn BlockDevice,
}

impl Lookup for Loading<'_> {
    type Stop = Error;
    fn meta(&self) -> &Meta {
        self.meta
    }
    fn l2_table(&mut self, l1_index: u64) -> Result<Option<HostOffset>> {
        Ok(self.meta.l1_entry(self.dev, l1_index)?.l2_offset())
    }
    fn l2_entry(&mut self, l2: HostOffset, index: u64) -> Result<L2Entry> {
        self.meta.l2_entry(self.dev, l2, index)
    }
    fn decode(&mut self, entry: L2Entry, at: u64) -> Result<L2Kind> {
        self.meta.decode_l2(self.dev, entry, at)
    }
    fn subclusters(&mut self, extents: &mut Vec<Extent>, s: Subcluster) -> Result<()> {
        self.meta.map_subclusters(self.dev, extents, s.entry, s.l2, s.index, s.pos, s.chunk)
    }
    fn outside(&self, at: u64) -> Error {
        Error::corrupt("L2 entry points outside the file", at)
    }
}

/// Lookups under the shared lock, from cached pieces alone: anything else stops the mapping, for the exclusive
/// lock to redo.
struct Cached<'a>(&'a Meta);

impl Lookup for Cached<'_> {
    type Stop = ();
    fn meta(&self) -> &Meta {
        self.0
    }
    fn l2_table(&mut self, l1_index: u64) -> std::result::Result<Option<HostOffset>, ()> {
        Ok(self.0.l1_entry_cached(l1_index).ok_or(())?.l2_offset())
    }
    fn l2_entry(&mut self, l2: HostOffset, index: u64) -> std::result::Result<L2Entry, ()> {
        self.0.l2_entry_cached(l2, index).ok_or(())
    }
    fn decode(&mut self, entry: L2Entry, _at: u64) -> std::result::Result<L2Kind, ()> {
        entry.kind(&self.0.geo).map_err(|_| ())
    }
    fn subclusters(&mut self, _: &mut Vec<Extent>, _: Subcluster) -> std::result::Result<(), ()> {
        Err(())
    }
    fn outside(&self, _at: u64) {}
}

/// Extents covering `offset..offset + len`, merged where contiguous, looked up as `lookup` does.
fn extents<L: Lookup>(lookup: &mut L, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, L::Stop> {
    let geo = lookup.meta().geo;
    let cs = geo.cluster_size();
    let mut extents = Vec::new();
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let l1_index = geo.l1_index(GuestOffset(pos));
        let l2 = if l1_index < lookup.meta().l1_size() { lookup.l2_table(l1_index)? } else { None };
        let Some(l2) = l2 else {
            // The whole L2 span is unallocated: skip it in one step.
            let span_end = ((l1_index + 1) * geo.l2_span()).min(end);
            push(&mut extents, Extent { guest: GuestOffset(pos), len: span_end - pos, kind: ExtentKind::Unallocated });
            pos = span_end;
            continue;
        };
        let in_cluster = geo.offset_in_cluster(pos);
        let chunk = (cs - in_cluster).min(end - pos);
        let index = geo.l2_index(GuestOffset(pos));
        let entry = lookup.l2_entry(l2, index)?;
        let at = l2.0 + index * geo.l2_entry_size();
        if geo.extended_l2 && !entry.is_compressed() {
            lookup.subclusters(&mut extents, Subcluster { entry, l2, index, pos, chunk })?;
            pos += chunk;
            continue;
        }
        let data_file_size = lookup.meta().data_file_size;
        let kind = match lookup.decode(entry, at)? {
            // In an external data file, guest cluster 0 may map to host offset 0.
            L2Kind::Unallocated if data_file_size.is_some() && entry.is_copied() => {
                ExtentKind::Data { host: HostOffset(in_cluster) }
            }
            L2Kind::Unallocated => ExtentKind::Unallocated,
            L2Kind::Zero { .. } => ExtentKind::Zero,
            L2Kind::Normal { host, .. } => {
                let file = lookup.meta().alloc.end_cluster().saturating_mul(cs);
                let limit = data_file_size.unwrap_or(file).next_multiple_of(cs);
                if host.0.checked_add(cs).is_none_or(|e| e > limit) {
                    return Err(lookup.outside(at));
                }
                ExtentKind::Data { host: HostOffset(host.0 + in_cluster) }
            }
            L2Kind::Compressed { host, len } => ExtentKind::Compressed { host, len },
        };
        push(&mut extents, Extent { guest: GuestOffset(pos), len: chunk, kind });
        pos += chunk;
    }
    Ok(extents)
}

impl Meta {
    /// Extents covering `offset..offset + len`, merged where contiguous.
    pub fn map(&mut self, dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<Extent>> {
        extents(&mut Loading { meta: self, dev }, offset, len)
    }

    /// [`map`](Self::map) from cached pieces alone, under the shared lock: `None` when a piece is not cached or
    /// anything needs more than a lookup (extended L2 entries, an entry that is not simply valid), and the caller
    /// maps under the exclusive lock instead, which loads what is missing and reports what is wrong.
    pub fn map_cached(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        extents(&mut Cached(self), offset, len).ok()
    }
}

impl Meta {
    /// Extents for part of one cluster of an image with extended L2 entries: each 1/32 of the cluster is
    /// allocated (data at its place in the host cluster), reads as zeros, or is unallocated.
    #[allow(clippy::too_many_arguments)]
    fn map_subclusters(
        &mut self,
        dev: &dyn BlockDevice,
        extents: &mut Vec<Extent>,
        entry: L2Entry,
        l2: HostOffset,
        index: u64,
        pos: u64,
        chunk: u64,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let at = l2.0 + index * geo.l2_entry_size();
        let bitmap = self.l2_bitmap(dev, l2, index)?;
        let (alloc, zero) = (bitmap.allocated(), bitmap.zero());
        if entry.has_zero_flag() || entry.has_reserved_bits() {
            return Err(Error::corrupt("reserved bits set in extended L2 entry", at));
        }
        if bitmap.is_contradictory() {
            return Err(Error::corrupt("subcluster both allocated and zero in extended L2 entry", at));
        }
        let host = entry.host_cluster();
        match host {
            None if alloc != 0 => return Err(Error::corrupt("allocated subclusters without a host cluster", at)),
            Some(h) if !geo.is_aligned(h.0) => {
                return Err(self.signal_corruption(dev, "extended L2 entry offset is not cluster aligned", at))
            }
            Some(h)
                if h.0.checked_add(cs).is_none_or(|e| {
                    e > self.data_file_size.unwrap_or(self.alloc.end_cluster() * cs).next_multiple_of(cs)
                }) =>
            {
                return Err(Error::corrupt("extended L2 entry points outside the file", at))
            }
            _ => {}
        }
        let sub = cs / 32;
        let start = geo.offset_in_cluster(pos);
        let mut off = start;
        while off < start + chunk {
            let i = off / sub;
            let end = ((i + 1) * sub).min(start + chunk);
            let kind = match host {
                Some(h) if alloc >> i & 1 != 0 => ExtentKind::Data { host: HostOffset(h.0 + off) },
                _ if zero >> i & 1 != 0 => ExtentKind::Zero,
                _ => ExtentKind::Unallocated,
            };
            push(extents, Extent { guest: GuestOffset(pos - start + off), len: end - off, kind });
            off = end;
        }
        Ok(())
    }
}

impl<D: BlockDevice> Image<D> {
    /// What backs each part of the guest range `offset..offset + len` (clipped to the virtual size).
    ///
    /// # Errors
    /// `Corrupt` when a table on the way is malformed; `Io` when reading one fails.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.observe(self.map_guest(offset, len))
    }

    /// The host cluster each uncompressed L2 entry names for the guest clusters of `offset..offset + len`
    /// (clipped to the virtual size), in guest order, whatever the entry says about the data: a zero cluster may
    /// keep a preallocated cluster, and an extended entry keeps its cluster under unallocated subclusters, as
    /// `qemu-img map` reports them. Clusters without an L2 table are passed over a table at a time.
    ///
    /// # Errors
    /// As [`Image::map`].
    pub fn host_clusters(&self, offset: u64, len: u64) -> Result<Vec<(GuestOffset, HostOffset)>> {
        self.observe(self.host_clusters_of(offset, len))
    }

    fn host_clusters_of(&self, offset: u64, len: u64) -> Result<Vec<(GuestOffset, HostOffset)>> {
        self.check_connected()?;
        let geo = self.geo;
        let end = offset.saturating_add(len).min(self.virtual_size());
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let mut found = Vec::new();
        let mut pos = offset - geo.offset_in_cluster(offset);
        while pos < end {
            let guest = GuestOffset(pos);
            match m.l1_entry(&self.dev, geo.l1_index(guest))?.l2_offset() {
                None => pos = (pos / geo.l2_span()).saturating_add(1).saturating_mul(geo.l2_span()),
                Some(l2) => {
                    if let Some(host) = m.l2_entry(&self.dev, l2, geo.l2_index(guest))?.host_cluster() {
                        found.push((guest, host));
                    }
                    pos = pos.saturating_add(geo.cluster_size());
                }
            }
        }
        Ok(found)
    }

    /// How many host clusters of the file have a nonzero refcount, counted no further than `limit` (QEMU's test
    /// for a metadata-preallocated image compares this with what the file really allocates).
    ///
    /// # Errors
    /// `Corrupt` when a refcount block cannot be read as one; `Io` when reading it fails.
    pub fn clusters_in_use(&self, limit: u64) -> Result<u64> {
        self.check_connected()?;
        let clusters = self.dev.info().size_bytes().div_ceil(self.geo.cluster_size());
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let mut count = 0;
        for cluster in 0..clusters {
            if count >= limit {
                break;
            }
            count += u64::from(m.refcount(&self.dev, cluster)? != 0);
        }
        Ok(count)
    }

    fn map_guest(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_connected()?;
        let end = offset.saturating_add(len).min(self.virtual_size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        if let Some(extents) = self.meta_shared(super::lock_timing::LockUse::Lookup).map_cached(offset, end - offset) {
            return Ok(extents);
        }
        self.meta_for(super::lock_timing::LockUse::Lookup).map(&self.dev, offset, end - offset)
    }
}
