//! Refcount blocks: one cluster of packed reference counts, 1 to 64 bits each.
//!
//! Widths of 8 bits and more are big-endian; 1-, 2- and 4-bit counts are packed starting from the least
//! significant bits of each byte, as QEMU packs them.

use super::geometry::Geometry;

/// The refcount structures that count a set of clusters and themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountSizing {
    /// Refcount blocks.
    pub blocks: u64,
    /// Clusters of refcount table.
    pub table_clusters: u64,
}

impl RefcountSizing {
    /// The fewest refcount blocks and refcount-table clusters that describe `clusters` clusters plus every
    /// cluster they take themselves (as `qcow2_refcount_metadata_size` computes it for a refcount table and
    /// blocks placed after the clusters). Zero clusters need nothing.
    pub fn for_clusters(clusters: u64, geometry: &Geometry) -> Self {
        let per_block = geometry.refcount_block_entries().max(1);
        let per_table_cluster = (geometry.cluster_size() / 8).max(1);
        let mut sizing = RefcountSizing { blocks: 0, table_clusters: 0 };
        // Both counts only grow from zero, so this stops at the least fixed point: at most a handful of rounds.
        loop {
            let covered = clusters.saturating_add(sizing.blocks).saturating_add(sizing.table_clusters);
            let blocks = covered.div_ceil(per_block);
            let next = RefcountSizing { blocks, table_clusters: blocks.div_ceil(per_table_cluster) };
            if next == sizing {
                return sizing;
            }
            sizing = next;
        }
    }

    /// Clusters the refcount structures take.
    pub fn clusters(&self) -> u64 {
        self.blocks.saturating_add(self.table_clusters)
    }
}

/// A view of a refcount block's bytes at a given width.
pub struct RefcountBlock<B> {
    bytes: B,
    order: u32,
}

impl<B: AsRef<[u8]>> RefcountBlock<B> {
    /// Views `bytes` as refcounts of `1 << order` bits.
    pub fn new(bytes: B, order: u32) -> Self {
        RefcountBlock { bytes, order: order.min(6) }
    }

    /// Number of refcounts in the block.
    pub fn len(&self) -> u64 {
        ((self.bytes.as_ref().len() as u64) * 8) >> self.order
    }

    /// Whether the block holds no refcounts at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The refcount at `index`, or `None` past the end.
    pub fn get(&self, index: u64) -> Option<u64> {
        let bytes = self.bytes.as_ref();
        let bits = 1u64 << self.order;
        if bits < 8 {
            let per_byte = 8 / bits;
            let byte = *bytes.get(usize::try_from(index / per_byte).ok()?)?;
            let shift = (index % per_byte) * bits;
            Some(u64::from((byte >> shift) & ((1u8 << bits) - 1)))
        } else {
            let width = (bits / 8) as usize;
            let start = usize::try_from(index).ok()?.checked_mul(width)?;
            let raw = bytes.get(start..start.checked_add(width)?)?;
            Some(raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        }
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> RefcountBlock<B> {
    /// Stores `value` at `index`. Returns `false` (changing nothing) when the index is out of range or the value
    /// does not fit the width.
    pub fn set(&mut self, index: u64, value: u64) -> bool {
        let order = self.order;
        let bits = 1u64 << order;
        if bits < 64 && value >> bits != 0 {
            return false;
        }
        let bytes = self.bytes.as_mut();
        if bits < 8 {
            let per_byte = 8 / bits;
            let Some(byte) = usize::try_from(index / per_byte).ok().and_then(|i| bytes.get_mut(i)) else {
                return false;
            };
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            true
        } else {
            let width = (bits / 8) as usize;
            let Some(start) = usize::try_from(index).ok().and_then(|i| i.checked_mul(width)) else {
                return false;
            };
            let Some(raw) = start.checked_add(width).and_then(|end| bytes.get_mut(start..end)) else {
                return false;
            };
            let be = value.to_be_bytes();
            raw.copy_from_slice(be.get(8 - width..).unwrap_or(&[]));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_counts_itself() {
        let g = Geometry { cluster_bits: 16, refcount_order: 4, extended_l2: false };
        assert_eq!(RefcountSizing::for_clusters(0, &g), RefcountSizing { blocks: 0, table_clusters: 0 });
        assert_eq!(RefcountSizing::for_clusters(3, &g), RefcountSizing { blocks: 1, table_clusters: 1 });
        // 32768 refcounts per block: the structures' own two clusters spill into a second block.
        assert_eq!(RefcountSizing::for_clusters(32767, &g), RefcountSizing { blocks: 2, table_clusters: 1 });
        let small = Geometry { cluster_bits: 9, refcount_order: 6, extended_l2: false };
        let s = RefcountSizing::for_clusters(10_000, &small);
        assert!(s.blocks * 64 >= 10_000 + s.clusters() && s.table_clusters * 64 >= s.blocks);
    }

    #[test]
    fn every_width_stores_its_maximum_and_neighbours_survive() {
        for order in 0..=6u32 {
            let mut block = RefcountBlock::new(vec![0u8; 512], order);
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            let n = block.len();
            assert_eq!(n, 4096 >> order);
            for i in 0..n {
                assert!(block.set(i, if i % 3 == 0 { max } else { i % 2 }));
            }
            for i in 0..n {
                assert_eq!(block.get(i), Some(if i % 3 == 0 { max } else { i % 2 }), "order {order} index {i}");
            }
            assert_eq!(block.get(n), None);
            assert!(!block.set(n, 1));
            if order < 6 {
                assert!(!block.set(0, max + 1));
            }
        }
    }

    #[test]
    fn narrow_widths_pack_from_the_low_bits() {
        let mut block = RefcountBlock::new(vec![0u8; 1], 0);
        block.set(0, 1);
        assert_eq!(block.bytes, vec![1]);
        let mut block = RefcountBlock::new(vec![0u8; 1], 2);
        block.set(1, 0xa);
        assert_eq!(block.bytes, vec![0xa0]);
        let mut block = RefcountBlock::new(vec![0u8; 2], 4);
        block.set(0, 0x1234);
        assert_eq!(block.bytes, vec![0x12, 0x34]);
    }
}
