//! The engine's own tests, on memory devices; `tests/convert.rs` has those with QEMU on the other side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;
use crate::block::{FileDevice, SECTOR_SIZE};
use crate::block::{FileOptions, MemoryDevice};
use crate::image::{ExtentKind, Image};
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
        Counting { inner: MemoryDevice::new(size), writes: Mutex::new(Vec::new()), write_count: AtomicUsize::new(0) }
    }
}

impl BlockDevice for Counting {
    fn info(&self) -> crate::block::Info {
        self.inner.info()
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> Result<()> {
        self.inner.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
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
    // Only the two 4 KiB granules holding data were written (by the workers, in any order).
    let mut writes = dst.writes.lock().unwrap().clone();
    writes.sort_unstable();
    assert_eq!(writes, vec![(0, 4096), ((3 << 20) + 69632, 4096)]);
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
    let mut writes = dst.writes.lock().unwrap().clone();
    writes.sort_unstable();
    assert_eq!(writes, vec![(0, 2 << 20), (2 << 20, 2 << 20)]);
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
    let dev =
        FileDevice::open(&path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() }).unwrap();
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

fn options(threads: usize) -> Options {
    Options { threads, in_flight: threads * 2, chunk_size: 256 << 10, ..Options::default() }
}

/// Bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn disk_with_data(size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    for (i, at) in [0usize, 300_000, 1 << 20, (3 << 20) + 4096, size - 65536].into_iter().enumerate() {
        if at >= size {
            continue;
        }
        let len = 65536.min(size - at);
        bytes[at..at + len].copy_from_slice(&noise(len, i as u64));
    }
    // Text-like data, which compresses.
    for (i, b) in bytes[2 << 20..(2 << 20) + 200_000].iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    bytes
}

fn image_bytes(image: &Image<MemoryDevice>) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut out).unwrap();
    out
}

#[test]
fn compressed_output_is_the_same_file_whatever_the_thread_count() {
    let size = 4 << 20;
    let bytes = disk_with_data(size);
    let src = MemoryDevice::from_bytes(bytes.clone());
    let mut files = Vec::new();
    for threads in [1, 2, 7] {
        for kind in [crate::format::CompressionType::Deflate, crate::format::CompressionType::Zstd] {
            let mut create = CreateOptions::new(size as u64);
            create.compression_type = kind;
            let image = Image::create(MemoryDevice::new(0), &create, Config::default()).unwrap();
            let mut opts = options(threads);
            opts.compression = Some(Compression { kind, level: None, cluster_size: 65536 });
            let source = Source { device: &src, map: &Whole, size: size as u64, base: None, watch: None };
            run(&source, &ImageTarget(&image), &opts, &mut |_, _| {}).unwrap();
            assert_eq!(image_bytes(&image), bytes);
            let kinds: Vec<_> = image.map(0, size as u64).unwrap().into_iter().map(|e| e.kind).collect();
            assert!(kinds.iter().any(|k| matches!(k, ExtentKind::Compressed { .. })), "{kinds:?}");
            // Random clusters do not shrink and are stored as data.
            assert!(kinds.iter().any(|k| matches!(k, ExtentKind::Data { .. })), "{kinds:?}");
            image.flush().unwrap();
            files.push((threads, kind, image.device().snapshot()));
        }
    }
    for (threads, kind, file) in &files[2..] {
        let same = files.iter().find(|f| f.1 == *kind).unwrap();
        assert!(file == &same.2, "{threads} threads, {kind:?}: a different file");
    }
}

/// An image target that counts the data pieces it allocated ahead for the store pool.
struct CountingPrepares<'a>(ImageTarget<'a, MemoryDevice>, AtomicUsize);

impl Target for CountingPrepares<'_> {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn write_data(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_data(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.0.write_compressed(offset, compressed)
    }
    fn prepare_data(&self, offset: u64, len: u64) -> Result<bool> {
        let prepared = self.0.prepare_data(offset, len)?;
        if prepared {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        Ok(prepared)
    }
    fn prepared_device(&self) -> Option<&dyn crate::block::BlockDevice> {
        self.0.prepared_device()
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}

#[test]
fn data_written_by_the_store_pool_gives_the_same_file_whatever_the_thread_count() {
    let size = 4 << 20;
    let bytes = disk_with_data(size);
    let src = MemoryDevice::from_bytes(bytes.clone());
    let mut files = Vec::new();
    for threads in [1, 2, 7] {
        let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(size as u64), Config::default()).unwrap();
        let target = CountingPrepares(ImageTarget(&image), AtomicUsize::new(0));
        let source = Source { device: &src, map: &Whole, size: size as u64, base: None, watch: None };
        run(&source, &target, &options(threads), &mut |_, _| {}).unwrap();
        assert!(target.1.load(Ordering::Relaxed) >= 5, "{threads} threads: the data went around the store pool");
        assert_eq!(image_bytes(&image), bytes, "{threads} threads");
        image.flush().unwrap();
        files.push(image.device().snapshot());
    }
    assert!(files.iter().all(|f| f == &files[0]), "the files differ between thread counts");
}

#[test]
fn a_watched_file_source_copies_what_it_holds_and_stops_with_an_error_once_it_shrinks() {
    let size = 4 << 20;
    let bytes = disk_with_data(size);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.raw");
    std::fs::write(&path, &bytes).unwrap();
    let dev =
        FileDevice::open(&path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() }).unwrap();
    let watch = Watch::new(dev.file()).unwrap();
    assert_eq!(watch.len(), size as u64);
    let source = Source { device: &dev, map: &dev, size: size as u64, base: None, watch: Some(&watch) };
    let dst = MemoryDevice::new(size as u64);
    run(&source, &DeviceTarget(&dst), &options(3), &mut |_, _| {}).unwrap();
    assert!(dst.snapshot() == bytes);
    let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(size as u64), Config::default()).unwrap();
    run(&source, &ImageTarget(&image), &options(2), &mut |_, _| {}).unwrap();
    assert!(image_bytes(&image) == bytes);

    // Another process truncates the file: the reads past its new end come back as zeros, and the watch says so.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
    let dst = MemoryDevice::new(size as u64);
    let err = run(&source, &DeviceTarget(&dst), &options(2), &mut |_, _| {}).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Io);
    let crate::Error::Io { op, source, .. } = &err else { panic!("not an I/O error: {err}") };
    assert_eq!(*op, "read the source");
    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(source.to_string().contains(&format!("shrank from {size} to {} bytes", 1 << 20)), "{source}");
}

#[test]
fn an_overlay_stores_only_what_differs_from_its_base_and_zeros_over_base_data() {
    let size = 1usize << 20;
    let mut base_bytes = vec![0u8; size];
    base_bytes[..262_144].copy_from_slice(&pattern(262_144, 1));
    let mut bytes = base_bytes.clone();
    // Cluster 1 changes, cluster 2 becomes zeros, the rest stays equal to the base.
    bytes[65_536..70_000].copy_from_slice(&pattern(4464, 2));
    bytes[131_072..196_608].fill(0);
    bytes[600_000..600_100].copy_from_slice(&pattern(100, 3));
    let base = MemoryDevice::from_bytes(base_bytes);
    let src = MemoryDevice::from_bytes(bytes.clone());
    let dst = Counting::new(size as u64);
    let mut opts = options(2);
    opts.zero_granule = 65_536;
    let source = Source { device: &src, map: &Whole, size: size as u64, base: Some(&base), watch: None };
    run(&source, &DeviceTarget(&dst), &opts, &mut |_, _| {}).unwrap();
    let mut writes = dst.writes.lock().unwrap().clone();
    writes.sort_unstable();
    assert_eq!(writes, vec![(65_536, 65_536), (131_072, 65_536), (589_824, 65_536)]);
}

#[test]
fn a_destination_that_is_not_zero_gets_every_hole_zeroed() {
    let size = 4usize << 20;
    let bytes = disk_with_data(size);
    let src = MemoryDevice::from_bytes(bytes.clone());
    let dst = MemoryDevice::from_bytes(vec![0xee; size]);
    let mut opts = options(2);
    opts.target_is_zero = false;
    // The map reports only the first 64 KiB: everything else must be zeroed, not left as 0xee.
    struct First;
    impl AllocationMap for First {
        fn data_ranges(&self, offset: u64, _: u64) -> Result<Vec<(u64, u64)>> {
            Ok(if offset == 0 { vec![(0, 65_536)] } else { vec![] })
        }
    }
    let source = Source { device: &src, map: &First, size: size as u64, base: None, watch: None };
    run(&source, &DeviceTarget(&dst), &opts, &mut |_, _| {}).unwrap();
    let mut expected = vec![0u8; size];
    expected[..65_536].copy_from_slice(&bytes[..65_536]);
    assert!(dst.snapshot() == expected);
}

#[test]
fn a_failing_destination_stops_the_copy_with_its_error() {
    use crate::block::{FaultyDevice, FaultyOp};
    let size = 4u64 << 20;
    let src = MemoryDevice::from_bytes(pattern(size as usize, 9));
    let image =
        Image::create(FaultyDevice::new(MemoryDevice::new(0)), &CreateOptions::new(size), Config::default()).unwrap();
    image.device().fail_next(FaultyOp::Write, 3);
    let source = Source { device: &src, map: &Whole, size, base: None, watch: None };
    let err = run(&source, &ImageTarget(&image), &options(2), &mut |_, _| {}).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Io);
}
