//! Making unallocated guest ranges read as zeros whatever a backing file holds there, as QEMU's write-zeroes does
//! on qcow2: zero clusters (or the zero bits of extended L2 entries) on version 3, which need no data write;
//! zeros written on version 2 (which has no zero flag) and with external data files. A rebase uses it where the
//! old backing file had ended, a resize where a longer backing file would show through the new end.

use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, L2Entry, L2Kind};

impl<D: BlockDevice> Image<D> {
    /// Makes the unallocated allocation units in `lo..hi` read as zeros whatever backing file is recorded later:
    /// zero clusters (or zero subclusters) on version 3, zeros written on version 2 and with external data files.
    pub(super) fn zero_unallocated(&self, lo: u64, hi: u64) -> Result<()> {
        let v3 = self.meta().header.version >= 3;
        if !v3 || self.data_file.is_some() {
            return crate::block::write_zeros(self, lo, hi - lo);
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let mut pos = lo;
        while pos < hi {
            let cluster = pos / cs;
            let stop = ((cluster + 1) * cs).min(hi);
            let _owned = self.ranges.lock(cluster, cluster + 1);
            let mut m = self.meta();
            let guest = GuestOffset(cluster * cs);
            let (l1_index, index) = (geo.l1_index(guest), geo.l2_index(guest));
            m.mark_dirty(&self.dev)?;
            let l2 = m.l2_for_write(&self.dev, l1_index)?;
            let at = l2.0 + index * geo.l2_entry_size();
            let entry = m.l2_entry(&self.dev, l2, index)?;
            if geo.extended_l2 {
                if entry.is_compressed() {
                    return Err(Error::corrupt("a compressed cluster mapped as unallocated", at));
                }
                let sub = cs / 32;
                let first = (pos - cluster * cs) / sub;
                // The disk's last subcluster counts whole, as it does for allocation.
                let end = if stop >= size { 32 } else { (stop - cluster * cs).div_ceil(sub) };
                let mask = ((1u64 << (end - first)) - 1) << first;
                let bitmap = m.l2_bitmap(&self.dev, l2, index)?;
                m.set_l2_bitmap(&self.dev, l2, index, (bitmap & !mask) | (mask << 32))?;
            } else {
                match m.decode_l2(&self.dev, entry, at)? {
                    L2Kind::Unallocated => m.set_l2_entry(&self.dev, l2, index, L2Entry::zero(None))?,
                    _ => return Err(Error::corrupt("an allocated cluster mapped as unallocated", at)),
                }
            }
            drop(m);
            pos = stop;
        }
        Ok(())
    }
}
