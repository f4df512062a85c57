//! Writing compressed clusters: whole clusters only, packed into host clusters as QEMU packs them.

use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::compress;

impl<D: BlockDevice> Image<D> {
    /// Writes one whole guest cluster compressed with the image's compression type. `buf` is a cluster, or for
    /// the last cluster of a disk whose size is not a cluster multiple, the sectors up to the end. When
    /// compression does not make the cluster smaller it is written as a normal cluster, as QEMU does.
    ///
    /// # Errors
    /// `InvalidArgument` when the range is not a whole cluster, plus everything [`Image::write_at`] returns.
    pub fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.observe(self.write_compressed_cluster(offset, buf))
    }

    fn write_compressed_cluster(&self, offset: u64, buf: &[u8]) -> Result<()> {
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
        match compressed {
            Some(data) => self.write_precompressed(offset, &data),
            None => self.write_at(offset, buf),
        }
    }
}
