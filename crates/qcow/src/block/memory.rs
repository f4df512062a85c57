//! [`MemoryDevice`]: a ramdisk, the device tests and scratch images sit on.
//!
//! Invariants: the contents are always a whole number of [`SECTOR_SIZE`] sectors long, so the device's size in
//! sectors is exactly `len / SECTOR_SIZE`; every request is validated with [`check_request`] under the same lock
//! that then serves it, so a concurrent resize can never make a validated request run past the end. Once
//! disconnected, a device stays disconnected.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{check_request, BlockDevice, Info, SECTOR_SIZE};
use crate::error::{Error, Result};

/// A block device kept in memory.
///
/// Reads take a shared lock and writes an exclusive one, so the device is safe to share between threads. Discard is
/// supported and zeroes the range. Flush has nothing to do.
#[derive(Debug)]
pub struct MemoryDevice {
    data: RwLock<Vec<u8>>,
    read_write: bool,
    disconnected: AtomicBool,
}

impl MemoryDevice {
    /// A zero-filled, writable device of `size_bytes`, rounded up to whole sectors.
    ///
    /// # Panics
    /// When the memory cannot be allocated, as any `Vec` allocation does.
    pub fn new(size_bytes: u64) -> Self {
        let len = round_up_to_sector(size_bytes);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        Self::from_vec(vec![0; len])
    }

    /// A writable device holding `bytes`, zero-padded up to whole sectors.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        let len = bytes.len() as u64;
        let padded = round_up_to_sector(len);
        if padded != len {
            bytes.resize(usize::try_from(padded).unwrap_or(usize::MAX), 0);
        }
        Self::from_vec(bytes)
    }

    fn from_vec(data: Vec<u8>) -> Self {
        MemoryDevice { data: RwLock::new(data), read_write: true, disconnected: AtomicBool::new(false) }
    }

    /// The same device, refusing writes, resizes and discards with `ReadOnly`.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_write = false;
        self
    }

    /// A copy of the whole contents. Works after [`disconnect`](BlockDevice::disconnect) too, so a test can look
    /// at what a closed image left behind.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data_read().clone()
    }

    /// The contents, without copying.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    // A panic while holding the lock cannot leave the bytes half-structured (they are plain bytes), so a poisoned
    // lock is safe to keep using.
    fn data_read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn data_write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    fn info_for(&self, data: &[u8]) -> Info {
        Info { sector_size: SECTOR_SIZE, size_sectors: data.len() as u64 / SECTOR_SIZE, read_write: self.read_write }
    }

    fn check_connected(&self) -> Result<()> {
        if self.disconnected.load(Ordering::Acquire) {
            Err(Error::Disconnected)
        } else {
            Ok(())
        }
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        self.check_connected()?;
        if self.read_write {
            Ok(())
        } else {
            Err(Error::ReadOnly { op })
        }
    }
}

fn round_up_to_sector(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR_SIZE).saturating_mul(SECTOR_SIZE)
}

/// The byte offset of `sector` as an index into the contents; only called after the request was validated, so it
/// fits.
fn byte_index(op: &'static str, sector: u64) -> Result<usize> {
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| Error::invalid(op, format!("sector {sector} is out of range")))
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> Info {
        self.info_for(&self.data_read())
    }

    fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.check_connected()?;
        let data = self.data_read();
        check_request(&self.info_for(&data), "read", sector, bufs.iter().map(|b| b.len()))?;
        let mut pos = byte_index("read", sector)?;
        for buf in bufs.iter_mut() {
            let end = pos.saturating_add(buf.len());
            let src =
                data.get(pos..end).ok_or_else(|| Error::invalid("read", "range runs past the end of the device"))?;
            buf.copy_from_slice(src);
            pos = end;
        }
        Ok(())
    }

    fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_writable("write")?;
        let mut data = self.data_write();
        check_request(&self.info_for(&data), "write", sector, bufs.iter().map(|b| b.len()))?;
        let mut pos = byte_index("write", sector)?;
        for buf in bufs {
            let end = pos.saturating_add(buf.len());
            let dst = data
                .get_mut(pos..end)
                .ok_or_else(|| Error::invalid("write", "range runs past the end of the device"))?;
            dst.copy_from_slice(buf);
            pos = end;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.check_connected()
    }

    fn resize(&self, sectors: u64) -> Result<()> {
        self.check_writable("resize")?;
        let len = sectors
            .checked_mul(SECTOR_SIZE)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| Error::invalid("resize", format!("{sectors} sectors do not fit in memory")))?;
        let mut data = self.data_write();
        if len > data.len() {
            // Growing by an absurd amount must answer an error, not abort the process.
            let extra = len.saturating_sub(data.len());
            data.try_reserve_exact(extra).map_err(|e| {
                Error::io(
                    "resize",
                    data.len() as u64,
                    std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string()),
                )
            })?;
        }
        data.resize(len, 0);
        if len < data.len() / 2 {
            data.shrink_to_fit();
        }
        Ok(())
    }

    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        self.check_writable("discard")?;
        let mut data = self.data_write();
        let size = data.len() as u64 / SECTOR_SIZE;
        match sector.checked_add(count) {
            Some(end) if end <= size => {}
            _ => {
                return Err(Error::invalid(
                    "discard",
                    format!("sectors {sector}..+{count} run past the end of the device ({size} sectors)"),
                ))
            }
        }
        let start = byte_index("discard", sector)?;
        let end = byte_index("discard", sector.saturating_add(count))?;
        if let Some(range) = data.get_mut(start..end) {
            range.fill(0);
        }
        Ok(())
    }

    fn disconnect(&self) {
        self.disconnected.store(true, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::io::{IoSlice, IoSliceMut};

    #[test]
    fn new_rounds_up_to_sectors() {
        let d = MemoryDevice::new(1000);
        let info = d.info();
        assert_eq!(info.sector_size, 512);
        assert_eq!(info.size_sectors, 2);
        assert!(info.read_write);
        assert_eq!(d.snapshot(), vec![0; 1024]);
        assert_eq!(MemoryDevice::new(0).info().size_sectors, 0);
        assert_eq!(MemoryDevice::new(512).info().size_sectors, 1);
    }

    #[test]
    fn from_bytes_pads_and_keeps_contents() {
        let d = MemoryDevice::from_bytes(vec![7; 600]);
        assert_eq!(d.info().size_sectors, 2);
        let snap = d.snapshot();
        assert_eq!(&snap[..600], &[7; 600][..]);
        assert_eq!(&snap[600..], &[0; 424][..]);
        assert_eq!(d.into_bytes().len(), 1024);
    }

    #[test]
    fn write_then_vectored_read() {
        let d = MemoryDevice::new(8 * 512);
        let a = vec![1u8; 512];
        let b = vec![2u8; 1024];
        d.write(2, &[IoSlice::new(&a), IoSlice::new(&b)]).unwrap();
        let mut x = vec![0u8; 1024];
        let mut y = vec![0u8; 1024];
        d.read(1, &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)]).unwrap();
        assert_eq!(&x[..512], &[0; 512][..]);
        assert_eq!(&x[512..], &[1; 512][..]);
        assert_eq!(y, vec![2; 1024]);
        // read_at / write_at defaults go through the same checks.
        d.write_at(7 * 512, &[9; 512]).unwrap();
        let mut z = vec![0u8; 512];
        d.read_at(7 * 512, &mut z).unwrap();
        assert_eq!(z, vec![9; 512]);
        assert_eq!(d.read_at(100, &mut z).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn requests_are_validated() {
        let d = MemoryDevice::new(4 * 512);
        let mut odd = vec![0u8; 100];
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut odd)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut two = vec![0u8; 1024];
        assert_eq!(d.read(3, &mut [IoSliceMut::new(&mut two)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(d.write(3, &[IoSlice::new(&two)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(d.read(u64::MAX, &mut [IoSliceMut::new(&mut two)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Empty requests at the end are fine; past the end they are not.
        d.read(4, &mut []).unwrap();
        d.write(4, &[]).unwrap();
        assert_eq!(d.read(5, &mut []).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn resize_grows_with_zeros_and_shrinks() {
        let d = MemoryDevice::from_bytes(vec![5; 1024]);
        d.resize(4).unwrap();
        assert_eq!(d.info().size_sectors, 4);
        let snap = d.snapshot();
        assert_eq!(&snap[..1024], &[5; 1024][..]);
        assert_eq!(&snap[1024..], &[0; 1024][..]);
        d.resize(1).unwrap();
        assert_eq!(d.snapshot(), vec![5; 512]);
        let mut buf = vec![0u8; 1024];
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Growing again must not resurrect the old bytes.
        d.resize(2).unwrap();
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[512..], &[0; 512][..]);
        assert_eq!(d.resize(u64::MAX).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn discard_zeroes_the_range() {
        let d = MemoryDevice::from_bytes(vec![3; 4 * 512]);
        d.discard(1, 2).unwrap();
        let snap = d.snapshot();
        assert_eq!(&snap[..512], &[3; 512][..]);
        assert_eq!(&snap[512..1536], &[0; 1024][..]);
        assert_eq!(&snap[1536..], &[3; 512][..]);
        d.discard(4, 0).unwrap();
        assert_eq!(d.discard(3, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(d.discard(u64::MAX, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn read_only_refuses_changes() {
        let d = MemoryDevice::from_bytes(vec![1; 1024]).read_only();
        assert!(!d.info().read_write);
        assert_eq!(d.write(0, &[IoSlice::new(&[0; 512])]).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.resize(8).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.discard(0, 1).unwrap_err().kind(), ErrorKind::ReadOnly);
        d.flush().unwrap();
        let mut buf = vec![0u8; 512];
        d.read(1, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, vec![1; 512]);
        assert_eq!(d.snapshot(), vec![1; 1024]);
    }

    #[test]
    fn disconnect_fails_everything() {
        let d = MemoryDevice::new(1024);
        d.write(0, &[IoSlice::new(&[4; 512])]).unwrap();
        d.disconnect();
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(0, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.write(0, &[IoSlice::new(&buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        assert!(matches!(d.resize(4), Err(Error::Disconnected)));
        assert!(matches!(d.discard(0, 1), Err(Error::Disconnected)));
        // The contents are still there for inspection.
        assert_eq!(&d.snapshot()[..512], &[4; 512][..]);
    }

    #[test]
    fn concurrent_non_overlapping_writes() {
        let d = std::sync::Arc::new(MemoryDevice::new(64 * 512));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..8u64 {
                        d.write(u64::from(t) * 8 + i, &[IoSlice::new(&[t + 1; 512])]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = d.snapshot();
        for (i, chunk) in snap.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i / 8) as u8 + 1));
        }
    }
}
