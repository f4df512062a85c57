//! A flush in progress never blocks a read, an overwrite of mapped clusters, or an allocating write: the
//! metadata is written back outside the engine's locks. The device here holds the writeback's first flush (the
//! barrier between refcount blocks and L2 tables) until the test lets it go, and everything else must finish
//! meanwhile. QEMU then judges the image.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/power_cut.rs"]
mod power_cut;
mod support;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use power_cut::PowerCut;
use qcow::block::{BlockDevice, FileDevice, FileOptions, Info};
use qcow::{Config, CreateOptions, Image};
use support::{assert_clean, assert_not_corrupt, qemu_compare_raw, qemu_create, qemu_io, qemu_to_raw, with_deadline};

/// A file whose flushes wait, once armed, until released.
struct HeldFlush {
    inner: FileDevice,
    armed: AtomicBool,
    state: Arc<(Mutex<Gate>, Condvar)>,
}

#[derive(Default)]
struct Gate {
    holding: bool,
    released: bool,
}

impl BlockDevice for HeldFlush {
    fn info(&self) -> Info {
        self.inner.info()
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        self.inner.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> qcow::Result<()> {
        self.inner.write(sector, bufs)
    }
    fn flush(&self) -> qcow::Result<()> {
        if self.armed.swap(false, Ordering::AcqRel) {
            let (lock, cv) = &*self.state;
            let mut gate = lock.lock().unwrap();
            gate.holding = true;
            cv.notify_all();
            while !gate.released {
                gate = cv.wait(gate).unwrap();
            }
        }
        self.inner.flush()
    }
    fn resize(&self, sectors: u64) -> qcow::Result<()> {
        self.inner.resize(sectors)
    }
    fn zero_range(&self, sector: u64, count: u64) -> qcow::Result<bool> {
        self.inner.zero_range(sector, count)
    }
    fn disconnect(&self) {
        self.inner.disconnect()
    }
}

#[test]
fn reads_overwrites_and_allocations_go_on_while_a_flush_writes_the_metadata_back() {
    with_deadline(120, "held flush", scenario);
}

fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.qcow2");
    let cs = 65536u64;
    let size = 1u64 << 30;
    let state = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
    let dev = HeldFlush {
        inner: FileDevice::create(&path, &FileOptions::default()).unwrap(),
        armed: AtomicBool::new(false),
        state: Arc::clone(&state),
    };
    let image = Arc::new(Image::create(dev, &CreateOptions::new(size), Config::default()).unwrap());
    let mut model = vec![0u8; (4 * cs) as usize];
    // Cluster 0 mapped and durable; cluster 1 mapped but not yet flushed.
    image.write_at(0, &vec![0x11; cs as usize]).unwrap();
    model[..cs as usize].fill(0x11);
    image.flush().unwrap();
    image.write_at(cs, &vec![0x22; cs as usize]).unwrap();
    model[cs as usize..2 * cs as usize].fill(0x22);
    // An L2 table in another part of the disk: the writeback has refcount blocks and L2 tables to write, so its
    // first flush is the barrier between them, inside the writeback.
    let far = 600u64 << 20;
    image.write_at(far, &vec![0x33; cs as usize]).unwrap();

    image.device().armed.store(true, Ordering::Release);
    let (done_tx, done_rx) = mpsc::channel();
    let flusher = {
        let image = Arc::clone(&image);
        std::thread::spawn(move || {
            let r = image.flush();
            done_tx.send(()).unwrap();
            r
        })
    };
    {
        let (lock, cv) = &*state;
        let mut gate = lock.lock().unwrap();
        while !gate.holding {
            gate = cv.wait(gate).unwrap();
        }
    }
    // The writeback is now inside its first flush, and stays there until released.
    let mut buf = vec![0u8; cs as usize];
    image.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "a read of a durable cluster during the flush");
    image.read_at(cs, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22), "a read of a cluster the flush is writing back");
    image.write_at(4096, &[0x44; 4096]).unwrap();
    model[4096..8192].fill(0x44);
    image.write_at(2 * cs + 512, &[0x55; 1024]).unwrap();
    model[(2 * cs + 512) as usize..(2 * cs + 1536) as usize].fill(0x55);
    image.read_at(2 * cs, &mut buf).unwrap();
    assert_eq!(&buf[..], &model[(2 * cs) as usize..(3 * cs) as usize], "an allocating write during the flush");
    assert!(
        done_rx.try_recv().is_err(),
        "the flush finished before it was released: the test did not run while a writeback was in flight"
    );

    {
        let (lock, cv) = &*state;
        lock.lock().unwrap().released = true;
        cv.notify_all();
    }
    done_rx.recv_timeout(Duration::from_secs(60)).expect("the released flush finishes");
    flusher.join().unwrap().unwrap();
    let image = Arc::try_unwrap(image).ok().expect("the flusher let go of the image");
    image.close().unwrap();

    assert_clean(&path);
    let raw = dir.path().join("expected.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&model, 0).unwrap();
    file.write_all_at(&vec![0x33; cs as usize], far).unwrap();
    drop(file);
    assert!(qemu_compare_raw(&path, &raw), "qemu-img compare: the image differs from what was written");
}

/// An overwrite of a preallocated zero cluster changes an L2 entry and no refcount, so the writeback has no
/// refcount step whose flush would make the data durable first. Power lost during the flush that follows, keeping
/// only the last unflushed write, must never leave the entry pointing at the cluster's old bytes.
#[test]
fn an_overwritten_preallocated_zero_cluster_never_shows_its_old_bytes_after_a_power_loss() {
    for config in [Config::default(), Config { writeback_under_lock: true, ..Config::default() }] {
        overwrite_preallocated_zero_cluster_then_lose_power(config);
    }
}

fn overwrite_preallocated_zero_cluster_then_lose_power(config: Config) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prealloc.qcow2");
    qemu_create(&path, "cluster_size=65536", "1M");
    // Old bytes, then zeroed by QEMU without unmapping: a zero entry that keeps its host cluster (and its bytes).
    qemu_io(&path, &["write -P 0xaa 0 64k", "write -z 0 64k"]);
    let original = std::fs::read(&path).unwrap();
    let mut boundaries_hit = 0;
    for after in 0..8u64 {
        let dev = Arc::new(PowerCut::new(original.clone()).cutting_at_flushes());
        let image = Image::open(Arc::clone(&dev), config.clone()).unwrap();
        image.write_at(0, &[0x55; 4096]).unwrap();
        // Keep only the newest unflushed write: the L2 entry, if the data was not made durable before it.
        dev.arm(after, |i, len| i + 1 == len);
        let flushed = image.flush();
        drop(image);
        if dev.armed() {
            assert!(flushed.is_ok(), "no power loss, yet the flush failed: {flushed:?}");
            continue;
        }
        boundaries_hit += 1;
        let survivor = dir.path().join(format!("survivor-{after}.qcow2"));
        std::fs::write(&survivor, dev.survivor()).unwrap();
        assert_not_corrupt(&survivor);
        let guest = qemu_to_raw(&survivor, dir.path());
        let head = &guest[..4096];
        assert!(
            head.iter().all(|&b| b == 0x55) || head.iter().all(|&b| b == 0),
            "power lost at boundary {after}: the first 4 KiB read {:#x}.., neither the new data nor the zeros",
            head[0]
        );
        assert!(guest[4096..65536].iter().all(|&b| b == 0), "boundary {after}: the rest of the cluster is not zeros");
    }
    assert!(boundaries_hit >= 2, "the flush crossed only {boundaries_hit} boundaries: the test cut nothing");
}
