//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap directory it points at, and the bitmap
//! tables the directory entries point at.
//!
//! The flow is parse, then validate, as for the header. [`BitmapsExtension::parse`] and
//! [`parse_bitmap_directory`] refuse only what they cannot read or represent (a wrong extension length, a nonzero
//! reserved field, an entry running past the directory, a name or granularity QEMU could not load, an entry count
//! that disagrees with the extension); [`BitmapsExtension::validate`] and [`BitmapEntry::validate`] then apply the
//! rest of the rules QEMU applies when it loads bitmaps (`bitmap_list_load` and `check_dir_entry` in
//! block/qcow2-bitmap.c).
//!
//! QEMU reads the extension only while autoclear bit 0 (bitmaps) is set: a clear bit means a program without
//! bitmap support wrote the image, and the bitmaps are stale. That decision is the caller's.
//!
//! Invariants kept by a parsed [`BitmapEntry`]: `name` is at most 1023 bytes, `granularity_bits` is in 9..=31,
//! `extra` holds the type-specific extra data verbatim, and `serialize_bitmap_directory` reproduces the directory
//! bytes exactly for UTF-8 names (names are read lossily; QEMU writes UTF-8).

use super::entry::OFFSET_MASK;

/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`: 1 KiB per bitmap.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// The data of the bitmaps header extension: `u32 nb_bitmaps, u32 reserved, u64 size, u64 offset`.
const EXTENSION_BYTES: usize = 24;
/// The fixed part of a directory entry.
const ENTRY_FIXED_BYTES: u64 = 24;
/// QEMU's `BME_MAX_NAME_SIZE`: bytes of a bitmap name.
pub const MAX_BITMAP_NAME_BYTES: usize = 1023;
/// QEMU's `BME_MIN_GRANULARITY_BITS` and `BME_MAX_GRANULARITY_BITS`: a bit covers 512 bytes to 2 GiB.
pub const BITMAP_GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// QEMU's `BME_MAX_TABLE_SIZE`: entries of one bitmap table.
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 0x800_0000;
/// QEMU's `BME_MAX_PHYS_SIZE`: the bitmap data of one bitmap, which QEMU keeps in RAM.
pub const MAX_BITMAP_DATA_BYTES: u64 = 0x2000_0000;
/// Flag bit 0: the bitmap was in use (open read-write) and may be inconsistent.
pub const BITMAP_FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks writes whenever the image is opened.
pub const BITMAP_FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU does not know; it refuses bitmaps that set any.
const RESERVED_FLAGS: u32 = !(BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO);
/// The only bitmap type defined: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// Bits 1..=8 and 56..=63 of a bitmap table entry.
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bit 0 of a bitmap table entry without an offset: that part of the bitmap is all ones.
const TABLE_ALL_ONES: u64 = 1;

/// The bitmaps extension, its directory or one of its entries failed to parse or to validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// The bitmaps header extension is not 24 bytes long.
    #[error("bitmaps header extension has length {length:#x}, expected 0x18")]
    ExtensionLength {
        /// The extension's data length.
        length: u64,
    },
    /// The reserved word of the bitmaps header extension is not zero.
    #[error("bitmaps header extension reserved field is {value:#x}, must be 0")]
    ReservedNotZero {
        /// The reserved word found.
        value: u32,
    },
    /// More bitmaps than QEMU supports.
    #[error("too many bitmaps: {count}, at most 65535")]
    TooMany {
        /// The `nb_bitmaps` found.
        count: u32,
    },
    /// The extension is present but announces no bitmaps.
    #[error("bitmaps header extension announces zero bitmaps")]
    NoBitmaps,
    /// The directory does not start on a cluster boundary.
    #[error("bitmap directory offset {offset:#x} is not aligned to a cluster")]
    DirectoryMisaligned {
        /// The `bitmap_directory_offset` found.
        offset: u64,
    },
    /// The directory is empty, or larger than QEMU accepts.
    #[error("bitmap directory size {size:#x} is outside 0x1..=0x3fffc00")]
    DirectorySize {
        /// The `bitmap_directory_size` found.
        size: u64,
    },
    /// The directory would end past the largest signed 64-bit file offset.
    #[error("bitmap directory at {offset:#x} with size {size:#x} overflows the file offset range")]
    DirectoryOverflow {
        /// The `bitmap_directory_offset` found.
        offset: u64,
        /// The `bitmap_directory_size` found.
        size: u64,
    },
    /// A directory entry runs past the end of the directory.
    #[error(
        "bitmap directory entry {index} at directory offset {offset:#x} truncated: needs {needed:#x} bytes, the \
         directory has {available:#x}"
    )]
    Truncated {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to the directory.
        offset: u64,
        /// The directory length the entry needs.
        needed: u64,
        /// The directory length there is.
        available: u64,
    },
    /// A bitmap name is longer than QEMU's 1023 bytes.
    #[error("bitmap directory entry {index} at directory offset {offset:#x} has a {size:#x}-byte name, at most 0x3ff")]
    NameTooLong {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to the directory.
        offset: u64,
        /// The `name_size` found.
        size: u16,
    },
    /// A granularity outside 512 bytes .. 2 GiB.
    #[error("bitmap directory entry {index} at directory offset {offset:#x} has granularity_bits {bits}, not 9..=31")]
    Granularity {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to the directory.
        offset: u64,
        /// The `granularity_bits` found.
        bits: u8,
    },
    /// The directory holds more entries than the extension announces.
    #[error("bitmap directory holds more than the {count} entries announced: another starts at {offset:#x}")]
    MoreEntries {
        /// The count the extension announces.
        count: u32,
        /// Where the surplus entry starts, relative to the directory.
        offset: u64,
    },
    /// The directory holds fewer entries than the extension announces.
    #[error("bitmap directory holds {found} entries, the header extension announces {count}")]
    FewerEntries {
        /// The count the extension announces.
        count: u32,
        /// The entries found.
        found: u32,
    },
    /// A bitmap carries type-specific extra data; none is defined, and QEMU refuses to load such a bitmap.
    #[error("bitmap '{name}' has {size:#x} bytes of extra data, which no bitmap type defines")]
    ExtraData {
        /// The bitmap's name.
        name: String,
        /// The `extra_data_size` found.
        size: u32,
    },
    /// A bitmap breaks one of QEMU's constraints on directory entries.
    #[error("bitmap '{name}' does not satisfy the constraints: {reason} ({value:#x})")]
    Constraint {
        /// The bitmap's name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
        /// The offending value.
        value: u64,
    },
    /// A new bitmap needs a name.
    #[error("a bitmap name cannot be empty")]
    NameEmpty,
    /// A new bitmap's name is longer than QEMU's 1023 bytes.
    #[error("bitmap name of {length:#x} bytes is longer than 0x3ff")]
    NameLength {
        /// The name's length in bytes.
        length: u64,
    },
    /// A granularity that is not a power of two from 512 bytes to 2 GiB.
    #[error("bitmap granularity {granularity:#x} is not a power of two from 0x200 to 0x80000000")]
    GranularityInvalid {
        /// The granularity asked for, in bytes.
        granularity: u64,
    },
    /// The bitmap would hold more data than QEMU keeps in memory (512 MiB) or than a table can describe.
    #[error("a bitmap of {bytes:#x} bytes is larger than QEMU allows (0x20000000 bytes, 0x8000000 table entries)")]
    DataTooLarge {
        /// Bytes of bitmap data the disk would need at the granularity asked for.
        bytes: u64,
    },
    /// A disk of zero bytes cannot carry a bitmap: its table would have no entries, which QEMU refuses.
    #[error("a disk of zero bytes cannot carry a bitmap")]
    EmptyDisk,
    /// The directory would grow past QEMU's limit with one more entry.
    #[error("the bitmap directory would take {size:#x} bytes, more than 0x3fffc00")]
    DirectoryFull {
        /// The directory size with the new entry.
        size: u64,
    },
}

/// The bitmaps header extension (type 0x23852875): where the bitmap directory is and how many entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

impl BitmapsExtension {
    /// Parses the extension's data.
    ///
    /// # Errors
    /// [`BitmapError::ExtensionLength`] unless `data` is exactly 24 bytes; [`BitmapError::ReservedNotZero`].
    pub fn parse(data: &[u8]) -> Result<Self, BitmapError> {
        let fixed: &[u8; EXTENSION_BYTES] =
            data.try_into().map_err(|_| BitmapError::ExtensionLength { length: len_u64(data.len()) })?;
        let mut r = Reader(fixed);
        let nb_bitmaps = r.u32();
        let reserved = r.u32();
        if reserved != 0 {
            return Err(BitmapError::ReservedNotZero { value: reserved });
        }
        Ok(BitmapsExtension { nb_bitmaps, directory_size: r.u64(), directory_offset: r.u64() })
    }

    /// Applies QEMU's rules at open: 1..=65535 bitmaps, a cluster-aligned directory of 1 byte .. 64 MiB - 1 KiB
    /// that ends within the signed 64-bit range. `cluster_size` must be a power of two.
    ///
    /// # Errors
    /// [`BitmapError::TooMany`], [`BitmapError::NoBitmaps`], [`BitmapError::DirectoryMisaligned`],
    /// [`BitmapError::DirectorySize`] or [`BitmapError::DirectoryOverflow`], in QEMU's order.
    pub fn validate(&self, cluster_size: u64) -> Result<(), BitmapError> {
        if self.nb_bitmaps > MAX_BITMAPS {
            return Err(BitmapError::TooMany { count: self.nb_bitmaps });
        }
        if self.nb_bitmaps == 0 {
            return Err(BitmapError::NoBitmaps);
        }
        if self.directory_offset & cluster_size.wrapping_sub(1) != 0 {
            return Err(BitmapError::DirectoryMisaligned { offset: self.directory_offset });
        }
        if self.directory_size == 0 || self.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(BitmapError::DirectorySize { size: self.directory_size });
        }
        if self.directory_offset.checked_add(self.directory_size).is_none_or(|end| end > i64::MAX as u64) {
            return Err(BitmapError::DirectoryOverflow { offset: self.directory_offset, size: self.directory_size });
        }
        Ok(())
    }

    /// The extension's 24 data bytes.
    pub fn to_bytes(&self) -> [u8; EXTENSION_BYTES] {
        let mut out = [0u8; EXTENSION_BYTES];
        let fields = self
            .nb_bitmaps
            .to_be_bytes()
            .into_iter()
            .chain([0u8; 4])
            .chain(self.directory_size.to_be_bytes())
            .chain(self.directory_offset.to_be_bytes());
        for (dst, src) in out.iter_mut().zip(fields) {
            *dst = src;
        }
        out
    }
}

/// One entry of the bitmap directory: a named bitmap and where its table is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Number of 64-bit entries in the bitmap table.
    pub table_size: u32,
    /// Bit 0 in use, bit 1 auto; the others are reserved.
    pub flags: u32,
    /// The bitmap type; 1 (dirty tracking) is the only one defined.
    pub kind: u8,
    /// log2 of the number of guest bytes one bit covers.
    pub granularity_bits: u8,
    /// The bitmap's name, unique within the image.
    pub name: String,
    /// Type-specific extra data, verbatim (none is defined; QEMU refuses bitmaps that have any).
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    /// Whether the bitmap was open for writing and not stored cleanly: its data may be inconsistent.
    pub fn in_use(&self) -> bool {
        self.flags & BITMAP_FLAG_IN_USE != 0
    }

    /// Whether the bitmap is enabled (tracks writes) whenever the image is opened.
    pub fn auto(&self) -> bool {
        self.flags & BITMAP_FLAG_AUTO != 0
    }

    /// Guest bytes per bit; 0 when `granularity_bits` is 64 or more, which parsing never yields.
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits)).unwrap_or(0)
    }

    /// Applies QEMU's `check_dir_entry` and its refusal of extra data. `cluster_size` must be a power of two;
    /// `disk_size` is the virtual disk size, which a consistent (not in-use) bitmap must cover.
    ///
    /// # Errors
    /// [`BitmapError::ExtraData`], or [`BitmapError::Constraint`] naming the rule and the offending value.
    pub fn validate(&self, cluster_size: u64, disk_size: u64) -> Result<(), BitmapError> {
        let fail = |reason, value| Err(BitmapError::Constraint { name: self.name.clone(), reason, value });
        if !self.extra.is_empty() {
            return Err(BitmapError::ExtraData {
                name: self.name.clone(),
                size: u32::try_from(self.extra.len()).unwrap_or(u32::MAX),
            });
        }
        let table_size = u64::from(self.table_size);
        if self.table_size == 0 {
            return fail("bitmap table size is zero", 0);
        }
        if self.table_offset == 0 {
            return fail("bitmap table offset is zero", 0);
        }
        if self.table_offset & cluster_size.wrapping_sub(1) != 0 {
            return fail("bitmap table offset is not aligned to a cluster", self.table_offset);
        }
        if self.table_size > MAX_BITMAP_TABLE_ENTRIES {
            return fail("bitmap table has more than 0x8000000 entries", table_size);
        }
        if !BITMAP_GRANULARITY_BITS.contains(&self.granularity_bits) {
            return fail("granularity_bits outside 9..=31", u64::from(self.granularity_bits));
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return fail("reserved flags set", u64::from(self.flags));
        }
        if self.name.len() > MAX_BITMAP_NAME_BYTES {
            return fail("name longer than 1023 bytes", len_u64(self.name.len()));
        }
        if self.kind != BITMAP_TYPE_DIRTY_TRACKING {
            return fail("type is not 1 (dirty tracking)", u64::from(self.kind));
        }
        let phys = table_size.checked_mul(cluster_size);
        if phys.is_none_or(|p| p > MAX_BITMAP_DATA_BYTES) {
            return fail("bitmap data larger than 512 MiB", phys.unwrap_or(u64::MAX));
        }
        // An in-use bitmap may be stale after a resize; only a consistent one must cover the whole disk.
        let covered =
            phys.and_then(|p| p.checked_mul(8)).and_then(|bits| bits.checked_shl(self.granularity_bits.into()));
        if !self.in_use() && covered.is_some_and(|c| c < disk_size) {
            return fail("bitmap table too small for the disk size", disk_size);
        }
        Ok(())
    }

    /// Bytes the entry takes in the directory, padding included.
    pub fn disk_len(&self) -> u64 {
        round_up8(ENTRY_FIXED_BYTES + len_u64(self.extra.len()) + len_u64(self.name.len()))
    }
}

/// Bytes of bitmap data a bitmap of a `disk_size`-byte disk at `granularity_bits` holds: one bit per granule,
/// the last granule partial (QEMU's `get_bitmap_bytes_needed`).
pub fn bitmap_data_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    let granule = 1u64.checked_shl(u32::from(granularity_bits)).unwrap_or(u64::MAX);
    disk_size.div_ceil(granule).div_ceil(8)
}

/// Entries of the table that stores such a bitmap: one per cluster of bitmap data (QEMU's table size, which it
/// requires to match exactly when it loads a consistent bitmap). `cluster_size` must be a power of two.
pub fn bitmap_table_entries(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_data_bytes(disk_size, granularity_bits).div_ceil(cluster_size.max(1))
}

/// Applies QEMU's rules for a new persistent bitmap (`qmp_block_dirty_bitmap_add` and
/// `check_constraints_on_bitmap`), in QEMU's order: a name, a granularity that is a power of two from 512 bytes to
/// 2 GiB, bitmap data of at most 512 MiB and 0x8000000 clusters, a name of at most 1023 bytes. A disk of zero
/// bytes is refused too, since the bitmap's table would be empty. `cluster_size` must be a power of two.
///
/// # Errors
/// [`BitmapError::NameEmpty`], [`BitmapError::GranularityInvalid`], [`BitmapError::DataTooLarge`],
/// [`BitmapError::NameLength`] or [`BitmapError::EmptyDisk`].
pub fn check_new_bitmap(name: &str, granularity: u64, disk_size: u64, cluster_size: u64) -> Result<(), BitmapError> {
    if name.is_empty() {
        return Err(BitmapError::NameEmpty);
    }
    let bits = granularity.trailing_zeros();
    if !granularity.is_power_of_two() || !BITMAP_GRANULARITY_BITS.contains(&u8::try_from(bits).unwrap_or(u8::MAX)) {
        return Err(BitmapError::GranularityInvalid { granularity });
    }
    let granularity_bits = u8::try_from(bits).unwrap_or(u8::MAX);
    let bytes = bitmap_data_bytes(disk_size, granularity_bits);
    let limit = MAX_BITMAP_DATA_BYTES.min(u64::from(MAX_BITMAP_TABLE_ENTRIES).saturating_mul(cluster_size));
    if bytes > limit {
        return Err(BitmapError::DataTooLarge { bytes });
    }
    if name.len() > MAX_BITMAP_NAME_BYTES {
        return Err(BitmapError::NameLength { length: len_u64(name.len()) });
    }
    if disk_size == 0 {
        return Err(BitmapError::EmptyDisk);
    }
    Ok(())
}

/// Parses the bitmap directory. `bytes` is exactly the directory (`directory_size` bytes from
/// `directory_offset`), and `count` the extension's `nb_bitmaps`; like QEMU, every byte of the directory must
/// belong to one of exactly `count` entries.
///
/// # Errors
/// [`BitmapError::TooMany`] for a `count` above 65535; [`BitmapError::MoreEntries`], [`BitmapError::Truncated`],
/// [`BitmapError::NameTooLong`] or [`BitmapError::Granularity`] for the first bad entry;
/// [`BitmapError::FewerEntries`] when the directory ends early.
pub fn parse_bitmap_directory(bytes: &[u8], count: u32) -> Result<Vec<BitmapEntry>, BitmapError> {
    if count > MAX_BITMAPS {
        return Err(BitmapError::TooMany { count });
    }
    let available = len_u64(bytes.len());
    // Each entry needs at least its fixed part, so a lying count cannot reserve more than the bytes allow.
    let fit = bytes.len() / ENTRY_FIXED_BYTES as usize;
    let mut entries = Vec::with_capacity(usize::try_from(count).map_or(fit, |c| c.min(fit)));
    let mut offset: u64 = 0;
    let mut index: u32 = 0;
    while offset < available {
        if index >= count {
            return Err(BitmapError::MoreEntries { count, offset });
        }
        let truncated = |needed| BitmapError::Truncated { index, offset, needed, available };
        let fixed = slice(bytes, offset, ENTRY_FIXED_BYTES).ok_or_else(|| truncated(offset + ENTRY_FIXED_BYTES))?;
        let mut r = Reader(fixed);
        let table_offset = r.u64();
        let table_size = r.u32();
        let flags = r.u32();
        let kind = r.u8();
        let granularity_bits = r.u8();
        let name_size = r.u16();
        let extra_size = r.u32();
        // The directory is at most 64 MiB and these sizes are 16 and 32 bits wide: no u64 sum overflows.
        let extra_at = offset + ENTRY_FIXED_BYTES;
        let name_at = extra_at + u64::from(extra_size);
        let end = round_up8(name_at + u64::from(name_size));
        if end > available {
            return Err(truncated(end));
        }
        if usize::from(name_size) > MAX_BITMAP_NAME_BYTES {
            return Err(BitmapError::NameTooLong { index, offset, size: name_size });
        }
        if !BITMAP_GRANULARITY_BITS.contains(&granularity_bits) {
            return Err(BitmapError::Granularity { index, offset, bits: granularity_bits });
        }
        let extra = slice(bytes, extra_at, u64::from(extra_size)).ok_or_else(|| truncated(end))?;
        let name = slice(bytes, name_at, u64::from(name_size)).ok_or_else(|| truncated(end))?;
        entries.push(BitmapEntry {
            table_offset,
            table_size,
            flags,
            kind,
            granularity_bits,
            name: String::from_utf8_lossy(name).into_owned(),
            extra: extra.to_vec(),
        });
        offset = end;
        index += 1;
    }
    if index != count {
        return Err(BitmapError::FewerEntries { count, found: index });
    }
    Ok(entries)
}

/// Writes the bitmap directory as QEMU does: each entry padded with zeros to 8 bytes, the last one included. The
/// inverse of [`parse_bitmap_directory`]; its length is the extension's `directory_size`. Names longer than 65535
/// bytes are cut to what the length field can express (a valid name has at most 1023).
pub fn serialize_bitmap_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let total = entries.iter().fold(0u64, |n, e| n.saturating_add(e.disk_len()));
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for e in entries {
        let extra = e.extra.get(..e.extra.len().min(u32::MAX as usize)).unwrap_or(&[]);
        let name = e.name.as_bytes().get(..e.name.len().min(usize::from(u16::MAX))).unwrap_or(&[]);
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&u32::try_from(extra.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(extra);
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// What one part of a bitmap (one cluster's worth of bits) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCluster {
    /// Not stored: every bit is zero.
    Zeros,
    /// Not stored: every bit is one.
    Ones,
    /// Stored in the host cluster at this offset, which must be refcounted.
    Data(u64),
}

/// One entry of a bitmap table, kept raw and read through accessors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// The host cluster holding this part of the bitmap, if the offset field is nonzero (even when the entry is
    /// otherwise malformed; see [`BitmapTableEntry::kind`]).
    pub fn data_offset(self) -> Option<u64> {
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(o),
        }
    }

    /// Decodes the entry as QEMU's `check_table_entry` does. `cluster_size` must be a power of two.
    ///
    /// # Errors
    /// A static description when reserved bits are set, when bit 0 is set together with an offset, or when the
    /// offset is not cluster aligned.
    pub fn kind(self, cluster_size: u64) -> Result<BitmapCluster, &'static str> {
        if self.0 & TABLE_RESERVED_MASK != 0 {
            return Err("reserved bits set in bitmap table entry");
        }
        match self.data_offset() {
            None if self.0 & TABLE_ALL_ONES != 0 => Ok(BitmapCluster::Ones),
            None => Ok(BitmapCluster::Zeros),
            Some(_) if self.0 & TABLE_ALL_ONES != 0 => Err("bitmap table entry has both an offset and bit 0 set"),
            Some(o) if o & cluster_size.wrapping_sub(1) != 0 => Err("bitmap table entry offset not cluster aligned"),
            Some(o) => Ok(BitmapCluster::Data(o)),
        }
    }
}

/// Decodes a bitmap table: `bytes` is the `table_size * 8` bytes at `table_offset`. A trailing partial entry is
/// ignored. The caller counts the clusters of entries whose [`BitmapTableEntry::kind`] is
/// [`BitmapCluster::Data`], and reports the malformed ones, as `qemu-img check` does.
pub fn parse_bitmap_table(bytes: &[u8]) -> Vec<BitmapTableEntry> {
    bytes.chunks_exact(8).map(|c| BitmapTableEntry(u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))).collect()
}

/// Reads big-endian fields in order from a slice known to be long enough; a short slice reads as zeros rather
/// than panicking (callers slice exactly the fixed part first).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            out = *head;
            self.0 = rest;
        }
        out
    }
    fn u8(&mut self) -> u8 {
        u8::from_be_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

/// `len` bytes of `buf` from `at`, or `None` when they are not all there.
fn slice(buf: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(at).ok()?;
    let stop = usize::try_from(at.checked_add(len)?).ok()?;
    buf.get(start..stop)
}

fn round_up8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::super::{Extension, Header};
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::Command;

    const CS: u64 = 1 << 16;

    fn run(dir: &Path, prog: &str, args: &[&str]) {
        let out = match Command::new(prog).current_dir(dir).args(args).output() {
            Ok(out) => out,
            Err(e) => panic!("cannot run {prog} ({e}): install qemu-utils"),
        };
        assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A 1 MiB image with 64 KiB written, bitmap `b1` (granularity 64 KiB, enabled) and `b2` (disabled); when
    /// `dirty_after` is set, another 64 KiB is written at 0 afterwards, which `b1` records.
    fn qemu_image_with_bitmaps(dirty_after: bool) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        run(d, "qemu-img", &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
        run(d, "qemu-io", &["-c", "write -P 1 0 64k", "x.qcow2"]);
        run(d, "qemu-img", &["bitmap", "--add", "x.qcow2", "b1", "-g", "65536"]);
        run(d, "qemu-img", &["bitmap", "--add", "x.qcow2", "b2", "--disable"]);
        if dirty_after {
            run(d, "qemu-io", &["-c", "write -P 2 0 64k", "x.qcow2"]);
        }
        std::fs::read(d.join("x.qcow2")).unwrap()
    }

    /// The parsed extension and the directory bytes of a qemu-img image.
    fn directory_of(file: &[u8]) -> (BitmapsExtension, &[u8]) {
        let header = Header::parse(&file[..CS as usize]).unwrap();
        assert_eq!(header.autoclear_features & 1, 1, "qemu-img sets the bitmaps autoclear bit");
        let ext = header.extensions.iter().find(|e| e.kind == Extension::BITMAPS).unwrap();
        let parsed = BitmapsExtension::parse(&ext.data).unwrap();
        parsed.validate(CS).unwrap();
        assert_eq!(parsed.to_bytes()[..], ext.data[..]);
        let start = parsed.directory_offset as usize;
        (parsed, &file[start..start + parsed.directory_size as usize])
    }

    fn check_qemu_directory(file: &[u8]) -> Vec<BitmapEntry> {
        let (ext, dir) = directory_of(file);
        assert_eq!(ext.nb_bitmaps, 2);
        let entries = parse_bitmap_directory(dir, ext.nb_bitmaps).unwrap();
        let summary: Vec<_> =
            entries.iter().map(|e| (e.name.as_str(), e.auto(), e.in_use(), e.granularity(), e.table_size)).collect();
        // b2 gets the default granularity, which is the cluster size.
        assert_eq!(summary, [("b1", true, false, 65536, 1), ("b2", false, false, 65536, 1)]);
        for e in &entries {
            e.validate(CS, 1 << 20).unwrap();
            assert_eq!((e.kind, e.extra.len()), (1, 0));
        }
        assert_eq!(serialize_bitmap_directory(&entries), dir, "serialize differs from qemu-img");
        entries
    }

    fn table_of<'a>(file: &'a [u8], e: &BitmapEntry) -> Vec<BitmapCluster> {
        let start = e.table_offset as usize;
        let bytes: &'a [u8] = &file[start..start + 8 * e.table_size as usize];
        parse_bitmap_table(bytes).into_iter().map(|t| t.kind(CS).unwrap()).collect()
    }

    #[test]
    fn parses_and_reproduces_a_qemu_bitmap_directory() {
        let file = qemu_image_with_bitmaps(false);
        let entries = check_qemu_directory(&file);
        // Nothing was written while the bitmaps existed: both tables say "all zeros" without data clusters.
        for e in &entries {
            assert_eq!(table_of(&file, e), [BitmapCluster::Zeros]);
        }
    }

    #[test]
    fn a_dirty_bitmap_table_points_at_a_data_cluster() {
        let file = qemu_image_with_bitmaps(true);
        let entries = check_qemu_directory(&file);
        let BitmapCluster::Data(at) = table_of(&file, &entries[0])[0] else { panic!("b1 recorded no write") };
        assert_eq!(at % CS, 0);
        // One bit per 64 KiB: the write at 0 sets the first bit of the stored bitmap, and nothing else.
        let data = &file[at as usize..(at + CS).min(file.len() as u64) as usize];
        assert_eq!(data[0], 1);
        assert!(data[1..].iter().all(|&b| b == 0));
        assert_eq!(table_of(&file, &entries[1]), [BitmapCluster::Zeros], "b2 is disabled");
    }

    fn sample(name: &str) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x9_0000,
            table_size: 1,
            flags: BITMAP_FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: name.into(),
            extra: Vec::new(),
        }
    }

    #[test]
    fn the_extension_is_refused_when_malformed() {
        let good = BitmapsExtension { nb_bitmaps: 2, directory_size: 0x40, directory_offset: 0xa_0000 };
        let bytes = good.to_bytes();
        assert_eq!(BitmapsExtension::parse(&bytes), Ok(good));
        assert_eq!(BitmapsExtension::parse(&bytes[..23]), Err(BitmapError::ExtensionLength { length: 23 }));
        let mut reserved = bytes;
        reserved[7] = 1;
        assert_eq!(BitmapsExtension::parse(&reserved), Err(BitmapError::ReservedNotZero { value: 1 }));
        let check = |e: BitmapsExtension| e.validate(CS);
        assert_eq!(check(BitmapsExtension { nb_bitmaps: 0, ..good }), Err(BitmapError::NoBitmaps));
        assert_eq!(check(BitmapsExtension { nb_bitmaps: 65536, ..good }), Err(BitmapError::TooMany { count: 65536 }));
        assert_eq!(
            check(BitmapsExtension { directory_offset: 0xa_0200, ..good }),
            Err(BitmapError::DirectoryMisaligned { offset: 0xa_0200 })
        );
        assert_eq!(check(BitmapsExtension { directory_size: 0, ..good }), Err(BitmapError::DirectorySize { size: 0 }));
        let huge = MAX_BITMAP_DIRECTORY_BYTES + 1;
        assert_eq!(
            check(BitmapsExtension { directory_size: huge, ..good }),
            Err(BitmapError::DirectorySize { size: huge })
        );
        assert!(matches!(
            check(BitmapsExtension { directory_offset: 1 << 63, ..good }),
            Err(BitmapError::DirectoryOverflow { .. })
        ));
    }

    #[test]
    fn directories_round_trip_with_extra_data_and_odd_name_lengths() {
        let mut odd = sample("a-name-of-13b");
        odd.extra = vec![7; 5];
        let entries = vec![sample("b1"), odd, sample(&"n".repeat(1023))];
        let bytes = serialize_bitmap_directory(&entries);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse_bitmap_directory(&bytes, 3).unwrap(), entries);
        let err = entries[1].validate(CS, 1 << 20).unwrap_err();
        assert_eq!(err, BitmapError::ExtraData { name: "a-name-of-13b".into(), size: 5 });
    }

    #[test]
    fn directory_entry_counts_must_match_the_extension() {
        let bytes = serialize_bitmap_directory(&[sample("b1"), sample("b2")]);
        assert_eq!(parse_bitmap_directory(&bytes, 1), Err(BitmapError::MoreEntries { count: 1, offset: 0x20 }));
        assert_eq!(parse_bitmap_directory(&bytes, 3), Err(BitmapError::FewerEntries { count: 3, found: 2 }));
        assert_eq!(parse_bitmap_directory(&bytes, 65536), Err(BitmapError::TooMany { count: 65536 }));
        assert_eq!(parse_bitmap_directory(&[], 0), Ok(vec![]));
    }

    #[test]
    fn truncated_directories_and_bad_fields_are_errors() {
        let bytes = serialize_bitmap_directory(&[sample("b1")]);
        for cut in 1..bytes.len() {
            assert!(
                matches!(parse_bitmap_directory(&bytes[..cut], 1), Err(BitmapError::Truncated { index: 0, .. })),
                "cut at {cut}"
            );
        }
        let mut long_name = bytes.clone();
        long_name[18..20].copy_from_slice(&1024u16.to_be_bytes());
        long_name.resize(24 + 1024, b'x');
        assert_eq!(
            parse_bitmap_directory(&long_name, 1),
            Err(BitmapError::NameTooLong { index: 0, offset: 0, size: 1024 })
        );
        let mut huge_extra = bytes.clone();
        huge_extra[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_bitmap_directory(&huge_extra, 1),
            Err(BitmapError::Truncated { index: 0, offset: 0, needed: round_up8(24 + 0xffff_ffff + 2), available: 32 })
        );
        for bits in [0u8, 8, 32, 255] {
            let mut g = bytes.clone();
            g[17] = bits;
            assert_eq!(parse_bitmap_directory(&g, 1), Err(BitmapError::Granularity { index: 0, offset: 0, bits }));
        }
    }

    #[test]
    fn validate_applies_qemus_entry_constraints() {
        let ok = sample("b");
        ok.validate(CS, 1 << 20).unwrap();
        let reason = |e: BitmapEntry, disk: u64| match e.validate(CS, disk) {
            Err(BitmapError::Constraint { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(BitmapEntry { table_size: 0, ..ok.clone() }, 0), "bitmap table size is zero");
        assert_eq!(reason(BitmapEntry { table_offset: 0, ..ok.clone() }, 0), "bitmap table offset is zero");
        assert_eq!(
            reason(BitmapEntry { table_offset: 0x9_0200, ..ok.clone() }, 0),
            "bitmap table offset is not aligned to a cluster"
        );
        assert_eq!(reason(BitmapEntry { flags: 4, ..ok.clone() }, 0), "reserved flags set");
        assert_eq!(reason(BitmapEntry { kind: 2, ..ok.clone() }, 0), "type is not 1 (dirty tracking)");
        assert_eq!(reason(BitmapEntry { table_size: 0x2001, ..ok.clone() }, 0), "bitmap data larger than 512 MiB");
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB.
        let covered = CS * 8 * CS;
        ok.validate(CS, covered).unwrap();
        assert_eq!(reason(ok.clone(), covered + 1), "bitmap table too small for the disk size");
        BitmapEntry { flags: BITMAP_FLAG_IN_USE, ..ok.clone() }.validate(CS, covered + 1).unwrap();
        let err = BitmapEntry { kind: 9, ..ok }.validate(CS, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bitmap 'b' does not satisfy the constraints: type is not 1 (dirty tracking) (0x9)"
        );
    }

    #[test]
    fn bitmap_table_entries_decode_as_qemu_checks_them() {
        let raw: Vec<u8> = [0u64, 1, 0x5_0000, 0x5_0001, 0x5_0200, 1 << 63, 0x2]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .chain([0xff; 3])
            .collect();
        let entries = parse_bitmap_table(&raw);
        assert_eq!(entries.len(), 7, "the trailing partial entry is ignored");
        let kinds: Vec<_> = entries.iter().map(|e| e.kind(CS)).collect();
        assert_eq!(kinds[..3], [Ok(BitmapCluster::Zeros), Ok(BitmapCluster::Ones), Ok(BitmapCluster::Data(0x5_0000))]);
        assert!(kinds[3..].iter().all(Result::is_err), "{kinds:?}");
        assert_eq!(entries[4].data_offset(), Some(0x5_0200));
        assert_eq!(entries[4].kind(512), Ok(BitmapCluster::Data(0x5_0200)));
    }

    #[test]
    fn new_bitmaps_meet_qemus_constraints_in_qemus_order() {
        assert_eq!(check_new_bitmap("", 1000, 0, CS), Err(BitmapError::NameEmpty), "the name is judged first");
        for g in [0u64, 256, 1000, 3 << 20, 1 << 32] {
            assert_eq!(check_new_bitmap("b", g, 1 << 20, CS), Err(BitmapError::GranularityInvalid { granularity: g }));
        }
        check_new_bitmap("b", 512, 1 << 20, CS).unwrap();
        check_new_bitmap("b", 1 << 31, 1 << 20, CS).unwrap();
        // 4 TiB at 1 KiB granularity is exactly 512 MiB of bits (QEMU accepts it); at 512 bytes it is twice that.
        check_new_bitmap("b", 1024, 4 << 40, CS).unwrap();
        assert_eq!(check_new_bitmap("b", 512, 4 << 40, CS), Err(BitmapError::DataTooLarge { bytes: 1 << 30 }));
        let long = "n".repeat(1024);
        assert_eq!(
            check_new_bitmap(&long, 512, 4 << 40, CS),
            Err(BitmapError::DataTooLarge { bytes: 1 << 30 }),
            "the size is judged before the name's length"
        );
        assert_eq!(check_new_bitmap(&long, 65536, 1 << 20, CS), Err(BitmapError::NameLength { length: 1024 }));
        check_new_bitmap(&long[..1023], 65536, 1 << 20, CS).unwrap();
        assert_eq!(check_new_bitmap("b", 65536, 0, CS), Err(BitmapError::EmptyDisk));
    }

    #[test]
    fn table_sizes_are_qemus() {
        // One bit per granule, the last partial; one table entry per cluster of bits.
        assert_eq!(bitmap_data_bytes(1 << 20, 16), 2);
        assert_eq!(bitmap_data_bytes((1 << 20) + 1, 16), 3);
        assert_eq!(bitmap_data_bytes(0, 16), 0);
        assert_eq!(bitmap_table_entries(1 << 20, 16, CS), 1);
        assert_eq!(bitmap_table_entries(CS * 8 * CS, 16, CS), 1);
        assert_eq!(bitmap_table_entries(CS * 8 * CS + 1, 16, CS), 2);
        assert_eq!(bitmap_table_entries(u64::MAX, 9, 512), u64::MAX.div_ceil(512).div_ceil(8).div_ceil(512));
    }

    proptest! {
        #[test]
        fn random_directories_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), count in 0u32..70_000) {
            if let Ok(entries) = parse_bitmap_directory(&bytes, count) {
                prop_assert_eq!(serialize_bitmap_directory(&entries).len(), bytes.len());
                for e in &entries {
                    let _ = e.validate(CS, 1 << 30);
                    let _ = e.granularity();
                }
            }
            if let Ok(ext) = BitmapsExtension::parse(bytes.get(..24).unwrap_or(&[])) {
                let _ = ext.validate(CS);
            }
            for e in parse_bitmap_table(&bytes) {
                let _ = e.kind(CS);
            }
        }
    }
}
