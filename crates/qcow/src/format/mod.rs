//! The qcow2 on-disk format, pure: bytes in, typed and validated values out, and back. No I/O happens here.
//!
//! Everything on disk is big-endian. Every limit QEMU enforces when it opens an image is enforced here, each with
//! its own [`FormatError`] variant that keeps the offending value.

mod bitmap;
mod compressed;
mod entry;
mod error;
pub mod feature;
mod geometry;
mod header;
mod refcount;
mod snapshot;
mod validate;

pub use bitmap::{
    bitmap_data_bytes, bitmap_table_entries, check_new_bitmap, parse_bitmap_directory, parse_bitmap_table,
    serialize_bitmap_directory, BitmapCluster, BitmapEntry, BitmapError, BitmapTableEntry, BitmapsExtension,
    BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, BITMAP_GRANULARITY_BITS, BITMAP_TYPE_DIRTY_TRACKING, MAX_BITMAPS,
    MAX_BITMAP_DATA_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_NAME_BYTES, MAX_BITMAP_TABLE_ENTRIES,
};
pub use compressed::{compress, compress_at_level, decompress, CompressedDescriptor, CompressionError};
pub use entry::{ClusterType, L1Entry, L2Entry, L2Kind, RefcountTableEntry, SubclusterBitmap};
pub use error::FormatError;
pub use geometry::{Geometry, GuestOffset, HostOffset};
pub use header::{
    l1_entries_required, CompressionType, Extension, FeatureName, Header, HEADER_V2_LENGTH, HEADER_V3_LENGTH, MAGIC,
};
pub use refcount::{RefcountBlock, RefcountSizing};
pub use snapshot::{
    parse_snapshot_table, parse_snapshot_table_for_check, serialize_snapshot_table, snapshot_table_size, Snapshot,
    SnapshotDefect, SnapshotError, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
};

/// A big-endian u64 from the first 8 bytes of `bytes` (fewer bytes read as if zero-padded on the left): how
/// table entries are decoded wherever a whole table is already in memory.
pub(crate) fn be64(bytes: &[u8]) -> u64 {
    bytes.iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}
