//! The hooks the write paths and resize call: guest ranges dirtied, and bitmaps resized with the disk.

use std::sync::{Arc, RwLockReadGuard};

use super::{retrack, Tracking};

use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::image::Image;

impl<D: BlockDevice> Image<D> {
    /// Takes the resize lock shared for a write of the guest bytes `offset..offset + len` (a write, a zero write,
    /// a discard, a compressed write) and, when `tracked`, records them first: each enabled consistent bitmap gets
    /// the bits of every granule the range touches, before the data moves, so that a store (which waits for the
    /// lock exclusively) cannot miss the change. With no bitmap to track this costs nothing beyond the lock the
    /// write takes anyway.
    ///
    /// After a store left consistent entries in the directory, the first such write marks them in use on disk
    /// again before it returns.
    pub(in crate::image) fn lock_for_write(
        &self,
        offset: u64,
        len: u64,
        tracked: bool,
    ) -> Result<RwLockReadGuard<'_, Tracking>> {
        let end = offset.saturating_add(len);
        loop {
            let shared = self.resize.read().unwrap_or_else(|e| e.into_inner());
            if !tracked || len == 0 || shared.bits.is_empty() {
                return Ok(shared);
            }
            if !shared.needs_mark {
                for (bits, g) in &shared.bits {
                    let g = u32::from(*g);
                    bits.set(offset >> g, end.div_ceil(1u64 << g));
                }
                return Ok(shared);
            }
            drop(shared);
            let mut exclusive = self.resize.write().unwrap_or_else(|e| e.into_inner());
            if exclusive.needs_mark {
                let mut set = self.bitmaps.write();
                let marked = self.mark_bitmaps_in_use(&mut set);
                retrack(&set, &mut exclusive);
                marked?;
            }
        }
    }

    /// Before the disk's size changes: refused while an inconsistent bitmap exists (QEMU's
    /// `qcow2_truncate_bitmaps_check`), and the directory marked in use so that no consistent entry on disk can
    /// disagree with the new size.
    pub(in crate::image) fn bitmaps_before_resize(&self, tracking: &mut Tracking) -> Result<()> {
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        if let Some(b) = set.list.iter().find(|b| !b.consistent()) {
            return Err(Error::invalid(
                "resize",
                format!("bitmap '{}' is inconsistent and cannot be used; remove it first", b.name),
            ));
        }
        let marked =
            if set.needs_mark || set.has_unmarked_entries() { self.mark_bitmaps_in_use(&mut set) } else { Ok(()) };
        retrack(&set, tracking);
        marked
    }

    /// The disk is now `size` bytes: every bitmap follows, dropping the bits past the end or adding clear ones.
    pub(in crate::image) fn bitmaps_resized(&self, size: u64, tracking: &mut Tracking) {
        let mut set = self.bitmaps.write();
        for b in set.list.iter_mut() {
            if let Some(bits) = &b.bits {
                let len = size.div_ceil(b.granularity());
                if bits.len() != len {
                    b.bits = Some(Arc::new(bits.resized(len)));
                }
            }
        }
        retrack(&set, tracking);
    }

    /// Before a snapshot replaces the active layer: the directory marked in use, as before any write, so that no
    /// consistent entry on disk can disagree with what the guest will read.
    pub(in crate::image) fn bitmaps_before_apply(&self, tracking: &mut Tracking) -> Result<()> {
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        let marked =
            if set.needs_mark || set.has_unmarked_entries() { self.mark_bitmaps_in_use(&mut set) } else { Ok(()) };
        retrack(&set, tracking);
        marked
    }

    /// After a snapshot replaced the active layer of a disk now `size` bytes long: every bitmap follows the size,
    /// and every enabled one (the AUTO bitmaps, as QEMU flags them) becomes wholly dirty, because any guest byte
    /// may have changed.
    pub(in crate::image) fn bitmaps_after_apply(&self, size: u64, tracking: &mut Tracking) {
        self.bitmaps_resized(size, tracking);
        for (bits, g) in &tracking.bits {
            bits.set(0, size.div_ceil(1u64 << u32::from(*g)));
        }
    }

    /// The image stops maintaining its bitmaps and leaves their directory as it is on disk: a downgrade to version
    /// 2 does this, as QEMU's does (version 2 has no autoclear bits, so QEMU calls such bitmaps inconsistent, and
    /// their clusters are leaks a repair frees).
    pub(in crate::image) fn abandon_bitmaps(&self) {
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        set.list.clear();
        set.loaded = true;
        set.needs_mark = false;
        retrack(&set, &mut tracking);
    }
}
