//! The block-device contract from the seed, and the devices that implement it.
//!
//! A device has a sector size and a size in sectors and is read-write or read-only. Reads and writes move whole
//! sectors, starting at a sector, through a list of buffers that are each a whole number of sectors long: the
//! standard library's [`IoSliceMut`] and [`IoSlice`], as `preadv`/`pwritev` and `Read::read_vectored` take them. Every
//! operation takes `&self`: devices are shared between threads, and positional I/O means there is no cursor to
//! race on. After [`BlockDevice::disconnect`] every operation fails with [`Error::Disconnected`].
//!
//! Devices stack: [`Padded`] wraps any device, and a qcow2 [`Image`](crate::Image) is itself a device.

// A test double for fault injection: built for the crate's own unit tests, and for other tests (this crate's
// integration tests, the tools' tests) through the `test-utils` feature, so that it is no part of the normal API.
#[cfg(any(test, feature = "test-utils"))]
mod faulty;
mod file;
mod file_lock;
mod memory;
mod padded;
mod unsynced;

#[cfg(any(test, feature = "test-utils"))]
pub use faulty::{FaultyDevice, FaultyOp};
pub use file::{FileDevice, FileOptions};
pub use file_lock::Locking;
pub use memory::MemoryDevice;
pub use padded::Padded;
pub use unsynced::Unsynced;

use std::io::{IoSlice, IoSliceMut};

use crate::error::{Error, Result};

/// The sector size every device in this crate uses, in bytes.
pub const SECTOR_SIZE: u64 = 512;

/// What a device is: its geometry and whether it accepts writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Bytes per sector.
    pub sector_size: u64,
    /// Size of the device in sectors.
    pub size_sectors: u64,
    /// Whether writes, flushes of data, resizes and discards are allowed.
    pub read_write: bool,
}

impl Info {
    /// Size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_sectors.saturating_mul(self.sector_size)
    }
}

/// A device that stores sectors: the seed's contract.
///
/// Implementations must be safe to call from many threads at once. Overlapping concurrent writes land in some
/// order; non-overlapping ones never disturb each other.
pub trait BlockDevice: Send + Sync {
    /// The device's geometry and mode.
    fn info(&self) -> Info;

    /// Fills `bufs`, in order, from consecutive sectors starting at `sector`.
    ///
    /// # Errors
    /// `InvalidArgument` when a buffer is not a whole number of sectors or the range runs past the end;
    /// `Disconnected` after [`disconnect`](Self::disconnect); `Io` when the storage fails, in which case some
    /// buffers may be unfilled.
    fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;

    /// Writes `bufs`, in order, to consecutive sectors starting at `sector`.
    ///
    /// # Errors
    /// As [`read`](Self::read), plus `ReadOnly` (nothing written). On `Io` part of the data may have been written.
    fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()>;

    /// Makes every write completed before this call durable.
    ///
    /// # Errors
    /// `Disconnected`, or `Io` when the storage fails.
    fn flush(&self) -> Result<()>;

    /// Changes the size of the device to `sectors`.
    ///
    /// # Errors
    /// `ReadOnly`, `Unimplemented` for fixed-size devices, `Disconnected`, `Io`.
    fn resize(&self, sectors: u64) -> Result<()>;

    /// Tells the device that `count` sectors from `sector` are no longer needed. Afterwards they read as zeros.
    ///
    /// # Errors
    /// `Unimplemented` (the default: nothing changed), `ReadOnly`, `InvalidArgument`, `Disconnected`, `Io`.
    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        let _ = (sector, count);
        Err(Error::Unimplemented { op: "discard" })
    }

    /// Makes `count` sectors from `sector` read as zeros without writing them, growing the device when they end
    /// past it, as `fallocate(FALLOC_FL_ZERO_RANGE)` does: the sectors stay allocated. Answers `Ok(false)`, having
    /// changed nothing, when the device cannot do that more cheaply than writing zeros (the default); the caller
    /// then writes the zeros itself.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Io`.
    fn zero_range(&self, sector: u64, count: u64) -> Result<bool> {
        let _ = (sector, count);
        Ok(false)
    }

    /// Grows the device to at least `sectors`, never shrinking it: sectors added read as zeros (allocated as
    /// zeros where [`zero_range`](Self::zero_range) can, else as a hole). A device shared by threads that grow it
    /// concurrently must serialise the check and the growth, so that one thread growing it less far cannot cut off
    /// what another added; [`Padded`] does. This default checks and grows without such a lock.
    ///
    /// # Errors
    /// As [`resize`](Self::resize) and [`zero_range`](Self::zero_range).
    fn grow_to(&self, sectors: u64) -> Result<()> {
        let have = self.info().size_sectors;
        if have < sectors && !self.zero_range(have, sectors - have)? {
            self.resize(sectors)?;
        }
        Ok(())
    }

    /// Releases the device. It cannot fail; every later operation answers `Disconnected`.
    fn disconnect(&self);

    /// Reads `buf` from byte `offset`; both must be sector multiples.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let sector = sector_of(self.info().sector_size, offset, "read")?;
        self.read(sector, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `buf` at byte `offset`; both must be sector multiples.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let sector = sector_of(self.info().sector_size, offset, "write")?;
        self.write(sector, &[IoSlice::new(buf)])
    }
}

/// Bytes of zeros written per request by [`write_zeros`].
const ZERO_CHUNK: u64 = 1 << 20;

/// Writes zeros over `len` bytes at byte `offset` (both sector multiples), a bounded piece at a time, for when
/// sectors must read as zeros and stay allocated, or the device cannot discard.
///
/// # Errors
/// As [`BlockDevice::write_at`]; the range may then be partly zeroed.
pub fn write_zeros(dev: &(impl BlockDevice + ?Sized), offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; usize::try_from(len.min(ZERO_CHUNK)).unwrap_or(0)];
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(ZERO_CHUNK);
        dev.write_at(pos, zeros.get(..usize::try_from(n).unwrap_or(0)).unwrap_or_default())?;
        pos += n;
    }
    Ok(())
}

/// Fills `bufs`, in order, from byte `offset` (a sector multiple): [`BlockDevice::read`] addressed in bytes, as
/// [`BlockDevice::read_at`] is for one buffer.
///
/// # Errors
/// As [`BlockDevice::read`], and `InvalidArgument` for an offset that is not a sector multiple.
pub fn read_vectored_at(dev: &(impl BlockDevice + ?Sized), offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    let sector = sector_of(dev.info().sector_size, offset, "read")?;
    dev.read(sector, bufs)
}

/// Writes `bufs`, in order, at byte `offset` (a sector multiple): [`BlockDevice::write`] addressed in bytes, as
/// [`BlockDevice::write_at`] is for one buffer.
///
/// # Errors
/// As [`BlockDevice::write`], and `InvalidArgument` for an offset that is not a sector multiple.
pub fn write_vectored_at(dev: &(impl BlockDevice + ?Sized), offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let sector = sector_of(dev.info().sector_size, offset, "write")?;
    dev.write(sector, bufs)
}

/// Reads `buf` from byte `offset` of `dev` as if the device were `limit` bytes long and zeros followed: bytes at
/// or past `limit` read as zeros without touching the device. Neither `offset` nor `buf` need be sector aligned;
/// the sectors holding the rest are read whole and only the asked-for bytes kept. Pass the device's own size as
/// `limit` to read past its end, or a smaller one (a backing file's guest size, a file length a check trusts).
///
/// # Errors
/// As [`BlockDevice::read_at`]; `InvalidArgument` when the range's sectors overflow.
pub fn read_padded(dev: &(impl BlockDevice + ?Sized), limit: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
    let avail = limit.saturating_sub(offset).min(buf.len() as u64);
    let (inside, past) = buf.split_at_mut(usize::try_from(avail).unwrap_or(usize::MAX));
    past.fill(0);
    if inside.is_empty() {
        return Ok(());
    }
    let sector_size = dev.info().sector_size.max(1);
    let start = offset - offset % sector_size;
    let end = offset
        .checked_add(avail)
        .and_then(|e| e.checked_next_multiple_of(sector_size))
        .ok_or_else(|| Error::invalid("read", format!("range {offset:#x}+{avail:#x} overflows")))?;
    if start == offset && end == offset + avail {
        return dev.read_at(offset, inside);
    }
    let mut sectors = vec![0u8; usize::try_from(end - start).unwrap_or(usize::MAX)];
    dev.read_at(start, &mut sectors)?;
    let skip = usize::try_from(offset - start).unwrap_or(usize::MAX);
    let src = sectors
        .get(skip..skip.saturating_add(inside.len()))
        .ok_or_else(|| Error::invalid("read", format!("range {offset:#x}+{avail:#x} is outside its sectors")))?;
    inside.copy_from_slice(src);
    Ok(())
}

/// Writes `buf` at byte `offset` (both sector multiples), first growing the device with
/// [`grow_to`](BlockDevice::grow_to) when the write ends past it, for files that may end short of what is
/// written into them (qemu-img leaves images that end inside their last cluster).
///
/// # Errors
/// As [`BlockDevice::grow_to`] and [`BlockDevice::write_at`]; `InvalidArgument` when the range overflows.
pub fn write_growing(dev: &(impl BlockDevice + ?Sized), offset: u64, buf: &[u8]) -> Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| Error::invalid("write", format!("range {offset:#x}+{:#x} overflows", buf.len())))?;
    let info = dev.info();
    if end > info.size_bytes() {
        dev.grow_to(end.div_ceil(info.sector_size.max(1)))?;
    }
    dev.write_at(offset, buf)
}

fn sector_of(sector_size: u64, offset: u64, op: &'static str) -> Result<u64> {
    if sector_size == 0 || offset % sector_size != 0 {
        return Err(Error::invalid(
            op,
            format!("byte offset {offset:#x} is not a multiple of the sector size {sector_size}"),
        ));
    }
    Ok(offset / sector_size)
}

/// Checks a request against a device's geometry: every buffer a whole number of sectors, and the whole range
/// inside the device. Returns the request's length in bytes.
///
/// # Errors
/// `InvalidArgument` naming the operation and what is wrong.
pub fn check_request(info: &Info, op: &'static str, sector: u64, buf_lens: impl Iterator<Item = usize>) -> Result<u64> {
    let mut total: u64 = 0;
    for len in buf_lens {
        let len = len as u64;
        if info.sector_size == 0 || len % info.sector_size != 0 {
            return Err(Error::invalid(
                op,
                format!("buffer of {len} bytes is not a multiple of the sector size {}", info.sector_size),
            ));
        }
        total = total.saturating_add(len);
    }
    let sectors = total / info.sector_size.max(1);
    match sector.checked_add(sectors) {
        Some(end) if end <= info.size_sectors => Ok(total),
        _ => Err(Error::invalid(
            op,
            format!("sectors {sector}..+{sectors} run past the end of the device ({} sectors)", info.size_sectors),
        )),
    }
}

/// Writes, inside an `impl BlockDevice for Wrapper`, the named methods as calls passed straight on to the field
/// `$field` of `self` (a name, or a tuple index such as `0`). A wrapper writes out only the methods it changes and
/// lists the rest, so a method added to the trait is passed on wherever it is listed.
///
/// ```
/// use qcow::block::{BlockDevice, MemoryDevice};
///
/// /// A device whose flushes do nothing.
/// struct NoFlush(MemoryDevice);
///
/// impl BlockDevice for NoFlush {
///     qcow::forward_block_device_methods!(0; info, read, write, resize, discard, zero_range, disconnect, read_at, write_at);
///     fn flush(&self) -> qcow::Result<()> {
///         Ok(())
///     }
/// }
///
/// let dev = NoFlush(MemoryDevice::new(4096));
/// dev.write_at(512, &[7u8; 512]).unwrap();
/// dev.flush().unwrap();
/// ```
#[macro_export]
macro_rules! forward_block_device_methods {
    ($field:tt; $($method:ident),+ $(,)?) => {
        $($crate::forward_block_device_methods!(@one $field $method);)+
    };
    (@one $field:tt info) => {
        fn info(&self) -> $crate::block::Info {
            self.$field.info()
        }
    };
    (@one $field:tt read) => {
        fn read(&self, sector: u64, bufs: &mut [::std::io::IoSliceMut<'_>]) -> $crate::Result<()> {
            self.$field.read(sector, bufs)
        }
    };
    (@one $field:tt write) => {
        fn write(&self, sector: u64, bufs: &[::std::io::IoSlice<'_>]) -> $crate::Result<()> {
            self.$field.write(sector, bufs)
        }
    };
    (@one $field:tt flush) => {
        fn flush(&self) -> $crate::Result<()> {
            self.$field.flush()
        }
    };
    (@one $field:tt resize) => {
        fn resize(&self, sectors: u64) -> $crate::Result<()> {
            self.$field.resize(sectors)
        }
    };
    (@one $field:tt discard) => {
        fn discard(&self, sector: u64, count: u64) -> $crate::Result<()> {
            self.$field.discard(sector, count)
        }
    };
    (@one $field:tt zero_range) => {
        fn zero_range(&self, sector: u64, count: u64) -> $crate::Result<bool> {
            self.$field.zero_range(sector, count)
        }
    };
    (@one $field:tt disconnect) => {
        fn disconnect(&self) {
            self.$field.disconnect()
        }
    };
    (@one $field:tt read_at) => {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> $crate::Result<()> {
            self.$field.read_at(offset, buf)
        }
    };
    (@one $field:tt write_at) => {
        fn write_at(&self, offset: u64, buf: &[u8]) -> $crate::Result<()> {
            self.$field.write_at(offset, buf)
        }
    };
}

/// Devices behind a pointer are devices: shared (`Arc`), boxed, or borrowed (an image opened on a device someone
/// else owns, as a check's repair does). A borrower's `disconnect` only stops using the device: the owner
/// disconnects it.
macro_rules! forward_block_device {
    ($($ptr:ty => $disconnect:expr),* $(,)?) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $ptr {
            fn info(&self) -> Info {
                (**self).info()
            }
            fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
                (**self).read(sector, bufs)
            }
            fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
                (**self).write(sector, bufs)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn resize(&self, sectors: u64) -> Result<()> {
                (**self).resize(sectors)
            }
            fn discard(&self, sector: u64, count: u64) -> Result<()> {
                (**self).discard(sector, count)
            }
            fn zero_range(&self, sector: u64, count: u64) -> Result<bool> {
                (**self).zero_range(sector, count)
            }
            fn disconnect(&self) {
                let disconnect: fn(&T) = $disconnect;
                disconnect(&**self)
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
                (**self).read_at(offset, buf)
            }
            fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
                (**self).write_at(offset, buf)
            }
        }
    )*};
}

forward_block_device! {
    std::sync::Arc<T> => |d| d.disconnect(),
    Box<T> => |d| d.disconnect(),
    &T => |_| {},
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Four sectors whose bytes are their sector number plus one.
    fn device() -> MemoryDevice {
        MemoryDevice::from_bytes((0..4u8).flat_map(|s| [s + 1; 512]).collect())
    }

    #[test]
    fn read_padded_reads_any_bytes_and_zeros_from_the_limit() {
        let d = device();
        let mut buf = [0xffu8; 1024];
        // Aligned and inside: a plain read.
        read_padded(&d, 2048, 512, &mut buf).unwrap();
        assert_eq!((buf[0], buf[1023]), (2, 3));
        // Unaligned, crossing the limit inside a sector: the device's bytes past it do not show.
        let mut buf = [0xffu8; 700];
        read_padded(&d, 1500, 1000, &mut buf).unwrap();
        assert_eq!(&buf[..24], &[2; 24][..]);
        assert_eq!(&buf[24..500], &[3; 476][..]);
        assert!(buf[500..].iter().all(|&b| b == 0));
        // Past the device's own end, and entirely past the limit.
        let mut buf = [0xffu8; 1024];
        read_padded(&d, d.info().size_bytes(), 1536, &mut buf).unwrap();
        assert_eq!((buf[0], buf[511], buf[512], buf[1023]), (4, 4, 0, 0));
        let mut buf = [0xffu8; 10];
        read_padded(&d, 100, 4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 10]);
    }

    #[test]
    fn write_growing_grows_only_when_the_write_ends_past_the_device() {
        let d = device();
        write_growing(&d, 512, &[9u8; 512]).unwrap();
        assert_eq!(d.info().size_sectors, 4);
        write_growing(&d, 3 * 512, &[7u8; 1536]).unwrap();
        assert_eq!(d.info().size_sectors, 6);
        let mut back = [0u8; 1536];
        d.read_at(3 * 512, &mut back).unwrap();
        assert_eq!(back, [7u8; 1536]);
        let mut buf = [0u8; 512];
        d.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 512]);
    }
}
