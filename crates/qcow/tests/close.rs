//! `Image::close`: the last writeback with its errors seen, and a drop that is only best effort.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::io::IoSlice;
use std::sync::Arc;

use qcow::block::{BlockDevice, FaultyDevice, FaultyOp, MemoryDevice};
use qcow::{Config, CreateOptions, ErrorKind, Image};
use support::{assert_clean, assert_matches_model};

const MIB: u64 = 1 << 20;

#[test]
fn close_writes_everything_back_and_qemu_img_check_finds_the_image_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.qcow2");
    let mut options = CreateOptions::new(8 * MIB);
    options.cluster_size = 4096;
    let image = Image::create_path(&path, &options, Config::default()).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    // Enough scattered writes that L2 and refcount tables are still dirty in the cache when close runs.
    for i in 0..64u64 {
        let at = i * 128 * 1024 + 1536;
        let (a, b) = (vec![i as u8 + 1; 2560], vec![i as u8 + 101; 4608]);
        image.write(at / 512, &[IoSlice::new(&a), IoSlice::new(&b)]).unwrap();
        model[at as usize..at as usize + 2560].copy_from_slice(&a);
        model[at as usize + 2560..at as usize + 7168].copy_from_slice(&b);
    }
    image.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

fn faulty_image() -> (Arc<FaultyDevice<MemoryDevice>>, Image<Arc<FaultyDevice<MemoryDevice>>>) {
    let dev = Arc::new(FaultyDevice::new(MemoryDevice::new(0)));
    let mut options = CreateOptions::new(4 * MIB);
    options.cluster_size = 4096;
    let image = Image::create(Arc::clone(&dev), &options, Config::default()).unwrap();
    // Flushed once, so that what follows is only this write's metadata.
    image.flush().unwrap();
    image.write_at(64 * 1024, &[7u8; 8192]).unwrap();
    (dev, image)
}

// One test, not two: the count of failed drops is process-wide, and tests of one binary run in parallel.
#[test]
fn close_returns_a_failed_flush_and_a_failed_drop_is_counted() {
    let before = qcow::failed_drops();

    let (dev, image) = faulty_image();
    dev.fail_next(FaultyOp::Flush, 0);
    let flushes = dev.flush_count();
    let err = image.close().expect_err("close must report the failed flush");
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(dev.flush_count() > flushes, "close flushed");
    // Dropped inside close, after close ran: the drop did nothing and counted nothing.
    assert_eq!(qcow::failed_drops(), before);
    // The device is released either way.
    assert_eq!(dev.read_at(0, &mut [0u8; 512]).unwrap_err().kind(), ErrorKind::Disconnected);

    let (dev, image) = faulty_image();
    dev.fail_next(FaultyOp::Flush, 0);
    drop(image);
    assert_eq!(qcow::failed_drops(), before + 1, "a drop that could not flush is counted");

    // A clean close counts nothing and answers Ok.
    let (_dev, image) = faulty_image();
    image.close().unwrap();
    assert_eq!(qcow::failed_drops(), before + 1);
}
