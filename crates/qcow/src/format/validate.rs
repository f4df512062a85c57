//! Validation of a parsed [`Header`]: every check QEMU makes when it opens an image, in QEMU's order, each
//! failing with its own [`FormatError`] variant.

use super::feature::{self, FeatureKind};
use super::header::{
    c_bytes, len_u64, CompressionType, Extension, Header, BITMAPS_EXTENSION_BYTES, CRYPTO_EXTENSION_BYTES, CRYPT_LUKS,
    HEADER_V2_LENGTH, HEADER_V3_LENGTH, MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_L1_INDEX, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
    SNAPSHOT_HEADER_BYTES,
};
use super::FormatError;

impl Header {
    /// Checks everything QEMU checks when it opens an image, in QEMU's order, and refuses encryption (not
    /// supported yet). `read_write` says whether the image is about to be opened for writing.
    ///
    /// Two checks go beyond QEMU: names in the backing format and data file extensions must be UTF-8, since they
    /// are handed out as strings.
    ///
    /// # Errors
    /// The first rule broken, as its own [`FormatError`] variant.
    pub fn validate(&self, read_write: bool) -> Result<(), FormatError> {
        if !(2..=3).contains(&self.version) {
            return Err(FormatError::UnsupportedVersion { version: self.version });
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(FormatError::ClusterBits { bits: self.cluster_bits });
        }
        let cluster_size = self.cluster_size();
        if self.version == 2 {
            self.check_v2_fields()?;
        } else {
            self.check_header_length()?;
        }
        if self.backing_file_offset > cluster_size {
            return Err(FormatError::BackingFileOffset { offset: self.backing_file_offset, cluster_size });
        }
        let bit_set = self.incompatible_features & feature::COMPRESSION_TYPE != 0;
        if bit_set != (self.compression_type != CompressionType::Deflate) {
            return Err(FormatError::CompressionTypeMismatch {
                compression_type: self.compression_type.as_u8(),
                bit_set,
            });
        }
        let unknown = self.incompatible_features & !feature::KNOWN_INCOMPATIBLE;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatibleFeatures {
                bits: unknown,
                names: self.name_incompatible_bits(unknown),
            });
        }
        if read_write && self.is_corrupt() {
            return Err(FormatError::CorruptBitSet);
        }
        if self.has_extended_l2() && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(FormatError::ExtendedL2ClusterTooSmall { cluster_bits: self.cluster_bits });
        }
        if self.refcount_order > 6 {
            return Err(FormatError::RefcountOrder { order: self.refcount_order });
        }
        if self.crypt_method != 0 {
            return Err(FormatError::EncryptionUnsupported { method: self.crypt_method });
        }
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::RefcountTableEmpty);
        }
        self.check_table(
            "refcount table",
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cluster_size,
            MAX_REFCOUNT_TABLE_BYTES,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::TooManySnapshots { count: self.nb_snapshots });
        }
        self.check_table(
            "snapshot table",
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            SNAPSHOT_HEADER_BYTES,
            SNAPSHOT_HEADER_BYTES * u64::from(MAX_SNAPSHOTS),
        )?;
        self.check_table("L1 table", self.l1_table_offset, u64::from(self.l1_size), 8, MAX_L1_BYTES)?;
        let required = self.l1_entries_required();
        if required > MAX_L1_INDEX {
            return Err(FormatError::ImageTooBig { size: self.size, l1_entries: required });
        }
        if u64::from(self.l1_size) < required {
            return Err(FormatError::L1TooSmall { l1_size: self.l1_size, required });
        }
        self.check_extensions()?;
        if !self.has_external_data_file() && self.autoclear_features & feature::DATA_FILE_RAW != 0 {
            return Err(FormatError::DataFileRawWithoutDataFile);
        }
        if let Some(name) = &self.backing_file {
            let max = if self.backing_file_offset != 0 {
                MAX_BACKING_FILE_NAME.min(cluster_size.saturating_sub(self.backing_file_offset))
            } else {
                MAX_BACKING_FILE_NAME
            };
            if len_u64(name.len()) > max {
                let size = u32::try_from(name.len()).unwrap_or(u32::MAX);
                return Err(FormatError::BackingFileName { size, max });
            }
        }
        Ok(())
    }

    /// QEMU's `header_length` rules for version 3 (it does not require a multiple of 8).
    pub(super) fn check_header_length(&self) -> Result<(), FormatError> {
        let length = self.header_length;
        if length < HEADER_V3_LENGTH {
            return Err(FormatError::HeaderLength { length, reason: "shorter than the 104-byte version 3 header" });
        }
        if u64::from(length) > self.cluster_size() {
            return Err(FormatError::HeaderLength { length, reason: "larger than a cluster" });
        }
        Ok(())
    }

    /// A version 2 header has nowhere to store version 3 fields, so they must hold their implied values.
    pub(super) fn check_v2_fields(&self) -> Result<(), FormatError> {
        let fields = [
            ("incompatible_features", self.incompatible_features, 0),
            ("compatible_features", self.compatible_features, 0),
            ("autoclear_features", self.autoclear_features, 0),
            ("refcount_order", u64::from(self.refcount_order), 4),
            ("header_length", u64::from(self.header_length), u64::from(HEADER_V2_LENGTH)),
            ("compression_type", u64::from(self.compression_type.as_u8()), 0),
            ("extra header bytes", len_u64(self.extra_header_bytes.len()), 0),
        ];
        match fields.iter().find(|(_, value, implied)| value != implied) {
            Some(&(field, value, _)) => Err(FormatError::Version2Field { field, value }),
            None => Ok(()),
        }
    }

    /// QEMU's `qcow2_validate_table`: size cap, then offset + size within a signed 64-bit offset, then alignment.
    pub(super) fn check_table(
        &self,
        table: &'static str,
        offset: u64,
        entries: u64,
        entry_len: u64,
        max_bytes: u64,
    ) -> Result<(), FormatError> {
        if entries > max_bytes / entry_len {
            return Err(FormatError::TableTooLarge { table, bytes: entries.saturating_mul(entry_len), max: max_bytes });
        }
        let bytes = entries * entry_len;
        if (i64::MAX as u64) - bytes < offset {
            return Err(FormatError::TableOverflow { table, offset, entries });
        }
        // Cluster sizes are powers of two.
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(FormatError::TableMisaligned { table, offset });
        }
        Ok(())
    }

    /// The per-extension checks QEMU makes while reading the extensions, in file order.
    pub(super) fn check_extensions(&self) -> Result<(), FormatError> {
        for ext in &self.extensions {
            let ty = ext.kind;
            let length = u32::try_from(ext.data.len()).unwrap_or(u32::MAX);
            let utf8 = std::str::from_utf8(c_bytes(&ext.data)).is_ok();
            match ty {
                Extension::BACKING_FORMAT if length > MAX_BACKING_FORMAT_NAME => {
                    return Err(FormatError::ExtensionTooLarge { ty, length, max: MAX_BACKING_FORMAT_NAME });
                }
                Extension::BACKING_FORMAT if !utf8 => {
                    return Err(FormatError::BackingFormatName { length, reason: "not UTF-8" });
                }
                Extension::CRYPTO if self.crypt_method != CRYPT_LUKS => {
                    return Err(FormatError::UnexpectedCryptoExtension { method: self.crypt_method });
                }
                Extension::CRYPTO if length != CRYPTO_EXTENSION_BYTES => {
                    return Err(FormatError::ExtensionLength { ty, length, expected: CRYPTO_EXTENSION_BYTES });
                }
                Extension::BITMAPS if length != BITMAPS_EXTENSION_BYTES => {
                    return Err(FormatError::ExtensionLength { ty, length, expected: BITMAPS_EXTENSION_BYTES });
                }
                Extension::DATA_FILE if !utf8 => {
                    return Err(FormatError::ExternalDataFileName { length, reason: "not UTF-8" });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Names unknown incompatible bits the way QEMU's `report_unsupported_feature` does: from the image's own
    /// feature-name table first (in table order, each bit once), then "bit N" for the rest.
    pub(super) fn name_incompatible_bits(&self, mut bits: u64) -> String {
        let mut names: Vec<String> = Vec::new();
        for f in self.feature_names() {
            if f.kind != FeatureKind::Incompatible {
                continue;
            }
            let Some(mask) = 1u64.checked_shl(u32::from(f.bit)) else {
                continue;
            };
            if bits & mask != 0 {
                names.push(f.name);
                bits &= !mask;
            }
        }
        names.extend((0..64).filter(|b| bits & (1u64 << b) != 0).map(|b| format!("bit {b}")));
        names.join(", ")
    }
}
