//! [`Unsynced`]: a device whose flushes return at once, for output nobody needs durable before the process ends
//! (qemu-img convert's default `cache=unsafe` for its target). Everything else is the inner device's answer.

use super::{BlockDevice, Info};
use crate::error::Result;

/// Wraps a device and makes [`BlockDevice::flush`] a no-op; the data still reaches the inner device (and the
/// page cache) on every write, it is only not forced to stable storage.
#[derive(Debug)]
pub struct Unsynced<D: BlockDevice>(D);

impl<D: BlockDevice> Unsynced<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        Unsynced(inner)
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.0
    }

    /// Unwraps the device.
    pub fn into_inner(self) -> D {
        self.0
    }
}

impl<D: BlockDevice> BlockDevice for Unsynced<D> {
    fn info(&self) -> Info {
        self.0.info()
    }
    fn read(&self, sector: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.0.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[&[u8]]) -> Result<()> {
        self.0.write(sector, bufs)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn resize(&self, sectors: u64) -> Result<()> {
        self.0.resize(sectors)
    }
    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        self.0.discard(sector, count)
    }
    fn zero_range(&self, sector: u64, count: u64) -> Result<bool> {
        self.0.zero_range(sector, count)
    }
    fn disconnect(&self) {
        self.0.disconnect()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.0.write_at(offset, buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::block::{FaultyDevice, FaultyOp, MemoryDevice};

    #[test]
    fn flushes_never_reach_the_device_and_writes_do() {
        let faulty = FaultyDevice::new(MemoryDevice::new(4096));
        faulty.fail_next(FaultyOp::Flush, 0);
        let dev = Unsynced::new(faulty);
        dev.flush().unwrap();
        assert_eq!(dev.inner().flush_count(), 0);
        dev.write_at(512, &[7u8; 512]).unwrap();
        let mut back = [0u8; 512];
        dev.inner().read_at(512, &mut back).unwrap();
        assert_eq!(back, [7u8; 512]);
    }
}
