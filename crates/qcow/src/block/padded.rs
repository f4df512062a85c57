//! [`Padded`]: a device padded with virtual zeros, so reads beyond its current end succeed.
//!
//! This is the seed's padded block device. A qcow2 file grows as clusters are allocated, and the engine may read a
//! cluster-sized range whose tail lies beyond the file's current end; through `Padded` such a read returns the
//! existing prefix followed by zeros instead of failing.
//!
//! Invariants: only reads change behaviour. A read must still be whole sectors; the part below the inner device's
//! end is read from the inner device and the part at or past it is zeros. Everything else (info, write, flush,
//! resize, discard, disconnect) is the inner device's answer, so writes past the end fail as the inner device fails
//! them. Once disconnected, every operation answers `Disconnected`, including reads that touch no inner sector.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{BlockDevice, Info};
use crate::error::{Error, Result};

/// A device whose reads past the end return zeros instead of failing.
#[derive(Debug)]
pub struct Padded<D: BlockDevice> {
    inner: D,
    disconnected: AtomicBool,
    /// Serialises every change of the inner device's size: the engine grows the file from writers, from the
    /// allocator and from a writeback running outside its locks, and a size checked by one must not be cut back
    /// by another growing it less far.
    sizing: Mutex<()>,
}

impl<D: BlockDevice> Padded<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        Padded { inner, disconnected: AtomicBool::new(false), sizing: Mutex::new(()) }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the device.
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn check_connected(&self) -> Result<()> {
        if self.disconnected.load(Ordering::Acquire) {
            Err(Error::Disconnected)
        } else {
            Ok(())
        }
    }
}

impl<D: BlockDevice> BlockDevice for Padded<D> {
    fn info(&self) -> Info {
        self.inner.info()
    }

    fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.check_connected()?;
        let info = self.inner.info();
        let sector_size = info.sector_size;
        let mut total: u64 = 0;
        for buf in bufs.iter() {
            let len = buf.len() as u64;
            if len.checked_rem(sector_size) != Some(0) {
                return Err(Error::invalid(
                    "read",
                    format!("buffer of {len} bytes is not a multiple of the sector size {sector_size}"),
                ));
            }
            total = total.saturating_add(len);
        }
        let sectors = total / sector_size;
        if sector.checked_add(sectors).is_none() {
            return Err(Error::invalid("read", format!("sectors {sector}..+{sectors} overflow the sector numbers")));
        }

        let size = info.size_sectors;
        if sector >= size {
            // Nothing to read from the inner device, but it may have been disconnected behind our back (it can be
            // shared through an Arc): an empty read at its end asks it without touching data.
            self.inner.read(size, &mut [])?;
            for buf in bufs.iter_mut() {
                buf.fill(0);
            }
            return Ok(());
        }

        let inside_bytes = (size - sector).saturating_mul(sector_size);
        if total <= inside_bytes {
            return self.inner.read(sector, bufs);
        }

        // The request straddles the end: lend the inner device the prefix, which ends on a sector boundary and so
        // splits the buffers into whole sectors, and zero the rest.
        let mut remaining = inside_bytes;
        let mut prefix: Vec<IoSliceMut<'_>> = Vec::with_capacity(bufs.len());
        for buf in bufs.iter_mut() {
            let len = buf.len() as u64;
            if remaining >= len {
                remaining -= len;
                prefix.push(IoSliceMut::new(buf));
            } else {
                let split = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len());
                let (head, tail) = buf.split_at_mut(split);
                tail.fill(0);
                remaining = 0;
                if !head.is_empty() {
                    prefix.push(IoSliceMut::new(head));
                }
            }
        }
        self.inner.read(sector, &mut prefix)
    }

    fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_connected()?;
        self.inner.write(sector, bufs)
    }

    fn flush(&self) -> Result<()> {
        self.check_connected()?;
        self.inner.flush()
    }

    fn resize(&self, sectors: u64) -> Result<()> {
        self.check_connected()?;
        let _sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.resize(sectors)
    }

    fn grow_to(&self, sectors: u64) -> Result<()> {
        self.check_connected()?;
        let _sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.grow_to(sectors)
    }

    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        self.check_connected()?;
        self.inner.discard(sector, count)
    }

    fn zero_range(&self, sector: u64, count: u64) -> Result<bool> {
        self.check_connected()?;
        if sector.saturating_add(count) > self.inner.info().size_sectors {
            // This grows the device: one size change at a time.
            let _sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
            return self.inner.zero_range(sector, count);
        }
        self.inner.zero_range(sector, count)
    }

    fn disconnect(&self) {
        self.disconnected.store(true, Ordering::Release);
        self.inner.disconnect();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::block::MemoryDevice;
    use crate::error::ErrorKind;
    use std::io::{IoSlice, IoSliceMut};
    use std::sync::Arc;

    /// Four sectors whose bytes are their sector number plus one.
    fn device() -> Padded<MemoryDevice> {
        let mut bytes = Vec::new();
        for s in 0..4u8 {
            bytes.extend_from_slice(&[s + 1; 512]);
        }
        Padded::new(MemoryDevice::from_bytes(bytes))
    }

    fn sector_of(buf: &[u8], i: usize) -> &[u8] {
        &buf[i * 512..(i + 1) * 512]
    }

    #[test]
    fn info_passes_through() {
        let d = device();
        assert_eq!(d.info(), d.inner().info());
        assert_eq!(d.info().size_sectors, 4);
    }

    #[test]
    fn read_fully_inside() {
        let d = device();
        let mut buf = vec![0xffu8; 1024];
        d.read(1, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(sector_of(&buf, 0), &[2; 512][..]);
        assert_eq!(sector_of(&buf, 1), &[3; 512][..]);
        // Up to exactly the end is still "inside".
        let mut buf = vec![0xffu8; 2048];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        for i in 0..4 {
            assert_eq!(sector_of(&buf, i), &[i as u8 + 1; 512][..]);
        }
    }

    #[test]
    fn read_straddling_the_end() {
        let d = device();
        let mut buf = vec![0xffu8; 4 * 512];
        d.read(2, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(sector_of(&buf, 0), &[3; 512][..]);
        assert_eq!(sector_of(&buf, 1), &[4; 512][..]);
        assert_eq!(sector_of(&buf, 2), &[0; 512][..]);
        assert_eq!(sector_of(&buf, 3), &[0; 512][..]);
    }

    #[test]
    fn read_fully_past_the_end() {
        let d = device();
        let mut buf = vec![0xffu8; 1024];
        d.read(4, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, vec![0; 1024]);
        let mut buf = vec![0xffu8; 512];
        d.read(1_000_000, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, vec![0; 512]);
    }

    #[test]
    fn zero_length_reads() {
        let d = device();
        d.read(0, &mut []).unwrap();
        d.read(4, &mut []).unwrap();
        d.read(100, &mut []).unwrap();
        let mut empty: [u8; 0] = [];
        d.read(2, &mut [IoSliceMut::new(&mut empty)]).unwrap();
        let mut empty2: [u8; 0] = [];
        d.read(9, &mut [IoSliceMut::new(&mut empty), IoSliceMut::new(&mut empty2)]).unwrap();
    }

    #[test]
    fn vectored_read_straddling_in_the_middle_of_the_list() {
        let d = device();
        // Start at sector 1: a = [s1], b = [s2, s3, pad, pad] (the end falls inside b), c = [pad].
        let mut a = vec![0xffu8; 512];
        let mut b = vec![0xffu8; 4 * 512];
        let mut c = vec![0xffu8; 512];
        d.read(1, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b), IoSliceMut::new(&mut c)]).unwrap();
        assert_eq!(a, vec![2; 512]);
        assert_eq!(sector_of(&b, 0), &[3; 512][..]);
        assert_eq!(sector_of(&b, 1), &[4; 512][..]);
        assert_eq!(sector_of(&b, 2), &[0; 512][..]);
        assert_eq!(sector_of(&b, 3), &[0; 512][..]);
        assert_eq!(c, vec![0; 512]);

        // The end falls exactly between two buffers, with an empty buffer thrown in.
        let mut a = vec![0xffu8; 1024];
        let mut empty: [u8; 0] = [];
        let mut b = vec![0xffu8; 1024];
        d.read(2, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut empty), IoSliceMut::new(&mut b)]).unwrap();
        assert_eq!(sector_of(&a, 0), &[3; 512][..]);
        assert_eq!(sector_of(&a, 1), &[4; 512][..]);
        assert_eq!(b, vec![0; 1024]);
    }

    #[test]
    fn non_sector_buffers_are_refused() {
        let d = device();
        let mut odd = vec![0u8; 100];
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut odd)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Also past the end, where nothing would be read from the inner device.
        assert_eq!(d.read(10, &mut [IoSliceMut::new(&mut odd)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut good = vec![0u8; 512];
        assert_eq!(
            d.read(3, &mut [IoSliceMut::new(&mut good), IoSliceMut::new(&mut odd)]).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let mut buf = vec![0u8; 1024];
        assert_eq!(d.read(u64::MAX, &mut [IoSliceMut::new(&mut buf)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn writes_and_the_rest_pass_through() {
        let d = device();
        d.write(3, &[IoSlice::new(&[9; 512])]).unwrap();
        assert_eq!(&d.inner().snapshot()[3 * 512..], &[9; 512][..]);
        // Writes past the end fail as the inner device fails them.
        assert_eq!(d.write(4, &[IoSlice::new(&[9; 512])]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(d.write(3, &[IoSlice::new(&[9; 1024])]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        d.flush().unwrap();
        d.resize(6).unwrap();
        assert_eq!(d.info().size_sectors, 6);
        d.write(5, &[IoSlice::new(&[8; 512])]).unwrap();
        d.discard(5, 1).unwrap();
        let mut buf = vec![0xffu8; 1024];
        d.read(5, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, vec![0; 1024]);
        let ro = Padded::new(MemoryDevice::new(512).read_only());
        assert_eq!(ro.write(0, &[IoSlice::new(&[1; 512])]).unwrap_err().kind(), ErrorKind::ReadOnly);
        let inner = d.into_inner();
        assert_eq!(inner.info().size_sectors, 6);
    }

    #[test]
    fn disconnect_fails_every_read() {
        let d = device();
        d.disconnect();
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(0, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(
            d.read(3, &mut [IoSliceMut::new(&mut buf), IoSliceMut::new(&mut vec![0u8; 512])]),
            Err(Error::Disconnected)
        ));
        assert!(matches!(d.read(100, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.write(0, &[IoSlice::new(&buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        assert!(matches!(d.resize(1), Err(Error::Disconnected)));
        assert!(matches!(d.discard(0, 1), Err(Error::Disconnected)));
        // The inner device was released too.
        assert!(matches!(d.inner().flush(), Err(Error::Disconnected)));
    }

    #[test]
    fn inner_disconnected_elsewhere_is_noticed_past_the_end() {
        let inner = Arc::new(MemoryDevice::new(1024));
        let d = Padded::new(inner.clone());
        inner.disconnect();
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(10, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(
            d.read(1, &mut [IoSliceMut::new(&mut buf), IoSliceMut::new(&mut vec![0u8; 512])]),
            Err(Error::Disconnected)
        ));
    }

    #[test]
    fn reads_follow_the_inner_size() {
        let d = device();
        d.resize(2).unwrap();
        let mut buf = vec![0xffu8; 2048];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(sector_of(&buf, 0), &[1; 512][..]);
        assert_eq!(sector_of(&buf, 1), &[2; 512][..]);
        assert_eq!(&buf[1024..], &[0; 1024][..]);
    }
}
