//! Copying between block devices: the engine behind `qcow-tool convert`.
//!
//! Owns two things:
//! - [`AllocationMap`], the question "which byte ranges of a source may hold nonzero data". A qcow2
//!   [`Image`] answers it from its own mapping, a [`FileDevice`] from the file system's holes
//!   (`SEEK_DATA`/`SEEK_HOLE`), and [`Whole`] answers "all of it" for sources that cannot tell.
//! - [`convert`], a simple copy loop: it reads only the data ranges, in chunks of at most [`CHUNK_SIZE`], and
//!   writes only the [`ZERO_GRANULE`]-sized pieces that are not entirely zero, at the same offsets.
//!
//! Invariants: a range the map leaves out is never read from the source nor written to the destination, so the
//! destination must already read as zeros there (a freshly created image or a freshly truncated file does). Every
//! transfer is whole sectors: a source whose size is not a sector multiple has its last sector read as one
//! whole, zero padded, sector. Ranges a map reports are clipped to the range asked for; they may overlap or be
//! unsorted without harm, since copying the same data twice writes the same bytes.

use std::os::unix::io::AsRawFd;

use crate::block::{BlockDevice, FileDevice, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::image::{ExtentKind, Image};

/// The largest read [`convert`] issues: 2 MiB.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// The unit [`convert`] checks for zeros: a piece of this size (aligned to it) that reads entirely as zeros is
/// not written.
pub const ZERO_GRANULE: u64 = 64 << 10;

/// How much of the source [`convert`] asks its [`AllocationMap`] about at once, so that progress is reported
/// across large holes and the answer stays small.
const MAP_WINDOW: u64 = 1 << 30;

/// Which parts of a source may hold nonzero data.
pub trait AllocationMap {
    /// The ranges, as `(offset, length)` in bytes, inside `offset..offset + len` that may hold nonzero data.
    /// Everything outside them reads as zeros. Reporting too much is always correct, only slower.
    ///
    /// # Errors
    /// Whatever the source reports when it cannot tell: `Io`, `Corrupt`, `Disconnected`.
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>>;
}

/// An allocation map that reports everything as data, for sources that cannot tell holes from data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Whole;

impl AllocationMap for Whole {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(if len == 0 { Vec::new() } else { vec![(offset, len)] })
    }
}

/// Appends `(start, len)` to `ranges`, merging it into the last range when they touch.
fn push_range(ranges: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut() {
        if last.0.saturating_add(last.1) == start {
            last.1 = last.1.saturating_add(len);
            return;
        }
    }
    ranges.push((start, len));
}

/// Data and compressed clusters count as data; zero and unallocated ones do not.
impl<D: BlockDevice> AllocationMap for Image<D> {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut ranges = Vec::new();
        for extent in self.map(offset, len)? {
            match extent.kind {
                ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
                    push_range(&mut ranges, extent.guest.0, extent.len)
                }
                // Unallocated clusters show the backing file, which may hold data.
                ExtentKind::Unallocated if self.has_backing() => push_range(&mut ranges, extent.guest.0, extent.len),
                ExtentKind::Zero | ExtentKind::Unallocated => {}
            }
        }
        Ok(ranges)
    }
}

/// Where `lseek` with `whence` lands from `pos`: `Ok(Some(offset))`, `Ok(None)` for `ENXIO` (no data, or no
/// hole, at or after `pos`), or the operating system's error.
fn seek(file: &std::fs::File, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    // SAFETY: lseek only reads and moves the descriptor's file offset; the descriptor stays open for as long as
    // `file` is borrowed, and `FileDevice` never uses the file offset (all its I/O is positional).
    let result = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if result < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    // A non-negative off_t always fits in u64.
    Ok(Some(u64::try_from(result).unwrap_or(0)))
}

/// Holes as the file system reports them (`SEEK_DATA`/`SEEK_HOLE`). Where the file system cannot tell
/// (`EINVAL`), the rest of the range counts as data. Bytes past the end of the file read as zeros and are never
/// data.
impl AllocationMap for FileDevice {
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len).min(self.len_bytes());
        let file = self.file();
        let mut ranges = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(file, pos, libc::SEEK_DATA) {
                Ok(Some(data)) => data,
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    push_range(&mut ranges, pos, end - pos);
                    break;
                }
                Err(e) => return Err(Error::io("seek data", pos, e)),
            };
            if data >= end {
                break;
            }
            let data = data.max(pos);
            let hole = match seek(file, data, libc::SEEK_HOLE) {
                Ok(Some(hole)) => hole,
                // The file shrank under us, or the file system cannot tell: count the rest as data.
                Ok(None) => end,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
                Err(e) => return Err(Error::io("seek hole", data, e)),
            };
            let hole = hole.clamp(data, end);
            if hole == data {
                // A hole at a data offset makes no sense; never loop on it.
                push_range(&mut ranges, data, end - data);
                break;
            }
            push_range(&mut ranges, data, hole - data);
            pos = hole;
        }
        Ok(ranges)
    }
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// Clips `ranges` to `lo..hi`, aligns them outwards to sectors (never past `limit`), sorts and merges them.
fn normalize(mut ranges: Vec<(u64, u64)>, lo: u64, hi: u64, limit: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let end = start.saturating_add(len).min(hi);
        let start = start.max(lo);
        if start >= end {
            continue;
        }
        let start = start - start % SECTOR_SIZE;
        let end = end.saturating_add(SECTOR_SIZE - 1) / SECTOR_SIZE * SECTOR_SIZE;
        let end = end.min(limit);
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Writes the pieces of `buf` (which holds the device bytes at `offset`) that are not entirely zero, checking
/// [`ZERO_GRANULE`]-aligned pieces and joining consecutive nonzero ones into one write.
fn write_nonzero(dst: &dyn BlockDevice, offset: u64, buf: &[u8]) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut run: Option<u64> = None;
    let mut pos = offset;
    while pos < end {
        let next = (pos / ZERO_GRANULE + 1).saturating_mul(ZERO_GRANULE).min(end);
        let piece = slice(buf, pos - offset, next - offset)?;
        if is_zero(piece) {
            if let Some(start) = run.take() {
                dst.write_at(start, slice(buf, start - offset, pos - offset)?)?;
            }
        } else if run.is_none() {
            run = Some(pos);
        }
        pos = next;
    }
    if let Some(start) = run {
        dst.write_at(start, slice(buf, start - offset, end - offset)?)?;
    }
    Ok(())
}

fn slice(buf: &[u8], from: u64, to: u64) -> Result<&[u8]> {
    usize::try_from(from).ok().zip(usize::try_from(to).ok()).and_then(|(from, to)| buf.get(from..to)).ok_or_else(|| {
        Error::invalid("convert", format!("internal: bytes {from}..{to} of a {}-byte buffer", buf.len()))
    })
}

/// Copies the first `size` bytes of `src` to the same offsets of `dst`.
///
/// Only the ranges `map` reports as data are read, in chunks of at most [`CHUNK_SIZE`]; of those, only the
/// [`ZERO_GRANULE`] pieces that are not entirely zero are written. `dst` must therefore read as zeros wherever it
/// is not written (a new image or a new sparse file). When `size` is not a sector multiple, the last sector is
/// copied whole: both devices must be at least `size` rounded up to a sector long. `progress(done, total)` is
/// called as the copy advances, with `total == size`, and a last time with `done == total`. `dst` is flushed at
/// the end.
///
/// # Errors
/// `InvalidArgument` when either device is shorter than `size` (rounded up to a sector); otherwise whatever
/// the map, the source or the destination report, after which `dst` holds part of the data.
pub fn convert(
    src: &dyn BlockDevice,
    map: &dyn AllocationMap,
    size: u64,
    dst: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let padded = size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| Error::invalid("convert", format!("size {size} overflows")))?;
    let src_len = src.info().size_bytes();
    if src_len < padded {
        return Err(Error::invalid("convert", format!("source is {src_len} bytes, shorter than {size}")));
    }
    let dst_len = dst.info().size_bytes();
    if dst_len < padded {
        return Err(Error::invalid("convert", format!("destination is {dst_len} bytes, shorter than {size}")));
    }
    let mut buf = Vec::new();
    progress(0, size);
    let mut window = 0u64;
    while window < size {
        let window_end = window.saturating_add(MAP_WINDOW).min(size);
        let ranges = normalize(map.data_ranges(window, window_end - window)?, window, window_end, padded);
        for (start, len) in ranges {
            let end = start + len;
            let mut pos = start;
            while pos < end {
                let chunk_end = (pos / CHUNK_SIZE + 1).saturating_mul(CHUNK_SIZE).min(end);
                let n = usize::try_from(chunk_end - pos)
                    .map_err(|_| Error::invalid("convert", "chunk does not fit in memory"))?;
                buf.resize(n, 0);
                src.read_at(pos, &mut buf)?;
                write_nonzero(dst, pos, &buf)?;
                pos = chunk_end;
                progress(pos.min(size), size);
            }
        }
        window = window_end;
        progress(window, size);
    }
    dst.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::block::{FileOptions, MemoryDevice};
    use crate::{Config, CreateOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A device that counts the writes it receives, so tests can see which ranges were skipped.
    struct Counting {
        inner: MemoryDevice,
        writes: Mutex<Vec<(u64, usize)>>,
        write_count: AtomicUsize,
    }

    impl Counting {
        fn new(size: u64) -> Self {
            Counting {
                inner: MemoryDevice::new(size),
                writes: Mutex::new(Vec::new()),
                write_count: AtomicUsize::new(0),
            }
        }
    }

    impl BlockDevice for Counting {
        fn info(&self) -> crate::block::Info {
            self.inner.info()
        }
        fn read(&self, sector: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
            self.inner.read(sector, bufs)
        }
        fn write(&self, sector: u64, bufs: &[&[u8]]) -> Result<()> {
            self.write_count.fetch_add(1, Ordering::Relaxed);
            self.writes.lock().unwrap().push((sector * SECTOR_SIZE, bufs.iter().map(|b| b.len()).sum()));
            self.inner.write(sector, bufs)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn resize(&self, sectors: u64) -> Result<()> {
            self.inner.resize(sectors)
        }
        fn disconnect(&self) {
            self.inner.disconnect()
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    #[test]
    fn whole_copies_everything_and_skips_zero_granules() {
        let size = 5 << 20;
        let mut bytes = vec![0u8; size];
        bytes[100..200].copy_from_slice(&pattern(100, 1));
        bytes[(3 << 20) + 70_000..(3 << 20) + 70_512].copy_from_slice(&pattern(512, 2));
        let src = MemoryDevice::from_bytes(bytes.clone());
        let dst = Counting::new(size as u64);
        let mut calls = Vec::new();
        convert(&src, &Whole, size as u64, &dst, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(dst.inner.snapshot(), bytes);
        // Only the two 64 KiB granules holding data were written.
        assert_eq!(*dst.writes.lock().unwrap(), vec![(0, 65536), ((3 << 20) + 65536, 65536)]);
        assert_eq!(calls.first(), Some(&(0, size as u64)));
        assert_eq!(calls.last(), Some(&(size as u64, size as u64)));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn consecutive_nonzero_granules_are_written_in_one_go() {
        let size = 4 << 20;
        let bytes = pattern(size, 3);
        let src = MemoryDevice::from_bytes(bytes.clone());
        let dst = Counting::new(size as u64);
        convert(&src, &Whole, size as u64, &dst, &mut |_, _| {}).unwrap();
        assert_eq!(dst.inner.snapshot(), bytes);
        // One write per 2 MiB chunk.
        assert_eq!(*dst.writes.lock().unwrap(), vec![(0, 2 << 20), (2 << 20, 2 << 20)]);
    }

    #[test]
    fn ranges_outside_the_map_are_neither_read_nor_written() {
        struct Fixed(Vec<(u64, u64)>);
        impl AllocationMap for Fixed {
            fn data_ranges(&self, _: u64, _: u64) -> Result<Vec<(u64, u64)>> {
                Ok(self.0.clone())
            }
        }
        let size = 1 << 20;
        let bytes = pattern(size, 4);
        let src = MemoryDevice::from_bytes(bytes.clone());
        let dst = MemoryDevice::new(size as u64);
        // Unsorted, overlapping, unaligned and partly out of range.
        let map = Fixed(vec![(700_000, 1000), (100, 10), (0, 50), (2 << 20, 100), (699_000, 1500)]);
        convert(&src, &map, size as u64, &dst, &mut |_, _| {}).unwrap();
        let out = dst.snapshot();
        let mut expected = vec![0u8; size];
        expected[0..512].copy_from_slice(&bytes[0..512]);
        let (lo, hi) = (699_000 / 512 * 512, (701_000usize).div_ceil(512) * 512);
        expected[lo..hi].copy_from_slice(&bytes[lo..hi]);
        assert_eq!(out, expected);
    }

    #[test]
    fn a_size_that_is_not_a_sector_multiple_copies_the_last_sector_whole() {
        let bytes = pattern(1536, 5);
        let src = MemoryDevice::from_bytes(bytes.clone());
        let dst = MemoryDevice::new(1536);
        convert(&src, &Whole, 1000, &dst, &mut |_, _| {}).unwrap();
        assert_eq!(dst.snapshot()[..1024], bytes[..1024]);
        assert!(dst.snapshot()[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn short_devices_are_refused() {
        let src = MemoryDevice::new(4096);
        let dst = MemoryDevice::new(1024);
        let err = convert(&src, &Whole, 4096, &dst, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let err = convert(&dst, &Whole, 4096, &src, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    }

    #[test]
    fn an_image_reports_only_written_clusters_as_data() {
        let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(64 << 20), Config::default()).unwrap();
        image.write_at(1 << 20, &pattern(4096, 6)).unwrap();
        image.write_at(10 << 20, &pattern(512, 7)).unwrap();
        image.write_at((10 << 20) + 65536, &pattern(512, 8)).unwrap();
        let ranges = image.data_ranges(0, 64 << 20).unwrap();
        assert_eq!(ranges, vec![(1 << 20, 65536), (10 << 20, 2 * 65536)]);
        assert_eq!(image.data_ranges(0, 1 << 20).unwrap(), vec![]);
        assert_eq!(image.data_ranges((1 << 20) + 4096, 8192).unwrap(), vec![((1 << 20) + 4096, 8192)]);
    }

    #[test]
    fn an_image_converts_to_memory_and_back_to_an_image() {
        let size = 16u64 << 20;
        let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(size), Config::default()).unwrap();
        image.write_at(0, &pattern(512, 9)).unwrap();
        image.write_at(5 << 20, &pattern(3 << 20, 10)).unwrap();
        image.write_at(15 << 20, &vec![0u8; 65536]).unwrap();
        let raw = Counting::new(size);
        convert(&image, &image, size, &raw, &mut |_, _| {}).unwrap();
        let mut expected = vec![0u8; size as usize];
        image.read_at(0, &mut expected).unwrap();
        assert_eq!(raw.inner.snapshot(), expected);
        // The written zero cluster is data to the map, but is skipped as all zeros.
        assert!(raw.writes.lock().unwrap().iter().all(|&(off, _)| off < 15 << 20));

        let copy = Image::create(MemoryDevice::new(0), &CreateOptions::new(size), Config::default()).unwrap();
        convert(&raw.inner, &Whole, size, &copy, &mut |_, _| {}).unwrap();
        let mut back = vec![0u8; size as usize];
        copy.read_at(0, &mut back).unwrap();
        assert_eq!(back, expected);
        assert_eq!(copy.data_ranges(0, size).unwrap(), vec![(0, 65536), (5 << 20, 3 << 20)]);
    }

    #[test]
    fn a_sparse_file_reports_its_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let mut file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.seek(SeekFrom::Start(8 << 20)).unwrap();
        file.write_all(&pattern(1 << 20, 11)).unwrap();
        file.sync_all().unwrap();
        drop(file);
        let dev = FileDevice::open(&path, &FileOptions { read_only: true, direct: false }).unwrap();
        let ranges = dev.data_ranges(0, 64 << 20).unwrap();
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        // The data is always reported; file systems without hole support report everything.
        assert!(ranges.iter().any(|&(s, l)| s <= 8 << 20 && s + l >= 9 << 20), "{ranges:?}");
        assert!(total == 1 << 20 || total == 64 << 20, "{ranges:?}");
        // Past the end of the file there is nothing, and a range inside a hole is empty (or whole).
        assert_eq!(dev.data_ranges(64 << 20, 1 << 20).unwrap(), vec![]);
        let in_hole = dev.data_ranges(1 << 20, 1 << 20).unwrap();
        assert!(in_hole.is_empty() || in_hole == vec![(1 << 20, 1 << 20)]);

        let dst = MemoryDevice::new(64 << 20);
        convert(&dev, &dev, 64 << 20, &dst, &mut |_, _| {}).unwrap();
        let mut expected = vec![0u8; 64 << 20];
        expected[8 << 20..9 << 20].copy_from_slice(&pattern(1 << 20, 11));
        assert!(dst.snapshot() == expected);
    }

    #[test]
    fn an_empty_source_copies_nothing() {
        let src = MemoryDevice::new(0);
        let dst = Counting::new(0);
        let mut calls = 0;
        convert(&src, &Whole, 0, &dst, &mut |_, _| calls += 1).unwrap();
        assert_eq!(dst.write_count.load(Ordering::Relaxed), 0);
        assert!(calls >= 1);
    }
}
