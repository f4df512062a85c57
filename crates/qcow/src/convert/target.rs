//! Where [`run`](super::run) stores what it copied: any block device that reads as zeros where it is not written
//! ([`DeviceTarget`]), or a qcow2 image, which also stores compressed clusters and skips zeroing what already
//! reads as zeros ([`ImageTarget`]).

use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::image::{ExtentKind, Image};

/// The largest zero write issued at once.
const ZERO_CHUNK: usize = 1 << 20;

/// A destination of [`run`](super::run). Calls come from one thread, in guest order.
pub trait Target {
    /// The destination's size in bytes; a copy never writes past it.
    fn size_bytes(&self) -> u64;

    /// Stores `data` at `offset` (both sector aligned).
    ///
    /// # Errors
    /// Whatever the destination reports.
    fn write_data(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes `len` bytes at `offset` (both sector aligned) read as zeros.
    ///
    /// # Errors
    /// Whatever the destination reports.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Stores the compressed form of the whole cluster at `offset`.
    ///
    /// # Errors
    /// `Unsupported` when the destination cannot store compressed clusters; whatever it reports otherwise.
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()>;

    /// The device data may be written to directly, from any thread and in any order, when the destination's
    /// layout does not depend on the order of writes (a plain device). `None` (the default) has every piece
    /// stored through this target, in guest order.
    fn concurrent(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// Makes everything stored durable.
    ///
    /// # Errors
    /// Whatever the destination reports.
    fn flush(&self) -> Result<()>;
}

/// Writes zeros over `offset..offset + len` of `dev`, a bounded piece at a time.
fn zero_fill(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64);
        dev.write_at(pos, zeros.get(..n as usize).unwrap_or(&[]))?;
        pos += n;
    }
    Ok(())
}

/// A plain block device (a raw file, memory): data is written as it is, zeros as zeros, and compressed clusters
/// are refused.
pub struct DeviceTarget<'a>(pub &'a dyn BlockDevice);

impl Target for DeviceTarget<'_> {
    fn size_bytes(&self) -> u64 {
        self.0.info().size_bytes()
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        zero_fill(self.0, offset, len)
    }

    fn concurrent(&self) -> Option<&dyn BlockDevice> {
        Some(self.0)
    }

    fn write_compressed(&self, offset: u64, _: &[u8]) -> Result<()> {
        Err(Error::Unsupported { feature: format!("compressed data at {offset:#x} for a device that is not qcow2") })
    }

    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}

/// A qcow2 image: compressed clusters go through [`Image::write_precompressed`], and zeroing skips clusters that
/// already read as zeros (so converting into an existing image with `-n` does not allocate its holes).
pub struct ImageTarget<'a, D: BlockDevice>(pub &'a Image<D>);

impl<D: BlockDevice> Target for ImageTarget<'_, D> {
    fn size_bytes(&self) -> u64 {
        self.0.virtual_size().next_multiple_of(512)
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        for extent in self.0.map(offset, len)? {
            let reads_zero = match extent.kind {
                ExtentKind::Zero => true,
                ExtentKind::Unallocated => !self.0.has_backing(),
                ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => false,
            };
            if !reads_zero {
                zero_fill(self.0, extent.guest.0, extent.len)?;
            }
        }
        Ok(())
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.0.write_precompressed(offset, compressed)
    }

    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}
