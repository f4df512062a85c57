//! Making unallocated guest ranges read as zeros whatever a backing file holds there, as QEMU's write-zeroes does
//! on qcow2: zero clusters (or the zero bits of extended L2 entries) on version 3, which need no data write;
//! zeros written on version 2 (which has no zero flag) and with external data files. A rebase uses it where the
//! old backing file had ended, a resize where a longer backing file would show through the new end.

use super::Image;
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{GuestOffset, HostOffset, L2Entry, L2Kind, SubclusterBitmap};

impl<D: BlockDevice> Image<D> {
    /// Makes `lo..hi` (whole allocation units, or up to the disk's end) read as zeros whatever backing file is
    /// recorded now or later: unallocated units become zero clusters (or zero subclusters) on version 3; anything
    /// else, and everything on version 2 or with an external data file, is written with zeros.
    pub(super) fn zero_unallocated(&self, lo: u64, hi: u64) -> Result<()> {
        let v3 = self.meta().header.version >= 3;
        if !v3 || self.data_file.is_some() {
            return crate::block::write_zeros(self, lo, hi - lo);
        }
        let cs = self.geo.cluster_size();
        let mut pos = lo;
        while pos < hi {
            let stop = ((pos / cs + 1) * cs).min(hi);
            if !self.zero_flag_cluster(pos, stop)? {
                crate::block::write_zeros(self, pos, stop - pos)?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Sets the zero flag (or the zero bits) for `lo..hi` inside one cluster when that part is unallocated;
    /// false, having changed nothing, when some of it is allocated.
    fn zero_flag_cluster(&self, lo: u64, hi: u64) -> Result<bool> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cluster = lo / cs;
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let _owned = self.ranges.lock(cluster, cluster + 1);
        let mut m = self.meta();
        let guest = GuestOffset(cluster * cs);
        let (l1_index, index) = (geo.l1_index(guest), geo.l2_index(guest));
        let current = match m.l1_entry(&self.dev, l1_index)?.l2_offset() {
            Some(l2) => (l2, m.l2_entry(&self.dev, l2, index)?),
            None => (HostOffset(0), L2Entry(0)),
        };
        let mask = if geo.extended_l2 {
            let sub = cs / 32;
            // The disk's last subcluster counts whole, as it does for allocation.
            let (first, end) = ((lo - cluster * cs) / sub, (hi - cluster * cs).div_ceil(sub));
            SubclusterBitmap::span(first, end)
        } else {
            0
        };
        let free = match current {
            (_, entry) if geo.extended_l2 && entry.is_compressed() => false,
            (HostOffset(0), _) => true,
            (l2, _) if geo.extended_l2 => m.l2_bitmap(&self.dev, l2, index)?.allocated() & mask == 0,
            (l2, entry) => {
                let at = l2.0 + index * geo.l2_entry_size();
                m.decode_l2(&self.dev, entry, at)? == L2Kind::Unallocated
            }
        };
        if !free {
            return Ok(false);
        }
        m.mark_dirty(&self.dev)?;
        let l2 = m.l2_for_write(&self.dev, l1_index)?;
        if geo.extended_l2 {
            let bitmap = m.l2_bitmap(&self.dev, l2, index)?;
            m.set_l2_bitmap(&self.dev, l2, index, bitmap.with_zeroed(mask))?;
        } else {
            m.set_l2_entry(&self.dev, l2, index, L2Entry::zero(None))?;
        }
        Ok(true)
    }
}
