//! Offline compaction: move the highest clusters of the file into the lowest holes, then truncate it.
//!
//! Movable are the clusters with exactly one referrer this code knows how to rewrite: data clusters and
//! preallocated zero clusters of the active L1 tree with refcount 1, L2 tables with refcount 1 reached from the
//! active L1 table, and refcount blocks. The L1 table and the refcount table move first, each into the lowest run
//! of free clusters below it that fits it whole. Everything else (the header, snapshot tables and trees,
//! compressed clusters, bitmaps, anything shared) stays where it is. Refcount blocks that describe nothing
//! but free clusters (and themselves) are dropped instead of moved.
//!
//! Free space is found by refcount, so nothing here runs before the refcounts are trusted (`super::trust`): a
//! damaged image is refused before its first write, never compacted into the space of clusters still in use.
//!
//! Each batch of moves keeps the durability rules: the destinations' refcounts are durable first, then the
//! copies, then the rewritten pointers, and only then are the sources freed. A crash (or a cancel) between any
//! two steps leaves a consistent image that at worst leaks the clusters of the batch in flight.

use std::collections::BTreeMap;

use super::meta::{write_meta, Meta};
use super::trust::Trusted;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{HostOffset, L1Entry, L2Kind, RefcountTableEntry};

/// Clusters moved per batch: a batch costs four device flushes.
const BATCH: usize = 512;

/// The one pointer to a movable cluster, by position rather than by address, so that it stays valid when the
/// table holding it moves too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Referrer {
    /// Entry `index` of the L2 table that active L1 entry `l1` points at.
    Data { l1: u64, index: u64 },
    /// Active L1 entry `l1`.
    L2Table { l1: u64 },
    /// Refcount table entry `index`.
    RefcountBlock { index: u64 },
}

/// How far a compaction has got, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactProgress {
    /// Clusters moved so far.
    pub moved: u64,
    /// Clusters the compaction planned to move.
    pub planned: u64,
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactSummary {
    /// Clusters copied to lower offsets.
    pub clusters_copied: u64,
    /// Pointers rewritten (L2 entries, L1 entries, refcount table entries).
    pub references_updated: u64,
    /// Empty refcount blocks dropped.
    pub refcount_blocks_dropped: u64,
    /// Tables the header names (the L1 table, the refcount table) moved lower.
    pub tables_moved: u64,
    /// File length before, in bytes.
    pub old_size: u64,
    /// File length after, in bytes.
    pub new_size: u64,
    /// Whether the progress callback asked to stop early (the image is consistent either way).
    pub cancelled: bool,
}

impl Meta {
    /// Every movable cluster in use, keyed by host cluster.
    fn movable_clusters(&mut self, dev: &dyn BlockDevice) -> Result<BTreeMap<u64, Referrer>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut movable = BTreeMap::new();
        for (index, &entry) in self.reftable.iter().enumerate() {
            let offset = RefcountTableEntry(entry).offset_field();
            if offset != 0 {
                movable.insert(offset / cs, Referrer::RefcountBlock { index: index as u64 });
            }
        }
        for l1 in 0..self.l1_size() {
            let entry = self.l1_entry(dev, l1)?;
            let Some(l2) = entry.l2_offset() else { continue };
            if !entry.is_copied() || self.refcount(dev, l2.0 / cs)? != 1 {
                continue; // shared with a snapshot: its entries are shared too
            }
            movable.insert(l2.0 / cs, Referrer::L2Table { l1 });
            if self.data_file_size.is_some() {
                continue; // guest data lives elsewhere
            }
            for index in 0..geo.l2_entries() {
                let entry = self.l2_entry(dev, l2, index)?;
                let at = l2.0 + index * geo.l2_entry_size();
                let host = match entry.kind(&geo).map_err(|what| Error::corrupt(what, at))? {
                    L2Kind::Normal { host, copied: true } => host,
                    L2Kind::Zero { host: Some(host) } if entry.is_copied() => host,
                    _ => continue,
                };
                if self.refcount(dev, host.0 / cs)? == 1 {
                    movable.insert(host.0 / cs, Referrer::Data { l1, index });
                }
            }
        }
        Ok(movable)
    }

    /// Whether refcount block `index` describes no cluster in use but possibly itself.
    fn refblock_is_empty(&mut self, dev: &dyn BlockDevice, index: u64, at: u64) -> Result<bool> {
        let per_block = self.geo.refcount_block_entries();
        for cluster in index * per_block..(index + 1) * per_block {
            if cluster != at && self.refcount(dev, cluster)? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Drops refcount blocks that describe only free clusters (and themselves): unlinked from the table first,
    /// their own cluster freed after, when another block counts it.
    fn drop_empty_refblocks(&mut self, dev: &dyn BlockDevice, _trusted: Trusted) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let per_block = self.geo.refcount_block_entries();
        let mut dropped = 0;
        // Block 0 describes the header: it is never empty.
        for index in 1..self.reftable.len() as u64 {
            let offset = self.reftable.get(index as usize).map_or(0, |e| RefcountTableEntry(*e).offset_field());
            if offset == 0 || !self.refblock_is_empty(dev, index, offset / cs)? {
                continue;
            }
            if let Some(slot) = self.reftable.get_mut(index as usize) {
                *slot = 0;
            }
            self.reftable_dirty.insert(index * 8 / cs);
            self.overlap.reftable_replaced();
            self.cache.remove(offset);
            if offset / cs / per_block != index {
                self.free_later(offset / cs);
            }
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The lowest run of `n` free clusters that ends at or below `limit` (and inside the file), each with an
    /// existing refcount block.
    fn lowest_free_run(&mut self, dev: &dyn BlockDevice, n: u64, limit: u64, _trusted: Trusted) -> Result<Option<u64>> {
        let per_block = self.geo.refcount_block_entries();
        // A table the header places far past the end must not make this a scan of its offset's length.
        let limit = limit.min(self.alloc.end_cluster());
        let (mut start, mut c) = (1, 1);
        while c < limit {
            if start + n > limit {
                return Ok(None);
            }
            let has_block = self
                .reftable
                .get((c / per_block) as usize)
                .is_some_and(|e| RefcountTableEntry(*e).block_offset().is_some());
            if has_block && self.refcount(dev, c)? == 0 && !self.reclaim.is_busy(c) {
                if c + 1 - start == n {
                    return Ok(Some(start));
                }
            } else {
                start = c + 1;
            }
            c += 1;
        }
        Ok(None)
    }

    /// Moves a table the header points at (the L1 or the refcount table: `bytes`, `clusters` long, now at
    /// cluster `at`) into the lowest free run below it, as growing moves it: the new clusters' refcounts are
    /// durable, then the copy, then the header names it, then the old clusters are freed. Returns the new
    /// cluster, or `None` when no run below it is free.
    fn lower_table(
        &mut self,
        dev: &dyn BlockDevice,
        bytes: &[u8],
        at: u64,
        clusters: u64,
        trusted: Trusted,
    ) -> Result<Option<u64>> {
        let Some(start) = self.lowest_free_run(dev, clusters, at, trusted)? else { return Ok(None) };
        for cluster in start..start + clusters {
            self.set_refcount(dev, cluster, 1)?;
        }
        self.writeback(dev)?;
        write_meta(dev, start * self.geo.cluster_size(), bytes)?;
        dev.flush()?;
        Ok(Some(start))
    }

    /// Moves the L1 table and the refcount table down into free runs below them, where there are any.
    /// Returns how many tables moved.
    fn lower_tables(&mut self, dev: &dyn BlockDevice, trusted: Trusted) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let mut moved = 0;
        let l1_clusters = self.geo.clusters_for(self.l1_size() * 8);
        if l1_clusters > 0 {
            let mut bytes = vec![0u8; (l1_clusters * cs) as usize];
            for (index, slot) in (0..self.l1_size()).zip(bytes.chunks_exact_mut(8)) {
                slot.copy_from_slice(&self.l1_entry(dev, index)?.0.to_be_bytes());
            }
            let old = self.header.l1_table_offset;
            if let Some(start) = self.lower_table(dev, &bytes, old / cs, l1_clusters, trusted)? {
                for c in 0..l1_clusters {
                    self.cache.remove(old + c * cs);
                }
                self.header.l1_table_offset = start * cs;
                self.write_header(dev)?;
                dev.flush()?;
                (0..l1_clusters).for_each(|c| self.free_later(old / cs + c));
                moved += 1;
            }
        }
        let rt_clusters = u64::from(self.header.refcount_table_clusters);
        let old = self.header.refcount_table_offset;
        let bytes = |table: &[u64]| -> Vec<u8> {
            let mut b: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            b.resize((rt_clusters * cs) as usize, 0);
            b
        };
        // The table's bytes are taken after the run's refcounts are set, which may create nothing (the run's
        // blocks exist) but may change what a block holds, never the table itself.
        let table = bytes(&self.reftable);
        if let Some(start) = self.lower_table(dev, &table, old / cs, rt_clusters, trusted)? {
            if bytes(&self.reftable) != table {
                return Err(Error::corrupt("refcount table changed while it was moved", old));
            }
            self.header.refcount_table_offset = start * cs;
            self.reftable_dirty.clear();
            self.overlap.reftable_replaced();
            self.write_header(dev)?;
            dev.flush()?;
            (0..rt_clusters).for_each(|c| self.free_later(old / cs + c));
            moved += 1;
        }
        Ok(moved)
    }

    /// Pairs the highest movable clusters with the lowest free clusters below them, creating the refcount blocks
    /// of free ranges that have none (inside the current table, so the table never grows).
    fn plan_moves(
        &mut self,
        dev: &dyn BlockDevice,
        movable: &BTreeMap<u64, Referrer>,
        _trusted: Trusted,
    ) -> Result<Vec<(u64, u64)>> {
        let per_block = self.geo.refcount_block_entries();
        let mut moves = Vec::new();
        let mut low = 1;
        for (&high, _) in movable.iter().rev() {
            while low < high {
                let block = low / per_block;
                let has_block =
                    self.reftable.get(block as usize).is_some_and(|e| RefcountTableEntry(*e).block_offset().is_some());
                if !has_block && block < self.reftable.len() as u64 && !self.reclaim.is_busy(block * per_block) {
                    // Free space no block describes (dropped, or never needed): a block on its first cluster
                    // makes the rest of it a destination. Unused, it is dropped again at the end.
                    self.create_refblock(dev, block)?;
                    continue;
                }
                if has_block
                    && self.refcount(dev, low)? == 0
                    && !movable.contains_key(&low)
                    && !self.reclaim.is_busy(low)
                {
                    break;
                }
                low += 1;
            }
            if low >= high {
                break;
            }
            moves.push((high, low));
            low += 1;
        }
        Ok(moves)
    }

    /// Rewrites the pointer to a moved cluster.
    pub(super) fn repoint(&mut self, dev: &dyn BlockDevice, referrer: Referrer, to: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        match referrer {
            Referrer::Data { l1, index } => {
                let l2 = self.l1_entry(dev, l1)?.l2_offset().ok_or_else(|| {
                    Error::corrupt("L2 table vanished during compaction", self.header.l1_table_offset)
                })?;
                let old = self.l2_entry(dev, l2, index)?;
                let entry = old.with_host(HostOffset(to * cs));
                self.set_l2_entry(dev, l2, index, entry)?;
            }
            Referrer::L2Table { l1 } => self.set_l1_entry(dev, l1, L1Entry::new(HostOffset(to * cs)))?,
            Referrer::RefcountBlock { index } => {
                if let Some(slot) = self.reftable.get_mut(index as usize) {
                    *slot = to * cs;
                }
                self.reftable_dirty.insert(index * 8 / cs);
                self.overlap.reftable_replaced();
            }
        }
        Ok(())
    }
}

impl<D: BlockDevice> Image<D> {
    /// Copies each source cluster to its destination and makes the copies durable. Tables leave the cache, so
    /// that later changes load them from their new place.
    fn copy_clusters(&self, m: &mut Meta, moves: &[(u64, u64, Referrer)]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        for &(from, to, _) in moves {
            self.dev.read_at(from * cs, &mut buf)?;
            self.dev.write_at(to * cs, &buf)?;
            // Neither place may be served from the cache any more: the source is going, and the destination
            // may still be cached as whatever table it held before it was freed.
            m.cache.remove(from * cs);
            m.cache.remove(to * cs);
        }
        self.dev.flush()
    }

    /// Moves clusters from the end of the file into holes nearer its start, then truncates the file. Guest I/O
    /// waits while it runs. `progress` is called after every batch; returning `false` stops early, leaving a
    /// consistent (and already partly compacted) image.
    ///
    /// Free space is found by refcount, so the refcounts are judged first (a check of the whole metadata, unless
    /// this session has shown them trustworthy already): an image whose refcounts cannot be trusted is refused
    /// before anything is written.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Untrusted` (nothing was changed: repair the image first), `Corrupt` for
    /// metadata that cannot be followed, `Io`.
    pub fn compact(&self, progress: &mut dyn FnMut(CompactProgress) -> bool) -> Result<CompactSummary> {
        self.observe(self.compact_offline(progress))
    }

    fn compact_offline(&self, progress: &mut dyn FnMut(CompactProgress) -> bool) -> Result<CompactSummary> {
        self.check_writable("compact")?;
        let _offline = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size();
        let mut summary = CompactSummary { old_size: self.dev.info().size_bytes(), ..CompactSummary::default() };
        let mut m = self.meta();
        let trusted = m.establish_trust(&self.dev, "compact")?;
        m.mark_dirty(&self.dev)?;
        m.writeback(&self.dev)?;
        summary.refcount_blocks_dropped = m.drop_empty_refblocks(&self.dev, trusted)?;
        m.writeback(&self.dev)?;
        // The tables the header names take the lowest runs that fit them, before data fills the holes.
        summary.tables_moved = m.lower_tables(&self.dev, trusted)?;
        m.writeback(&self.dev)?;
        let movable = m.movable_clusters(&self.dev)?;
        let moves = m.plan_moves(&self.dev, &movable, trusted)?;
        let planned = moves.len() as u64;
        for batch in moves.chunks(BATCH) {
            let referrer = |from: u64| {
                movable.get(&from).copied().ok_or_else(|| Error::corrupt("moved cluster lost its referrer", from * cs))
            };
            // The destinations are taken, durably.
            for &(_, to) in batch {
                m.set_refcount(&self.dev, to, 1)?;
            }
            m.writeback(&self.dev)?;
            // Data first: its pointers live in L2 tables that may move below, which must copy the new pointers.
            // Tables second: after the writeback that follows the data, their bytes on disk are current.
            for tables in [false, true] {
                let part: Vec<(u64, u64, Referrer)> = batch
                    .iter()
                    .map(|&(from, to)| Ok((from, to, referrer(from)?)))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .filter(|&(_, _, r)| matches!(r, Referrer::Data { .. }) != tables)
                    .collect();
                if part.is_empty() {
                    continue;
                }
                self.copy_clusters(&mut m, &part)?;
                for &(from, to, r) in &part {
                    m.repoint(&self.dev, r, to)?;
                    m.free_later(from);
                }
                // Pointers durable, then the sources freed: the order writeback keeps.
                m.writeback(&self.dev)?;
            }
            summary.clusters_copied += batch.len() as u64;
            summary.references_updated += batch.len() as u64;
            if !progress(CompactProgress { moved: summary.clusters_copied, planned }) {
                summary.cancelled = true;
                break;
            }
        }
        summary.refcount_blocks_dropped += m.drop_empty_refblocks(&self.dev, trusted)?;
        m.writeback(&self.dev)?;
        m.trim_file(&self.dev, trusted)?;
        // The L1 table is written only up to its last sector, so a file that ends with it may end there too,
        // as a fresh image does.
        let l1_end = (m.header.l1_table_offset + m.l1_size() * 8).next_multiple_of(512);
        let file = self.dev.info().size_bytes();
        if m.l1_size() > 0 && l1_end < file && l1_end > file - cs.min(file) {
            self.dev.resize(l1_end / 512)?;
        }
        m.mark_clean(&self.dev)?;
        self.dev.flush()?;
        summary.new_size = self.dev.info().size_bytes();
        Ok(summary)
    }
}
