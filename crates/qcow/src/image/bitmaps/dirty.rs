//! The hooks the write paths and resize call: guest ranges dirtied, and bitmaps resized with the disk.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::image::Image;

impl<D: BlockDevice> Image<D> {
    /// Records that the guest bytes `offset..offset + len` are about to change (a write, a zero write, a discard,
    /// a compressed write): each enabled consistent bitmap gets the bits of every granule the range touches. Called
    /// before the data moves, so that a store running meanwhile cannot miss the change. With no bitmap to track
    /// this is one atomic load.
    ///
    /// After a store left consistent entries in the directory, the first such write marks them in use on disk
    /// again, before it returns.
    pub(in crate::image) fn dirty_bitmaps(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !self.bitmaps.tracking.load(Ordering::Acquire) {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        loop {
            {
                let set = self.bitmaps.read();
                if !set.needs_mark {
                    for b in set.list.iter().filter(|b| b.enabled) {
                        if let Some(bits) = &b.bits {
                            let g = u32::from(b.granularity_bits);
                            bits.set(offset >> g, end.div_ceil(1u64 << g));
                        }
                    }
                    return Ok(());
                }
            }
            let mut set = self.bitmaps.write();
            if set.needs_mark {
                self.mark_bitmaps_in_use(&mut set)?;
            }
        }
    }

    /// Before the disk's size changes: refused while an inconsistent bitmap exists (QEMU's
    /// `qcow2_truncate_bitmaps_check`), and the directory marked in use so that no consistent entry on disk can
    /// disagree with the new size.
    pub(in crate::image) fn bitmaps_before_resize(&self) -> Result<()> {
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        if let Some(b) = set.list.iter().find(|b| !b.consistent()) {
            return Err(Error::invalid(
                "resize",
                format!("bitmap '{}' is inconsistent and cannot be used; remove it first", b.name),
            ));
        }
        if set.needs_mark || set.has_unmarked_entries() {
            self.mark_bitmaps_in_use(&mut set)?;
        }
        Ok(())
    }

    /// The disk is now `size` bytes: every bitmap follows, dropping the bits past the end or adding clear ones.
    pub(in crate::image) fn bitmaps_resized(&self, size: u64) {
        let mut set = self.bitmaps.write();
        for b in set.list.iter_mut() {
            if let Some(bits) = &b.bits {
                let len = size.div_ceil(b.granularity());
                if bits.len() != len {
                    b.bits = Some(Arc::new(bits.resized(len)));
                }
            }
        }
    }
}
