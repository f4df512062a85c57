//! Changing the refcount width (`refcount_bits`) of an open image, as QEMU's `qcow2_change_refcount_order`
//! does: new refcount structures at the new width, then the header, then the old structures free.
//!
//! The new refcounts are counted from the metadata (every L1 tree, snapshots included), so they are exact and
//! trusted afterwards, as after any rebuild. They are written past the end of the file, table and blocks counting
//! themselves, and flushed; one header write then switches the table offset, its size and the width together
//! (they share the header's first sector) and is flushed. A crash before it leaves the old width with unreferenced
//! clusters past its old end; a crash after it, the new width, with the old structures simply free. A width too
//! narrow for some cluster's count is refused before anything is written.

use super::{Image, Refusal};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::Geometry;

impl<D: BlockDevice> Image<D> {
    /// Rewrites the refcount structures `bits` wide (a power of two from 1 to 64).
    ///
    /// # Errors
    /// [`Refusal::RefcountWidthInvalid`], [`Refusal::RefcountWidthNeedsV3`], [`Refusal::RefcountTooLarge`]
    /// (nothing written for any); `Corrupt` when the metadata cannot be walked; `Io`.
    pub(super) fn change_refcount_width(&mut self, bits: u64) -> Result<()> {
        if !(1..=64).contains(&bits) || !bits.is_power_of_two() {
            return Err(Refusal::RefcountWidthInvalid { bits }.into());
        }
        let order = bits.trailing_zeros();
        if order == self.geo.refcount_order {
            return Ok(());
        }
        let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
        if meta.header.version < 3 {
            return Err(Refusal::RefcountWidthNeedsV3.into());
        }
        let counts = meta.counted_references(&self.dev)?;
        let max = Geometry { refcount_order: order, ..meta.geo }.refcount_max();
        if let Some((cluster, refcount)) = counts.iter().find(|&(_, n)| u64::from(n) > max) {
            let offset = cluster << meta.geo.cluster_bits;
            return Err(Refusal::RefcountTooLarge { bits, offset, refcount: u64::from(refcount) }.into());
        }
        meta.write_refcounts(&self.dev, counts, order)?;
        self.geo = meta.geo;
        Ok(())
    }
}
