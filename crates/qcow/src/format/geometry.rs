//! Address spaces and the cluster geometry that converts between them.
//!
//! A guest offset is a byte in the virtual disk; a host offset is a byte in the image file. Keeping them in
//! different types means one can never be passed where the other is meant.

/// A byte offset in the virtual disk the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl std::fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}

impl std::fmt::Display for HostOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

/// The shape of an image: cluster size, table sizes and refcount width, derived once from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Whether L2 entries are 128 bits wide (extended L2, subclusters).
    pub extended_l2: bool,
}

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes mapped by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Bits per refcount.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Refcounts in one refcount block (one cluster).
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Largest refcount a block can hold.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 / self.l2_span()
    }

    /// Index into an L2 table for a guest offset.
    pub fn l2_index(&self, guest: GuestOffset) -> u64 {
        (guest.0 >> self.cluster_bits) % self.l2_entries()
    }

    /// Offset of a byte inside its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Whether an offset is on a cluster boundary.
    pub fn is_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// The cluster index that holds a host byte.
    pub fn host_cluster(&self, host: HostOffset) -> u64 {
        host.0 >> self.cluster_bits
    }

    /// Number of clusters needed to hold `bytes`, rounded up.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// L1 entries needed to map a virtual disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_span())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_qemu() {
        let g = Geometry { cluster_bits: 16, refcount_order: 4, extended_l2: false };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.refcount_block_entries(), 32768);
        assert_eq!(g.refcount_max(), 0xffff);
        assert_eq!(g.l1_entries_for(1 << 50), 2 << 20);
        let x = Geometry { extended_l2: true, ..g };
        assert_eq!(x.l2_entries(), 4096);
        let one = Geometry { refcount_order: 0, ..g };
        assert_eq!(one.refcount_max(), 1);
        assert_eq!(Geometry { refcount_order: 6, ..g }.refcount_max(), u64::MAX);
    }
}
