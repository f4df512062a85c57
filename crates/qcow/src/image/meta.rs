//! The metadata state behind the image's lock: header, refcount table, cached tables, and the allocator.
//!
//! Every accessor validates what it reads from disk before using it: table offsets must be cluster aligned and
//! inside the file, and entries must not set reserved bits. Refcount changes go to cached blocks and are written
//! back by [`writeback`](super::writeback); decrements wait in `pending_frees` until the references they
//! correspond to are durably gone.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::cache::{MetadataCache, TableKind};
use super::overlap::{Corruption, OverlapIndex};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
pub(crate) use crate::format::be64;
use crate::format::{
    Geometry, Header, HostOffset, L1Entry, L2Entry, RefcountBlock, RefcountTableEntry, SubclusterBitmap,
};

/// Mutable metadata of an open image.
pub struct Meta {
    /// The header as it is (or will be, after writeback) on disk.
    pub header: Header,
    /// The image geometry (never changes while open).
    pub geo: Geometry,
    /// The refcount table, whole: it is small (8 MiB at most) and read on every allocation.
    pub reftable: Vec<u64>,
    /// Indices of refcount-table clusters changed since the last writeback.
    pub reftable_dirty: BTreeSet<u64>,
    /// Cached L1 clusters, L2 tables and refcount blocks.
    pub cache: MetadataCache,
    /// Where new clusters go: the end of the file, the free hint, deferred decrements.
    pub alloc: super::allocator::Allocator,
    /// The header changed and must be written back.
    pub header_dirty: bool,
    /// Lazy refcounts are on and the dirty bit has been set on disk.
    pub lazy_dirty: bool,
    /// Size in bytes of the external data file, when guest data lives there instead of in the image file.
    pub data_file_size: Option<u64>,
    /// Where metadata lies, for refusing writes onto it.
    pub overlap: OverlapIndex,
    /// Corruption found while open (shared with the image, which refuses writes once it is set).
    pub corruption: Arc<Corruption>,
    /// Whether the image may be written (the corrupt bit is set on disk only then).
    pub writable: bool,
    /// The reclaimer's view of free and moving clusters.
    pub reclaim: super::reclaim::ClusterStates,
    /// Reads in flight: deferred decrements wait for the ones that may read what they free.
    pub read_grace: Arc<super::reclaim::ReadGrace>,
    /// Evidence that the refcounts can be trusted to say what is free ([`super::trust`]), once there is some.
    pub(super) trust: Option<super::trust::Trusted>,
    /// The writeback outside the lock: whoever writes metadata to the device waits for its copies first.
    pub(super) queue: Arc<super::writeback_queue::WritebackQueue>,
}

fn read_piece(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Box<[u8]>> {
    let mut buf = vec![0u8; len as usize].into_boxed_slice();
    dev.read_at(offset, &mut buf)?;
    Ok(buf)
}

/// Writes metadata bytes, growing the device first when they end past it (qemu-img leaves files that end
/// inside their last cluster).
pub fn write_meta(dev: &dyn BlockDevice, offset: u64, bytes: &[u8]) -> Result<()> {
    if offset.checked_add(bytes.len() as u64).is_none() {
        return Err(Error::corrupt("metadata offset overflows", offset));
    }
    crate::block::write_growing(dev, offset, bytes)
}

impl Meta {
    /// Bytes the device holds, rounded up to whole clusters: anything at or past this is outside the file.
    fn file_limit(&self) -> u64 {
        self.alloc.end_cluster().saturating_mul(self.geo.cluster_size())
    }

    fn check_table_offset(&self, offset: u64, what: &'static str, at: u64) -> Result<()> {
        if !self.geo.is_aligned(offset) || offset == 0 {
            return Err(Error::corrupt(what, at));
        }
        if offset.checked_add(self.geo.cluster_size()).is_none_or(|end| end > self.file_limit()) {
            return Err(Error::corrupt(what, at));
        }
        Ok(())
    }

    /// Makes sure the piece of the table at `cluster` that holds its byte `at` is cached, and answers that
    /// piece's key and the byte's place in it.
    fn load(&mut self, dev: &dyn BlockDevice, cluster: u64, at: u64, kind: TableKind) -> Result<(u64, usize)> {
        let (key, within) = self.cache.piece_of(kind, cluster, at);
        if self.cache.kind(key) != Some(kind) {
            self.check_table_load(dev, cluster, kind)?;
            if self.cache.cluster_kind(cluster).is_some_and(|k| k != kind) {
                return Err(Error::corrupt("table is already cached as another kind of table", cluster));
            }
            let bytes = read_piece(dev, key, self.cache.piece_len(kind))?;
            self.cache.insert(key, kind, bytes, false);
        }
        Ok((key, within))
    }

    /// The whole table at `cluster`, every piece loaded, as one buffer (with any unwritten change).
    pub fn table_bytes(&mut self, dev: &dyn BlockDevice, cluster: u64, kind: TableKind) -> Result<Box<[u8]>> {
        let cs = self.geo.cluster_size();
        let mut out = vec![0u8; cs as usize];
        let piece = self.cache.piece_len(kind);
        for (i, chunk) in out.chunks_mut(piece as usize).enumerate() {
            let (key, _) = self.load(dev, cluster, i as u64 * piece, kind)?;
            let bytes = self.cache.peek(key).ok_or_else(|| Error::corrupt("table vanished from the cache", key))?;
            if bytes.len() != chunk.len() {
                return Err(Error::corrupt("cached table piece has the wrong size", key));
            }
            chunk.copy_from_slice(bytes);
        }
        Ok(out.into_boxed_slice())
    }

    /// Loads every piece of the table at `cluster` into the cache (so that it can move as a whole).
    pub fn load_table(&mut self, dev: &dyn BlockDevice, cluster: u64, kind: TableKind) -> Result<()> {
        let piece = self.cache.piece_len(kind);
        let mut at = 0;
        while at < self.geo.cluster_size() {
            self.load(dev, cluster, at, kind)?;
            at += piece;
        }
        Ok(())
    }

    fn l1_slot(&self, index: u64) -> Result<(u64, usize)> {
        if index >= u64::from(self.header.l1_size) {
            return Err(Error::corrupt("L1 index beyond the L1 table", self.header.l1_table_offset));
        }
        let byte = self
            .header
            .l1_table_offset
            .checked_add(index * 8)
            .ok_or_else(|| Error::corrupt("L1 table offset overflows", self.header.l1_table_offset))?;
        let cluster = byte & !(self.geo.cluster_size() - 1);
        Ok((cluster, (byte - cluster) as usize))
    }

    /// Number of entries in the L1 table.
    pub fn l1_size(&self) -> u64 {
        u64::from(self.header.l1_size)
    }

    /// The L1 entry at `index`, validated.
    pub fn l1_entry(&mut self, dev: &dyn BlockDevice, index: u64) -> Result<L1Entry> {
        let (cluster, at) = self.l1_slot(index)?;
        let (key, at) = self.load(dev, cluster, at as u64, TableKind::L1)?;
        let raw = self.cache.get(key).and_then(|c| c.get(at..at + 8)).map(be64);
        let entry = L1Entry(raw.ok_or_else(|| Error::corrupt("L1 entry outside its cluster", cluster))?);
        if entry.is_malformed(&self.geo) {
            let at = cluster + at as u64;
            // QEMU marks the image corrupt for a misaligned L2 table offset at once; reserved bits fail the
            // request here, and `Image::observe` records them as it records any corruption met.
            if entry.l2_offset().is_some_and(|l2| !self.geo.is_aligned(l2.0)) {
                return Err(self.signal_corruption(dev, "L1 entry offset is not cluster aligned", at));
            }
            return Err(Error::corrupt("malformed L1 entry", at));
        }
        if let Some(l2) = entry.l2_offset() {
            self.check_table_offset(l2.0, "L1 entry points outside the file", cluster + at as u64)?;
        }
        Ok(entry)
    }

    /// The L1 entry at `index` from a cached piece, for a lookup under the shared lock: `None` when the piece is
    /// not cached or the entry is not simply valid (the exclusive lookup then loads it, or reports what is wrong).
    pub fn l1_entry_cached(&self, index: u64) -> Option<L1Entry> {
        let (cluster, at) = self.l1_slot(index).ok()?;
        let (key, within) = self.cache.piece_of(TableKind::L1, cluster, at as u64);
        let entry = L1Entry(self.cache.lookup_shared(key, TableKind::L1)?.get(within..within + 8).map(be64)?);
        if entry.is_malformed(&self.geo) {
            return None;
        }
        if let Some(l2) = entry.l2_offset() {
            self.check_table_offset(l2.0, "L1 entry points outside the file", cluster + at as u64).ok()?;
        }
        Some(entry)
    }

    /// The L2 entry at `index` of the table at `l2` from a cached piece, for a lookup under the shared lock.
    pub fn l2_entry_cached(&self, l2: HostOffset, index: u64) -> Option<L2Entry> {
        let at = self.l2_byte(l2, index).ok()?;
        let (key, within) = self.cache.piece_of(TableKind::L2, l2.0, at);
        self.cache.lookup_shared(key, TableKind::L2)?.get(within..within + 8).map(be64).map(L2Entry)
    }

    /// Stores the L1 entry at `index` (in the cache; written back later).
    pub fn set_l1_entry(&mut self, dev: &dyn BlockDevice, index: u64, entry: L1Entry) -> Result<()> {
        let (cluster, at) = self.l1_slot(index)?;
        let (key, at) = self.load(dev, cluster, at as u64, TableKind::L1)?;
        let slot = self.cache.get_mut(key).and_then(|c| c.get_mut(at..at + 8));
        let old = match slot {
            Some(s) => {
                let old = L1Entry(be64(s));
                s.copy_from_slice(&entry.0.to_be_bytes());
                old
            }
            None => return Err(Error::corrupt("L1 entry outside its cluster", cluster)),
        };
        self.overlap.l1_entry_changed(old, entry, self.geo.cluster_bits);
        Ok(())
    }

    /// Where entry `index` of an L2 table starts in it.
    fn l2_byte(&self, l2: HostOffset, index: u64) -> Result<u64> {
        if index >= self.geo.l2_entries() {
            return Err(Error::corrupt("L2 index outside its table", l2.0));
        }
        Ok(index * self.geo.l2_entry_size())
    }

    /// The L2 entry at `index` of the table at `l2`.
    pub fn l2_entry(&mut self, dev: &dyn BlockDevice, l2: HostOffset, index: u64) -> Result<L2Entry> {
        let at = self.l2_byte(l2, index)?;
        let (key, at) = self.load(dev, l2.0, at, TableKind::L2)?;
        let raw = self.cache.get(key).and_then(|c| c.get(at..at + 8)).map(be64);
        raw.map(L2Entry).ok_or_else(|| Error::corrupt("L2 index outside its table", l2.0))
    }

    /// The subcluster bitmap of extended L2 entry `index`.
    pub fn l2_bitmap(&mut self, dev: &dyn BlockDevice, l2: HostOffset, index: u64) -> Result<SubclusterBitmap> {
        let at = self.l2_byte(l2, index)? + 8;
        let (key, at) = self.load(dev, l2.0, at, TableKind::L2)?;
        let raw = self.cache.get(key).and_then(|c| c.get(at..at + 8)).map(be64);
        raw.map(SubclusterBitmap).ok_or_else(|| Error::corrupt("L2 index outside its table", l2.0))
    }

    /// Stores the subcluster bitmap of extended L2 entry `index` (in the cache).
    pub fn set_l2_bitmap(
        &mut self,
        dev: &dyn BlockDevice,
        l2: HostOffset,
        index: u64,
        bitmap: SubclusterBitmap,
    ) -> Result<()> {
        let at = self.l2_byte(l2, index)? + 8;
        let (key, at) = self.load(dev, l2.0, at, TableKind::L2)?;
        match self.cache.get_mut(key).and_then(|c| c.get_mut(at..at + 8)) {
            Some(s) => s.copy_from_slice(&bitmap.0.to_be_bytes()),
            None => return Err(Error::corrupt("L2 index outside its table", l2.0)),
        }
        Ok(())
    }

    /// Stores the L2 entry at `index` of the table at `l2` (in the cache).
    pub fn set_l2_entry(&mut self, dev: &dyn BlockDevice, l2: HostOffset, index: u64, entry: L2Entry) -> Result<()> {
        let at = self.l2_byte(l2, index)?;
        let (key, at) = self.load(dev, l2.0, at, TableKind::L2)?;
        match self.cache.get_mut(key).and_then(|c| c.get_mut(at..at + 8)) {
            Some(s) => s.copy_from_slice(&entry.0.to_be_bytes()),
            None => return Err(Error::corrupt("L2 index outside its table", l2.0)),
        }
        Ok(())
    }

    fn refblock_offset(&self, block: u64) -> Result<Option<u64>> {
        let Some(&raw) = usize::try_from(block).ok().and_then(|b| self.reftable.get(b)) else {
            return Ok(None);
        };
        let offset = RefcountTableEntry(raw).offset_field();
        if offset == 0 {
            return Ok(None);
        }
        let at = self.header.refcount_table_offset.saturating_add(block * 8);
        self.check_table_offset(offset, "refcount table entry points outside the file", at)?;
        Ok(Some(offset))
    }

    /// The refcount of a host cluster (0 when no refcount block covers it).
    pub fn refcount(&mut self, dev: &dyn BlockDevice, cluster: u64) -> Result<u64> {
        let rbe = self.geo.refcount_block_entries();
        let Some(block) = self.refblock_offset(cluster / rbe)? else {
            return Ok(0);
        };
        let (key, _) = self.load(dev, block, 0, TableKind::RefcountBlock)?;
        let order = self.geo.refcount_order;
        self.cache
            .get(key)
            .and_then(|b| RefcountBlock::new(b, order).get(cluster % rbe))
            .ok_or_else(|| Error::corrupt("refcount index outside its block", block))
    }

    /// Sets the refcount of a host cluster, creating its refcount block if needed.
    pub fn set_refcount(&mut self, dev: &dyn BlockDevice, cluster: u64, value: u64) -> Result<()> {
        let rbe = self.geo.refcount_block_entries();
        if value > self.geo.refcount_max() {
            return Err(Error::corrupt("refcount would overflow its width", cluster << self.geo.cluster_bits));
        }
        let block = match self.refblock_offset(cluster / rbe)? {
            Some(b) => b,
            None => self.create_refblock(dev, cluster / rbe)?,
        };
        let (key, _) = self.load(dev, block, 0, TableKind::RefcountBlock)?;
        let order = self.geo.refcount_order;
        let ok = self.cache.get_mut(key).is_some_and(|b| RefcountBlock::new(b, order).set(cluster % rbe, value));
        if !ok {
            return Err(Error::corrupt("refcount index outside its block", block));
        }
        if value > 0 {
            self.reclaim.taken(cluster);
        }
        Ok(())
    }

    /// Adds `delta` to a cluster's refcount.
    pub fn adjust_refcount(&mut self, dev: &dyn BlockDevice, cluster: u64, delta: i64) -> Result<()> {
        let old = self.refcount(dev, cluster)?;
        let new = old
            .checked_add_signed(delta)
            .ok_or_else(|| Error::corrupt("refcount would drop below zero", cluster << self.geo.cluster_bits))?;
        self.set_refcount(dev, cluster, new)?;
        if new == 0 {
            self.reclaim.freed(cluster);
            // A freed cluster may be reused for anything: compressed data must not be appended to it.
            self.alloc.freed(cluster, self.geo.cluster_bits);
            // A stale cached copy of a freed table must not pass for the cluster's next use.
            self.cache.remove(cluster << self.geo.cluster_bits);
        }
        Ok(())
    }

    /// Creates the refcount block for block index `block`, placed at the first cluster it describes, which is
    /// free because no block describes it yet. Returns the block's offset.
    pub(super) fn create_refblock(&mut self, dev: &dyn BlockDevice, block: u64) -> Result<u64> {
        let rbe = self.geo.refcount_block_entries();
        if block >= self.reftable.len() as u64 {
            self.grow_reftable(dev, block + 1)?;
            if let Some(existing) = self.refblock_offset(block)? {
                return Ok(existing);
            }
        }
        let cluster = block * rbe;
        if cluster == 0 {
            return Err(Error::corrupt("refcount block 0 is missing", self.header.refcount_table_offset));
        }
        let offset = cluster << self.geo.cluster_bits;
        let mut bytes = vec![0u8; self.geo.cluster_size() as usize].into_boxed_slice();
        RefcountBlock::new(&mut bytes[..], self.geo.refcount_order).set(0, 1);
        self.cache.insert(offset, TableKind::RefcountBlock, bytes, true);
        if let Some(slot) = self.reftable.get_mut(block as usize) {
            *slot = offset;
        }
        self.overlap.refblock_added(offset, self.geo.cluster_bits);
        self.reftable_dirty.insert(block * 8 / self.geo.cluster_size());
        self.reserve_to(dev, cluster + 1)?;
        Ok(offset)
    }

    /// Makes sure the device covers clusters below `end`.
    pub fn reserve_to(&mut self, dev: &dyn BlockDevice, end: u64) -> Result<()> {
        if self.alloc.reserve(end) {
            let bytes = end << self.geo.cluster_bits;
            // Grown with extents allocated as zeros where the device can, not as a hole: a direct write of part
            // of a cluster then converts the extent, where into a hole the file system would allocate 4 KiB at a
            // time (slower, and fragmented). Either way the new clusters read as zeros.
            dev.grow_to(bytes / 512)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free host clusters with refcount 1 and returns the first.
    pub fn alloc_clusters(&mut self, dev: &dyn BlockDevice, n: u64) -> Result<u64> {
        self.corruption.check()?;
        let rbe = self.geo.refcount_block_entries();
        let n = n.max(1);
        // A new refcount block sits on the first cluster it describes, so first fit can never find a run as
        // long as a block's span; long runs go past the end of the file instead.
        if n >= rbe / 2 {
            return self.alloc_at_end(dev, n);
        }
        if n == 1 {
            // Clusters the reclaimer has zeroed and flushed go first.
            while let Some(c) = self.reclaim.take_available() {
                if c < self.alloc.end_cluster()
                    && self.refblock_offset(c / rbe)?.is_some()
                    && self.refcount(dev, c)? == 0
                {
                    self.set_refcount(dev, c, 1)?;
                    return Ok(c);
                }
            }
        }
        loop {
            let start = self.alloc.hint();
            let mut first_free = None;
            let mut run_start = start;
            let mut run = 0;
            let mut c = start;
            while run < n {
                // Nothing in use lies past the end of the file, so a scan that gets there finds its run within
                // `n` clusters; one that does not is reading refcount blocks that claim space the file lacks, and
                // must not turn into a scan as long as the refcount table can describe.
                if c >= self.alloc.end_cluster().saturating_add(n) {
                    return Err(Error::corrupt(
                        "refcount blocks claim clusters past the end of the file are in use",
                        self.header.refcount_table_offset.saturating_add(c / rbe * 8),
                    ));
                }
                if self.refcount(dev, c)? == 0 && !self.reclaim.is_busy(c) {
                    first_free.get_or_insert(c);
                    if run == 0 {
                        run_start = c;
                    }
                    run += 1;
                } else {
                    run = 0;
                }
                c += 1;
            }
            let mut created = false;
            for block in run_start / rbe..=(run_start + n - 1) / rbe {
                if self.refblock_offset(block)?.is_none() {
                    self.create_refblock(dev, block)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for cluster in run_start..run_start + n {
                self.set_refcount(dev, cluster, 1)?;
            }
            self.alloc.set_hint(match first_free {
                Some(f) if f < run_start => f,
                _ => run_start + n,
            });
            self.reserve_to(dev, run_start + n)?;
            return Ok(run_start);
        }
    }

    /// Allocates `n` contiguous clusters past the end of the file. Refcount blocks the area needs are placed
    /// right after it and describe it and themselves.
    fn alloc_at_end(&mut self, dev: &dyn BlockDevice, n: u64) -> Result<u64> {
        let rbe = self.geo.refcount_block_entries();
        loop {
            let start = self.alloc.end_cluster();
            let mut missing: Vec<u64> = Vec::new();
            loop {
                let end = start + n + missing.len() as u64;
                let now: Vec<u64> = (start / rbe..=(end - 1) / rbe)
                    .filter(|b| {
                        self.reftable.get(*b as usize).is_none_or(|e| RefcountTableEntry(*e).block_offset().is_none())
                    })
                    .collect();
                if now.len() == missing.len() {
                    break;
                }
                missing = now;
            }
            if let Some(&last) = missing.last() {
                if last >= self.reftable.len() as u64 {
                    self.grow_reftable(dev, last + 1)?;
                    continue;
                }
            }
            let blocks_at = start + n;
            let end = blocks_at + missing.len() as u64;
            let cs = self.geo.cluster_size();
            for (i, &block) in missing.iter().enumerate() {
                let offset = (blocks_at + i as u64) * cs;
                let bytes = vec![0u8; cs as usize].into_boxed_slice();
                self.cache.insert(offset, TableKind::RefcountBlock, bytes, true);
                if let Some(slot) = self.reftable.get_mut(block as usize) {
                    *slot = offset;
                }
                self.overlap.refblock_added(offset, self.geo.cluster_bits);
                self.reftable_dirty.insert(block * 8 / cs);
            }
            self.reserve_to(dev, end)?;
            for cluster in start..end {
                self.set_refcount(dev, cluster, 1)?;
            }
            return Ok(start);
        }
    }

    /// Allocates `len` bytes (less than a cluster) for compressed data as QEMU does (`qcow2_alloc_bytes`): right
    /// after the previous compressed data, byte for byte, running on into the next cluster when that is the one
    /// allocated next, otherwise at the start of a new cluster. Every cluster the bytes touch gains one reference.
    pub fn alloc_bytes(&mut self, dev: &dyn BlockDevice, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let mut open = self.alloc.compressed_tail();
        if open != 0 {
            // A cluster freed since (or full of references) is not written into.
            let count = self.refcount(dev, open / cs)?;
            if count == 0 || count >= self.geo.refcount_max() {
                open = 0;
            }
        }
        let offset = if open != 0 && cs - open % cs >= len {
            self.adjust_refcount(dev, open / cs, 1)?;
            open
        } else {
            // The new cluster's refcount of one is this data's reference to it.
            let new = self.alloc_clusters(dev, 1)? * cs;
            if open != 0 && open.next_multiple_of(cs) == new {
                self.adjust_refcount(dev, open / cs, 1)?;
                open
            } else {
                new
            }
        };
        let end = offset + len;
        self.alloc.set_compressed_tail(if end % cs == 0 { 0 } else { end });
        Ok(offset)
    }

    /// Queues a refcount decrement for after the reference's removal is durable.
    pub fn free_later(&mut self, cluster: u64) {
        self.alloc.free_later(cluster);
    }
}
