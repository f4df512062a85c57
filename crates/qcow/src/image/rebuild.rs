//! Refcounts recomputed from the metadata and written as new refcount structures, for dirty images (lazy
//! refcounts after a crash). The references are counted by the checker's walk (`crate::check::references`), the
//! one walk over the metadata; comparing stored refcounts with the metadata (`check_on_connect`, runtime asserts,
//! trust before space is given back) is the checker's job too.
//!
//! The counts cover every host cluster of the file as it exists, kept in pages where something is referenced
//! (`crate::check::Paged`), so memory follows what the metadata references, not the file's length; a reference
//! past the end of the file is an error, not an allocation.

use super::meta::Meta;
use crate::block::BlockDevice;
use crate::check::Paged;
use crate::error::{Error, Result};
use crate::format::{feature, RefcountBlock, RefcountSizing};

/// QEMU's cap on the refcount table.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

impl Meta {
    /// Replaces the refcount structures with new ones computed from the metadata, written past the end of the
    /// file; the old table and blocks simply become free space. Clears the dirty bit.
    pub fn rebuild_refcounts(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        let counts = self.counted_references(dev)?;
        self.write_refcounts(dev, counts, self.geo.refcount_order)
    }

    /// How many references each host cluster of the file has, counted from the metadata (every structure the
    /// header, the L1 trees, the snapshots and consistent bitmaps reach), with everything written back first.
    pub(super) fn counted_references(&mut self, dev: &dyn BlockDevice) -> Result<Paged<u32>> {
        // The walk reads the device: what the cache holds must be there first.
        self.writeback(dev)?;
        crate::check::references(dev)
    }

    /// Writes `counts` (one per host cluster) as new refcount structures of `refcount_order` past the end of the
    /// file, counting themselves, flushes, then switches the header to them in one write (refcount table offset,
    /// its size, the refcount order and the cleared dirty bit all lie in its first sector) and flushes again. The
    /// old structures are then free: nothing counted refers to them. The refcounts are this engine's own
    /// afterwards, hence trusted.
    pub(super) fn write_refcounts(
        &mut self,
        dev: &dyn BlockDevice,
        counts: Paged<u32>,
        refcount_order: u32,
    ) -> Result<()> {
        let geo = crate::format::Geometry { refcount_order, ..self.geo };
        let cs = geo.cluster_size();
        let rbe = geo.refcount_block_entries();
        let counted = counts.len();
        let start = self.alloc.end_cluster().max(counted);
        let RefcountSizing { blocks, table_clusters } = RefcountSizing::for_clusters(start, &geo);
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported { feature: "a refcount table larger than 8 MiB".into() });
        }
        let total = start + table_clusters + blocks;
        self.reserve_to(dev, total)?;
        let blocks_at = start + table_clusters;
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        let mut bytes = vec![0u8; cs as usize];
        for b in 0..total.div_ceil(rbe) {
            bytes.fill(0);
            let mut view = RefcountBlock::new(&mut bytes[..], refcount_order);
            let first = b * rbe;
            for cluster in first..(first + rbe).min(total) {
                // Past what was counted: clusters up to the allocator's end, and the new table and blocks.
                let n = if cluster < counted { u64::from(counts.get(cluster)) } else { 1 };
                if !view.set(cluster - first, n) {
                    return Err(Error::corrupt(
                        "cluster has more references than the refcount width can count",
                        cluster * cs,
                    ));
                }
            }
            let offset = (blocks_at + b) * cs;
            super::meta::write_meta(dev, offset, &bytes)?;
            if let Some(slot) = usize::try_from(b).ok().and_then(|b| table.get_mut(b)) {
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
