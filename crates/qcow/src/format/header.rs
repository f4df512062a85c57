//! The qcow2 header in cluster 0: parsing it from bytes, validating it the way QEMU does at open, and writing it
//! back.
//!
//! The flow is parse, then validate. [`Header::parse`] reads a plain struct from the bytes of cluster 0 and
//! refuses only what it cannot read safely or represent: a bad magic, version or cluster size, a `header_length` or
//! backing file name that lies outside cluster 0, an unknown compression type, a header extension that runs past
//! the extension area. [`Header::validate`]
//! then applies every other rule QEMU enforces at open, in QEMU's order, so the first error reported is the one
//! QEMU would report.
//!
//! Invariants kept by a parsed header:
//! - every header extension is kept, known or not, in file order, without its end marker;
//! - bytes of the fixed header past the fields this library knows (up to `header_length`) are kept verbatim in
//!   `extra_header_bytes`, so a header rewritten by an older library loses nothing a newer one wrote;
//! - `backing_file` holds the raw name bytes, which are not NUL terminated on disk.
//!
//! [`Header::serialize`] lays the header out the way qemu-img does: the fixed fields, the extensions each padded
//! to 8 bytes, the end marker, and the backing file name right after it. For a header that qemu-img wrote,
//! `serialize(parse(bytes))` reproduces its bytes exactly; for any header `h` that serializes,
//! `parse(serialize(h))` equals `h` after [`Header::layout`].

use super::feature::{self, FeatureKind};
use super::FormatError;

/// The magic number that opens every qcow2 image: `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// The length of a version 2 header; version 2 has no `header_length` field.
pub const HEADER_V2_LENGTH: u32 = 72;
/// The smallest `header_length` of a version 3 header (the compression type byte is optional).
pub const HEADER_V3_LENGTH: u32 = 104;

/// QEMU's `MIN_CLUSTER_BITS`: 512-byte clusters.
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's `MAX_CLUSTER_BITS`: 2 MiB clusters.
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// Offset of the compression type byte; it exists only when `header_length` is larger than this.
const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// The `header_length` qemu-img 10 writes: QEMU's `sizeof(QCowHeader)`, padded to 8 bytes.
const QEMU_HEADER_LENGTH: u32 = 112;
/// QEMU refuses backing file names longer than this.
pub(super) const MAX_BACKING_FILE_NAME: u64 = 1023;
/// QEMU's `backing_format` buffer is 16 bytes, NUL included.
pub(super) const MAX_BACKING_FORMAT_NAME: u32 = 15;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`.
pub(super) const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_L1_SIZE`.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub(super) const MAX_SNAPSHOTS: u32 = 65536;
/// The fixed part of a snapshot table entry; QEMU sizes its snapshot table check by it.
pub(super) const SNAPSHOT_HEADER_BYTES: u64 = 40;
/// QEMU keeps the L1 index of the end of the disk in an `int`.
pub(super) const MAX_L1_INDEX: u64 = i32::MAX as u64;
/// Subclusters (cluster_size / 32) must be at least 512 bytes.
pub(super) const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// `crypt_method` for LUKS, the only method that has a crypto header extension.
pub(super) const CRYPT_LUKS: u32 = 2;
/// The data of the crypto header extension: `u64 offset, u64 length`.
pub(super) const CRYPTO_EXTENSION_BYTES: u32 = 16;
/// The data of the bitmaps extension: `u32 nb_bitmaps, u32 reserved, u64 directory_size, u64 directory_offset`.
pub(super) const BITMAPS_EXTENSION_BYTES: u32 = 24;
/// A feature-name table entry: `u8 type, u8 bit, name[46]`.
const FEATURE_ENTRY_BYTES: usize = 48;
/// The name field of a feature-name table entry.
const FEATURE_NAME_BYTES: usize = 46;
/// QEMU writes its feature-name table only for clusters larger than 4 KiB.
const MIN_FEATURE_TABLE_CLUSTER_BITS: u32 = 13;

/// The algorithm of compressed clusters (the header byte at offset 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib"); the only type before the field existed.
    #[default]
    Deflate = 0,
    /// Zstandard frames.
    Zstd = 1,
}

impl CompressionType {
    /// The type for an on-disk byte, or `None` for a value the specification does not define.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(CompressionType::Deflate),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// The on-disk byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// One entry of the feature-name table extension: a human-readable name for a feature bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which feature word the bit is in.
    pub kind: FeatureKind,
    /// The bit number, 0..=63.
    pub bit: u8,
    /// The name; at most 46 bytes are stored.
    pub name: String,
}

impl FeatureName {
    /// The 48-byte on-disk entry. A name longer than 46 bytes is cut, as QEMU prints at most 46 bytes of it.
    pub fn to_bytes(&self) -> [u8; FEATURE_ENTRY_BYTES] {
        let mut out = [0u8; FEATURE_ENTRY_BYTES];
        let mut fields = out.iter_mut();
        if let Some(b) = fields.next() {
            *b = self.kind.as_u8();
        }
        if let Some(b) = fields.next() {
            *b = self.bit;
        }
        for (dst, src) in fields.zip(self.name.bytes().take(FEATURE_NAME_BYTES)) {
            *dst = src;
        }
        out
    }

    /// Decodes one entry, zero-padded if `entry` is short (as QEMU's buffer is). `None` for an undefined type or
    /// an empty name.
    fn from_entry(entry: &[u8]) -> Option<FeatureName> {
        let kind = FeatureKind::from_u8(*entry.first()?)?;
        let bit = entry.get(1).copied().unwrap_or(0);
        let raw = entry.get(2..).unwrap_or(&[]);
        let raw = raw.get(..FEATURE_NAME_BYTES).unwrap_or(raw);
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name = raw.get(..len).unwrap_or(&[]);
        if name.is_empty() {
            return None;
        }
        Some(FeatureName { kind, bit, name: String::from_utf8_lossy(name).into_owned() })
    }
}

/// A header extension: `u32 type, u32 length, data`, padded to 8 bytes on disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Extension {
    /// The extension's type (one of the associated constants, or an unknown type to preserve).
    pub kind: u32,
    /// The data, without padding.
    pub data: Vec<u8>,
}

impl Extension {
    /// Type 0 ends the extension list; it is never stored in [`Header::extensions`].
    pub const END: u32 = 0;
    /// Backing file format name, e.g. `raw` or `qcow2`.
    pub const BACKING_FORMAT: u32 = 0xE279_2ACA;
    /// Feature-name table: 48-byte entries naming feature bits.
    pub const FEATURE_TABLE: u32 = 0x6803_F857;
    /// Persistent dirty bitmaps: `u32 nb_bitmaps, u32 reserved, u64 directory_size, u64 directory_offset`.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer: `u64 offset, u64 length`.
    pub const CRYPTO: u32 = 0x0537_BE77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;

    /// An extension of type `kind` holding `data`.
    pub fn new(kind: u32, data: Vec<u8>) -> Self {
        Extension { kind, data }
    }

    /// Bytes it takes on disk: the type and length words plus the data padded to 8.
    fn disk_len(&self) -> u64 {
        8 + round_up8(len_u64(self.data.len()))
    }

    /// Where qemu-img puts an extension of this type relative to the others, so that headers built here match
    /// qemu-img's byte for byte (qcow2_update_header writes them in this order; unknown ones go last).
    fn qemu_rank(kind: u32) -> u8 {
        match kind {
            Self::BACKING_FORMAT => 0,
            Self::DATA_FILE => 1,
            Self::CRYPTO => 2,
            Self::FEATURE_TABLE => 3,
            Self::BITMAPS => 4,
            _ => 5,
        }
    }
}

/// The qcow2 header: the fixed fields, the header extensions and the backing file name, all from cluster 0.
///
/// Fields a version 2 header lacks hold the values QEMU implies: no feature bits, `refcount_order` 4,
/// `header_length` 72, deflate compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0, 0 for none. [`Header::layout`] recomputes it.
    pub backing_file_offset: u64,
    /// Length of the backing file name. [`Header::layout`] recomputes it.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 legacy AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (see [`feature`]).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the fixed header; extensions start here. [`Header::layout`] recomputes it for version 3.
    pub header_length: u32,
    /// The compression type (deflate when `header_length` is 104 or less). Set it with
    /// [`Header::set_compression_type`] to keep incompatible bit 3 in step.
    pub compression_type: CompressionType,
    /// The bytes from offset 105 up to `header_length` (QEMU's padding to 112, and any fields newer than this
    /// library), kept verbatim. Empty when `header_length` is 104 or less.
    pub extra_header_bytes: Vec<u8>,
    /// Every header extension, in file order, known or not, except the end marker.
    pub extensions: Vec<Extension>,
    /// The raw backing file name (not NUL terminated), or `None` when `backing_file_offset` is 0.
    pub backing_file: Option<Vec<u8>>,
}

/// Where [`Header::serialize`] puts things; what [`Header::layout`] stores back.
struct Layout {
    header_length: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    total: usize,
}

impl Header {
    /// Checks the magic, version and cluster size from the start of an image, and returns `cluster_bits` so that
    /// the caller knows how much of cluster 0 to read for [`Header::parse`].
    ///
    /// # Errors
    /// [`FormatError::Truncated`] if `first` is shorter than 24 bytes, then [`FormatError::BadMagic`],
    /// [`FormatError::UnsupportedVersion`] or [`FormatError::ClusterBits`].
    pub fn peek_cluster_bits(first: &[u8]) -> Result<u32, FormatError> {
        let magic = be32(first, 0, "qcow2 magic")?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = be32(first, 4, "qcow2 version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let bits = be32(first, 20, "qcow2 header")?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(FormatError::ClusterBits { bits });
        }
        Ok(bits)
    }

    /// Parses the header from the bytes of cluster 0.
    ///
    /// `cluster0` should hold the whole cluster, or the whole file if that is shorter, zero-padded to at least
    /// 512 bytes. Anything the header points at beyond `cluster0` is reported as truncated, never guessed.
    ///
    /// # Errors
    /// Those of [`Header::peek_cluster_bits`]; [`FormatError::HeaderLength`] for a version 3 `header_length`
    /// below 104 or above the cluster size; [`FormatError::BackingFileOffset`] and
    /// [`FormatError::BackingFileName`] for a backing file name outside cluster 0 or longer than 1023 bytes;
    /// [`FormatError::UnknownCompressionType`] for a compression type other than 0 and 1;
    /// [`FormatError::ExtensionOverflow`] for an extension that runs past the extension area; and
    /// [`FormatError::Truncated`] when `cluster0` ends before something the header needs.
    pub fn parse(cluster0: &[u8]) -> Result<Header, FormatError> {
        let cluster_bits = Self::peek_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(cluster0, 4, "qcow2 header")?;
        let mut h = Header {
            version,
            backing_file_offset: be64(cluster0, 8, "qcow2 header")?,
            backing_file_size: be32(cluster0, 16, "qcow2 header")?,
            cluster_bits,
            size: be64(cluster0, 24, "qcow2 header")?,
            crypt_method: be32(cluster0, 32, "qcow2 header")?,
            l1_size: be32(cluster0, 36, "qcow2 header")?,
            l1_table_offset: be64(cluster0, 40, "qcow2 header")?,
            refcount_table_offset: be64(cluster0, 48, "qcow2 header")?,
            refcount_table_clusters: be32(cluster0, 56, "qcow2 header")?,
            nb_snapshots: be32(cluster0, 60, "qcow2 header")?,
            snapshots_offset: be64(cluster0, 64, "qcow2 header")?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_V2_LENGTH,
            compression_type: CompressionType::Deflate,
            extra_header_bytes: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        let mut compression_type = 0;
        if version >= 3 {
            h.incompatible_features = be64(cluster0, 72, "qcow2 v3 header")?;
            h.compatible_features = be64(cluster0, 80, "qcow2 v3 header")?;
            h.autoclear_features = be64(cluster0, 88, "qcow2 v3 header")?;
            h.refcount_order = be32(cluster0, 96, "qcow2 v3 header")?;
            h.header_length = be32(cluster0, 100, "qcow2 v3 header")?;
            h.check_header_length()?;
            // QEMU does not require a multiple of 8 here (the specification does); mirror QEMU.
            if h.header_length > COMPRESSION_TYPE_OFFSET {
                let fields = bytes(cluster0, 0, u64::from(h.header_length), "qcow2 v3 header")?;
                let mut tail = fields.get(COMPRESSION_TYPE_OFFSET as usize..).unwrap_or(&[]).iter();
                compression_type = tail.next().copied().unwrap_or(0);
                h.extra_header_bytes = tail.copied().collect();
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err(FormatError::BackingFileOffset { offset: h.backing_file_offset, cluster_size });
        }
        // QEMU checks the type right here, before the feature bits and the extensions.
        h.compression_type = CompressionType::from_u8(compression_type)
            .ok_or(FormatError::UnknownCompressionType { value: compression_type })?;
        // Extensions may not run into the backing file name; without one they may fill the cluster.
        let ext_end = if h.backing_file_offset != 0 { h.backing_file_offset } else { cluster_size };
        h.extensions = parse_extensions(cluster0, u64::from(h.header_length), ext_end)?;
        if h.backing_file_offset != 0 {
            let max = MAX_BACKING_FILE_NAME.min(cluster_size - h.backing_file_offset);
            if u64::from(h.backing_file_size) > max {
                return Err(FormatError::BackingFileName { size: h.backing_file_size, max });
            }
            let name = bytes(cluster0, h.backing_file_offset, u64::from(h.backing_file_size), "backing file name")?;
            h.backing_file = Some(name.to_vec());
        }
        Ok(h)
    }

    /// The bytes of the header area: fixed fields, extensions, end marker and backing file name, laid out as
    /// qemu-img does (see [`Header::layout`]). The caller writes them at offset 0 and zero-fills the rest of
    /// cluster 0.
    ///
    /// # Errors
    /// [`FormatError::HeaderDoesNotFit`] when the result would be larger than a cluster;
    /// [`FormatError::Version2Field`] when a version 2 header holds a field version 2 cannot store.
    pub fn serialize(&self) -> Result<Vec<u8>, FormatError> {
        if self.version == 2 {
            self.check_v2_fields()?;
        }
        let layout = self.compute_layout()?;
        let mut out = Vec::with_capacity(layout.total);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&layout.backing_file_offset.to_be_bytes());
        out.extend_from_slice(&layout.backing_file_size.to_be_bytes());
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version != 2 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&layout.header_length.to_be_bytes());
            if layout.header_length > COMPRESSION_TYPE_OFFSET {
                out.push(self.compression_type.as_u8());
                out.extend_from_slice(&self.extra_header_bytes);
            }
        }
        for ext in &self.extensions {
            // compute_layout proved that every length fits the cluster, hence a u32.
            let len = u32::try_from(ext.data.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&ext.kind.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&ext.data);
            out.resize(out.len() + (8 - ext.data.len() % 8) % 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            out.extend_from_slice(name);
        }
        Ok(out)
    }

    /// Recomputes the fields [`Header::serialize`] derives: `backing_file_offset` and `backing_file_size` (the
    /// name goes right after the extensions' end marker, or offset 0 without a backing file) and, for version 3,
    /// `header_length` (104 when there is no compression type byte and no extra bytes, else 105 plus
    /// `extra_header_bytes`). After it, `parse(serialize(h)) == h`.
    ///
    /// # Errors
    /// [`FormatError::HeaderDoesNotFit`] when the header would be larger than a cluster.
    pub fn layout(&mut self) -> Result<(), FormatError> {
        let layout = self.compute_layout()?;
        self.header_length = layout.header_length;
        self.backing_file_offset = layout.backing_file_offset;
        self.backing_file_size = layout.backing_file_size;
        Ok(())
    }

    /// A fresh header as qemu-img 10 writes it for `qemu-img create`: version 3 gets `header_length` 112, deflate
    /// compression and, for clusters above 4 KiB, QEMU's feature-name table; version 2 gets no extensions. The
    /// table offsets and sizes (L1, refcount table) are left 0 for the caller to fill. Lazy refcounts on a
    /// version 2 header, or a version 2 `refcount_order` other than 4, make [`Header::validate`] fail, as
    /// qemu-img refuses them.
    pub fn for_create(size: u64, cluster_bits: u32, refcount_order: u32, version: u32, lazy_refcounts: bool) -> Header {
        let v3 = version != 2;
        let mut h = Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: if lazy_refcounts { feature::LAZY_REFCOUNTS } else { 0 },
            autoclear_features: 0,
            refcount_order,
            header_length: if v3 { QEMU_HEADER_LENGTH } else { HEADER_V2_LENGTH },
            compression_type: CompressionType::Deflate,
            extra_header_bytes: if v3 {
                vec![0; (QEMU_HEADER_LENGTH - COMPRESSION_TYPE_OFFSET - 1) as usize]
            } else {
                Vec::new()
            },
            extensions: Vec::new(),
            backing_file: None,
        };
        if v3 && cluster_bits >= MIN_FEATURE_TABLE_CLUSTER_BITS {
            h.set_feature_names(&feature::qemu_feature_table());
        }
        h
    }

    /// The cluster size in bytes (meaningful once `cluster_bits` is validated).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// The width of a refcount in bits (meaningful once `refcount_order` is validated).
    pub fn refcount_bits(&self) -> u64 {
        1u64 << self.refcount_order.min(63)
    }

    /// The number of entries in an L2 table (one cluster of 8-byte, or 16-byte extended, entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.has_extended_l2() { 16 } else { 8 }
    }

    /// The number of L1 entries the virtual size needs.
    pub fn l1_entries_required(&self) -> u64 {
        l1_entries_required(self.size, self.cluster_bits, self.has_extended_l2())
    }

    /// Sets the compression type and incompatible bit 3 to match.
    pub fn set_compression_type(&mut self, ty: CompressionType) {
        self.compression_type = ty;
        self.set_incompatible(feature::COMPRESSION_TYPE, ty != CompressionType::Deflate);
    }

    /// Whether L2 entries are extended (incompatible bit 4).
    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & feature::EXTENDED_L2 != 0
    }

    /// Turns extended L2 entries on or off (incompatible bit 4).
    pub fn set_extended_l2(&mut self, on: bool) {
        self.set_incompatible(feature::EXTENDED_L2, on);
    }

    /// Whether the dirty bit is set: refcounts may be stale.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & feature::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & feature::CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled (compatible bit 0).
    pub fn has_lazy_refcounts(&self) -> bool {
        self.compatible_features & feature::LAZY_REFCOUNTS != 0
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & feature::EXTERNAL_DATA_FILE != 0
    }

    /// Whether the external data file is a valid raw image on its own (autoclear bit 1).
    pub fn is_data_file_raw(&self) -> bool {
        self.autoclear_features & feature::DATA_FILE_RAW != 0
    }

    /// The backing file format name from its extension, cut at a NUL as QEMU reads it.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(Extension::BACKING_FORMAT).map(|e| c_string(&e.data))
    }

    /// The external data file name from its extension, cut at a NUL as QEMU reads it.
    pub fn external_data_file(&self) -> Option<String> {
        self.extension(Extension::DATA_FILE).map(|e| c_string(&e.data))
    }

    /// The entries of the image's feature-name table, up to the first empty name (where QEMU stops); entries of
    /// an undefined type are skipped. Empty without a table.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        let Some(table) = self.extension(Extension::FEATURE_TABLE) else {
            return Vec::new();
        };
        let mut names = Vec::new();
        for entry in table.data.chunks(FEATURE_ENTRY_BYTES) {
            if entry.get(2).copied().unwrap_or(0) == 0 {
                break;
            }
            names.extend(FeatureName::from_entry(entry));
        }
        names
    }

    /// Replaces the feature-name table extension with `names` (removes it when `names` is empty).
    pub fn set_feature_names(&mut self, names: &[FeatureName]) {
        if names.is_empty() {
            self.remove_extension(Extension::FEATURE_TABLE);
        } else {
            let data = names.iter().flat_map(|n| n.to_bytes()).collect();
            self.set_extension(Extension::FEATURE_TABLE, data);
        }
    }

    /// The extension of type `kind`. With duplicates, the last one, which is the one QEMU ends up using.
    pub fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().rev().find(|e| e.kind == kind)
    }

    /// Sets the data of the extension of type `kind`: replaces it where it is (dropping duplicates), or inserts
    /// it where qemu-img would put it. `kind` 0 is the end marker and is ignored.
    pub fn set_extension(&mut self, kind: u32, data: Vec<u8>) {
        if kind == Extension::END {
            return;
        }
        if let Some(pos) = self.extensions.iter().position(|e| e.kind == kind) {
            let mut index = 0;
            self.extensions.retain(|e| {
                let keep = e.kind != kind || index == pos;
                index += 1;
                keep
            });
            if let Some(ext) = self.extensions.get_mut(pos) {
                ext.data = data;
            }
            return;
        }
        let rank = Extension::qemu_rank(kind);
        let at =
            self.extensions.iter().position(|e| Extension::qemu_rank(e.kind) > rank).unwrap_or(self.extensions.len());
        self.extensions.insert(at, Extension::new(kind, data));
    }

    /// Removes every extension of type `kind`; returns the one [`Header::extension`] would have returned.
    pub fn remove_extension(&mut self, kind: u32) -> Option<Extension> {
        let pos = self.extensions.iter().rposition(|e| e.kind == kind)?;
        let removed = self.extensions.remove(pos);
        self.extensions.retain(|e| e.kind != kind);
        Some(removed)
    }

    /// Sets (or, with `None`, clears) the backing file name and its format extension.
    pub fn set_backing_file(&mut self, name: Option<&[u8]>, format: Option<&str>) {
        self.backing_file = name.map(<[u8]>::to_vec);
        match format {
            Some(f) => self.set_extension(Extension::BACKING_FORMAT, f.as_bytes().to_vec()),
            None => {
                self.remove_extension(Extension::BACKING_FORMAT);
            }
        }
    }

    /// Sets (or, with `None`, clears) the external data file: incompatible bit 2, the name extension, and
    /// autoclear bit 1 when `raw` (the data file alone is a valid raw image).
    pub fn set_external_data_file(&mut self, name: Option<&str>, raw: bool) {
        self.set_incompatible(feature::EXTERNAL_DATA_FILE, name.is_some());
        let raw = raw && name.is_some();
        if raw {
            self.autoclear_features |= feature::DATA_FILE_RAW;
        } else {
            self.autoclear_features &= !feature::DATA_FILE_RAW;
        }
        match name {
            Some(n) => self.set_extension(Extension::DATA_FILE, n.as_bytes().to_vec()),
            None => {
                self.remove_extension(Extension::DATA_FILE);
            }
        }
    }

    fn set_incompatible(&mut self, bit: u64, on: bool) {
        if on {
            self.incompatible_features |= bit;
        } else {
            self.incompatible_features &= !bit;
        }
    }

    fn compute_layout(&self) -> Result<Layout, FormatError> {
        let cluster_size = self.cluster_size();
        let header_length = if self.version == 2 {
            HEADER_V2_LENGTH
        } else if self.header_length <= COMPRESSION_TYPE_OFFSET
            && self.compression_type == CompressionType::Deflate
            && self.extra_header_bytes.is_empty()
        {
            HEADER_V3_LENGTH
        } else {
            let extra = len_u64(self.extra_header_bytes.len());
            u32::try_from(extra.saturating_add(u64::from(COMPRESSION_TYPE_OFFSET) + 1)).unwrap_or(u32::MAX)
        };
        let extensions = self.extensions.iter().fold(0u64, |acc, e| acc.saturating_add(e.disk_len()));
        let name_offset = u64::from(header_length).saturating_add(extensions).saturating_add(8);
        let name_len = self.backing_file.as_ref().map_or(0, |n| len_u64(n.len()));
        let needed = name_offset.saturating_add(name_len);
        // The fixed header may not reach past a cluster either (a u32::MAX header_length from a huge extra is
        // caught here too, as cluster sizes stay far below 4 GiB).
        if needed > cluster_size || u64::from(header_length) >= u64::from(u32::MAX) {
            return Err(FormatError::HeaderDoesNotFit { needed, cluster_size });
        }
        let total = usize::try_from(needed).map_err(|_| FormatError::HeaderDoesNotFit { needed, cluster_size })?;
        let (backing_file_offset, backing_file_size) = match &self.backing_file {
            // needed <= cluster_size keeps both within range.
            Some(name) => (name_offset, u32::try_from(name.len()).unwrap_or(u32::MAX)),
            None => (0, 0),
        };
        Ok(Layout { header_length, backing_file_offset, backing_file_size, total })
    }
}

/// The number of L1 entries needed to map `size` bytes: ceil(size / (cluster_size * l2_entries)), where an L2
/// table holds cluster_size / 8 entries, or cluster_size / 16 with extended L2. Never panics; meaningful for
/// `cluster_bits` in 9..=21.
pub fn l1_entries_required(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let entry_bits = if extended_l2 { 4 } else { 3 };
    let shift = cluster_bits.saturating_add(cluster_bits.saturating_sub(entry_bits));
    if shift >= 64 {
        return u64::from(size != 0);
    }
    let whole = size >> shift;
    whole + u64::from(size & ((1u64 << shift) - 1) != 0)
}

/// Parses header extensions from `start` until the end marker or `end`, checking each length against `end` before
/// it is used (QEMU's `qcow2_read_extensions`).
fn parse_extensions(buf: &[u8], start: u64, end: u64) -> Result<Vec<Extension>, FormatError> {
    let mut extensions = Vec::new();
    let mut offset = start;
    while offset < end {
        let ty = be32(buf, offset, "header extension")?;
        let length = be32(buf, offset.saturating_add(4), "header extension")?;
        let data_start = offset.saturating_add(8);
        if data_start > end || u64::from(length) > end - data_start {
            return Err(FormatError::ExtensionOverflow { ty, offset, length, end });
        }
        if ty == Extension::END {
            break;
        }
        let data = bytes(buf, data_start, u64::from(length), "header extension")?;
        extensions.push(Extension::new(ty, data.to_vec()));
        offset = data_start + round_up8(u64::from(length));
    }
    Ok(extensions)
}

/// `len` bytes of `buf` at `at`, or [`FormatError::Truncated`].
fn bytes<'a>(buf: &'a [u8], at: u64, len: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
    let needed = at.saturating_add(len);
    let truncated = || FormatError::Truncated { what, needed, available: len_u64(buf.len()) };
    let start = usize::try_from(at).map_err(|_| truncated())?;
    let stop = usize::try_from(needed).map_err(|_| truncated())?;
    buf.get(start..stop).ok_or_else(truncated)
}

/// The big-endian u32 at `at`, or [`FormatError::Truncated`].
fn be32(buf: &[u8], at: u64, what: &'static str) -> Result<u32, FormatError> {
    let b = bytes(buf, at, 4, what)?;
    let arr: [u8; 4] = b.try_into().map_err(|_| FormatError::Truncated {
        what,
        needed: at.saturating_add(4),
        available: len_u64(buf.len()),
    })?;
    Ok(u32::from_be_bytes(arr))
}

/// The big-endian u64 at `at`, or [`FormatError::Truncated`].
fn be64(buf: &[u8], at: u64, what: &'static str) -> Result<u64, FormatError> {
    let b = bytes(buf, at, 8, what)?;
    let arr: [u8; 8] = b.try_into().map_err(|_| FormatError::Truncated {
        what,
        needed: at.saturating_add(8),
        available: len_u64(buf.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn round_up8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

pub(super) fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The bytes before the first NUL, as C reads a string.
pub(super) fn c_bytes(data: &[u8]) -> &[u8] {
    let len = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    data.get(..len).unwrap_or(data)
}

fn c_string(data: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(data)).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::Command;

    /// Runs `qemu-img create -f qcow2 ARGS` in a fresh directory (which holds a 10 MiB `base.raw` to use as a
    /// backing file) and returns cluster 0 of `img.qcow2` as `Header::parse` expects it.
    fn qemu_img_create(args: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join("base.raw")).unwrap().set_len(10 << 20).unwrap();
        let out = match Command::new("qemu-img")
            .current_dir(dir.path())
            .args(["create", "-q", "-f", "qcow2"])
            .args(args)
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("cannot run qemu-img ({e}): install qemu-utils"),
        };
        assert!(out.status.success(), "qemu-img create {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        cluster0(&dir.path().join("img.qcow2"))
    }

    fn cluster0(path: &Path) -> Vec<u8> {
        let data = std::fs::read(path).unwrap();
        let bits = Header::peek_cluster_bits(&data).unwrap();
        let mut c = data[..data.len().min(1 << bits)].to_vec();
        c.resize(c.len().max(512), 0);
        c
    }

    /// Parses and validates a qemu-img header and checks that serializing reproduces its bytes exactly.
    fn assert_byte_exact(bytes: &[u8]) -> Header {
        let h = Header::parse(bytes).unwrap();
        h.validate(false).unwrap();
        h.validate(true).unwrap();
        let out = h.serialize().unwrap();
        assert_eq!(out[..], bytes[..out.len()], "serialize differs from qemu-img");
        assert!(bytes[out.len()..].iter().all(|&b| b == 0));
        let mut laid = h.clone();
        laid.layout().unwrap();
        assert_eq!(laid, h, "qemu-img's layout is ours");
        h
    }

    /// `Header::for_create` with the table fields qemu-img chose copied over.
    fn for_create_like(h: &Header) -> Header {
        let mut n = Header::for_create(h.size, h.cluster_bits, h.refcount_order, h.version, h.has_lazy_refcounts());
        n.l1_size = h.l1_size;
        n.l1_table_offset = h.l1_table_offset;
        n.refcount_table_offset = h.refcount_table_offset;
        n.refcount_table_clusters = h.refcount_table_clusters;
        n
    }

    fn assert_same_bytes(built: &Header, qemu: &[u8]) {
        let out = built.serialize().unwrap();
        assert_eq!(out[..], qemu[..out.len()], "for_create differs from qemu-img");
        assert!(qemu[out.len()..].iter().all(|&b| b == 0));
    }

    /// A valid 1 GiB, 64 KiB-cluster header laid out like qemu-img's.
    fn valid() -> Header {
        let mut h = Header::for_create(1 << 30, 16, 4, 3, false);
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.l1_table_offset = 0x30000;
        h.l1_size = 2;
        h.validate(true).unwrap();
        h
    }

    fn valid_bytes() -> Vec<u8> {
        let mut b = valid().serialize().unwrap();
        b.resize(1 << 16, 0);
        b
    }

    fn poke32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn poke64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn parse_and_validate(b: &[u8], read_write: bool) -> Result<Header, FormatError> {
        let h = Header::parse(b)?;
        h.validate(read_write)?;
        Ok(h)
    }

    #[test]
    fn default_v3_image_matches_qemu_img_byte_for_byte() {
        let bytes = qemu_img_create(&["img.qcow2", "1G"]);
        let h = assert_byte_exact(&bytes);
        assert_eq!(h.version, 3);
        assert_eq!(h.header_length, 112);
        assert_eq!(h.extra_header_bytes, vec![0; 7]);
        assert_eq!(h.compression_type, CompressionType::Deflate);
        assert_eq!(h.feature_names(), feature::qemu_feature_table());
        assert_eq!((h.cluster_size(), h.refcount_bits(), h.l2_entries()), (65536, 16, 8192));
        assert_eq!(h.l1_entries_required(), 2);
        // The feature table makes the header area exactly 512 bytes: 112 + 8 + 8 * 48 + the end marker.
        assert_eq!(h.serialize().unwrap().len(), 512);
        assert_same_bytes(&for_create_like(&h), &bytes);
    }

    #[test]
    fn v2_image_matches_qemu_img_and_has_no_extensions() {
        let bytes = qemu_img_create(&["-o", "compat=0.10", "img.qcow2", "1G"]);
        let h = assert_byte_exact(&bytes);
        assert_eq!((h.version, h.header_length, h.refcount_order), (2, 72, 4));
        assert!(h.extensions.is_empty());
        assert_same_bytes(&for_create_like(&h), &bytes);
    }

    #[test]
    fn v2_image_with_backing_file_keeps_the_format_extension() {
        let bytes = qemu_img_create(&["-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "img.qcow2"]);
        let h = assert_byte_exact(&bytes);
        assert_eq!(h.backing_format().as_deref(), Some("raw"));
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.raw"[..]));
        assert_eq!(h.backing_file_offset, 72 + 16 + 8);
        let mut built = for_create_like(&h);
        built.set_backing_file(Some(b"base.raw"), Some("raw"));
        assert_same_bytes(&built, &bytes);
    }

    #[test]
    fn extended_l2_image_matches_qemu_img() {
        let bytes = qemu_img_create(&["-o", "extended_l2=on", "img.qcow2", "1G"]);
        let h = assert_byte_exact(&bytes);
        assert!(h.has_extended_l2());
        assert_eq!(h.l2_entries(), 4096);
        assert_eq!(h.l1_size, 4);
        let mut built = for_create_like(&h);
        built.set_extended_l2(true);
        assert_same_bytes(&built, &bytes);
    }

    #[test]
    fn zstd_image_sets_compression_byte_and_bit() {
        let bytes = qemu_img_create(&["-o", "compression_type=zstd", "img.qcow2", "64M"]);
        let h = assert_byte_exact(&bytes);
        assert_eq!(h.compression_type, CompressionType::Zstd);
        assert_eq!(h.incompatible_features, feature::COMPRESSION_TYPE);
        let mut built = for_create_like(&h);
        built.set_compression_type(CompressionType::Zstd);
        assert_same_bytes(&built, &bytes);
    }

    #[test]
    fn backing_file_name_follows_the_end_marker() {
        let bytes = qemu_img_create(&["-b", "base.raw", "-F", "raw", "img.qcow2"]);
        let h = assert_byte_exact(&bytes);
        assert_eq!(h.size, 10 << 20);
        assert_eq!(h.backing_format().as_deref(), Some("raw"));
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.raw"[..]));
        assert_eq!((h.backing_file_offset, h.backing_file_size), (0x210, 8));
        let mut built = for_create_like(&h);
        built.set_backing_file(Some(b"base.raw"), Some("raw"));
        assert_same_bytes(&built, &bytes);
    }

    #[test]
    fn lazy_refcounts_image_sets_only_the_compatible_bit() {
        let bytes = qemu_img_create(&["-o", "lazy_refcounts=on", "img.qcow2", "1G"]);
        let h = assert_byte_exact(&bytes);
        assert!(h.has_lazy_refcounts());
        assert!(!h.is_dirty());
        assert_same_bytes(&for_create_like(&h), &bytes);
    }

    #[test]
    fn small_clusters_get_no_feature_table() {
        for cluster_size in ["512", "4096"] {
            let opts = format!("cluster_size={cluster_size}");
            let bytes = qemu_img_create(&["-o", &opts, "-b", "base.raw", "-F", "raw", "img.qcow2"]);
            let h = assert_byte_exact(&bytes);
            assert!(h.extension(Extension::FEATURE_TABLE).is_none());
            let mut built = for_create_like(&h);
            built.set_backing_file(Some(b"base.raw"), Some("raw"));
            assert_same_bytes(&built, &bytes);
        }
        let bytes = qemu_img_create(&["-o", "cluster_size=8192", "img.qcow2", "1M"]);
        assert!(assert_byte_exact(&bytes).extension(Extension::FEATURE_TABLE).is_some());
    }

    #[test]
    fn external_data_file_image_matches_qemu_img() {
        let bytes = qemu_img_create(&["-o", "data_file=d.raw,data_file_raw=on", "img.qcow2", "10M"]);
        let h = assert_byte_exact(&bytes);
        assert!(h.has_external_data_file() && h.is_data_file_raw());
        assert_eq!(h.external_data_file().as_deref(), Some("d.raw"));
        let mut built = for_create_like(&h);
        built.set_external_data_file(Some("d.raw"), true);
        assert_same_bytes(&built, &bytes);
    }

    #[test]
    fn every_refcount_width_matches_qemu_img() {
        for order in 0..=6u32 {
            let opts = format!("refcount_bits={}", 1u32 << order);
            let bytes = qemu_img_create(&["-o", &opts, "img.qcow2", "1M"]);
            let h = assert_byte_exact(&bytes);
            assert_eq!(h.refcount_order, order);
            assert_same_bytes(&for_create_like(&h), &bytes);
        }
    }

    #[test]
    fn qemu_img_rounds_the_virtual_size_up_to_a_sector() {
        let h = assert_byte_exact(&qemu_img_create(&["img.qcow2", "1000001"]));
        assert_eq!(h.size, 1_000_448);
    }

    #[test]
    fn peek_reads_cluster_bits_and_refuses_garbage() {
        let b = valid_bytes();
        assert_eq!(Header::peek_cluster_bits(&b[..512]), Ok(16));
        assert!(matches!(
            Header::peek_cluster_bits(&b[..10]),
            Err(FormatError::Truncated { needed: 24, available: 10, .. })
        ));
    }

    #[test]
    fn parse_refuses_a_short_buffer() {
        let b = valid_bytes();
        assert!(matches!(Header::parse(&b[..100]), Err(FormatError::Truncated { .. })));
        // The feature table ends at 504: cutting into it is truncation, not a bad extension.
        assert!(matches!(Header::parse(&b[..300]), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = valid_bytes();
        poke32(&mut b, 0, 0x514649fc);
        assert_eq!(parse_and_validate(&b, false), Err(FormatError::BadMagic { found: 0x514649fc }));
    }

    #[test]
    fn versions_1_and_4_are_unsupported() {
        for version in [1, 4] {
            let mut b = valid_bytes();
            poke32(&mut b, 4, version);
            let e = parse_and_validate(&b, false).unwrap_err();
            assert_eq!(e, FormatError::UnsupportedVersion { version });
            assert!(e.is_unsupported());
        }
    }

    #[test]
    fn cluster_bits_outside_9_to_21_are_refused() {
        for bits in [8, 22, 64, u32::MAX] {
            let mut b = valid_bytes();
            poke32(&mut b, 20, bits);
            assert_eq!(parse_and_validate(&b, false), Err(FormatError::ClusterBits { bits }));
        }
    }

    #[test]
    fn header_length_bounds_are_enforced() {
        for length in [100, 103] {
            let mut b = valid_bytes();
            poke32(&mut b, 100, length);
            assert!(matches!(
                parse_and_validate(&b, false),
                Err(FormatError::HeaderLength { length: l, .. }) if l == length
            ));
        }
        let mut b = valid_bytes();
        poke32(&mut b, 100, 0x10008);
        assert!(matches!(parse_and_validate(&b, false), Err(FormatError::HeaderLength { length: 0x10008, .. })));
    }

    #[test]
    fn header_length_104_has_no_compression_byte_and_odd_lengths_are_accepted() {
        let mut h = valid();
        h.extra_header_bytes.clear();
        h.header_length = 104;
        h.extensions.clear();
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 104 + 8);
        let back = Header::parse(&pad(&b)).unwrap();
        assert_eq!(back, h);
        // 109 is not a multiple of 8; QEMU accepts it, and so do we.
        h.extra_header_bytes = vec![1, 2, 3, 4];
        h.layout().unwrap();
        assert_eq!(h.header_length, 109);
        let back = parse_and_validate(&pad(&h.serialize().unwrap()), true).unwrap();
        assert_eq!(back, h);
    }

    fn pad(b: &[u8]) -> Vec<u8> {
        let mut v = b.to_vec();
        v.resize(1 << 16, 0);
        v
    }

    #[test]
    fn unknown_header_fields_are_preserved() {
        let mut h = valid();
        h.extra_header_bytes = vec![0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x11, 0x22];
        h.layout().unwrap();
        assert_eq!(h.header_length, 120);
        let back = parse_and_validate(&pad(&h.serialize().unwrap()), true).unwrap();
        assert_eq!(back.extra_header_bytes, h.extra_header_bytes);
        assert_eq!(back, h);
    }

    #[test]
    fn backing_offset_outside_cluster_0_is_refused() {
        let mut b = valid_bytes();
        poke64(&mut b, 8, 0x10001);
        assert_eq!(
            parse_and_validate(&b, false),
            Err(FormatError::BackingFileOffset { offset: 0x10001, cluster_size: 0x10000 })
        );
    }

    #[test]
    fn backing_name_of_1024_bytes_is_refused() {
        let mut b = valid_bytes();
        poke64(&mut b, 8, 0x1000);
        poke32(&mut b, 16, 1024);
        assert_eq!(parse_and_validate(&b, false), Err(FormatError::BackingFileName { size: 1024, max: 1023 }));
        poke32(&mut b, 16, 1023);
        let h = parse_and_validate(&b, false).unwrap();
        assert_eq!(h.backing_file.unwrap().len(), 1023);
        // Near the end of the cluster, what is left of it is the limit.
        poke64(&mut b, 8, 0xfff0);
        poke32(&mut b, 16, 0x11);
        assert_eq!(parse_and_validate(&b, false), Err(FormatError::BackingFileName { size: 0x11, max: 0x10 }));
    }

    #[test]
    fn refcount_order_7_is_refused() {
        let mut h = valid();
        h.refcount_order = 7;
        assert_eq!(h.validate(false), Err(FormatError::RefcountOrder { order: 7 }));
    }

    #[test]
    fn missing_refcount_table_is_refused() {
        let mut h = valid();
        h.refcount_table_clusters = 0;
        assert_eq!(h.validate(false), Err(FormatError::RefcountTableEmpty));
    }

    #[test]
    fn misaligned_tables_are_refused() {
        let mut h = valid();
        h.l1_table_offset = 0x30200;
        assert_eq!(h.validate(false), Err(FormatError::TableMisaligned { table: "L1 table", offset: 0x30200 }));
        let mut h = valid();
        h.refcount_table_offset = 0x10008;
        assert_eq!(h.validate(false), Err(FormatError::TableMisaligned { table: "refcount table", offset: 0x10008 }));
        let mut h = valid();
        h.snapshots_offset = 0x100;
        assert_eq!(h.validate(false), Err(FormatError::TableMisaligned { table: "snapshot table", offset: 0x100 }));
    }

    #[test]
    fn oversized_tables_are_refused() {
        let mut h = valid();
        h.l1_size = (32 << 20) / 8 + 1;
        assert_eq!(
            h.validate(false),
            Err(FormatError::TableTooLarge { table: "L1 table", bytes: (32 << 20) + 8, max: 32 << 20 })
        );
        h.l1_size = u32::MAX;
        assert!(matches!(h.validate(false), Err(FormatError::TableTooLarge { table: "L1 table", .. })));
        let mut h = valid();
        h.refcount_table_clusters = 129;
        assert_eq!(
            h.validate(false),
            Err(FormatError::TableTooLarge { table: "refcount table", bytes: 129 << 16, max: 8 << 20 })
        );
        let mut h = valid();
        h.nb_snapshots = 65537;
        assert_eq!(h.validate(false), Err(FormatError::TooManySnapshots { count: 65537 }));
        h.nb_snapshots = 65536;
        h.validate(false).unwrap();
    }

    #[test]
    fn table_offsets_that_overflow_are_refused() {
        let mut h = valid();
        h.l1_table_offset = 1 << 63;
        assert_eq!(
            h.validate(false),
            Err(FormatError::TableOverflow { table: "L1 table", offset: h.l1_table_offset, entries: 2 })
        );
        let mut h = valid();
        h.refcount_table_offset = !0xffff;
        assert!(matches!(h.validate(false), Err(FormatError::TableOverflow { table: "refcount table", .. })));
    }

    #[test]
    fn l1_too_small_for_the_virtual_size_is_refused() {
        let mut h = valid();
        h.size = (1 << 30) + 1;
        assert_eq!(h.validate(false), Err(FormatError::L1TooSmall { l1_size: 2, required: 3 }));
        h.size = u64::MAX;
        // 2^64 bytes at 64 KiB clusters need 2^35 L1 entries: more than QEMU can index.
        assert_eq!(h.validate(false), Err(FormatError::ImageTooBig { size: u64::MAX, l1_entries: 1 << 35 }));
        let mut h = valid();
        h.size = 0;
        h.l1_size = 0;
        h.l1_table_offset = 0;
        h.validate(true).unwrap();
    }

    #[test]
    fn l1_entries_required_rounds_up_and_never_panics() {
        assert_eq!(l1_entries_required(0, 16, false), 0);
        assert_eq!(l1_entries_required(1, 16, false), 1);
        assert_eq!(l1_entries_required(1 << 29, 16, false), 1);
        assert_eq!(l1_entries_required((1 << 29) + 1, 16, false), 2);
        assert_eq!(l1_entries_required(1 << 29, 16, true), 2);
        assert_eq!(l1_entries_required(u64::MAX, 9, false), 1 << 49);
        assert_eq!(l1_entries_required(u64::MAX, 40, false), 1);
        assert_eq!(l1_entries_required(5, 0, false), 5);
    }

    #[test]
    fn unknown_incompatible_bit_is_named_from_the_image_table() {
        let mut h = valid();
        let mut names = feature::qemu_feature_table();
        names.push(FeatureName { kind: FeatureKind::Incompatible, bit: 9, name: "frobnication".into() });
        h.set_feature_names(&names);
        h.incompatible_features |= (1 << 9) | (1 << 40);
        let e = h.validate(false).unwrap_err();
        assert_eq!(
            e,
            FormatError::UnknownIncompatibleFeatures {
                bits: (1 << 9) | (1 << 40),
                names: "frobnication, bit 40".into()
            }
        );
        assert!(e.is_unsupported());
        h.remove_extension(Extension::FEATURE_TABLE);
        assert!(matches!(
            h.validate(false),
            Err(FormatError::UnknownIncompatibleFeatures { names, .. }) if names == "bit 9, bit 40"
        ));
    }

    #[test]
    fn compression_bit_must_match_the_type_both_ways() {
        let mut h = valid();
        h.incompatible_features |= feature::COMPRESSION_TYPE;
        assert_eq!(h.validate(false), Err(FormatError::CompressionTypeMismatch { compression_type: 0, bit_set: true }));
        let mut h = valid();
        h.compression_type = CompressionType::Zstd;
        assert_eq!(
            h.validate(false),
            Err(FormatError::CompressionTypeMismatch { compression_type: 1, bit_set: false })
        );
        // An unknown type cannot even be represented: parse refuses it, at the point where QEMU checks it.
        let mut b = valid_bytes();
        b[104] = 2;
        poke64(&mut b, 72, feature::COMPRESSION_TYPE);
        let e = parse_and_validate(&b, false).unwrap_err();
        assert_eq!(e, FormatError::UnknownCompressionType { value: 2 });
        assert!(e.is_unsupported());
        // With header_length 104 the byte is not part of the header and is ignored.
        poke32(&mut b, 100, 104);
        poke64(&mut b, 72, 0);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.compression_type, CompressionType::Deflate);
    }

    #[test]
    fn corrupt_bit_refuses_read_write_only() {
        let mut h = valid();
        h.incompatible_features |= feature::CORRUPT;
        assert!(h.is_corrupt());
        h.validate(false).unwrap();
        assert_eq!(h.validate(true), Err(FormatError::CorruptBitSet));
    }

    #[test]
    fn dirty_bit_is_known_and_accepted() {
        let mut h = valid();
        h.incompatible_features |= feature::DIRTY;
        assert!(h.is_dirty());
        h.validate(true).unwrap();
    }

    #[test]
    fn encryption_is_unsupported() {
        let mut h = valid();
        h.crypt_method = 2;
        let e = h.validate(false).unwrap_err();
        assert_eq!(e, FormatError::EncryptionUnsupported { method: 2 });
        assert!(e.is_unsupported());
    }

    #[test]
    fn extended_l2_needs_16k_clusters() {
        let mut h = Header::for_create(1 << 20, 13, 4, 3, false);
        h.set_extended_l2(true);
        (h.refcount_table_offset, h.refcount_table_clusters) = (0x4000, 1);
        (h.l1_table_offset, h.l1_size) = (0xc000, 1);
        assert_eq!(h.validate(false), Err(FormatError::ExtendedL2ClusterTooSmall { cluster_bits: 13 }));
        h.cluster_bits = 14;
        h.validate(false).unwrap();
    }

    #[test]
    fn extension_length_overflow_is_refused() {
        let mut b = valid_bytes();
        // The feature table's length word, at 112 + 4.
        poke32(&mut b, 116, 0xffff_ffff);
        assert_eq!(
            parse_and_validate(&b, false),
            Err(FormatError::ExtensionOverflow {
                ty: Extension::FEATURE_TABLE,
                offset: 112,
                length: 0xffff_ffff,
                end: 0x10000
            })
        );
    }

    #[test]
    fn extension_crossing_the_backing_name_is_refused() {
        let mut h = valid();
        h.set_backing_file(Some(b"base"), Some("raw"));
        let mut b = pad(&h.serialize().unwrap());
        // Point the name into the middle of the feature table: the extension now crosses the end of the area.
        poke64(&mut b, 8, 0x100);
        assert!(matches!(
            parse_and_validate(&b, false),
            Err(FormatError::ExtensionOverflow { ty: Extension::FEATURE_TABLE, end: 0x100, .. })
        ));
        // An end marker that straddles the end of the area is refused too, as QEMU does.
        let mut h = valid();
        h.extensions.clear();
        h.set_backing_file(Some(b"base"), None);
        let mut b = pad(&h.serialize().unwrap());
        poke64(&mut b, 8, 116);
        assert!(matches!(
            parse_and_validate(&b, false),
            Err(FormatError::ExtensionOverflow { ty: 0, offset: 112, end: 116, .. })
        ));
    }

    #[test]
    fn extensions_may_fill_the_cluster_without_an_end_marker() {
        let mut b = vec![0u8; 512];
        let mut h = Header::for_create(1 << 20, 9, 4, 3, false);
        (h.refcount_table_offset, h.refcount_table_clusters) = (0x200, 1);
        (h.l1_table_offset, h.l1_size) = (0x600, 64);
        h.set_extension(0x1234_5678, vec![7; 512 - 112 - 8]);
        let s = h.serialize();
        assert!(matches!(s, Err(FormatError::HeaderDoesNotFit { needed: 520, cluster_size: 512 })));
        h.extensions[0].data.truncate(512 - 112 - 16);
        let s = h.serialize().unwrap();
        b[..s.len()].copy_from_slice(&s);
        // Overwrite the end marker with one more 8-byte extension that ends exactly at the cluster end.
        poke32(&mut b, 504, 0x9999);
        poke32(&mut b, 508, 0);
        let back = parse_and_validate(&b, true).unwrap();
        assert_eq!(back.extensions.len(), 2);
        assert_eq!(back.extensions[1], Extension::new(0x9999, vec![]));
    }

    #[test]
    fn known_extensions_are_checked() {
        let mut h = valid();
        h.set_backing_file(Some(b"base"), Some("a-very-long-format"));
        assert_eq!(
            h.validate(false),
            Err(FormatError::ExtensionTooLarge { ty: Extension::BACKING_FORMAT, length: 18, max: 15 })
        );
        h.set_extension(Extension::BACKING_FORMAT, vec![0xff, 0xfe]);
        assert_eq!(h.validate(false), Err(FormatError::BackingFormatName { length: 2, reason: "not UTF-8" }));
        let mut h = valid();
        h.set_extension(Extension::BITMAPS, vec![0; 16]);
        assert_eq!(
            h.validate(false),
            Err(FormatError::ExtensionLength { ty: Extension::BITMAPS, length: 16, expected: 24 })
        );
        let mut h = valid();
        h.set_extension(Extension::CRYPTO, vec![0; 16]);
        assert_eq!(h.validate(false), Err(FormatError::UnexpectedCryptoExtension { method: 0 }));
        let mut h = valid();
        h.set_external_data_file(Some("d.raw"), false);
        h.set_extension(Extension::DATA_FILE, vec![b'd', 0xc0]);
        assert_eq!(h.validate(false), Err(FormatError::ExternalDataFileName { length: 2, reason: "not UTF-8" }));
    }

    #[test]
    fn raw_data_file_bit_without_a_data_file_is_refused() {
        let mut h = valid();
        h.autoclear_features |= feature::DATA_FILE_RAW;
        assert_eq!(h.validate(false), Err(FormatError::DataFileRawWithoutDataFile));
    }

    #[test]
    fn v2_headers_cannot_carry_v3_fields() {
        let mut h = Header::for_create(1 << 30, 16, 4, 2, true);
        (h.refcount_table_offset, h.refcount_table_clusters) = (0x10000, 1);
        (h.l1_table_offset, h.l1_size) = (0x30000, 2);
        let e = FormatError::Version2Field { field: "compatible_features", value: 1 };
        assert_eq!(h.validate(false), Err(e.clone()));
        assert_eq!(h.serialize(), Err(e));
        h.compatible_features = 0;
        h.validate(false).unwrap();
        h.refcount_order = 3;
        assert_eq!(h.validate(false), Err(FormatError::Version2Field { field: "refcount_order", value: 3 }));
    }

    #[test]
    fn unknown_extensions_survive_a_round_trip_in_order() {
        let mut h = valid();
        h.set_extension(0xdead_beef, b"hello".to_vec());
        h.set_extension(0x0000_0001, vec![]);
        h.set_backing_file(Some(b"/images/base.qcow2"), Some("qcow2"));
        let kinds: Vec<u32> = h.extensions.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Extension::BACKING_FORMAT, Extension::FEATURE_TABLE, 0xdead_beef, 1]);
        h.layout().unwrap();
        let back = parse_and_validate(&pad(&h.serialize().unwrap()), true).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.backing_format().as_deref(), Some("qcow2"));
    }

    #[test]
    fn set_and_remove_extension_keep_one_copy() {
        let mut h = valid();
        h.extensions.push(Extension::new(0x77, vec![1]));
        h.extensions.push(Extension::new(0x77, vec![2]));
        assert_eq!(h.extension(0x77).unwrap().data, [2]);
        h.set_extension(0x77, vec![3]);
        assert_eq!(h.extensions.iter().filter(|e| e.kind == 0x77).count(), 1);
        assert_eq!(h.remove_extension(0x77), Some(Extension::new(0x77, vec![3])));
        assert_eq!(h.remove_extension(0x77), None);
        h.set_extension(Extension::END, vec![1]);
        assert!(h.extension(Extension::END).is_none());
    }

    #[test]
    fn header_that_does_not_fit_a_cluster_is_refused() {
        let mut h = valid();
        h.cluster_bits = 9;
        // With QEMU's feature table the header area is exactly 512 bytes: it just fits.
        assert_eq!(h.serialize().unwrap().len(), 512);
        h.set_backing_file(Some(b"x"), None);
        assert_eq!(h.serialize(), Err(FormatError::HeaderDoesNotFit { needed: 513, cluster_size: 512 }));
    }

    #[test]
    fn feature_names_stop_at_the_first_empty_name_as_qemu_does() {
        let mut h = valid();
        let mut data: Vec<u8> = feature::qemu_feature_table()[..2].iter().flat_map(FeatureName::to_bytes).collect();
        data.extend_from_slice(&[0u8; 48]);
        data.extend_from_slice(&FeatureName { kind: FeatureKind::Incompatible, bit: 9, name: "x".into() }.to_bytes());
        h.set_extension(Extension::FEATURE_TABLE, data);
        assert_eq!(h.feature_names().len(), 2);
        let long = FeatureName { kind: FeatureKind::Compatible, bit: 1, name: "n".repeat(60) };
        h.set_feature_names(&[long]);
        assert_eq!(h.feature_names()[0].name, "n".repeat(46));
    }

    prop_compose! {
        fn arb_header()(
            v3 in any::<bool>(),
            cluster_bits in 9u32..=21,
            fields in any::<[u64; 6]>(),
            small in any::<[u32; 6]>(),
            features in any::<[u64; 3]>(),
            zstd in any::<bool>(),
            extra in proptest::collection::vec(any::<u8>(), 0..16),
            extensions in proptest::collection::vec((1u32.., proptest::collection::vec(any::<u8>(), 0..40)), 0..4),
            backing in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) -> Header {
            let mut h = Header::for_create(fields[0], cluster_bits, small[0], if v3 { 3 } else { 2 }, false);
            h.crypt_method = small[1];
            h.l1_size = small[2];
            h.l1_table_offset = fields[1];
            h.refcount_table_offset = fields[2];
            h.refcount_table_clusters = small[3];
            h.nb_snapshots = small[4];
            h.snapshots_offset = fields[3];
            h.backing_file = backing;
            h.extensions = extensions.into_iter().map(|(k, d)| Extension::new(k, d)).collect();
            if v3 {
                [h.incompatible_features, h.compatible_features, h.autoclear_features] = features;
                h.compression_type = if zstd { CompressionType::Zstd } else { CompressionType::Deflate };
                h.extra_header_bytes = extra;
                h.header_length = small[5];
            } else {
                h.refcount_order = 4;
            }
            h
        }
    }

    proptest! {
        #[test]
        fn parse_inverts_serialize(mut h in arb_header()) {
            if let Ok(bytes) = h.serialize() {
                h.layout().unwrap();
                let mut padded = bytes.clone();
                padded.resize(512, 0);
                prop_assert_eq!(Header::parse(&padded), Ok(h));
            }
        }

        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..1024), magic in any::<bool>()) {
            if magic && bytes.len() >= 24 {
                bytes[..8].copy_from_slice(&[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
                bytes[20..24].copy_from_slice(&9u32.to_be_bytes());
            }
            let _ = Header::peek_cluster_bits(&bytes);
            if let Ok(h) = Header::parse(&bytes) {
                let _ = h.validate(true);
                let _ = h.feature_names();
                let _ = h.serialize();
            }
        }

        #[test]
        fn poked_valid_headers_never_panic(pokes in proptest::collection::vec((0usize..600, any::<u8>()), 1..8),
                                           word in (0usize..150, prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 63), any::<u64>()])) {
            let mut b = valid_bytes();
            b[word.0..word.0 + 8].copy_from_slice(&word.1.to_be_bytes());
            for (at, v) in pokes {
                b[at] = v;
            }
            if let Ok(h) = Header::parse(&b) {
                let _ = h.validate(true);
                let _ = h.validate(false);
                if let Ok(out) = h.serialize() {
                    let mut laid = h.clone();
                    laid.layout().unwrap();
                    prop_assert_eq!(Header::parse(&pad(&out)), Ok(laid));
                }
            }
        }
    }
}
