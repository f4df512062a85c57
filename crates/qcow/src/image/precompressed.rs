//! Storing a cluster that is already compressed: the engine half of [`Image::write_compressed`], exposed so that a
//! converter can compress clusters on many threads and still store them one at a time, in guest order, which
//! keeps the image's layout independent of thread timing.

use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{CompressedDescriptor, GuestOffset, HostOffset, L2Entry, L2Kind, SubclusterBitmap};

impl<D: BlockDevice> Image<D> {
    /// Stores `data`, the compressed form of the whole guest cluster at `offset` in the image's compression type
    /// (as [`crate::format::compress`] makes it from the cluster zero padded to full size), packed after the
    /// previous compressed cluster as QEMU packs them. The caller vouches that `data` decompresses to the
    /// cluster; nothing here can check it short of decompressing.
    ///
    /// # Errors
    /// `InvalidArgument` when `offset` is not a cluster inside the disk or `data` is empty or not shorter than a
    /// cluster; `Unsupported` for an image with an external data file; otherwise as [`Image::write_at`].
    pub fn write_precompressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.observe(self.write_precompressed_cluster(offset, data))
    }

    fn write_precompressed_cluster(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable("write compressed")?;
        if self.data_file.is_some() {
            return Err(Error::Unsupported {
                feature: "compressed clusters in an image with an external data file".into(),
            });
        }
        let cs = self.geo.cluster_size();
        if !self.geo.is_aligned(offset) || offset >= self.virtual_size() {
            return Err(Error::invalid("write compressed", format!("{offset:#x} is not a cluster of the disk")));
        }
        if data.is_empty() || data.len() as u64 >= cs {
            return Err(Error::invalid(
                "write compressed",
                format!("{} compressed bytes for a {cs}-byte cluster at {offset:#x}", data.len()),
            ));
        }
        let _resize = self.lock_for_write(offset, cs.min(self.virtual_size() - offset), true)?;
        let guest_cluster = offset / cs;
        let _owned = self.ranges.lock(guest_cluster, guest_cluster + 1);
        let len = data.len() as u64;
        let guest = GuestOffset(offset);
        let host = {
            let mut m = self.meta();
            m.mark_dirty(&self.dev)?;
            // The L2 table first, as QEMU allocates it: then a reader of the file from start to end meets every
            // table before the data it maps, which is what lets a pipe be decoded without spooling.
            m.l2_for_write(&self.dev, self.geo.l1_index(guest))?;
            let host = m.alloc_bytes(&self.dev, len)?;
            // Written under the metadata lock: the first and last sectors may be shared with the neighbouring
            // compressed clusters, so they are read, patched and written whole, and no other packed write may
            // touch them meanwhile.
            let first = host / 512 * 512;
            let end = (host + len).next_multiple_of(512);
            let mut sectors = vec![0u8; (end - first) as usize];
            if first < host {
                if let Some(head) = sectors.get_mut(..512) {
                    self.dev.read_at(first, head)?;
                }
            }
            if let Some(dst) = sectors.get_mut((host - first) as usize..(host - first + len) as usize) {
                dst.copy_from_slice(data);
            }
            // Bytes after the data in its last sector belong to nothing yet: zeros, as QEMU leaves them.
            if let Some(tail) = sectors.get_mut((host - first + len) as usize..) {
                tail.fill(0);
            }
            self.dev.write_at(first, &sectors)?;
            host
        };
        let descriptor = CompressedDescriptor::encode(host, len, self.geo.cluster_bits)
            .map_err(|_| Error::corrupt("compressed cluster offset does not fit a descriptor", host))?;
        let mut m = self.meta();
        let l2 = m.l2_for_write(&self.dev, self.geo.l1_index(guest))?;
        let index = self.geo.l2_index(guest);
        let old = m.l2_entry(&self.dev, l2, index)?;
        let at = l2.0 + index * self.geo.l2_entry_size();
        m.set_l2_entry(&self.dev, l2, index, L2Entry(descriptor))?;
        if self.geo.extended_l2 {
            m.set_l2_bitmap(&self.dev, l2, index, SubclusterBitmap::default())?;
        }
        match m.decode_l2(&self.dev, old, at)? {
            L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => m.free_later(host.0 / cs),
            L2Kind::Compressed { host: HostOffset(h), len } => {
                for cluster in h / cs..=(h + len.max(1) - 1) / cs {
                    m.free_later(cluster);
                }
            }
            L2Kind::Zero { host: None } | L2Kind::Unallocated => {}
        }
        if m.cache.over_budget() {
            m.writeback(&self.dev)?;
        }
        Ok(())
    }
}
