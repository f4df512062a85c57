//! Compaction and the reclaimer on images whose metadata is damaged (issue: "compaction and the reclaimer must
//! never discard data on a damaged image").
//!
//! Each case damages one kind of metadata of an image qemu-io wrote (L1 table, L2 table, refcount table,
//! refcount block, snapshot table, bitmap directory), records what `qemu-img convert` reads from the damaged
//! image, and then runs offline compaction, online compaction (with junk erasing) and the background reclaimer
//! on copies. Each must either keep the guest data exactly as QEMU read it (and leave an image `qemu-img check`
//! finds no corruption in), or fail with a clear error and leave the file byte for byte as it was.
//!
//! Also here: corruption met by I/O after the reclaimer has started stops it, keeps the error and sets the corrupt
//! bit; and `check -r all` followed by compaction keeps the data of every case QEMU can read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow::block::{FileDevice, FileOptions};
use qcow::check::{check, Repair};
use qcow::{Config, Error, ErrorKind, Image, ReclaimerOptions};
use support::{assert_not_corrupt, qemu, qemu_check, qemu_io, run_ok};

const CS: u64 = 4096;
const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An offset far past the end of every test image, cluster aligned.
const FAR: u64 = 0x0000_fe00_0001_0000;
/// The guest range the reclaimer case discards (so that it has something to compact).
const DISCARDED: (u64, u64) = (3 << 20, 32 << 10);

fn be64_at(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn be32_at(path: &Path, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u32::from_be_bytes(b)
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn poke64(path: &Path, offset: u64, value: u64) {
    poke(path, offset, &value.to_be_bytes());
}

/// The images the damage is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Plain,
    /// With an internal snapshot, the active layer written after it.
    Snapshot,
    /// With a persistent bitmap, written after it was added.
    Bitmap,
}

fn make_base(dir: &Path, base: Base) -> PathBuf {
    let path = dir.join(format!("{base:?}.qcow2"));
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]).arg(&path).arg("4M"));
    // Holes in the middle (the discard) give compaction something to move into.
    qemu_io(&path, &["write -P 1 0 100k", "write -P 2 1M 64k", "write -P 3 3M 32k", "discard 16k 48k"]);
    match base {
        Base::Plain => {}
        Base::Snapshot => {
            run_ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&path));
            qemu_io(&path, &["write -P 4 2M 16k", "write -P 5 0 8k"]);
        }
        Base::Bitmap => {
            run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&path).arg("bm0"));
            qemu_io(&path, &["write -P 6 2M 16k"]);
        }
    }
    path
}

/// Where the image keeps the structures the damage is done to.
struct Places {
    l1: u64,
    l2: u64,
    reftable: u64,
    refblock: u64,
    snapshots: u64,
    bitmap_directory: Option<u64>,
}

fn places(path: &Path) -> Places {
    let l1 = be64_at(path, 40);
    let reftable = be64_at(path, 48);
    let mut bitmap_directory = None;
    let mut at = u64::from(be32_at(path, 100));
    loop {
        let (kind, len) = (be32_at(path, at), u64::from(be32_at(path, at + 4)));
        if kind == 0 {
            break;
        }
        if kind == 0x2385_2875 {
            bitmap_directory = Some(be64_at(path, at + 8 + 16));
        }
        at += 8 + len.next_multiple_of(8);
    }
    Places {
        l1,
        l2: be64_at(path, l1) & OFFSET_MASK,
        reftable,
        refblock: be64_at(path, reftable) & !(CS - 1),
        snapshots: be64_at(path, 64),
        bitmap_directory,
    }
}

/// One kind of damage: its name, the image it is done to, and the poke.
struct Damage {
    name: &'static str,
    base: Base,
    poke: fn(&Path, &Places),
}

fn damages() -> Vec<Damage> {
    vec![
        Damage {
            name: "L1 entry points past the end of the file",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.l1, COPIED | FAR),
        },
        Damage {
            name: "L1 entry not cluster aligned",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.l1, COPIED | (s.l2 + 512)),
        },
        Damage {
            name: "L2 entry names the cluster of another entry (refcount 1, two references)",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.l2 + 8 * 20, be64_at(p, s.l2)),
        },
        Damage {
            name: "L2 entry points past the end of the file",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.l2 + 8, COPIED | FAR),
        },
        Damage {
            name: "L2 entry points at the refcount table",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.l2 + 8, COPIED | s.reftable),
        },
        Damage { name: "refcount table entry 0 zeroed", base: Base::Plain, poke: |p, s| poke64(p, s.reftable, 0) },
        Damage { name: "refcount table past the end of the file", base: Base::Plain, poke: |p, _| poke64(p, 48, FAR) },
        Damage {
            name: "refcount table entry points past the end of the file",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.reftable, FAR),
        },
        Damage {
            name: "refcount table entry not cluster aligned",
            base: Base::Plain,
            poke: |p, s| poke64(p, s.reftable, s.refblock + 512),
        },
        Damage {
            name: "refcount block zeroed",
            base: Base::Plain,
            poke: |p, s| poke(p, s.refblock, &[0; CS as usize]),
        },
        Damage {
            name: "refcount of the file's last cluster zeroed",
            base: Base::Plain,
            poke: |p, s| {
                let last = std::fs::metadata(p).unwrap().len().div_ceil(CS) - 1;
                poke(p, s.refblock + 2 * last, &[0, 0]);
            },
        },
        Damage {
            name: "snapshot table overwritten",
            base: Base::Snapshot,
            poke: |p, s| poke(p, s.snapshots, &[0xff; 64]),
        },
        Damage {
            name: "snapshot table past the end of the file",
            base: Base::Snapshot,
            poke: |p, _| poke64(p, 64, FAR),
        },
        Damage {
            name: "snapshot's L1 table zeroed in the snapshot table",
            base: Base::Snapshot,
            poke: |p, s| poke64(p, s.snapshots, 0),
        },
        Damage {
            name: "bitmap directory overwritten",
            base: Base::Bitmap,
            poke: |p, s| poke(p, s.bitmap_directory.unwrap(), &[0xff; 64]),
        },
        Damage {
            name: "bitmap directory's table pointer past the end of the file",
            base: Base::Bitmap,
            poke: |p, s| poke64(p, s.bitmap_directory.unwrap(), FAR),
        },
    ]
}

/// What `qemu-img convert` reads from an image, if it can read it.
fn qemu_reads(path: &Path) -> Option<Vec<u8>> {
    let raw = path.with_extension("qemu.raw");
    let out =
        qemu("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(path).arg(&raw).output().unwrap();
    let bytes = out.status.success().then(|| std::fs::read(&raw).unwrap());
    std::fs::remove_file(&raw).ok();
    bytes
}

/// What we read from an image, read-only, if we can read it.
fn we_read(path: &Path) -> Option<Vec<u8>> {
    let dev = FileDevice::open(path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() }).ok()?;
    let image = Image::open(dev, Config::read_only()).ok()?;
    let mut bytes = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut bytes).ok()?;
    Some(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Offline,
    Online,
    Reclaimer,
}

fn config() -> Config {
    Config { discard: true, keep_erased: 64, compact_after_unmaps: 1, ..Config::default() }
}

fn open(path: &Path) -> qcow::Result<Image<FileDevice>> {
    Image::open(FileDevice::open(path, &FileOptions::default())?, config())
}

/// Runs `op` on the image at `path`. Returns whether the guest range [`DISCARDED`] was discarded on the way.
fn attempt(path: &Path, op: Op) -> qcow::Result<bool> {
    let image = open(path)?;
    match op {
        Op::Offline => {
            image.compact(&mut |_| true)?;
            image.close()?;
            Ok(false)
        }
        Op::Online => {
            image.erase_junk(1 << 20)?;
            while image.compact_online(64, &|| false)?.moved > 0 {}
            image.close()?;
            Ok(false)
        }
        Op::Reclaimer => {
            let image = Arc::new(image);
            let tick = Duration::from_millis(5);
            let options = ReclaimerOptions { tick, flush_delay: tick, ..ReclaimerOptions::default() };
            image.start_reclaimer(options)?;
            image.discard(DISCARDED.0 / 512, DISCARDED.1 / 512)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while image.metrics()?.moved_bytes == 0 && image.reclaimer_running() {
                assert!(Instant::now() < deadline, "the reclaimer never compacted");
                std::thread::sleep(tick);
            }
            image.stop_reclaimer();
            if let Some(error) = image.reclaimer_error() {
                panic!("the reclaimer stopped on a trusted image: {error}");
            }
            Arc::into_inner(image).unwrap().close()?;
            Ok(true)
        }
    }
}

/// How one case ended, for the summary the test prints.
struct Outcome {
    damage: &'static str,
    op: Op,
    result: String,
}

#[test]
fn compaction_and_the_reclaimer_keep_the_data_of_damaged_images_or_refuse_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut outcomes = Vec::new();
    for damage in damages() {
        let base = make_base(dir.path(), damage.base);
        let damaged = dir.path().join("damaged.qcow2");
        std::fs::copy(&base, &damaged).unwrap();
        (damage.poke)(&damaged, &places(&base));
        let bytes = std::fs::read(&damaged).unwrap();
        let expected = qemu_reads(&damaged).or_else(|| we_read(&damaged));
        for op in [Op::Offline, Op::Online, Op::Reclaimer] {
            let path = dir.path().join("work.qcow2");
            std::fs::write(&path, &bytes).unwrap();
            let what = format!("{} / {op:?}", damage.name);
            let result = match attempt(&path, op) {
                Ok(discarded) => {
                    let mut expected =
                        expected.clone().unwrap_or_else(|| panic!("{what}: nobody could read it, yet it compacted"));
                    if discarded {
                        expected[DISCARDED.0 as usize..(DISCARDED.0 + DISCARDED.1) as usize].fill(0);
                    }
                    let after = qemu_reads(&path).unwrap_or_else(|| panic!("{what}: QEMU cannot read the result"));
                    assert!(after == expected, "{what}: the guest data changed");
                    let c = qemu_check(&path);
                    assert_eq!((c.corruptions(), c.check_errors()), (0, 0), "{what}: qemu-img check: {:#}", c.json);
                    "done, data kept".to_string()
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
                    assert!(std::fs::read(&path).unwrap() == bytes, "{what}: failed ({e}) but changed the file");
                    format!("refused: {e}")
                }
            };
            outcomes.push(Outcome { damage: damage.name, op, result });
        }
    }
    for o in &outcomes {
        println!("{:<75} {:<10} {}", o.damage, format!("{:?}", o.op), o.result);
    }
    // The cases of the issue are refused by the judgement of the refcounts, not by chance.
    for name in ["refcount table entry 0 zeroed", "refcount table past the end of the file", "refcount block zeroed"] {
        for o in outcomes.iter().filter(|o| o.damage == name) {
            assert!(o.result.contains("refcounts cannot be trusted"), "{name} / {:?}: {}", o.op, o.result);
        }
    }
}

/// The reproduction of the issue, step by step: a refcount table entry zeroed, then compaction.
#[test]
fn compacting_with_a_refcount_table_entry_zeroed_is_refused_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hr.qcow2");
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]).arg(&path).arg("4M"));
    qemu_io(&path, &["write -P 1 0 100k"]);
    let reftable = be64_at(&path, 48);
    poke64(&path, reftable, 0);
    let bytes = std::fs::read(&path).unwrap();
    let image = open(&path).unwrap();
    let e = image.compact(&mut |_| true).unwrap_err();
    let Error::Untrusted { op: "compact", why } = &e else { panic!("not a refusal: {e}") };
    let slot = why.refcount.expect("names the refcount table entry");
    assert_eq!((slot.table_index, slot.entry_at, slot.entry), (0, reftable, 0), "{e}");
    let text = e.to_string();
    assert!(text.contains("refcount table entry 0 (at 0x1000), which names no refcount block"), "{text}");
    drop(image);
    assert!(std::fs::read(&path).unwrap() == bytes, "the file is unchanged");
    assert!(qemu_reads(&path).unwrap()[..100 << 10].iter().all(|&b| b == 1), "QEMU still reads the data");
}

/// The other reproduction: a refcount table offset far past the end of the file is refused at once, without a
/// scan as long as the offset.
#[test]
fn compacting_with_the_refcount_table_far_past_the_end_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hh.qcow2");
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&path).arg("4M"));
    qemu_io(&path, &["write -P 1 0 100k"]);
    poke64(&path, 48, FAR);
    let bytes = std::fs::read(&path).unwrap();
    let started = Instant::now();
    let image = open(&path).unwrap();
    let e = image.compact(&mut |_| true).unwrap_err();
    assert!(matches!(e, Error::Untrusted { .. }), "{e}");
    assert!(e.to_string().contains("0xfe0000010000"), "names the table's offset: {e}");
    let e = image.compact_online(64, &|| false).unwrap_err();
    assert!(matches!(e, Error::Untrusted { .. }), "{e}");
    drop(image);
    // Generous for a loaded machine; the scan this guards against took seconds to minutes.
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(std::fs::read(&path).unwrap() == bytes, "the file is unchanged");
}

/// Corruption met after the reclaimer started (the refcount block is damaged behind the engine's back, then a
/// discard meets it): the discard fails, the reclaimer stops with that error, the corrupt bit is set, and the
/// file is not cut.
#[test]
fn corruption_met_by_a_discard_stops_the_reclaimer_and_sets_the_corrupt_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_base(dir.path(), Base::Plain);
    let s = places(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    let image = Arc::new(open(&path).unwrap());
    // A tick this long means the worker does no pass (and loads no refcount block) before the discard.
    let options = ReclaimerOptions { tick: Duration::from_secs(3600), ..ReclaimerOptions::default() };
    image.start_reclaimer(options).unwrap();
    assert!(image.reclaimer_running());
    poke(&path, s.refblock, &[0; CS as usize]);
    let e = image.discard(0, 8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(!image.reclaimer_running(), "the reclaimer stopped");
    let kept = image.reclaimer_error().expect("the error is kept");
    assert!(kept.contains("refcount would drop below zero"), "{kept}");
    assert!(image.write_at(1 << 20, &[7; 512]).is_err(), "writes are refused from now on");
    let e = image.compact_online(64, &|| false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    drop(image);
    let info = run_ok(qemu("qemu-img").args(["info", "-U", "--output=json"]).arg(&path));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{info:#}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "the file is not cut");
}

/// The way out the refusal names: `check -r all`, then compaction. The data QEMU read from the damaged image
/// survives both.
#[test]
fn repair_then_compaction_keeps_the_data_of_every_damaged_image_qemu_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut compacted = 0;
    for damage in damages() {
        let base = make_base(dir.path(), damage.base);
        let path = dir.path().join("repaired.qcow2");
        std::fs::copy(&base, &path).unwrap();
        (damage.poke)(&path, &places(&base));
        let Some(expected) = qemu_reads(&path) else { continue };
        let what = damage.name;
        let dev = FileDevice::open(&path, &FileOptions::default()).unwrap();
        check(&dev, Repair::All).unwrap();
        let left = check(&dev, Repair::None).unwrap();
        drop(dev);
        let repaired = left.corruptions == 0 && left.check_errors == 0;
        if repaired {
            assert!(qemu_reads(&path).unwrap() == expected, "{what}: the repair changed the guest data");
        }
        let compacted_now = open(&path).and_then(|image| {
            image.compact(&mut |_| true)?;
            image.close()
        });
        match compacted_now {
            Ok(()) => {}
            // What the repair could not fix (QEMU cannot either) still refuses compaction.
            Err(e) if !repaired => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
                continue;
            }
            Err(e) => panic!("{what}: repaired, yet compaction failed: {e}"),
        }
        assert!(qemu_reads(&path).unwrap() == expected, "{what}: compaction changed the guest data");
        assert_not_corrupt(&path);
        compacted += 1;
    }
    eprintln!("{compacted} of {} damaged images repaired and compacted with their data", damages().len());
    assert!(compacted >= 8, "only {compacted} damaged images were repaired and compacted");
}

/// A refcount table as large as QEMU allows (8 MiB), every entry naming one refcount block that says every
/// cluster is in use: an allocation must fail at once with `Corrupt`, not scan the hundreds of millions of
/// clusters the table describes.
#[test]
fn allocation_on_refcounts_claiming_space_past_the_end_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claims.qcow2");
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"]).arg(&path).arg("1M"));
    let refblock = be64_at(&path, be64_at(&path, 48));
    // Every refcount of the block is 1 (16-bit entries).
    poke(&path, refblock, &[0, 1].repeat(256));
    let table_at = std::fs::metadata(&path).unwrap().len().next_multiple_of(512);
    let clusters = (8u64 << 20) / 512;
    poke(&path, table_at, &refblock.to_be_bytes().repeat((clusters * 512 / 8) as usize));
    poke64(&path, 48, table_at);
    poke(&path, 56, &(clusters as u32).to_be_bytes());
    let started = Instant::now();
    let image = open(&path).unwrap();
    let e = image.write_at(0, &[0x5a; 512]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}
