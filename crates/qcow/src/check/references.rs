//! The references a rebuild of the refcount structures counts: the check's walk over every structure the header
//! reaches except the refcount table and blocks being replaced.

use super::counts::Paged;
use super::layout::Layout;
use super::problem::{Problem, Referrer};
use super::walk::{Sink, Walk};
use crate::block::BlockDevice;
use crate::error::{Error, Result};

/// Counts per host cluster, without the check's limit at the current refcount width: a rebuild may write a
/// wider one.
struct Counter {
    counts: Paged<u32>,
    cluster_bits: u32,
}

impl Sink for Counter {
    fn reference(&mut self, offset: u64, len: u64, _: Referrer) {
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len.saturating_sub(1)) >> self.cluster_bits;
        for cluster in first..=last {
            // At most one partial cluster past the end of the file (the walk refuses anything further) extends
            // the range covered.
            if let Some(n) = self.counts.slot(cluster) {
                *n = n.saturating_add(1);
            }
        }
    }

    fn count(&self, cluster: u64) -> u64 {
        u64::from(self.counts.get(cluster))
    }

    fn clusters(&self) -> u64 {
        self.counts.len()
    }
}

/// How many references each host cluster of the image on `dev` has from its metadata (the header, the L1 trees
/// of the active image and of every snapshot, the snapshot table and consistent bitmaps), the refcount table and
/// blocks left out; covering every cluster of the file, kept in pages where something is referenced.
///
/// # Errors
/// `Corrupt` when part of the metadata could not be read, or a pointer could not be counted (outside the file,
/// misaligned, reserved bits set): counts missing a reference would let a rebuild free a cluster in use.
/// `Io` (out of memory) when the counts cannot be kept.
pub(crate) fn references(dev: &dyn BlockDevice) -> Result<Paged<u32>> {
    let layout = Layout::read(dev, false)?;
    let mut counter = Counter { counts: Paged::new(layout.file_clusters()), cluster_bits: layout.geo.cluster_bits };
    let mut walk = Walk::new(dev, &layout, true).without_refcounts();
    walk.run(&mut counter)?;
    counter.counts.allocated(layout.geo.cluster_bits, "count references")?;
    if let Some(err) = walk.problems.iter().find_map(uncountable) {
        return Err(err);
    }
    if walk.incomplete {
        return Err(Error::corrupt("part of the metadata could not be read", 0));
    }
    Ok(counter.counts)
}

/// The error for a finding that leaves a reference uncounted or wrongly counted.
fn uncountable(problem: &Problem) -> Option<Error> {
    Some(match *problem {
        Problem::OutsideFile { referrer, .. } => Error::corrupt(referrer_outside(referrer), referrer.at),
        Problem::Misaligned { referrer, .. } => {
            Error::corrupt("pointer to a cluster is not cluster aligned", referrer.at)
        }
        Problem::ReservedBits { at, .. } => Error::corrupt("reserved bits set in a table entry", at),
        Problem::BadSnapshotL1 { why, .. } => Error::corrupt(why, 0),
        Problem::Unreadable { offset, .. } => Error::corrupt("part of the metadata could not be read", offset),
        _ => return None,
    })
}

fn referrer_outside(referrer: Referrer) -> &'static str {
    match referrer.target {
        super::Structure::Data => "data cluster outside the file",
        super::Structure::CompressedData => "compressed data outside the file",
        super::Structure::L2Table => "L2 table outside the file",
        _ => "metadata outside the file",
    }
}
