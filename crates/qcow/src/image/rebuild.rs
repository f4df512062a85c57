//! Refcounts recomputed from the metadata and written as new refcount structures, for dirty images (lazy
//! refcounts after a crash). Comparing stored refcounts with the metadata (`check_on_connect`, runtime asserts,
//! trust before space is given back) is the checker's job (`crate::check`).
//!
//! The count array has one entry per host cluster of the file as it exists, so memory follows the file's real
//! size; a reference past the end of the file is an error, not an allocation.

use super::meta::be64;
use super::meta::Meta;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    feature, snapshot_table_size, BitmapsExtension, Extension, HostOffset, L1Entry, L2Kind, RefcountBlock,
};

/// QEMU's cap on the refcount table.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

struct Counts {
    counts: Vec<u32>,
    cluster_bits: u32,
}

impl Counts {
    fn add(&mut self, host: u64, what: &'static str, at: u64) -> Result<()> {
        let cluster = host >> self.cluster_bits;
        match usize::try_from(cluster).ok().and_then(|c| self.counts.get_mut(c)) {
            Some(n) => {
                *n = n.saturating_add(1);
                Ok(())
            }
            None => Err(Error::corrupt(what, at)),
        }
    }

    fn add_range(&mut self, start: u64, len: u64, what: &'static str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = 1u64 << self.cluster_bits;
        let mut c = start & !(cs - 1);
        while c < start.saturating_add(len) {
            self.add(c, what, start)?;
            c += cs;
        }
        Ok(())
    }
}

impl Meta {
    fn count_references(&mut self, dev: &dyn BlockDevice) -> Result<Counts> {
        let geo = self.geo;
        let mut counts = Counts { counts: vec![0; self.alloc.end_cluster() as usize], cluster_bits: geo.cluster_bits };
        counts.add(0, "header outside the file", 0)?;
        counts.add_range(self.header.l1_table_offset, self.l1_size() * 8, "L1 table outside the file")?;
        for l1_index in 0..self.l1_size() {
            let l1_at = self.header.l1_table_offset + l1_index * 8;
            if let Some(l2) = self.l1_entry(dev, l1_index)?.l2_offset() {
                self.count_l2(dev, &mut counts, l2, l1_at)?;
            }
        }
        self.count_snapshots(dev, &mut counts)?;
        if self.header.autoclear_features & feature::BITMAPS != 0 {
            self.count_bitmaps(dev, &mut counts)?;
        }
        Ok(counts)
    }

    fn count_l2(&mut self, dev: &dyn BlockDevice, counts: &mut Counts, l2: HostOffset, l1_at: u64) -> Result<()> {
        let geo = self.geo;
        counts.add(l2.0, "L2 table outside the file", l1_at)?;
        for index in 0..geo.l2_entries() {
            let at = l2.0 + index * geo.l2_entry_size();
            let entry = self.l2_entry(dev, l2, index)?;
            match entry.kind(&geo).map_err(|what| Error::corrupt(what, at))? {
                // Data in an external data file is not refcounted.
                L2Kind::Normal { .. } | L2Kind::Zero { host: Some(_) } if self.data_file_size.is_some() => {}
                L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => {
                    counts.add(host.0, "data cluster outside the file", at)?
                }
                L2Kind::Compressed { host, len } => {
                    counts.add_range(host.0, len, "compressed data outside the file")?
                }
                L2Kind::Zero { host: None } | L2Kind::Unallocated => {}
            }
        }
        Ok(())
    }

    /// Snapshot table, and every snapshot's L1 table and the tree below it (read from disk: snapshots are never
    /// modified, so the cache cannot hold a newer copy).
    fn count_snapshots(&mut self, dev: &dyn BlockDevice, counts: &mut Counts) -> Result<()> {
        let snapshots = self.snapshots(dev)?;
        if snapshots.is_empty() {
            return Ok(());
        }
        let table_len = snapshot_table_size(&snapshots);
        counts.add_range(self.header.snapshots_offset, table_len, "snapshot table outside the file")?;
        for snapshot in snapshots {
            let l1_bytes = u64::from(snapshot.l1_size) * 8;
            counts.add_range(snapshot.l1_table_offset, l1_bytes, "snapshot L1 table outside the file")?;
            let mut l1 = vec![0u8; l1_bytes.next_multiple_of(512) as usize];
            dev.read_at(snapshot.l1_table_offset, &mut l1)?;
            for (i, raw) in l1.chunks_exact(8).take(snapshot.l1_size as usize).enumerate() {
                let entry = L1Entry(be64(raw));
                let at = snapshot.l1_table_offset + i as u64 * 8;
                if entry.is_malformed(&self.geo) {
                    return Err(Error::corrupt("malformed snapshot L1 entry", at));
                }
                if let Some(l2) = entry.l2_offset() {
                    if l2
                        .0
                        .checked_add(self.geo.cluster_size())
                        .is_none_or(|e| e > self.alloc.end_cluster() * self.geo.cluster_size())
                    {
                        return Err(Error::corrupt("snapshot L1 entry points outside the file", at));
                    }
                    self.count_l2(dev, counts, l2, at)?;
                }
            }
        }
        Ok(())
    }

    /// Bitmap directory, bitmap tables and the bitmap data clusters they point at.
    fn count_bitmaps(&mut self, dev: &dyn BlockDevice, counts: &mut Counts) -> Result<()> {
        let Some(ext) = self.header.extension(Extension::BITMAPS) else { return Ok(()) };
        let ext = BitmapsExtension::parse(&ext.data).map_err(|_| Error::corrupt("malformed bitmaps extension", 0))?;
        counts.add_range(ext.directory_offset, ext.directory_size, "bitmap directory outside the file")?;
        for bitmap in self.bitmaps(dev)? {
            let bytes = u64::from(bitmap.table_size) * 8;
            counts.add_range(bitmap.table_offset, bytes, "bitmap table outside the file")?;
            let mut table = vec![0u8; bytes.next_multiple_of(512) as usize];
            dev.read_at(bitmap.table_offset, &mut table)?;
            for (i, raw) in table.chunks_exact(8).take(bitmap.table_size as usize).enumerate() {
                let data = be64(raw) & 0x00ff_ffff_ffff_fe00;
                if data != 0 {
                    counts.add(data, "bitmap data cluster outside the file", bitmap.table_offset + i as u64 * 8)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the refcount structures with new ones computed from the metadata, written past the end of the
    /// file; the old table and blocks simply become free space. Clears the dirty bit.
    pub fn rebuild_refcounts(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        let counts = self.counted_references(dev)?;
        self.write_refcounts(dev, counts, self.geo.refcount_order)
    }

    /// How many references each host cluster of the file has, counted from the metadata (every structure the
    /// header, the L1 trees, the snapshots and consistent bitmaps reach), with everything written back first.
    pub(super) fn counted_references(&mut self, dev: &dyn BlockDevice) -> Result<Vec<u32>> {
        self.writeback(dev)?;
        // The refcount structures about to be replaced may be stale: do not judge other metadata by them.
        self.overlap.enabled = false;
        let counted = self.count_references(dev);
        self.overlap.enabled = true;
        Ok(counted?.counts)
    }

    /// Writes `counts` (one per host cluster) as new refcount structures of `refcount_order` past the end of the
    /// file, counting themselves, flushes, then switches the header to them in one write (refcount table offset,
    /// its size, the refcount order and the cleared dirty bit all lie in its first sector) and flushes again. The
    /// old structures are then free: nothing counted refers to them. The refcounts are this engine's own
    /// afterwards, hence trusted.
    pub(super) fn write_refcounts(
        &mut self,
        dev: &dyn BlockDevice,
        mut counts: Vec<u32>,
        refcount_order: u32,
    ) -> Result<()> {
        let geo = crate::format::Geometry { refcount_order, ..self.geo };
        let cs = geo.cluster_size();
        let rbe = geo.refcount_block_entries();
        let start = self.alloc.end_cluster().max(counts.len() as u64);
        let (mut table_clusters, mut blocks) = (1u64, 0u64);
        loop {
            let total = start + table_clusters + blocks;
            let b = total.div_ceil(rbe);
            let t = (b * 8).div_ceil(cs);
            if b == blocks && t == table_clusters {
                break;
            }
            blocks = b;
            table_clusters = t;
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported { feature: "a refcount table larger than 8 MiB".into() });
        }
        let total = start + table_clusters + blocks;
        counts.resize(total as usize, 1);
        self.reserve_to(dev, total)?;
        let blocks_at = start + table_clusters;
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        let mut bytes = vec![0u8; cs as usize];
        for (b, chunk) in counts.chunks(rbe as usize).enumerate() {
            bytes.fill(0);
            let mut view = RefcountBlock::new(&mut bytes[..], refcount_order);
            for (i, &n) in chunk.iter().enumerate() {
                if !view.set(i as u64, u64::from(n)) {
                    return Err(Error::corrupt(
                        "cluster has more references than the refcount width can count",
                        (b as u64 * rbe + i as u64) * cs,
                    ));
                }
            }
            let offset = (blocks_at + b as u64) * cs;
            super::meta::write_meta(dev, offset, &bytes)?;
            if let Some(slot) = table.get_mut(b) {
                *slot = offset;
            }
        }
        let table_bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        super::meta::write_meta(dev, start * cs, &table_bytes)?;
        dev.flush()?;
        self.header.refcount_table_offset = start * cs;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.header.refcount_order = refcount_order;
        self.header.incompatible_features &= !feature::DIRTY;
        self.write_header(dev)?;
        dev.flush()?;
        self.geo = geo;
        self.reftable = table;
        self.overlap.reftable_replaced();
        self.reftable_dirty.clear();
        self.cache.clear_clean();
        self.alloc.set_hint(0);
        self.lazy_dirty = false;
        self.trust_own_refcounts();
        Ok(())
    }
}
