//! Table entries: L1 and L2 entries (the two levels that map guest clusters to host clusters), the subcluster
//! bitmap of extended L2 entries, and refcount table entries.
//!
//! Entries are kept as the raw big-endian-decoded `u64` and read through named accessors, so bit masks live
//! here and nowhere else.

use super::compressed::CompressedDescriptor;
use super::geometry::{Geometry, HostOffset};

/// Bits 9..=55: a cluster-aligned host offset (L1, L2 and bitmap table entries).
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount of the referenced cluster is exactly one, so it may be written in place.
const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub(super) const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of an L2 entry (v3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// L1 bits that must be zero: 1..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Standard L2 bits that must be zero: 1..=8 and 56..=61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table bits that must be zero: 0..=8 (the offset is cluster aligned).
const REFTABLE_RESERVED: u64 = 0x1ff;
/// Low half of a subcluster bitmap: subcluster `i` is allocated when bit `i` is set.
const SUBCLUSTER_ALLOC: u64 = 0xffff_ffff;
/// The zero bits of a subcluster bitmap start at bit 32.
const SUBCLUSTER_ZERO_SHIFT: u32 = 32;

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

    /// The offset field as stored, aligned or not (0 when unallocated).
    pub fn offset_field(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Whether any of the bits that must be zero is set.
    pub fn has_reserved_bits(self) -> bool {
        self.0 & L1_RESERVED != 0
    }

    /// Whether reserved bits are set, or the offset is not cluster aligned.
    pub fn is_malformed(self, geometry: &Geometry) -> bool {
        self.has_reserved_bits() || !geometry.is_aligned(self.offset_field())
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

/// What an L2 entry is, decided exactly as QEMU's `qcow2_get_cluster_type` decides it (no validation: the
/// checker reports malformed entries by what they claim to be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// Not allocated.
    Unallocated,
    /// Zero flag, no host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc,
    /// Data at a host cluster.
    Normal,
    /// Compressed data.
    Compressed,
}

/// One standard (64-bit) L2 entry; an extended entry is this followed by a [`SubclusterBitmap`].
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

    /// Whether bit 0 is set: the zero flag of a standard entry, a reserved bit of an extended one.
    pub fn has_zero_flag(self) -> bool {
        self.0 & ZERO != 0
    }

    /// Whether any bit a standard entry reserves is set (1..=8, 56..=61; meaningless for compressed entries).
    pub fn has_reserved_bits(self) -> bool {
        self.0 & L2_RESERVED != 0
    }

    /// The offset field of an uncompressed entry as stored, aligned or not (0 when it names no cluster).
    pub fn offset_field(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// The same entry pointing at `host` instead, every flag kept (an uncompressed entry's cluster moved).
    #[must_use]
    pub fn with_host(self, host: HostOffset) -> Self {
        L2Entry((self.0 & !OFFSET_MASK) | (host.0 & OFFSET_MASK))
    }

    /// Where the compressed bytes of a compressed entry lie (the fields as stored; not meaningful otherwise).
    pub fn compressed_descriptor(self, geometry: &Geometry) -> CompressedDescriptor {
        CompressedDescriptor::decode(self.0, geometry.cluster_bits)
    }

    /// Classifies the entry as QEMU does. Bit 0 is a zero flag only in standard entries; with an external data
    /// file, offset 0 is a valid host offset and COPIED tells it from "unallocated".
    pub fn cluster_type(self, extended_l2: bool, data_file: bool) -> ClusterType {
        let offset = self.offset_field();
        if self.is_compressed() {
            ClusterType::Compressed
        } else if self.has_zero_flag() && !extended_l2 {
            if offset != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if offset == 0 && !(data_file && self.is_copied()) {
            ClusterType::Unallocated
        } else {
            ClusterType::Normal
        }
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
            let descriptor = self.compressed_descriptor(geometry);
            let len = descriptor.readable_len();
            return Ok(L2Kind::Compressed { host: HostOffset(descriptor.host_offset), len });
        }
        if self.has_reserved_bits() {
            return Err("reserved bits set in L2 entry");
        }
        let offset = self.0 & OFFSET_MASK;
        if !geometry.is_aligned(offset) {
            return Err("L2 entry offset is not cluster aligned");
        }
        let host = (offset != 0).then_some(HostOffset(offset));
        if self.has_zero_flag() {
            return Ok(L2Kind::Zero { host });
        }
        Ok(match host {
            None => L2Kind::Unallocated,
            Some(host) => L2Kind::Normal { host, copied: self.is_copied() },
        })
    }
}

/// The second half of an extended L2 entry: per subcluster (32 of them), an allocation bit (bits 0..=31) and a
/// zero bit (bits 32..=63). Masks are `u32`s with bit `i` standing for subcluster `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(SUBCLUSTER_ALLOC);
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap(SUBCLUSTER_ALLOC << SUBCLUSTER_ZERO_SHIFT);

    /// The mask of subclusters `first..end` (clamped to the 32 there are).
    pub fn span(first: u64, end: u64) -> u32 {
        let end = end.min(32);
        let first = first.min(end);
        let width = (end - first) as u32;
        if width == 0 {
            return 0;
        }
        (u32::MAX >> (32 - width)) << first
    }

    /// The subclusters whose allocation bit is set.
    pub fn allocated(self) -> u32 {
        (self.0 & SUBCLUSTER_ALLOC) as u32
    }

    /// The subclusters whose zero bit is set.
    pub fn zero(self) -> u32 {
        (self.0 >> SUBCLUSTER_ZERO_SHIFT) as u32
    }

    /// The subclusters that hold data: allocated and not zero.
    pub fn data(self) -> u32 {
        self.allocated() & !self.zero()
    }

    /// Whether some subcluster is marked both allocated and zero, which QEMU takes for corruption.
    pub fn is_contradictory(self) -> bool {
        self.allocated() & self.zero() != 0
    }

    /// The bitmap with the subclusters of `mask` allocated (their zero bits cleared).
    #[must_use]
    pub fn with_allocated(self, mask: u32) -> Self {
        SubclusterBitmap::from_halves(self.allocated() | mask, self.zero() & !mask)
    }

    /// The bitmap with the subclusters of `mask` reading as zeros (their allocation bits cleared).
    #[must_use]
    pub fn with_zeroed(self, mask: u32) -> Self {
        SubclusterBitmap::from_halves(self.allocated() & !mask, self.zero() | mask)
    }

    fn from_halves(allocated: u32, zero: u32) -> Self {
        SubclusterBitmap(u64::from(allocated) | (u64::from(zero) << SUBCLUSTER_ZERO_SHIFT))
    }
}

/// One refcount table entry: where a refcount block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// An entry pointing at the refcount block at `block`.
    pub fn new(block: HostOffset) -> Self {
        RefcountTableEntry(block.0 & !REFTABLE_RESERVED)
    }

    /// The offset field as stored, aligned or not (0 when no block is allocated).
    pub fn offset_field(self) -> u64 {
        self.0 & !REFTABLE_RESERVED
    }

    /// The refcount block's host offset, or `None` when none is allocated.
    pub fn block_offset(self) -> Option<HostOffset> {
        match self.offset_field() {
            0 => None,
            o => Some(HostOffset(o)),
        }
    }

    /// Whether any of the bits that must be zero is set.
    pub fn has_reserved_bits(self) -> bool {
        self.0 & REFTABLE_RESERVED != 0
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
    fn subcluster_bitmaps_split_in_halves() {
        let b = SubclusterBitmap(0x0000_0003_0000_0005);
        assert_eq!((b.allocated(), b.zero(), b.data()), (5, 3, 4));
        assert!(b.is_contradictory());
        assert_eq!(b.with_allocated(2), SubclusterBitmap(0x0000_0001_0000_0007));
        assert_eq!(b.with_zeroed(4), SubclusterBitmap(0x0000_0007_0000_0001));
        assert_eq!(SubclusterBitmap::ALL_ZERO.zero(), u32::MAX);
        assert_eq!(SubclusterBitmap::span(0, 32), u32::MAX);
        assert_eq!(SubclusterBitmap::span(3, 5), 0b11000);
        assert_eq!(SubclusterBitmap::span(5, 5), 0);
    }

    #[test]
    fn refcount_table_entries_keep_bits_9_up() {
        assert_eq!(RefcountTableEntry(0x1_0000).block_offset(), Some(HostOffset(0x1_0000)));
        assert_eq!(RefcountTableEntry(0x1ff).block_offset(), None);
        assert!(RefcountTableEntry(0x1_0001).has_reserved_bits());
    }

    #[test]
    fn cluster_types_follow_qemu() {
        assert_eq!(L2Entry(1).cluster_type(false, false), ClusterType::ZeroPlain);
        assert_eq!(L2Entry(1).cluster_type(true, false), ClusterType::Unallocated);
        assert_eq!(L2Entry(COPIED).cluster_type(false, true), ClusterType::Normal);
        assert_eq!(L2Entry(COPIED).cluster_type(false, false), ClusterType::Unallocated);
        assert_eq!(L2Entry(0x5_0001).cluster_type(false, false), ClusterType::ZeroAlloc);
    }

    #[test]
    fn malformed_entries_are_named() {
        assert!(L2Entry(0x8000_0000_0005_0200).kind(&G).is_err());
        assert!(L2Entry(0x0100_0000_0005_0000).kind(&G).is_err());
        assert!(L1Entry(0x8000_0000_0005_0200).is_malformed(&G));
        assert!(!L1Entry::new(HostOffset(0x40000)).is_malformed(&G));
    }
}
