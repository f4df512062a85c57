//! [`FormatError`]: everything that can be wrong with the bytes of a qcow2 header, each with its own variant.
//!
//! Invariants: every variant keeps the offending value (and, where there is one, the limit it broke), so that a
//! logged message is enough to find the bad field with a hex dump; offsets and sizes print in hex. No variant
//! carries a free-form `String` except names read from the image itself. [`FormatError::is_unsupported`] is the
//! one place that decides "valid image, feature we lack" versus "malformed image".

/// A qcow2 header (or one of the structures it describes) failed to parse or to validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The buffer ends before a structure that must be read from it.
    #[error("{what} truncated: needs {needed:#x} bytes, only {available:#x} available")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// The number of bytes it needs (counted from the start of the buffer).
        needed: u64,
        /// The number of bytes there are.
        available: u64,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image: magic is {found:#010x}, expected 0x514649fb")]
    BadMagic {
        /// The magic that was found.
        found: u32,
    },
    /// The version field is neither 2 nor 3.
    #[error("unsupported qcow2 version {version} (only 2 and 3 exist)")]
    UnsupportedVersion {
        /// The version that was found.
        version: u32,
    },
    /// `cluster_bits` is outside QEMU's range 9..=21 (512 bytes to 2 MiB).
    #[error("unsupported cluster size 2^{bits} (cluster_bits must be 9..=21)")]
    ClusterBits {
        /// The `cluster_bits` that was found.
        bits: u32,
    },
    /// `header_length` is too short, too long, or inconsistent with the version.
    #[error("invalid header_length {length:#x}: {reason}")]
    HeaderLength {
        /// The `header_length` that was found.
        length: u32,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A field that a version 2 header does not have holds a value other than its implied default.
    #[error("version 2 header cannot carry {field} = {value:#x}")]
    Version2Field {
        /// The version 3 field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// `backing_file_offset` points past the end of cluster 0.
    #[error("backing file name offset {offset:#x} lies outside cluster 0 (cluster size {cluster_size:#x})")]
    BackingFileOffset {
        /// The `backing_file_offset` that was found.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// `backing_file_size` is longer than 1023 bytes or than what is left of cluster 0.
    #[error("backing file name too long: {size:#x} bytes, at most {max:#x} allowed here")]
    BackingFileName {
        /// The `backing_file_size` that was found.
        size: u32,
        /// The largest size allowed at this offset.
        max: u64,
    },
    /// `refcount_order` is above 6 (refcounts wider than 64 bits).
    #[error("refcount_order {order} too large: refcounts may not exceed 64 bits (order 6)")]
    RefcountOrder {
        /// The `refcount_order` that was found.
        order: u32,
    },
    /// `refcount_table_clusters` is 0: the image has no refcount table.
    #[error("image does not contain a refcount table (refcount_table_clusters is 0)")]
    RefcountTableEmpty,
    /// A table's offset is not a multiple of the cluster size.
    #[error("{table} offset {offset:#x} is not aligned to a cluster")]
    TableMisaligned {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A table is larger than QEMU accepts.
    #[error("{table} too large: {bytes:#x} bytes, at most {max:#x}")]
    TableTooLarge {
        /// Which table.
        table: &'static str,
        /// Its size in bytes.
        bytes: u64,
        /// The largest size QEMU accepts.
        max: u64,
    },
    /// A table's offset plus its size does not fit in a signed 64-bit file offset.
    #[error("{table} at offset {offset:#x} with {entries:#x} entries overflows the file offset range")]
    TableOverflow {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its number of entries.
        entries: u64,
    },
    /// `nb_snapshots` is above QEMU's limit of 65536.
    #[error("too many snapshots: {count}, at most 65536")]
    TooManySnapshots {
        /// The `nb_snapshots` that was found.
        count: u32,
    },
    /// The virtual size needs more L1 entries than QEMU can address.
    #[error("image too big: virtual size {size:#x} needs {l1_entries:#x} L1 entries")]
    ImageTooBig {
        /// The virtual size in bytes.
        size: u64,
        /// The number of L1 entries it needs.
        l1_entries: u64,
    },
    /// The L1 table has fewer entries than the virtual size needs.
    #[error("L1 table too small: {l1_size:#x} entries, the virtual size needs {required:#x}")]
    L1TooSmall {
        /// The `l1_size` that was found.
        l1_size: u32,
        /// The number of entries the virtual size needs.
        required: u64,
    },
    /// The compression-type incompatible bit (3) disagrees with the compression type field.
    #[error(
        "compression type {compression_type} disagrees with the compression incompatible bit (bit set: {bit_set})"
    )]
    CompressionTypeMismatch {
        /// The compression type field.
        compression_type: u8,
        /// Whether incompatible bit 3 is set.
        bit_set: bool,
    },
    /// The compression type is neither deflate (0) nor zstd (1).
    #[error("unknown compression type {value}")]
    UnknownCompressionType {
        /// The compression type field.
        value: u8,
    },
    /// Incompatible feature bits this library does not know are set.
    #[error("unsupported qcow2 feature(s): {names} (incompatible bits {bits:#x})")]
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Their names from the image's feature-name table, or "bit N", comma separated.
        names: String,
    },
    /// The corrupt bit is set and the image was to be opened read-write.
    #[error("image is marked corrupt; it cannot be opened read-write")]
    CorruptBitSet,
    /// The image is encrypted.
    #[error("encrypted images are not supported ({} encryption, crypt_method {method})", encryption_name(*method))]
    EncryptionUnsupported {
        /// The `crypt_method` that was found.
        method: u32,
    },
    /// Extended L2 entries with clusters below 16 KiB would make subclusters smaller than 512 bytes.
    #[error("extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})")]
    ExtendedL2ClusterTooSmall {
        /// The `cluster_bits` that was found.
        cluster_bits: u32,
    },
    /// A header extension runs past the end of the extension area.
    #[error(
        "header extension {ty:#010x} at {offset:#x} with length {length:#x} runs past the extension area end {end:#x}"
    )]
    ExtensionOverflow {
        /// The extension's type.
        ty: u32,
        /// The offset of the extension's 8-byte type/length header.
        offset: u64,
        /// The extension's data length.
        length: u32,
        /// Where the extension area ends (the backing name offset, or the cluster size).
        end: u64,
    },
    /// A known header extension is longer than QEMU accepts.
    #[error("header extension {ty:#010x} too large: {length:#x} bytes, at most {max:#x}")]
    ExtensionTooLarge {
        /// The extension's type.
        ty: u32,
        /// The extension's data length.
        length: u32,
        /// The largest length accepted.
        max: u32,
    },
    /// A known fixed-size header extension has the wrong length.
    #[error("header extension {ty:#010x} has length {length:#x}, expected {expected:#x}")]
    ExtensionLength {
        /// The extension's type.
        ty: u32,
        /// The extension's data length.
        length: u32,
        /// The length its type requires.
        expected: u32,
    },
    /// A full-disk-encryption header extension is present but the image does not use LUKS.
    #[error("crypto header extension present, but crypt_method is {method} (only LUKS, 2, has one)")]
    UnexpectedCryptoExtension {
        /// The `crypt_method` that was found.
        method: u32,
    },
    /// The backing file format name extension is unusable.
    #[error("invalid backing file format name ({length:#x} bytes): {reason}")]
    BackingFormatName {
        /// The extension's data length.
        length: u32,
        /// Why it is unusable.
        reason: &'static str,
    },
    /// The external data file name extension is unusable.
    #[error("invalid external data file name ({length:#x} bytes): {reason}")]
    ExternalDataFileName {
        /// The extension's data length.
        length: u32,
        /// Why it is unusable.
        reason: &'static str,
    },
    /// The image keeps its data in an external file, and no name for that file is known.
    #[error("image needs an external data file, and none was named")]
    DataFileMissing,
    /// The "raw external data" autoclear bit is set on an image without an external data file.
    #[error("the raw external data bit is set, but the image has no external data file")]
    DataFileRawWithoutDataFile,
    /// The serialized header, its extensions and the backing file name do not fit in cluster 0.
    #[error("header needs {needed:#x} bytes, more than the cluster size {cluster_size:#x}")]
    HeaderDoesNotFit {
        /// The bytes needed.
        needed: u64,
        /// The cluster size.
        cluster_size: u64,
    },
}

/// The name of a `crypt_method` value, as QEMU calls it.
fn encryption_name(method: u32) -> &'static str {
    match method {
        1 => "AES",
        2 => "LUKS",
        _ => "unknown",
    }
}

impl FormatError {
    /// True when the image is well formed but uses something this library cannot handle (a newer version, an
    /// unknown incompatible feature, encryption, an unknown compression type); false when it is malformed.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            FormatError::UnsupportedVersion { .. }
                | FormatError::UnknownIncompatibleFeatures { .. }
                | FormatError::EncryptionUnsupported { .. }
                | FormatError::UnknownCompressionType { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_kinds_are_exactly_the_valid_but_unhandled_ones() {
        assert!(FormatError::UnsupportedVersion { version: 4 }.is_unsupported());
        assert!(FormatError::EncryptionUnsupported { method: 2 }.is_unsupported());
        assert!(FormatError::UnknownCompressionType { value: 2 }.is_unsupported());
        assert!(FormatError::UnknownIncompatibleFeatures { bits: 1 << 5, names: "bit 5".into() }.is_unsupported());
        assert!(!FormatError::BadMagic { found: 0 }.is_unsupported());
        assert!(!FormatError::CorruptBitSet.is_unsupported());
        assert!(!FormatError::L1TooSmall { l1_size: 1, required: 2 }.is_unsupported());
    }

    #[test]
    fn messages_print_offsets_in_hex() {
        let e = FormatError::TableMisaligned { table: "L1 table", offset: 0x30200 };
        assert_eq!(e.to_string(), "L1 table offset 0x30200 is not aligned to a cluster");
        let e = FormatError::BadMagic { found: 0x1234 };
        assert_eq!(e.to_string(), "not a qcow2 image: magic is 0x00001234, expected 0x514649fb");
        let e = FormatError::UnknownIncompatibleFeatures { bits: 0x20, names: "frobnication".into() };
        assert_eq!(e.to_string(), "unsupported qcow2 feature(s): frobnication (incompatible bits 0x20)");
    }
}
