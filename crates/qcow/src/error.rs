//! The one error type of the library, and the small set of kinds a caller matches on.
//!
//! Every variant keeps the evidence: the operation that failed and the byte offset it was working on, so that a
//! message read in a log is enough to find the bad spot in an image.

use crate::format::FormatError;

/// What went wrong, coarsely: the part of an [`Error`] a caller branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The device was disconnected; every later operation fails this way.
    Disconnected,
    /// The operation is not implemented by this device; nothing was written.
    Unimplemented,
    /// The device is read-only; nothing was written.
    ReadOnly,
    /// The operating system reported an I/O error.
    Io,
    /// The image's metadata is inconsistent or malformed.
    Corrupt,
    /// The image uses a feature this library does not support (yet).
    Unsupported,
    /// The caller passed an argument that cannot be honoured.
    InvalidArgument,
    /// Another process (or another open in this one) holds the file with locks that exclude this open.
    Locked,
}

/// An error from a block device or an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device was disconnected at the application's request.
    #[error("device is disconnected")]
    Disconnected,
    /// The operation is not implemented; nothing was written.
    #[error("{op} is not implemented by this device")]
    Unimplemented {
        /// The operation that was asked for.
        op: &'static str,
    },
    /// The device or image is read-only; nothing was written.
    #[error("{op} refused: the device is read-only")]
    ReadOnly {
        /// The operation that was refused.
        op: &'static str,
    },
    /// An I/O error from the operating system.
    #[error("I/O error during {op} at byte offset {offset:#x}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The byte offset on the device where it failed.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Metadata that the engine met while working is inconsistent.
    #[error("corrupt image: {what} (at byte offset {offset:#x})")]
    Corrupt {
        /// What is wrong, in the qcow2 specification's words.
        what: &'static str,
        /// The byte offset in the image file of the bad structure or entry.
        offset: u64,
    },
    /// Work that gives space back where a refcount reads zero (compaction, truncating a free tail, erasing
    /// free clusters) was refused before it changed anything: the refcounts could not all be read, or they
    /// disagree with the metadata, so a zero might belong to a cluster in use. A repair makes them trustworthy.
    #[error("corrupt image: {op} refused, the refcounts cannot be trusted: {why}")]
    Untrusted {
        /// The operation that was refused.
        op: &'static str,
        /// The first finding that refuses trust, with where it is.
        why: Box<crate::check::Distrust>,
    },
    /// A backing file failed; the error is the backing file's own, not the overlay's.
    #[error("backing file: {0}")]
    Backing(Box<Error>),
    /// The on-disk header or one of its structures failed validation.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A persistent bitmap (its directory entry or its table) breaks one of the rules QEMU applies when it loads
    /// bitmaps; QEMU refuses to open such an image read-write, and so does this library.
    #[error("bitmaps of the image at byte offset {offset:#x}: {source}")]
    Bitmap {
        /// Where the offending structure is: the directory, or the bitmap's table.
        offset: u64,
        /// What is wrong with it.
        #[source]
        source: crate::format::BitmapError,
    },
    /// The image needs a feature that is not supported.
    #[error("unsupported image feature: {feature}")]
    Unsupported {
        /// The feature's name, taken from the image's feature-name table where it has one.
        feature: String,
    },
    /// An internal snapshot could not be created, applied or deleted; nothing was changed.
    #[error("{op} refused: {why}")]
    Snapshot {
        /// The operation that was refused.
        op: &'static str,
        /// Why.
        why: crate::image::SnapshotRefusal,
    },
    /// A change to the image (rebase, commit, amend) was refused before anything was written.
    #[error(transparent)]
    Refused(#[from] crate::image::Refusal),
    /// Another open of the file holds locks that exclude this one: QEMU's image locks, which a running QEMU,
    /// qemu-img or this library take. Nothing was read or written.
    #[error("{}: failed to get {}\"{permission}\" lock: another process is using the image", path.display(), if *shared { "shared " } else { "" })]
    Locked {
        /// The file that is locked.
        path: std::path::PathBuf,
        /// The permission that conflicts, in QEMU's words ("write", "resize", ...).
        permission: &'static str,
        /// True when the other open uses the permission and this one would not share it; false when this open
        /// wants the permission and the other does not share it.
        shared: bool,
    },
    /// An argument the caller passed cannot be honoured.
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// Why the argument was refused.
        reason: String,
    },
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Disconnected => ErrorKind::Disconnected,
            Error::Unimplemented { .. } => ErrorKind::Unimplemented,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::Io { .. } => ErrorKind::Io,
            Error::Corrupt { .. } | Error::Untrusted { .. } => ErrorKind::Corrupt,
            Error::Backing(inner) => inner.kind(),
            Error::Format(e) if e.is_unsupported() => ErrorKind::Unsupported,
            Error::Format(_) | Error::Bitmap { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Snapshot { why, .. } => why.kind(),
            Error::InvalidArgument { .. } | Error::Refused(_) => ErrorKind::InvalidArgument,
            Error::Locked { .. } => ErrorKind::Locked,
        }
    }

    /// Builds an [`Error::Io`] from an operating-system error.
    pub fn io(op: &'static str, offset: u64, source: std::io::Error) -> Self {
        Error::Io { op, offset, source }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { op, reason: reason.into() }
    }

    /// Whether this error says the image's own metadata is corrupt, as met while working on it (not a refusal
    /// made before any change, and not a backing file's error).
    pub fn is_met_corruption(&self) -> bool {
        match self {
            Error::Corrupt { .. } => true,
            Error::Format(e) => !e.is_unsupported(),
            _ => false,
        }
    }

    /// Builds an [`Error::Corrupt`].
    pub fn corrupt(what: &'static str, offset: u64) -> Self {
        Error::Corrupt { what, offset }
    }
}

/// The result type of this library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
