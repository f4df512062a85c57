//! Walks over an L1 tree (an L1 table, its L2 tables and the clusters they name): the reference counting of
//! QEMU's `qcow2_update_snapshot_refcount`, and the COPIED flags that follow from it.
//!
//! A tree references each of its L2 tables once per L1 entry naming it, and each data cluster once per L2 entry
//! naming it, however many other trees share the L2 table; a compressed entry references every host cluster its
//! bytes touch. That is how refcounts are counted everywhere in this engine (`rebuild`, `check`), so raising or
//! lowering a tree by one adds or removes exactly one tree's worth.

use super::super::meta::{be64, Meta};
use super::{refused, SnapshotRefusal};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{L1Entry, L2Entry, L2Kind, Snapshot};

/// What a walk does with each host cluster the tree references.
type Visit<'a> = dyn FnMut(&mut Meta, &dyn BlockDevice, u64) -> Result<()> + 'a;

impl Meta {
    /// The active L1 table's entries, each validated.
    pub(super) fn active_l1(&mut self, dev: &dyn BlockDevice) -> Result<Vec<L1Entry>> {
        (0..self.l1_size()).map(|index| self.l1_entry(dev, index)).collect()
    }

    /// The L1 table of `snapshot`, read from disk and validated as QEMU validates it before using it: the
    /// pointer (aligned, at most 32 MiB, no overflow), the table inside the file, every entry free of reserved
    /// bits and pointing inside the file.
    pub(super) fn snapshot_l1(&mut self, dev: &dyn BlockDevice, snapshot: &Snapshot) -> Result<Vec<L1Entry>> {
        let cs = self.geo.cluster_size();
        let table = self.header.snapshots_offset;
        snapshot.validate(cs).map_err(|_| Error::corrupt("malformed snapshot L1 table pointer", table))?;
        let bytes = u64::from(snapshot.l1_size) * 8;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let offset = snapshot.l1_table_offset;
        let limit = self.alloc.end_cluster().saturating_mul(cs);
        if offset == 0 || offset.checked_add(bytes).is_none_or(|end| end > limit) {
            return Err(Error::corrupt("snapshot L1 table outside the file", offset));
        }
        // At most 32 MiB (validated above).
        let mut raw = vec![0u8; bytes.next_multiple_of(512) as usize];
        dev.read_at(offset, &mut raw)?;
        let mut entries = Vec::with_capacity(snapshot.l1_size as usize);
        for (i, chunk) in raw.chunks_exact(8).take(snapshot.l1_size as usize).enumerate() {
            let entry = L1Entry(be64(chunk));
            let at = offset + i as u64 * 8;
            if entry.is_malformed(&self.geo) {
                return Err(Error::corrupt("malformed snapshot L1 entry", at));
            }
            if entry.l2_offset().is_some_and(|l2| l2.0.checked_add(cs).is_none_or(|end| end > limit)) {
                return Err(Error::corrupt("snapshot L1 entry points outside the file", at));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Calls `visit` for the first `limit` host clusters the tree references, in a fixed order (L1 order; what
    /// each L2 table's entries name, then the table), and answers how many it visited.
    fn walk_references(
        &mut self,
        dev: &dyn BlockDevice,
        l1: &[L1Entry],
        limit: u64,
        visit: &mut Visit<'_>,
    ) -> Result<u64> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let mut done = 0u64;
        for l2 in l1.iter().filter_map(|e| e.l2_offset()) {
            self.check_reference(l2.0, l2.0)?;
            for index in 0..geo.l2_entries() {
                let at = l2.0 + index * geo.l2_entry_size();
                let entry = self.l2_entry(dev, l2, index)?;
                let (first, end) = match self.decode_l2(dev, entry, at)? {
                    L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => (host.0, host.0 + 1),
                    L2Kind::Compressed { host, len } => (host.0, host.0.saturating_add(len.max(1))),
                    L2Kind::Zero { host: None } | L2Kind::Unallocated => continue,
                };
                let mut cluster = first >> cb;
                while cluster << cb < end {
                    if done >= limit {
                        return Ok(done);
                    }
                    self.check_reference(cluster << cb, at)?;
                    visit(self, dev, cluster)?;
                    done += 1;
                    cluster += 1;
                }
            }
            // The table itself last, as QEMU does: lowered to zero it is freed and dropped from the cache, and
            // must not be read (and cached again) after that.
            if done >= limit {
                return Ok(done);
            }
            visit(self, dev, l2.0 >> cb)?;
            done += 1;
        }
        Ok(done)
    }

    /// A referenced cluster must lie inside the file: raising the refcount of one far past it would grow the
    /// refcount structures to describe space that does not exist.
    fn check_reference(&self, host: u64, at: u64) -> Result<()> {
        if host >> self.geo.cluster_bits >= self.alloc.end_cluster() {
            return Err(Error::corrupt("a table entry points past the end of the file", at));
        }
        Ok(())
    }

    /// Raises the refcount of everything the tree references by one. All or nothing: when a refcount would
    /// overflow its width (or the walk meets bad metadata), the raises already made are undone and the error
    /// returned.
    pub(super) fn raise_tree(&mut self, dev: &dyn BlockDevice, op: &'static str, l1: &[L1Entry]) -> Result<()> {
        let max = self.geo.refcount_max();
        let cb = self.geo.cluster_bits;
        let mut raised = 0u64;
        let result = self.walk_references(dev, l1, u64::MAX, &mut |m, dev, cluster| {
            let count = m.refcount(dev, cluster)?;
            if count >= max {
                return Err(refused(op, SnapshotRefusal::RefcountOverflow { offset: cluster << cb }));
            }
            m.set_refcount(dev, cluster, count + 1)?;
            raised += 1;
            Ok(())
        });
        if let Err(e) = result {
            // The raises stand for references that were never made: lowering them again at once is safe.
            let _ = self.walk_references(dev, l1, raised, &mut |m, dev, cluster| m.adjust_refcount(dev, cluster, -1));
            return Err(e);
        }
        Ok(())
    }

    /// Lowers the refcount of everything the tree references by one, freeing what drops to zero. Only once no
    /// durable structure reaches the tree any more.
    pub(super) fn lower_tree(&mut self, dev: &dyn BlockDevice, l1: &[L1Entry]) -> Result<()> {
        self.walk_references(dev, l1, u64::MAX, &mut |m, dev, cluster| {
            m.adjust_refcount(dev, cluster, -1)?;
            if m.cache.over_budget() {
                m.writeback(dev)?;
            }
            Ok(())
        })
        .map(|_| ())
    }

    /// Clusters just allocated for a table written straight to the device: no stale cached copy of what they
    /// held before may pass for it.
    pub(super) fn forget_cached(&mut self, offset: u64, entries: u64) {
        let cs = self.geo.cluster_size();
        if entries > 0 {
            for cluster in offset / cs..(offset + entries * 8).div_ceil(cs) {
                self.cache.remove(cluster * cs);
            }
        }
    }

    /// Lowers the refcount of every cluster of an L1 table of `entries` entries at `offset`.
    pub(super) fn free_l1_clusters(&mut self, dev: &dyn BlockDevice, offset: u64, entries: u64) -> Result<()> {
        if entries == 0 || offset == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        for cluster in offset / cs..(offset + entries * 8).div_ceil(cs) {
            self.adjust_refcount(dev, cluster, -1)?;
        }
        Ok(())
    }

    /// Clears the COPIED flag of every entry of the tree's L2 tables (they are, or are about to be, shared).
    pub(super) fn clear_copied_below(&mut self, dev: &dyn BlockDevice, l1: &[L1Entry]) -> Result<()> {
        let geo = self.geo;
        for l2 in l1.iter().filter_map(|e| e.l2_offset()) {
            for index in 0..geo.l2_entries() {
                let entry = self.l2_entry(dev, l2, index)?;
                if entry.is_copied() && !entry.is_compressed() {
                    self.set_l2_entry(dev, l2, index, entry.with_copied(false))?;
                }
            }
            if self.cache.over_budget() {
                self.writeback(dev)?;
            }
        }
        Ok(())
    }

    /// Sets every COPIED flag of the active tree from the refcounts: set exactly where the L2 table or the data
    /// cluster has a refcount of one (`qcow2_update_snapshot_refcount` with an addend of 0).
    pub(super) fn recompute_active_copied(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        for l1_index in 0..self.l1_size() {
            let l1 = self.l1_entry(dev, l1_index)?;
            let Some(l2) = l1.l2_offset() else { continue };
            for index in 0..geo.l2_entries() {
                let at = l2.0 + index * geo.l2_entry_size();
                let entry = self.l2_entry(dev, l2, index)?;
                let host = match self.decode_l2(dev, entry, at)? {
                    L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => host,
                    _ => continue,
                };
                let copied = self.refcount(dev, host.0 >> cb)? == 1;
                if entry.is_copied() != copied {
                    self.set_l2_entry(dev, l2, index, L2Entry::with_copied(entry, copied))?;
                }
            }
            let copied = self.refcount(dev, l2.0 >> cb)? == 1;
            if l1.is_copied() != copied {
                self.set_l1_entry(dev, l1_index, l1.with_copied(copied))?;
            }
            if self.cache.over_budget() {
                self.writeback(dev)?;
            }
        }
        Ok(())
    }
}
