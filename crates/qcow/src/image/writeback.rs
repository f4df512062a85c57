//! Writing metadata back in crash-safe order, and the structural changes that must order their own writes:
//! growing the refcount table and flipping the dirty bit.
//!
//! Order of a writeback, with a device flush between a step that wrote something and the next one that writes:
//! 1. refcount blocks (so every increment is durable before any new reference),
//! 2. refcount-table clusters (a table entry never points at a block that is not on disk),
//! 3. L2 tables (data was written before its L2 entry was even set in the cache),
//! 4. L1 clusters and the header,
//! 5. deferred decrements, now that the references they drop are durably gone.
//!
//! With lazy refcounts and the dirty bit set on disk, steps 1 to 4 share one flush: the dirty bit already tells
//! every reader that refcounts must be rebuilt.

use super::cache::TableKind;
use super::meta::{write_meta, Meta};
use super::overlap::MetaKind;
use super::writeback_queue::{Copies, PieceCopy};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{feature, RefcountBlock};

impl Meta {
    fn write_dirty(&mut self, dev: &dyn BlockDevice, kind: TableKind) -> Result<bool> {
        let dirty = self.cache.dirty(kind);
        let own = match kind {
            TableKind::L1 => MetaKind::ActiveL1,
            TableKind::L2 => MetaKind::ActiveL2,
            TableKind::RefcountBlock => MetaKind::RefcountBlock,
        };
        for &offset in &dirty {
            // Tables reached through on-disk pointers may sit on other metadata: never write them there.
            self.check_meta_write(dev, offset, own)?;
            let len = match kind {
                // The L1 table may end inside its last cluster, and the file with it.
                TableKind::L1 => {
                    let end = self.header.l1_table_offset + self.l1_size() * 8;
                    end.saturating_sub(offset).min(self.geo.cluster_size()).next_multiple_of(512)
                }
                _ => self.cache.piece_len(kind),
            };
            if let Some(bytes) = self.cache.peek(offset).and_then(|b| b.get(..len as usize)) {
                write_meta(dev, offset, bytes)?;
            }
            self.cache.mark_clean(offset);
        }
        Ok(!dirty.is_empty())
    }

    fn write_reftable_clusters(&mut self, dev: &dyn BlockDevice) -> Result<bool> {
        let dirty = std::mem::take(&mut self.reftable_dirty);
        let per_cluster = (self.geo.cluster_size() / 8) as usize;
        for &index in &dirty {
            let offset = self.header.refcount_table_offset + index * self.geo.cluster_size();
            if let Err(e) = self.check_meta_write(dev, offset, MetaKind::RefcountTable) {
                self.reftable_dirty = dirty;
                return Err(e);
            }
            let bytes: Vec<u8> = self
                .reftable
                .iter()
                .skip(index as usize * per_cluster)
                .take(per_cluster)
                .flat_map(|e| e.to_be_bytes())
                .collect();
            write_meta(dev, offset, &bytes)?;
        }
        Ok(!dirty.is_empty())
    }

    /// The header as written: serialised, padded to whole sectors.
    fn header_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = self.header.serialize()?;
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        Ok(bytes)
    }

    /// Writes the header (cluster 0's header area) now.
    pub fn write_header(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        self.corruption.check()?;
        self.queue.wait_idle();
        write_meta(dev, 0, &self.header_bytes()?)?;
        self.header_dirty = false;
        Ok(())
    }

    /// Copies of the dirty pieces of one kind, each checked not to land on other metadata; L1 clusters are cut
    /// where the table ends (it may end inside its last cluster, and the file with it).
    fn piece_copies(&mut self, dev: &dyn BlockDevice, kind: TableKind) -> Result<Vec<PieceCopy>> {
        let own = match kind {
            TableKind::L1 => MetaKind::ActiveL1,
            TableKind::L2 => MetaKind::ActiveL2,
            TableKind::RefcountBlock => MetaKind::RefcountBlock,
        };
        let mut copies = self.cache.dirty_copies(kind);
        let l1_end = self.header.l1_table_offset.saturating_add(self.l1_size() * 8);
        for (offset, _, bytes) in &mut copies {
            self.check_meta_write(dev, *offset, own)?;
            if kind == TableKind::L1 {
                let len = l1_end.saturating_sub(*offset).min(self.geo.cluster_size()).next_multiple_of(512);
                let cut: Box<[u8]> = bytes.get(..len as usize).unwrap_or(&bytes[..]).into();
                *bytes = cut;
            }
        }
        Ok(copies)
    }

    /// Takes a consistent copy of the dirty metadata for a writeback outside the lock: every dirty piece, the
    /// changed refcount-table clusters, the header and the deferred decrements with `everything`, else the
    /// refcount blocks alone (what the decrements just changed). Answers `None` when nothing is dirty; otherwise
    /// the copies are marked in flight, and the caller writes them and then calls
    /// [`finish_copies`](Self::finish_copies). The caller holds the queue's turn.
    pub(super) fn take_copies(&mut self, dev: &dyn BlockDevice, everything: bool) -> Result<Option<Copies>> {
        self.corruption.check()?;
        let mut copies = Copies { strict: !self.lazy_dirty, ..Copies::default() };
        copies.refcount_blocks = self.piece_copies(dev, TableKind::RefcountBlock)?;
        if everything {
            copies.l2 = self.piece_copies(dev, TableKind::L2)?;
            copies.l1 = self.piece_copies(dev, TableKind::L1)?;
            if self.header_dirty {
                copies.header = Some(self.header_bytes()?);
            }
            let cs = self.geo.cluster_size();
            let per_cluster = (cs / 8) as usize;
            for index in self.reftable_dirty.iter().copied().collect::<Vec<_>>() {
                let offset = self.header.refcount_table_offset + index * cs;
                self.check_meta_write(dev, offset, MetaKind::RefcountTable)?;
                let start = usize::try_from(index).unwrap_or(usize::MAX).saturating_mul(per_cluster);
                let bytes: Vec<u8> =
                    self.reftable.iter().skip(start).take(per_cluster).flat_map(|e| e.to_be_bytes()).collect();
                copies.reftable.push((index, offset, bytes));
            }
            self.reftable_dirty.clear();
            copies.frees = self.alloc.take_frees();
        }
        if copies.is_empty() {
            return Ok(None);
        }
        self.queue.begin();
        Ok(Some(copies))
    }

    /// Records what a writeback outside the lock achieved: the pieces written and unchanged since are clean, and
    /// the decrements are applied once the references they drop are durably gone, answering the copies of the
    /// refcount blocks they changed, to be written the same way. After a failure everything not known to be
    /// written stays dirty and the decrements stay deferred.
    pub(super) fn finish_copies(
        &mut self,
        dev: &dyn BlockDevice,
        copies: Copies,
        written: Result<()>,
    ) -> Result<Option<Copies>> {
        if let Err(e) = written {
            self.reftable_dirty.extend(copies.reftable.iter().map(|r| r.0));
            self.alloc.restore_frees(copies.frees);
            return Err(e);
        }
        for (key, version, _) in copies.refcount_blocks.iter().chain(&copies.l2).chain(&copies.l1) {
            self.cache.mark_clean_if(*key, *version);
        }
        if let Some(header) = &copies.header {
            if self.header_dirty && self.header_bytes()? == *header {
                self.header_dirty = false;
            }
        }
        if copies.frees.is_empty() {
            self.cache.shrink();
            return Ok(None);
        }
        for cluster in copies.frees {
            self.adjust_refcount(dev, cluster, -1)?;
        }
        self.take_copies(dev, false)
    }

    /// Writes every dirty metadata cluster in crash-safe order and applies deferred decrements.
    ///
    /// A device flush separates each step from the next one that writes something; the last step's writes may
    /// still be unflushed on return (a caller that needs them durable flushes, as [`Image::flush`] does), which
    /// saves one flush per writeback.
    ///
    /// [`Image::flush`]: super::Image::flush
    pub fn writeback(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        // Once corruption was found nothing more is written (QEMU makes the node unusable): the image keeps the
        // state of its last writeback plus the corrupt bit, for a repair to start from.
        self.corruption.check()?;
        self.queue.wait_idle();
        let strict = !self.lazy_dirty;
        // Whether writes since the last flush must become durable before the next step writes.
        let mut unflushed = false;
        let barrier = |unflushed: &mut bool| -> Result<()> {
            if std::mem::take(unflushed) && strict {
                dev.flush()?;
            }
            Ok(())
        };
        unflushed |= self.write_dirty(dev, TableKind::RefcountBlock)?;
        if !self.reftable_dirty.is_empty() {
            barrier(&mut unflushed)?;
            unflushed |= self.write_reftable_clusters(dev)?;
        }
        if self.cache.has_dirty(TableKind::L2) || self.cache.has_dirty(TableKind::L1) || self.header_dirty {
            // Pointers come next: guest data written since the last flush must be durable before them even when
            // no refcount changed (see `writeback_queue`).
            unflushed = true;
        }
        if self.cache.has_dirty(TableKind::L2) {
            barrier(&mut unflushed)?;
            unflushed |= self.write_dirty(dev, TableKind::L2)?;
        }
        if self.cache.has_dirty(TableKind::L1) || self.header_dirty {
            barrier(&mut unflushed)?;
            self.write_dirty(dev, TableKind::L1)?;
            if self.header_dirty {
                self.write_header(dev)?;
            }
        }
        if !self.alloc.pending_frees().is_empty() {
            // The decrements below must not reach the disk before the references they drop are gone, and the
            // clusters they free must not be handed out while a read that mapped them before is still reading.
            dev.flush()?;
            self.read_grace.wait_for_readers();
            for cluster in self.alloc.take_frees() {
                self.adjust_refcount(dev, cluster, -1)?;
            }
            self.write_dirty(dev, TableKind::RefcountBlock)?;
        }
        self.cache.shrink();
        Ok(())
    }

    /// Sets the dirty bit on disk before the first deferred refcount update of a lazy-refcounts image.
    pub fn mark_dirty(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        if self.lazy_dirty || self.header.compatible_features & feature::LAZY_REFCOUNTS == 0 {
            return Ok(());
        }
        self.header.incompatible_features |= feature::DIRTY;
        self.write_header(dev)?;
        dev.flush()?;
        self.lazy_dirty = true;
        Ok(())
    }

    /// After a full writeback, clears the dirty bit of a lazy-refcounts image.
    pub fn mark_clean(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        if !self.lazy_dirty {
            return Ok(());
        }
        dev.flush()?;
        self.header.incompatible_features &= !feature::DIRTY;
        self.write_header(dev)?;
        self.lazy_dirty = false;
        Ok(())
    }

    /// Moves the refcount table to the end of the file with room for at least `min_entries` blocks. The new
    /// table and the new blocks that describe it are written and flushed before the header points at them; the
    /// old table is freed afterwards.
    pub fn grow_reftable(&mut self, dev: &dyn BlockDevice, min_entries: u64) -> Result<()> {
        self.writeback(dev)?;
        let cs = self.geo.cluster_size();
        let rbe = self.geo.refcount_block_entries();
        let old_len = self.reftable.len() as u64;
        let start = self.alloc.end_cluster();
        let mut entries = min_entries.max(old_len * 2).max(1);
        let (table_clusters, new_blocks) = loop {
            let table_clusters = (entries * 8).div_ceil(cs);
            // Blocks for the area [start, start + table + blocks) that the table does not yet have.
            let mut blocks = 0;
            let new_blocks = loop {
                let end = start + table_clusters + blocks;
                let missing: Vec<u64> = (start / rbe..=(end - 1) / rbe)
                    .filter(|b| self.reftable.get(*b as usize).is_none_or(|e| *e == 0))
                    .collect();
                if missing.len() as u64 == blocks {
                    break missing;
                }
                blocks = missing.len() as u64;
            };
            let needed = new_blocks.iter().max().map_or(0, |b| b + 1);
            if needed <= entries {
                break (table_clusters, new_blocks);
            }
            entries = needed;
        };
        let table_at = start;
        let blocks_at = start + table_clusters;
        let area_end = blocks_at + new_blocks.len() as u64;
        self.reserve_to(dev, area_end)?;
        let mut table = self.reftable.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        for (i, &block) in new_blocks.iter().enumerate() {
            let offset = (blocks_at + i as u64) * cs;
            if let Some(slot) = table.get_mut(block as usize) {
                *slot = offset;
            }
            let mut bytes = vec![0u8; cs as usize];
            let mut view = RefcountBlock::new(&mut bytes[..], self.geo.refcount_order);
            for cluster in (block * rbe).max(start)..((block + 1) * rbe).min(area_end) {
                view.set(cluster % rbe, 1);
            }
            write_meta(dev, offset, &bytes)?;
        }
        self.reftable = table;
        self.overlap.reftable_replaced();
        // Clusters of the area that existing blocks describe get their counts through the cache.
        for cluster in start..area_end {
            if new_blocks.contains(&(cluster / rbe)) {
                continue;
            }
            self.set_refcount(dev, cluster, 1)?;
        }
        self.write_dirty(dev, TableKind::RefcountBlock)?;
        let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        write_meta(dev, table_at * cs, &bytes)?;
        dev.flush()?;
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_at * cs;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.reftable_dirty.clear();
        self.write_header(dev)?;
        dev.flush()?;
        for c in 0..old_clusters {
            self.free_later(old_offset / cs + c);
        }
        Ok(())
    }
}
