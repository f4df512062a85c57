//! L1 and L2 table entries: the two levels that map guest clusters to host clusters.
//!
//! Entries are kept as the raw big-endian-decoded `u64` and read through named accessors, so bit masks live
//! here and nowhere else.

use super::geometry::{Geometry, HostOffset};

/// Bits 9..=55: a cluster-aligned host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount of the referenced cluster is exactly one, so it may be written in place.
const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of an L2 entry (v3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// L1 bits that must be zero: 1..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Standard L2 bits that must be zero: 1..=8 and 56..=61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// One entry of the L1 table: where an L2 table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table whose refcount is one.
    pub fn new(l2: HostOffset) -> Self {
        L1Entry((l2.0 & OFFSET_MASK) | COPIED)
    }

    /// The L2 table's host offset, or `None` when unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset(o)),
        }
    }

    /// Whether the L2 table may be modified in place.
    pub fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The same entry with the COPIED flag set or cleared.
    #[must_use]
    pub fn with_copied(self, copied: bool) -> Self {
        L1Entry(if copied { self.0 | COPIED } else { self.0 & !COPIED })
    }

    /// Whether reserved bits are set, or the offset is not cluster aligned.
    pub fn is_malformed(self, geometry: &Geometry) -> bool {
        self.0 & L1_RESERVED != 0 || !geometry.is_aligned(self.0 & OFFSET_MASK)
    }
}

/// What a standard L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Kind {
    /// Not allocated: reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster when present.
    Zero {
        /// A cluster still reserved for this guest cluster.
        host: Option<HostOffset>,
    },
    /// Data lives at `host`.
    Normal {
        /// The host cluster.
        host: HostOffset,
        /// Whether the host cluster's refcount is exactly one.
        copied: bool,
    },
    /// Compressed data of `len` bytes starting at `host` (not aligned).
    Compressed {
        /// First byte of the compressed data.
        host: HostOffset,
        /// Bytes that may be read: whole 512-byte sectors, less the offset into the first sector.
        len: u64,
    },
}

/// One standard (64-bit) L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// An entry for a normal cluster at `host` with refcount one.
    pub fn normal(host: HostOffset) -> Self {
        L2Entry((host.0 & OFFSET_MASK) | COPIED)
    }

    /// A zero-flag entry (v3 only), keeping a preallocated cluster when one is given.
    pub fn zero(host: Option<HostOffset>) -> Self {
        match host {
            Some(h) => L2Entry((h.0 & OFFSET_MASK) | COPIED | ZERO),
            None => L2Entry(ZERO),
        }
    }

    /// Whether the entry is all zero bits (unallocated, no flags).
    pub fn is_unallocated(self) -> bool {
        self.0 == 0
    }

    /// Whether the entry describes a compressed cluster.
    pub fn is_compressed(self) -> bool {
        self.0 & COMPRESSED != 0
    }

    /// The host cluster this entry owns, if any (compressed entries own bytes, not a cluster).
    pub fn host_cluster(self) -> Option<HostOffset> {
        if self.is_compressed() {
            return None;
        }
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset(o)),
        }
    }

    /// Whether the COPIED flag is set.
    pub fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The same entry with the COPIED flag set or cleared (compressed entries have no such flag: unchanged).
    #[must_use]
    pub fn with_copied(self, copied: bool) -> Self {
        if self.is_compressed() {
            return self;
        }
        L2Entry(if copied { self.0 | COPIED } else { self.0 & !COPIED })
    }

    /// Decodes the entry, or returns what is wrong with it.
    ///
    /// # Errors
    /// A static description when reserved bits are set or a normal cluster's offset is not cluster aligned.
    pub fn kind(self, geometry: &Geometry) -> Result<L2Kind, &'static str> {
        if self.is_compressed() {
            // The offset field's width depends on the cluster size: x = 62 - (cluster_bits - 8).
            let x = 62 - (geometry.cluster_bits - 8);
            let host = self.0 & ((1u64 << x) - 1);
            let sector_mask = (1u64 << (geometry.cluster_bits - 8)) - 1;
            let sectors = ((self.0 >> x) & sector_mask) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            return Ok(L2Kind::Compressed { host: HostOffset(host), len });
        }
        if self.0 & L2_RESERVED != 0 {
            return Err("reserved bits set in L2 entry");
        }
        let offset = self.0 & OFFSET_MASK;
        if !geometry.is_aligned(offset) {
            return Err("L2 entry offset is not cluster aligned");
        }
        let host = (offset != 0).then_some(HostOffset(offset));
        if self.0 & ZERO != 0 {
            return Ok(L2Kind::Zero { host });
        }
        Ok(match host {
            None => L2Kind::Unallocated,
            Some(host) => L2Kind::Normal { host, copied: self.is_copied() },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry { cluster_bits: 16, refcount_order: 4, extended_l2: false };

    #[test]
    fn normal_entry_round_trips() {
        let e = L2Entry::normal(HostOffset(0x50000));
        assert_eq!(e.0, 0x8000_0000_0005_0000);
        assert_eq!(e.kind(&G), Ok(L2Kind::Normal { host: HostOffset(0x50000), copied: true }));
        assert_eq!(e.host_cluster(), Some(HostOffset(0x50000)));
    }

    #[test]
    fn zero_entries_decode() {
        assert_eq!(L2Entry::zero(None).kind(&G), Ok(L2Kind::Zero { host: None }));
        assert_eq!(
            L2Entry::zero(Some(HostOffset(0x30000))).kind(&G),
            Ok(L2Kind::Zero { host: Some(HostOffset(0x30000)) })
        );
        assert_eq!(L2Entry(0).kind(&G), Ok(L2Kind::Unallocated));
    }

    #[test]
    fn compressed_descriptor_decodes_as_qemu_writes_it() {
        // 64 KiB clusters: x = 54; 3 sectors => field 2; offset 0x12345.
        let e = L2Entry(COMPRESSED | (2 << 54) | 0x12345);
        assert_eq!(e.kind(&G), Ok(L2Kind::Compressed { host: HostOffset(0x12345), len: 3 * 512 - 0x145 }));
        assert_eq!(e.host_cluster(), None);
    }

    #[test]
    fn malformed_entries_are_named() {
        assert!(L2Entry(0x8000_0000_0005_0200).kind(&G).is_err());
        assert!(L2Entry(0x0100_0000_0005_0000).kind(&G).is_err());
        assert!(L1Entry(0x8000_0000_0005_0200).is_malformed(&G));
        assert!(!L1Entry::new(HostOffset(0x40000)).is_malformed(&G));
    }
}
