//! Where [`run`](super::run) stores what it copied: any block device that reads as zeros where it is not written
//! ([`DeviceTarget`]), or a qcow2 image, which also stores compressed clusters and skips zeroing what already
//! reads as zeros ([`ImageTarget`]).

use crate::block::{write_zeros, BlockDevice};
use crate::error::{Error, Result};
use crate::image::Image;

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

    /// Allocates, in guest order, what a data write of `len` bytes at `offset` will need, so that the data itself
    /// may then be written from any thread through [`prepared_device`](Self::prepared_device) without the layout
    /// depending on which thread writes first. Answers false (the default) when the data must go through
    /// [`write_data`](Self::write_data), in order.
    ///
    /// # Errors
    /// Whatever the destination reports.
    fn prepare_data(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }

    /// The device that data prepared by [`prepare_data`](Self::prepare_data) is written to, from any thread.
    fn prepared_device(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// Makes everything stored durable.
    ///
    /// # Errors
    /// Whatever the destination reports.
    fn flush(&self) -> Result<()>;
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
        write_zeros(self.0, offset, len)
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
            if !self.0.reads_as_zeros(&extent) {
                write_zeros(self.0, extent.guest.0, extent.len)?;
            }
        }
        Ok(())
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.0.write_precompressed(offset, compressed)
    }

    fn prepare_data(&self, offset: u64, len: u64) -> Result<bool> {
        self.0.allocate_zeroed(offset, len)
    }

    fn prepared_device(&self) -> Option<&dyn BlockDevice> {
        Some(self.0)
    }

    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}
