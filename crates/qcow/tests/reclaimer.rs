//! The space reclaimer on images QEMU made: junk is erased and becomes available after a flush, allocation takes
//! available clusters first, online compaction moves clusters while the image is in use (a client write cancels
//! the move of its cluster), the background worker compacts while writers and readers run, disconnect stops it,
//! and power loss at any write or flush of a reclaim never corrupts the image, loses a flushed write or exposes
//! discarded data. QEMU judges every end state (`qemu-img check`, `qemu-img compare`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use qcow::block::{BlockDevice, FaultyDevice, FaultyOp, FileDevice, FileOptions, Info, MemoryDevice};
use qcow::{ClusterState, Config, Image, ReclaimerOptions};
use support::{assert_clean, assert_matches_model, qemu_create, qemu_io, qemu_to_raw, with_deadline, OnFailure, Rng};

/// A device that cannot punch holes (as on file systems without `FALLOC_FL_PUNCH_HOLE`): discard answers
/// `Unimplemented`, so freed clusters keep their old bytes until the reclaimer erases them.
struct NoPunch<D>(D);

impl<D: BlockDevice> BlockDevice for NoPunch<D> {
    fn info(&self) -> Info {
        self.0.info()
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        self.0.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> qcow::Result<()> {
        self.0.write(sector, bufs)
    }
    fn flush(&self) -> qcow::Result<()> {
        self.0.flush()
    }
    fn resize(&self, sectors: u64) -> qcow::Result<()> {
        self.0.resize(sectors)
    }
    fn discard(&self, _sector: u64, _count: u64) -> qcow::Result<()> {
        Err(qcow::Error::Unimplemented { op: "discard" })
    }
    fn disconnect(&self) {
        self.0.disconnect()
    }
}

fn config() -> Config {
    Config { discard: true, runtime_asserts: true, ..Config::default() }
}

fn open_no_punch(path: &Path, config: Config) -> Image<NoPunch<FileDevice>> {
    Image::open(NoPunch(FileDevice::open(path, &FileOptions::default()).unwrap()), config).unwrap()
}

/// Whether the file holds `pattern` repeated over any whole 512-byte sector.
fn file_holds_sector_of(path: &Path, pattern: u8) -> bool {
    std::fs::read(path).unwrap().chunks(512).any(|s| s.iter().all(|&b| b == pattern))
}

/// An image of 8 MiB with 4 KiB clusters: data in four places, the last one pinning the end of the file.
fn junk_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    qemu_create(&path, "cluster_size=4096", "8M");
    qemu_io(&path, &["write -P 0x5a 0 1M", "write -P 0x11 2M 256k", "write -P 0x22 4M 256k", "write -P 0x33 7M 64k"]);
    path
}

#[test]
fn junk_is_erased_then_available_after_a_flush_and_allocated_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = junk_image(dir.path(), "junk");
    let cs = 4096u64;
    let image = open_no_punch(&path, Config { keep_erased: 1 << 20, ..config() });
    image.discard(0, (1 << 20) / 512).unwrap();
    image.flush().unwrap();
    let mut model = qemu_to_raw(&path, dir.path());
    assert!(file_holds_sector_of(&path, 0x5a), "without hole punching the discarded data is still in the file");
    let m = image.metrics().unwrap();
    assert!(m.junk_bytes >= 1 << 20, "the discarded clusters are junk: {m:?}");
    let junk: Vec<u64> = (0..image.device().info().size_bytes() / cs)
        .filter(|&c| image.cluster_state(c).unwrap() == ClusterState::Junk)
        .collect();
    assert!(junk.len() >= 256, "{} junk clusters", junk.len());

    // One pass erases the junk (with zeros, since the device cannot punch), without flushing it.
    let erased = image.reclaim_pass(&ReclaimerOptions::default(), &|| false).unwrap().erased;
    assert_eq!(erased, junk.len() as u64);
    assert!(junk.iter().all(|&c| image.cluster_state(c).unwrap() == ClusterState::Erased));
    assert!(!file_holds_sector_of(&path, 0x5a), "no byte of the discarded data is left in the file");
    let m = image.metrics().unwrap();
    assert_eq!((m.junk_bytes, m.erased_bytes, m.available_bytes), (0, junk.len() as u64 * cs, 0), "{m:?}");

    // A flush makes them available; the next allocation takes one of them instead of growing the file.
    image.flush().unwrap();
    assert!(junk.iter().all(|&c| image.cluster_state(c).unwrap() == ClusterState::Available));
    let len = image.device().info().size_bytes();
    image.write_at(6 << 20, &[0x44; 4096]).unwrap();
    model[6 << 20..(6 << 20) + 4096].fill(0x44);
    assert_eq!(image.device().info().size_bytes(), len, "the file did not grow");
    let taken = junk.iter().filter(|&&c| image.cluster_state(c).unwrap() == ClusterState::Allocated).count();
    assert_eq!(taken, 1, "the new data cluster is one of the available ones");
    image.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

#[test]
fn online_compaction_keeps_both_ranges_of_the_reference_scenario_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.qcow2");
    qemu_create(&path, "", "1G");
    let cs = 65536u64;
    qemu_io(&path, &[&format!("write -P 0x61 0 {}", 8 * cs), &format!("write -P 0x62 {} {}", 8193 * cs, 7 * cs)]);
    let fresh = dir.path().join("fresh.qcow2");
    qemu_create(&fresh, "", "1G");
    for punch in [true, false] {
        let _why = OnFailure(format!("punch {punch}"));
        let copy = dir.path().join("copy.qcow2");
        std::fs::copy(&path, &copy).unwrap();
        let mut model = qemu_to_raw(&copy, dir.path());
        let dev = FileDevice::open(&copy, &FileOptions::default()).unwrap();
        let image: Image<Box<dyn BlockDevice>> = if punch {
            Image::open(Box::new(dev) as Box<dyn BlockDevice>, config()).unwrap()
        } else {
            Image::open(Box::new(NoPunch(dev)) as Box<dyn BlockDevice>, config()).unwrap()
        };
        image.discard(0, 8 * cs / 512).unwrap();
        model[..(8 * cs) as usize].fill(0);
        let before = std::fs::metadata(&copy).unwrap().len();
        let mut moved = 0;
        loop {
            let round = image.compact_online(4, &|| false).unwrap();
            moved += round.moved;
            if round.moved == 0 {
                break;
            }
        }
        image.close().unwrap();
        let after = std::fs::metadata(&copy).unwrap().len();
        assert!(moved >= 7, "the seven data clusters (and their L2 table) moved down: {moved}");
        assert!(after < before, "the file shrank: {before} -> {after}");
        assert!(
            after <= std::fs::metadata(&fresh).unwrap().len() + 9 * cs,
            "the file is no larger than a fresh image plus what is still used: {after}"
        );
        assert_clean(&copy);
        assert_matches_model(&copy, &model);
    }
}

/// A device that runs a hook once, just before the first write of a whole cluster at a given offset: the moment
/// the reclaimer copies a cluster to its destination, when it holds no lock.
struct Interposer {
    inner: MemoryDevice,
    at: u64,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl BlockDevice for Interposer {
    fn info(&self) -> Info {
        self.inner.info()
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        self.inner.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> qcow::Result<()> {
        if sector * 512 == self.at {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        self.inner.write(sector, bufs)
    }
    fn flush(&self) -> qcow::Result<()> {
        self.inner.flush()
    }
    fn resize(&self, sectors: u64) -> qcow::Result<()> {
        self.inner.resize(sectors)
    }
    fn discard(&self, sector: u64, count: u64) -> qcow::Result<()> {
        self.inner.discard(sector, count)
    }
    fn disconnect(&self) {
        self.inner.disconnect()
    }
}

#[test]
fn a_client_write_during_the_copy_cancels_the_move_and_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cancel.qcow2");
    qemu_create(&path, "cluster_size=4096", "1M");
    qemu_io(&path, &["write -P 0x71 0 4k", "write -P 0x72 512k 4k"]);
    let probe = Image::open(MemoryDevice::from_bytes(std::fs::read(&path).unwrap()), config()).unwrap();
    probe.discard(0, 8).unwrap();
    // The lowest free cluster is where the last data cluster (guest 512k) will be copied to.
    let target = (1..).find(|&c| probe.cluster_state(c).unwrap() != ClusterState::Allocated).unwrap();
    let bytes = probe.device().snapshot();
    drop(probe);

    let dev = Interposer { inner: MemoryDevice::from_bytes(bytes), at: target * 4096, hook: Mutex::new(None) };
    let image = Arc::new(Image::open(dev, config()).unwrap());
    let weak: Arc<OnceLock<Weak<Image<Interposer>>>> = Arc::new(OnceLock::new());
    weak.set(Arc::downgrade(&image)).ok();
    let hook_weak = weak.clone();
    *image.device().hook.lock().unwrap() = Some(Box::new(move || {
        let image = hook_weak.get().and_then(Weak::upgrade).unwrap();
        image.write_at(512 << 10, &[0x99; 4096]).unwrap();
    }));
    let round = image.compact_online(16, &|| false).unwrap();
    assert_eq!(round.cancelled, 1, "the copy raced with a client write: {round:?}");
    let mut back = vec![0u8; 4096];
    image.read_at(512 << 10, &mut back).unwrap();
    assert_eq!(back, vec![0x99; 4096], "the client's write is what reads back");
    image.flush().unwrap();
    let after = dir.path().join("after.qcow2");
    std::fs::write(&after, image.device().inner.snapshot()).unwrap();
    let mut model = vec![0u8; 1 << 20];
    model[512 << 10..(512 << 10) + 4096].fill(0x99);
    assert_clean(&after);
    assert_matches_model(&after, &model);
}

/// Writers and readers on separate regions, each checking its own model, while the background worker erases,
/// flushes and compacts.
#[test]
fn client_io_goes_on_while_the_background_reclaimer_compacts() {
    with_deadline(300, "concurrent reclaim", || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.qcow2");
        qemu_create(&path, "cluster_size=4096", "32M");
        qemu_io(&path, &["write -P 0x10 0 24M"]);
        let cs = 4096u64;
        let region = 4u64 << 20;
        let image = Arc::new(open_no_punch(
            &path,
            Config { keep_erased: 256, compact_after_unmaps: 2048, runtime_asserts: false, ..config() },
        ));
        let options = ReclaimerOptions {
            tick: Duration::from_millis(5),
            flush_delay: Duration::from_millis(20),
            moves_per_round: 64,
            erase_per_pass: 64,
        };
        image.start_reclaimer(options).unwrap();
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    let base = t * region;
                    let mut model = vec![0x10u8; region as usize];
                    let mut rng = Rng(0x5eed + t);
                    // Discards for the first half; then only writes and reads, so that the discards settle and
                    // the worker compacts while the clients go on.
                    let start = Instant::now();
                    let mut ops = 0;
                    while start.elapsed() < Duration::from_secs(8) || ops < 400 {
                        ops += 1;
                        let at = rng.below(region / cs) * cs;
                        let len = (cs * (1 + rng.below(16))).min(region - at);
                        let discarding = start.elapsed() < Duration::from_secs(4);
                        match rng.below(10) {
                            4..=6 if !discarding => {}
                            0..=3 => {
                                let byte = (t * 40 + 1 + rng.below(39)) as u8;
                                image.write_at(base + at, &vec![byte; len as usize]).unwrap();
                                model[at as usize..(at + len) as usize].fill(byte);
                            }
                            4..=6 => {
                                image.discard((base + at) / 512, len / 512).unwrap();
                                model[at as usize..(at + len) as usize].fill(0);
                            }
                            _ => {
                                let mut back = vec![0u8; len as usize];
                                image.read_at(base + at, &mut back).unwrap();
                                assert!(back == model[at as usize..(at + len) as usize], "thread {t}, op {ops}");
                            }
                        }
                    }
                    (t, model)
                })
            })
            .collect();
        let models: Vec<(u64, Vec<u8>)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        // On a loaded machine the worker may not have got to it while the clients ran: give it time.
        let waited = Instant::now();
        while image.metrics().unwrap().moved_bytes == 0 && waited.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(image.reclaimer_error(), None);
        let m = image.metrics().unwrap();
        let text = image.prometheus_metrics().unwrap();
        image.stop_reclaimer();
        assert!(!image.reclaimer_running());
        assert!(m.moved_bytes > 0, "the worker moved clusters: {m:?}");
        let mut model = vec![0u8; 32 << 20];
        for (t, part) in models {
            model[(t * region) as usize..((t + 1) * region) as usize].copy_from_slice(&part);
        }
        assert!(text.contains("qcow_moved_bytes_total"), "{text}");
        Arc::try_unwrap(image).ok().unwrap().close().unwrap();
        assert_clean(&path);
        assert_matches_model(&path, &model);
    });
}

#[test]
fn disconnect_stops_the_background_worker() {
    let dir = tempfile::tempdir().unwrap();
    let path = junk_image(dir.path(), "stop");
    let image = Arc::new(open_no_punch(&path, Config { keep_erased: 16, ..config() }));
    image.start_reclaimer(ReclaimerOptions { tick: Duration::from_millis(1), ..Default::default() }).unwrap();
    assert!(image.start_reclaimer(ReclaimerOptions::default()).is_err(), "one worker at a time");
    assert!(image.reclaimer_running());
    image.disconnect();
    assert!(!image.reclaimer_running());
    assert_eq!(image.reclaimer_error(), None, "a disconnect is a clean stop, not an error");
    assert!(image.start_reclaimer(ReclaimerOptions::default()).is_err(), "a disconnected image cannot reclaim");
    assert_clean(&path);
    // Closed, so that its lock lets the read-only open below in.
    drop(image);
    let read_only =
        Arc::new(Image::open(FileDevice::open(&path, &FileOptions::default()).unwrap(), Config::read_only()).unwrap());
    assert!(read_only.start_reclaimer(ReclaimerOptions::default()).is_err());
}

/// The reclaim every crash test runs: erase junk, compact in small rounds, a client write acknowledged by a flush
/// in the middle, then a pass that flushes. Returns whether the client's flush completed.
fn reclaim_sequence<D: BlockDevice>(image: &Image<D>, client_at: u64) -> bool {
    let _ = image.erase_junk(1 << 20);
    for _ in 0..3 {
        if image.compact_online(8, &|| false).is_err() {
            return false;
        }
    }
    if image.write_at(client_at, &[0xc1; 4096]).is_err() || image.flush().is_err() {
        return false;
    }
    while let Ok(round) = image.compact_online(8, &|| false) {
        if round.moved == 0 {
            break;
        }
    }
    let _ = image.flush();
    true
}

/// Power loss at every write and flush boundary of a reclaim (erasing with zeros, moving tables and data), keeping
/// none, all or a random subset of the unflushed writes: QEMU finds no corruption, every flushed write reads back,
/// and discarded ranges read as zeros, never as old data.
#[test]
fn power_loss_during_reclaim_never_corrupts_loses_flushed_writes_or_exposes_discarded_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = junk_image(dir.path(), "crash");
    let client_at = 6u64 << 20;
    let (bytes, model) = {
        let image = open_no_punch(&path, config());
        image.discard(0, (1 << 20) / 512).unwrap();
        image.discard((2 << 20) / 512, (128 << 10) / 512).unwrap();
        image.close().unwrap();
        (std::fs::read(&path).unwrap(), qemu_to_raw(&path, dir.path()))
    };
    let mut after_write = model.clone();
    after_write[client_at as usize..client_at as usize + 4096].fill(0xc1);
    let config = Config { keep_erased: 1 << 20, ..config() };
    let (writes, flushes) = {
        let dev = Arc::new(FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone())));
        let image = Image::open(NoPunch(Arc::clone(&dev)), config.clone()).unwrap();
        assert!(reclaim_sequence(&image, client_at));
        (dev.write_count(), dev.flush_count())
    };
    assert!(writes > 20 && flushes > 4, "the reclaim writes in many steps ({writes} writes, {flushes} flushes)");
    let mut rng = Rng(0xdead_beef);
    let step = (writes / 50).max(1);
    let cuts: Vec<(FaultyOp, u64)> = (0..=writes)
        .step_by(step as usize)
        .map(|n| (FaultyOp::Write, n))
        .chain((0..flushes).map(|n| (FaultyOp::Flush, n)))
        .collect();
    let crashed = dir.path().join("after.qcow2");
    for (op, cut) in cuts {
        for trial in 0..3u64 {
            let _why = OnFailure(format!("{op:?} {cut} fails, then power is lost; trial {trial}"));
            let dev = Arc::new(FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone())));
            let acked = {
                let image = Image::open(NoPunch(Arc::clone(&dev)), config.clone()).unwrap();
                dev.fail_next(op, cut);
                let acked = reclaim_sequence(&image, client_at);
                std::mem::forget(image);
                acked
            };
            let mask = rng.next();
            dev.power_loss(&|i| trial == 1 || (trial == 2 && mask >> (i % 64) & 1 == 1)).unwrap();
            std::fs::write(&crashed, dev.inner().snapshot()).unwrap();
            support::assert_not_corrupt(&crashed);
            let back = qemu_to_raw(&crashed, dir.path());
            let client = client_at as usize..client_at as usize + 4096;
            assert!(back[..client.start] == model[..client.start] && back[client.end..] == model[client.end..]);
            let written = back[client.clone()] == after_write[client.clone()];
            assert!(written || (!acked && back[client.clone()] == model[client]), "flushed write lost");
        }
    }
}
