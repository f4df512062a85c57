//! Writing compressed clusters: whole clusters only, packed into host clusters as QEMU packs them.

use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{compress, CompressedDescriptor, GuestOffset, HostOffset, L2Entry, L2Kind};

impl<D: BlockDevice> Image<D> {
    /// Writes one whole guest cluster compressed with the image's compression type. `buf` is a cluster, or for
    /// the last cluster of a disk whose size is not a cluster multiple, the sectors up to the end. When
    /// compression does not make the cluster smaller it is written as a normal cluster, as QEMU does.
    ///
    /// # Errors
    /// `InvalidArgument` when the range is not a whole cluster, plus everything [`Image::write_at`] returns.
    pub fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable("write compressed")?;
        if self.data_file.is_some() {
            return Err(Error::Unsupported {
                feature: "compressed clusters in an image with an external data file".into(),
            });
        }
        let cs = self.geo.cluster_size();
        let size = self.virtual_size().next_multiple_of(512);
        let expected = cs.min(size.saturating_sub(offset));
        if !self.geo.is_aligned(offset) || buf.len() as u64 != expected || expected == 0 {
            return Err(Error::invalid(
                "write compressed",
                format!("{:#x} bytes at {offset:#x} is not one whole cluster of the disk", buf.len()),
            ));
        }
        let mut whole = vec![0u8; cs as usize];
        if let Some(dst) = whole.get_mut(..buf.len()) {
            dst.copy_from_slice(buf);
        }
        let compressed =
            compress(self.compression, &whole).map_err(|_| Error::corrupt("compressing a cluster failed", offset))?;
        let Some(mut data) = compressed else {
            return self.write_at(offset, buf);
        };
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let guest_cluster = offset / cs;
        let _owned = self.ranges.lock(guest_cluster, guest_cluster + 1);
        let len = data.len() as u64;
        let host = {
            let mut m = self.meta();
            m.mark_dirty(&self.dev)?;
            m.alloc_bytes(&self.dev, len)?
        };
        data.resize(len.next_multiple_of(512) as usize, 0);
        self.dev.write_at(host, &data)?;
        let descriptor = CompressedDescriptor::encode(host, len, self.geo.cluster_bits)
            .map_err(|_| Error::corrupt("compressed cluster offset does not fit a descriptor", host))?;
        let mut m = self.meta();
        let guest = GuestOffset(offset);
        let l2 = m.l2_for_write(&self.dev, self.geo.l1_index(guest))?;
        let index = self.geo.l2_index(guest);
        let old = m.l2_entry(&self.dev, l2, index)?;
        let at = l2.0 + index * self.geo.l2_entry_size();
        m.set_l2_entry(&self.dev, l2, index, L2Entry(descriptor))?;
        if self.geo.extended_l2 {
            m.set_l2_bitmap(&self.dev, l2, index, 0)?;
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
