//! Emptying an image, as QEMU's `make_empty` does after a commit: every guest cluster becomes unallocated, so
//! that the image reads through to its backing file again, and what the active tables held is given back.
//!
//! It is a shrink to size zero without the size change: the L1 entries are cleared in the cache, and the L2 tables
//! and data clusters they reached are freed only after the cleared L1 table is durable (writeback's order), so a
//! crash leaves each L2 table either linked with its data or unlinked with its clusters at worst leaked.
//! Snapshots keep what they share: only the active tree's references go.

use super::Image;
use crate::block::BlockDevice;
use crate::error::Result;

impl<D: BlockDevice> Image<D> {
    /// Unmaps every guest cluster, so that the whole disk reads from the backing file (zeros without one), and
    /// frees the clusters only the active tables used. The file is cut after its last cluster in use when the
    /// refcounts are already trusted (see [`Image::verify_refcounts`]); otherwise it keeps its length.
    ///
    /// # Errors
    /// `ReadOnly`, `Corrupt`, `Io`, `Disconnected`.
    pub fn make_empty(&self) -> Result<()> {
        self.observe(self.empty_active_tables())
    }

    fn empty_active_tables(&self) -> Result<()> {
        self.check_writable("make empty")?;
        let _exclusive = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        m.mark_dirty(&self.dev)?;
        m.unmap_tail(&self.dev, 0)?;
        m.writeback(&self.dev)?;
        if let Some(trusted) = m.trusted()? {
            m.trim_file(&self.dev, trusted)?;
        }
        drop(m);
        self.flush_all()
    }
}
