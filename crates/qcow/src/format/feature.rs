//! Feature bits of the version 3 header, and the feature-name table QEMU writes into new images.
//!
//! The three feature words mean different things to a reader: an unknown *incompatible* bit forbids opening the
//! image, an unknown *compatible* bit is ignored, and an unknown *autoclear* bit must be cleared by any writer
//! before its first write. The `KNOWN_*` masks list exactly the bits this library understands; everything else is
//! "unknown" in that sense.

use super::FeatureName;

/// Incompatible bit 0: refcounts may be stale and must be rebuilt before clusters are allocated.
pub const DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt; it may only be opened read-only (or for repair).
pub const CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file, at host offset == guest offset.
pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression type field is not deflate.
pub const COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible bit 4: L2 entries are 128 bits wide, with 32 subclusters per cluster.
pub const EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit this library knows; any other set bit refuses the open.
pub const KNOWN_INCOMPATIBLE: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;

/// Compatible bit 0: the writer may defer refcount updates, keeping the dirty bit set while it does.
pub const LAZY_REFCOUNTS: u64 = 1 << 0;
/// Every compatible bit this library knows.
pub const KNOWN_COMPATIBLE: u64 = LAZY_REFCOUNTS;

/// Autoclear bit 0: the bitmaps extension is consistent with the image.
pub const BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image on its own.
pub const DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit this library knows.
pub const KNOWN_AUTOCLEAR: u64 = BITMAPS | DATA_FILE_RAW;

/// Which of the three feature words a feature-name table entry describes (its on-disk type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible = 0,
    /// `compatible_features`.
    Compatible = 1,
    /// `autoclear_features`.
    Autoclear = 2,
}

impl FeatureKind {
    /// The kind for an on-disk type byte, or `None` for a type the specification does not define.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }

    /// The on-disk type byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// The feature-name table qemu-img 10 writes into a version 3 image with clusters larger than 4 KiB, in its order.
///
/// QEMU leaves the table out for clusters of 4 KiB and smaller, because its 8 entries (392 bytes with the
/// extension header) would crowd out the backing file name in a 512-byte cluster; `Header::for_create` follows
/// that rule.
pub fn qemu_feature_table() -> Vec<FeatureName> {
    const TABLE: [(FeatureKind, u8, &str); 8] = [
        (FeatureKind::Incompatible, 0, "dirty bit"),
        (FeatureKind::Incompatible, 1, "corrupt bit"),
        (FeatureKind::Incompatible, 2, "external data file"),
        (FeatureKind::Incompatible, 3, "compression type"),
        (FeatureKind::Incompatible, 4, "extended L2 entries"),
        (FeatureKind::Compatible, 0, "lazy refcounts"),
        (FeatureKind::Autoclear, 0, "bitmaps"),
        (FeatureKind::Autoclear, 1, "raw external data"),
    ];
    TABLE.iter().map(|&(kind, bit, name)| FeatureName { kind, bit, name: name.to_owned() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_round_trips_through_its_type_byte() {
        for kind in [FeatureKind::Incompatible, FeatureKind::Compatible, FeatureKind::Autoclear] {
            assert_eq!(FeatureKind::from_u8(kind.as_u8()), Some(kind));
        }
        assert_eq!(FeatureKind::from_u8(3), None);
    }

    #[test]
    fn qemu_table_names_every_known_bit_once() {
        let table = qemu_feature_table();
        assert_eq!(table.len(), 8);
        for (kind, mask) in [
            (FeatureKind::Incompatible, KNOWN_INCOMPATIBLE),
            (FeatureKind::Compatible, KNOWN_COMPATIBLE),
            (FeatureKind::Autoclear, KNOWN_AUTOCLEAR),
        ] {
            let named = table.iter().filter(|f| f.kind == kind).fold(0u64, |acc, f| acc | (1u64 << f.bit));
            assert_eq!(named, mask, "{kind:?}");
        }
        assert!(table.iter().all(|f| f.name.len() <= 46));
    }
}
