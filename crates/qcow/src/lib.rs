//! qcow: qcow2 disk images as composable block devices.
//!
//! A [`BlockDevice`](block::BlockDevice) stores sectors. Files, memory and padded devices implement it, and so
//! does a qcow2 [`Image`], which can therefore sit on a file, on memory, or on another image.
//!
//! ```
//! use qcow::block::{BlockDevice, MemoryDevice};
//! use qcow::{Config, CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcow::Error> {
//! let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(1 << 30), Config::default())?;
//! image.write_at(1 << 20, &[0xab; 4096])?;
//! let mut back = vec![0; 4096];
//! image.read_at(1 << 20, &mut back)?;
//! assert_eq!(back, vec![0xab; 4096]);
//! image.flush()?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod block;
pub mod check;
pub mod convert;
mod error;
pub mod format;
mod image;
pub mod stream;

pub use error::{Error, ErrorKind, Result};
pub use image::{
    failed_drops, parse_size, AmendOptions, Backing, BackingPolicy, BackingResolver, BitmapInfo, BitmapRun,
    ClusterState, CommitRange, CommitSummary, CompactProgress, CompactSummary, Compat, Config, CreateOptions, DepthRun,
    DirtyRanges, DiscardStats, Extent, ExtentKind, FileResolver, HoldTimes, Image, ImageInfo, LayeredDevice,
    LockHoldTimes, MappedExtent, MappedKind, Metrics, NewBacking, NoBacking, OnlineCompaction, Preallocation,
    RebaseOptions, RebaseSummary, ReclaimPass, ReclaimerOptions, Refusal, SnapshotRefusal, MAX_SNAPSHOTS,
    MAX_SNAPSHOT_NAME,
};
