//! Changing the virtual size. Growing may move the L1 table to a larger home; shrinking unmaps and frees
//! everything past the new end, and only when the caller accepts the data loss.

use super::meta::{write_meta, Meta};
use super::trust::Trusted;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, L1Entry, L2Entry, L2Kind, SubclusterBitmap};

/// QEMU's cap on the L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;

impl Meta {
    /// Makes the L1 table hold `entries` entries, moving it when its clusters are too few. The new table is
    /// durable before the header points at it, and the old one is freed after.
    fn grow_l1(&mut self, dev: &dyn BlockDevice, entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old = self.l1_size();
        if entries <= old {
            return Ok(());
        }
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("resize", "the new size needs an L1 table over 32 MiB: use larger clusters"));
        }
        let old_clusters = self.geo.clusters_for(old * 8);
        let new_clusters = self.geo.clusters_for(entries * 8);
        if new_clusters == old_clusters && old > 0 {
            // The entries past the old end sit in the table's last cluster already; make sure they are zero.
            for index in old..entries {
                self.header.l1_size = entries as u32;
                self.set_l1_entry(dev, index, L1Entry(0))?;
            }
            self.header_dirty = true;
            return Ok(());
        }
        self.writeback(dev)?;
        let mut bytes = vec![0u8; (new_clusters * cs) as usize];
        for index in 0..old {
            let entry = self.l1_entry(dev, index)?;
            if let Some(slot) = bytes.get_mut((index * 8) as usize..(index * 8 + 8) as usize) {
                slot.copy_from_slice(&entry.0.to_be_bytes());
            }
        }
        let first = self.alloc_clusters(dev, new_clusters)?;
        // The new table's refcounts must be durable before the header points at it.
        self.writeback(dev)?;
        write_meta(dev, first * cs, &bytes)?;
        dev.flush()?;
        let old_offset = self.header.l1_table_offset;
        for c in 0..old_clusters {
            self.cache.remove(old_offset + c * cs);
        }
        self.header.l1_table_offset = first * cs;
        self.header.l1_size = entries as u32;
        self.write_header(dev)?;
        dev.flush()?;
        if old > 0 {
            for c in 0..old_clusters {
                self.free_later(old_offset / cs + c);
            }
        }
        Ok(())
    }

    /// Unmaps every guest cluster at or past `from` (a cluster boundary) and frees what they used; L2 tables
    /// left empty are unlinked and freed too.
    pub(super) fn unmap_tail(&mut self, dev: &dyn BlockDevice, from: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let first_l1 = geo.l1_index(GuestOffset(from));
        for l1_index in first_l1..self.l1_size() {
            let entry = self.l1_entry(dev, l1_index)?;
            let Some(mut l2) = entry.l2_offset() else { continue };
            let table_start = l1_index * geo.l2_span();
            let first = if table_start >= from { 0 } else { geo.l2_index(GuestOffset(from)) };
            if first == 0 {
                self.set_l1_entry(dev, l1_index, L1Entry(0))?;
            } else {
                // Part of the table stays: edit a private copy.
                l2 = self.l2_for_write(dev, l1_index)?;
            }
            for index in first..geo.l2_entries() {
                let at = l2.0 + index * geo.l2_entry_size();
                let entry = self.l2_entry(dev, l2, index)?;
                if first != 0 {
                    if !entry.is_unallocated() {
                        self.set_l2_entry(dev, l2, index, L2Entry(0))?;
                    }
                    if geo.extended_l2 {
                        self.set_l2_bitmap(dev, l2, index, SubclusterBitmap::default())?;
                    }
                }
                match self.decode_l2(dev, entry, at)? {
                    // Data in an external data file is not refcounted.
                    L2Kind::Normal { .. } | L2Kind::Zero { host: Some(_) } if self.data_file_size.is_some() => {}
                    L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => self.free_later(host.0 / cs),
                    L2Kind::Compressed { host, len } => {
                        for c in host.0 / cs..=(host.0 + len.max(1) - 1) / cs {
                            self.free_later(c);
                        }
                    }
                    L2Kind::Zero { host: None } | L2Kind::Unallocated => {}
                }
            }
            if first == 0 {
                self.cache.remove(l2.0);
                self.free_later(l2.0 / cs);
            }
        }
        Ok(())
    }

    /// Truncates the device after the last cluster with a nonzero refcount. With the refcounts trusted, nothing
    /// past it is referenced by any table, snapshot, bitmap or the header.
    pub(super) fn trim_file(&mut self, dev: &dyn BlockDevice, _trusted: Trusted) -> Result<()> {
        let mut end = self.alloc.end_cluster();
        // A cluster the reclaimer is erasing is written without the lock: the file must keep it.
        while end > 1 && self.refcount(dev, end - 1)? == 0 && !self.reclaim.is_busy(end - 1) {
            end -= 1;
        }
        if end < self.alloc.end_cluster() {
            self.alloc.cut(end);
            self.reclaim.truncated(end);
            dev.resize((end << self.geo.cluster_bits) / 512)?;
        }
        Ok(())
    }
}

impl<D: BlockDevice> Image<D> {
    /// Changes the virtual size to `new_size` bytes, a multiple of 512. Shrinking discards the data past the new
    /// end and is refused unless `allow_shrink` is set. Growing makes the new part read as zeros, also where a
    /// longer backing file would show through (zero clusters, as QEMU does).
    ///
    /// # Errors
    /// `InvalidArgument`, changing nothing, for a size that is not a multiple of 512 (QEMU's qcow2 driver
    /// refuses those too), a refused shrink, a size the L1 table cannot map, or an inconsistent persistent bitmap
    /// (QEMU refuses to resize an image with one; remove it first); `Untrusted`, changing nothing, for a shrink of
    /// an image whose refcounts cannot be trusted to say where the file may end;
    /// [`Refusal::GrowV2OverBacking`](super::Refusal::GrowV2OverBacking), changing nothing, for growing a version 2
    /// image over a longer backing file (QEMU refuses it too); `ReadOnly`, `Io`, `Corrupt`.
    pub fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.observe(self.resize_guest(new_size, allow_shrink))
    }

    fn resize_guest(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.check_writable("resize")?;
        if new_size % 512 != 0 {
            // Rounding would leave the image at a size the caller did not ask for.
            return Err(Error::invalid("resize", format!("{new_size} bytes is not a multiple of 512")));
        }
        let mut exclusive = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let old_size = self.virtual_size();
        if new_size == old_size {
            return Ok(());
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        if new_size < old_size {
            if !allow_shrink {
                return Err(Error::invalid(
                    "resize",
                    format!("shrinking from {old_size} to {new_size} bytes loses data; allow it explicitly"),
                ));
            }
            // Refused while a bitmap is inconsistent, as QEMU refuses it; the others follow the new size.
            self.bitmaps_before_resize(&mut exclusive)?;
            let mut m = self.meta();
            // The file is cut after its last cluster in use, by refcount: judged before anything changes.
            let trusted = m.establish_trust(&self.dev, "resize")?;
            m.mark_dirty(&self.dev)?;
            m.unmap_tail(&self.dev, new_size.next_multiple_of(cs))?;
            m.header.size = new_size;
            m.header_dirty = true;
            m.writeback(&self.dev)?;
            m.trim_file(&self.dev, trusted)?;
            self.size.store(new_size, std::sync::atomic::Ordering::Release);
            drop(m);
            self.bitmaps_resized(new_size, &mut exclusive);
        } else {
            // What grows into view must read as zeros, as QEMU has it: the tail of a cluster a shrink kept, and
            // whatever part of a longer backing file lies past the old end (zero clusters, which version 2 lacks).
            let backed_to = self.backing.as_ref().map_or(0, super::Backing::size).min(new_size);
            if backed_to > old_size && self.meta().header.version < 3 {
                return Err(super::Refusal::GrowV2OverBacking.into());
            }
            let tail_end = old_size.next_multiple_of(cs).min(new_size);
            self.bitmaps_before_resize(&mut exclusive)?;
            let stale_tail = {
                let mut m = self.meta();
                m.grow_l1(&self.dev, geo.l1_entries_for(new_size))?;
                m.header.size = new_size;
                m.header_dirty = true;
                tail_end > old_size
                    && !m.map(&self.dev, old_size, tail_end - old_size)?.iter().all(|e| self.reads_as_zeros(e))
            };
            self.size.store(new_size, std::sync::atomic::Ordering::Release);
            self.bitmaps_resized(new_size, &mut exclusive);
            drop(exclusive);
            if stale_tail {
                // Not a guest write: the bytes past the old end read as zeros already, and QEMU dirties nothing.
                self.write_untracked(old_size, &vec![0u8; (tail_end - old_size) as usize])?;
            }
            if backed_to > tail_end {
                self.zero_unallocated(tail_end, backed_to.next_multiple_of(cs).min(new_size))?;
            }
        }
        self.flush()
    }
}
