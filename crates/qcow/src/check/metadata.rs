//! Where an image keeps its metadata: every cluster that a check's walk reaches and that is not guest data,
//! for tools that copy an image's metadata without its data (`qcow-tool dehydrate`).

use super::layout::Layout;
use super::problem::{Referrer, Structure};
use super::refcounts::Implied;
use super::walk::{Sink, Walk};
use crate::block::BlockDevice;
use crate::error::Result;

/// A byte range of the image file and the structure stored there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataRange {
    /// First byte in the image file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the pointer to it says it is.
    pub structure: Structure,
}

/// A sink that counts like the check's (the walk consults the counts) and records every metadata reference.
struct Recorder {
    implied: Implied,
    ranges: Vec<MetadataRange>,
}

impl Sink for Recorder {
    fn reference(&mut self, offset: u64, len: u64, referrer: Referrer) {
        self.implied.reference(offset, len, referrer);
        if !matches!(referrer.target, Structure::Data | Structure::CompressedData) {
            self.ranges.push(MetadataRange { offset, len, structure: referrer.target });
        }
    }

    fn count(&self, cluster: u64) -> u64 {
        self.implied.count(cluster)
    }

    fn clusters(&self) -> u64 {
        self.implied.clusters()
    }
}

/// Every metadata range of the qcow2 image on `dev`, in walk order: the header cluster (with its extensions),
/// the refcount table and blocks, the active and snapshot L1 tables, every L2 table they reach, the snapshot
/// table, the bitmap directory, bitmap tables and bitmap data. Pointers that leave the file are skipped, as the
/// check skips them. Nothing is written.
///
/// # Errors
/// The header is refused (as [`check`](super::check) refuses it), or reading the device fails.
pub fn metadata_ranges<D: BlockDevice>(dev: &D) -> Result<Vec<MetadataRange>> {
    let layout = Layout::read(dev, false)?;
    let mut recorder = Recorder { implied: Implied::new(&layout), ranges: Vec::new() };
    let mut walk = Walk::new(dev, &layout, true);
    walk.run(&mut recorder)?;
    recorder.implied.allocated()?;
    Ok(recorder.ranges)
}
