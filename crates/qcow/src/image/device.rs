//! A qcow2 image is itself a block device with 512-byte sectors, so images stack on images.

use std::sync::atomic::Ordering;

use super::Image;
use crate::block::{check_request, BlockDevice, Info, SECTOR_SIZE};
use crate::error::{Error, Result};

impl<D: BlockDevice> BlockDevice for Image<D> {
    fn info(&self) -> Info {
        Info {
            sector_size: SECTOR_SIZE,
            size_sectors: self.virtual_size().div_ceil(SECTOR_SIZE),
            read_write: !self.read_only,
        }
    }

    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> Result<()> {
        self.check_connected()?;
        check_request(&BlockDevice::info(self), "read", sector, bufs.iter().map(|b| b.len()))?;
        self.read_vectored(sector * SECTOR_SIZE, bufs)
    }

    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
        self.check_writable("write")?;
        check_request(&BlockDevice::info(self), "write", sector, bufs.iter().map(|b| b.len()))?;
        self.write_vectored(sector * SECTOR_SIZE, bufs)
    }

    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }

    /// Grows the image. Shrinking through the device interface is refused, because it loses data: call
    /// [`Image::resize`] with `allow_shrink` for that.
    fn resize(&self, sectors: u64) -> Result<()> {
        let bytes = sectors.checked_mul(SECTOR_SIZE).ok_or_else(|| Error::invalid("resize", "size overflows"))?;
        Image::resize(self, bytes, false)
    }

    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        Image::discard(self, sector, count)
    }

    fn disconnect(&self) {
        self.stop_reclaimer();
        if !self.disconnected.load(Ordering::Acquire) {
            let _ = self.shutdown();
            self.disconnected.store(true, Ordering::Release);
            self.dev.disconnect();
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Image::read_at(self, offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Image::write_at(self, offset, buf)
    }
}
