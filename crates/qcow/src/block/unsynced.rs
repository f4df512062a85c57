//! [`Unsynced`]: a device whose flushes return at once, for output nobody needs durable before the process ends
//! (qemu-img convert's default `cache=unsafe` for its target). Everything else is the inner device's answer.

use super::BlockDevice;
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
    crate::forward_block_device_methods!(0; info, read, write, resize, discard, zero_range, disconnect, read_at, write_at);
    fn flush(&self) -> Result<()> {
        Ok(())
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
