//! Why a change to an image's chain or options (rebase, commit, amend) was refused. Every refusal is made
//! before the change writes anything, so the image is as it was; each variant keeps the values that decided it,
//! so that a front end can word it as it likes.

/// A requested change that cannot be made to this image; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A backing file name longer than a qcow2 header may hold (1023 bytes).
    #[error("backing file name of {len} bytes is longer than the 1023 a qcow2 header holds")]
    BackingNameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The new header (backing file name, format extension and the other extensions) does not fit in cluster 0.
    #[error("the new header needs {needed} bytes, more than the {cluster_size}-byte header cluster")]
    HeaderFull {
        /// Bytes the header would take.
        needed: u64,
        /// The cluster size, which bounds the header.
        cluster_size: u64,
    },
    /// A backing file name without its format: formats are recorded, never probed.
    #[error("a backing file needs its format recorded with it")]
    BackingFormatRequired,
    /// A backing file format other than raw and qcow2.
    #[error("backing format {format:?} is not supported (raw and qcow2 are)")]
    BackingFormatUnsupported {
        /// The format asked for.
        format: String,
    },
    /// The refcount width asked for is not a power of two from 1 to 64.
    #[error("refcount width {bits} is not a power of two from 1 to 64")]
    RefcountWidthInvalid {
        /// The width asked for.
        bits: u64,
    },
    /// Version 2 images have 16-bit refcounts only.
    #[error("refcount widths other than 16 bits need a version 3 image")]
    RefcountWidthNeedsV3,
    /// A cluster's refcount does not fit the narrower width asked for.
    #[error("cluster at {offset:#x} has a refcount of {refcount}, too large for {bits}-bit refcounts")]
    RefcountTooLarge {
        /// The width asked for.
        bits: u64,
        /// The cluster's host offset.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// Lazy refcounts need a version 3 image.
    #[error("lazy refcounts need a version 3 image")]
    LazyRefcountsNeedV3,
    /// A data file name was given for an image that keeps its data in the image file.
    #[error("the image has no external data file whose name could be set")]
    DataFileNotUsed,
    /// The raw-data-file bit may only be cleared on an existing image, never set.
    #[error("an existing image cannot be declared to keep its data file raw")]
    DataFileRawCannotBeSet,
    /// The backing file is changed by a rebase, not by amending options.
    #[error("the backing file is changed by rebasing, not by amending options")]
    BackingFileAmend,
    /// A version 2 image with internal snapshots cannot change its size (its snapshots cannot record theirs).
    #[error("a version 2 image with internal snapshots cannot be resized")]
    ResizeV2WithSnapshots,
    /// Growing a version 2 image whose backing file reaches past its end: the backing file would show through the
    /// new part, and version 2 has no zero clusters to hide it.
    #[error("a version 2 image cannot grow over its longer backing file (it has no zero clusters)")]
    GrowV2OverBacking,
    /// A virtual size that is not a multiple of 512.
    #[error("virtual size {size} is not a multiple of 512")]
    SizeNotSectorMultiple {
        /// The size asked for.
        size: u64,
    },
    /// A downgrade to version 2 needs 16-bit refcounts.
    #[error("version 2 needs 16-bit refcounts")]
    DowngradeRefcountWidth,
    /// A downgrade to version 2 of an image with an external data file.
    #[error("version 2 images cannot have an external data file")]
    DowngradeDataFile,
    /// An internal snapshot records a size other than the image's, or a VM state larger than 32 bits can say.
    #[error("snapshot {id} cannot be described by a version 2 image")]
    DowngradeSnapshot {
        /// The snapshot's ID.
        id: String,
    },
    /// Incompatible features a version 2 image cannot have (extended L2 entries, ...).
    #[error("incompatible features {bits:#x} cannot be kept in a version 2 image")]
    DowngradeIncompatibleFeatures {
        /// The feature bits.
        bits: u64,
    },
    /// zstd-compressed clusters cannot be kept in a version 2 image.
    #[error("zstd-compressed clusters cannot be kept in a version 2 image")]
    DowngradeZstdClusters,
}
