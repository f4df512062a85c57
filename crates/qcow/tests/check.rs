//! `qcow::check` against `qemu-img check`: on images QEMU made (clean, leaky, corrupted by pokes, dirty after a
//! killed qemu-io), our counts equal qemu-img's; after our repair `qemu-img check` is clean wherever QEMU's own
//! repair makes it clean, and the guest data equals what QEMU's repair kept. A repair cut by power loss at every
//! write never leaves an image worse than it found it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::{Path, PathBuf};

use qcow::block::{FaultyDevice, FileDevice, FileOptions, MemoryDevice};
use qcow::check::{check, CheckReport, Problem, Repair};
use support::{qemu, qemu_check, qemu_create, qemu_io, run_ok, Check};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Where the structures of a qemu-img-made image are, read from its bytes.
struct Map {
    cluster_bits: u32,
    l1: u64,
    reftable: u64,
    refcount_order: u32,
}

impl Map {
    fn of(path: &Path) -> Map {
        let b = std::fs::read(path).unwrap();
        let version = be32(&b, 4);
        Map {
            cluster_bits: be32(&b, 20),
            l1: be64(&b, 40),
            reftable: be64(&b, 48),
            refcount_order: if version >= 3 { be32(&b, 96) } else { 4 },
        }
    }

    /// File offset of the L2 entry of guest cluster `index` (within the first L2 table).
    fn l2_entry(&self, path: &Path, index: u64) -> u64 {
        let b = std::fs::read(path).unwrap();
        let l2 = be64(&b, self.l1 as usize) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "guest cluster {index} has no L2 table");
        l2 + index * 8
    }

    /// The host offset guest cluster `index` maps to.
    fn data(&self, path: &Path, index: u64) -> u64 {
        let b = std::fs::read(path).unwrap();
        be64(&b, self.l2_entry(path, index) as usize) & 0x00ff_ffff_ffff_fe00
    }

    /// File offset of the (16-bit) refcount of host cluster `cluster`, in refcount block 0.
    fn refcount16(&self, path: &Path, cluster: u64) -> u64 {
        assert_eq!(self.refcount_order, 4);
        let b = std::fs::read(path).unwrap();
        be64(&b, self.reftable as usize) + cluster * 2
    }
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn peek64(path: &Path, offset: u64) -> u64 {
    be64(&std::fs::read(path).unwrap(), offset as usize)
}

fn ours(path: &Path, repair: Repair) -> CheckReport {
    let dev = FileDevice::open(
        path,
        &FileOptions { read_only: repair == Repair::None, direct: false, ..FileOptions::default() },
    )
    .unwrap();
    check(&dev, repair).unwrap_or_else(|e| panic!("our check of {} failed: {e}", path.display()))
}

fn copy(path: &Path, suffix: &str) -> PathBuf {
    let to = path.with_extension(suffix);
    std::fs::copy(path, &to).unwrap();
    to
}

/// Our report's counts equal qemu-img's JSON, field for field.
fn assert_same_counts(name: &str, ours: &CheckReport, qemu: &Check) {
    let get = |f: &str| qemu.json.get(f).and_then(|v| v.as_u64()).unwrap_or(0);
    let problems: Vec<String> = ours.problems.iter().map(Problem::to_string).collect();
    let pairs = [
        ("check-errors", ours.check_errors),
        ("corruptions", ours.corruptions),
        ("leaks", ours.leaks),
        ("corruptions-fixed", ours.corruptions_fixed),
        ("leaks-fixed", ours.leaks_fixed),
    ];
    for (field, value) in pairs {
        assert_eq!(
            value,
            get(field),
            "{name}: {field}: ours {value}, qemu-img {:#}\nour findings: {problems:#?}",
            qemu.json
        );
    }
    if qemu.code == 0 {
        let stats = [
            ("allocated-clusters", ours.allocated_clusters),
            ("total-clusters", ours.total_clusters),
            ("fragmented-clusters", ours.fragmented_clusters),
            ("compressed-clusters", ours.compressed_clusters),
            ("image-end-offset", ours.image_end_offset),
        ];
        for (field, value) in stats {
            assert_eq!(value, get(field), "{name}: {field}: qemu-img says {:#}", qemu.json);
        }
    }
    assert_eq!(i32::from(ours.exit_code()), qemu.code, "{name}: exit code; qemu-img: {:#}", qemu.json);
}

fn qemu_repair(path: &Path, mode: &str) {
    let out = qemu("qemu-img").args(["check", "-r", mode, "-f", "qcow2"]).arg(path).output().unwrap();
    assert!(out.status.code().is_some(), "qemu-img check -r died");
}

/// Checks `path` with both tools; repairs copies with both; compares the outcomes.
fn compare_with_qemu(name: &str, path: &Path) {
    let before = qemu_check(path);
    let report = ours(path, Repair::None);
    assert_same_counts(name, &report, &before);
    let original = support::qemu_to_raw(path, path.parent().unwrap());
    for (mode, repair) in [("leaks", Repair::Leaks), ("all", Repair::All)] {
        let theirs = copy(path, &format!("qemu-{mode}"));
        qemu_repair(&theirs, mode);
        let after_theirs = qemu_check(&theirs);
        let mine = copy(path, &format!("ours-{mode}"));
        let fixed = ours(&mine, repair);
        let after_ours = qemu_check(&mine);
        let report = format!(
            "{name}: after -r {mode}: qemu-img check of our repair {:#} vs of QEMU's repair {:#}\nour repair: {fixed:#?}",
            after_ours.json, after_theirs.json
        );
        if after_theirs.code == 0 {
            assert_eq!(after_ours.code, 0, "{report}");
        } else {
            // Where QEMU's repair falls short, ours may do better, never worse.
            assert!(after_ours.corruptions() <= after_theirs.corruptions(), "{report}");
            assert!(after_ours.code == 0 || after_ours.code == after_theirs.code, "{report}");
            if after_ours.code == 0 && mode == "all" {
                let ours_kept = support::qemu_to_raw(&mine, path.parent().unwrap());
                assert!(ours_kept == original, "{name}: our repair changed the guest data");
            }
        }
        // What we say remains equals what qemu-img then finds.
        assert_same_counts(&format!("{name} after our -r {mode}"), &ours(&mine, Repair::None), &after_ours);
        if after_theirs.code == 0 {
            let kept = support::qemu_to_raw(&theirs, path.parent().unwrap());
            let ours_kept = support::qemu_to_raw(&mine, path.parent().unwrap());
            assert!(ours_kept == kept, "{name}: guest data after our -r {mode} differs from QEMU's repair");
            assert!(kept == original || mode == "all", "{name}: QEMU's leak repair changed guest data");
        }
    }
}

fn image(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    qemu_create(&path, opts, size);
    if !io.is_empty() {
        qemu_io(&path, io);
    }
    path
}

#[test]
fn clean_images_of_every_kind_count_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("default", "", "8M"),
        ("c512", "cluster_size=512", "8M"),
        ("c4k_r1", "cluster_size=4096,refcount_bits=1", "8M"),
        ("c2m_r64", "cluster_size=2M,refcount_bits=64", "16M"),
        ("r8", "refcount_bits=8", "8M"),
        ("v2", "compat=0.10", "8M"),
        ("lazy", "lazy_refcounts=on", "8M"),
        ("zstd", "compression_type=zstd", "8M"),
        ("extl2", "extended_l2=on", "8M"),
        ("prealloc", "preallocation=metadata", "8M"),
    ];
    for &(name, opts, size) in cases {
        let cs: u64 = if opts.contains("2M") { 2 << 20 } else { 128 << 10 };
        // Compressed writes need clusters not yet allocated, which preallocation never leaves.
        let c = if opts.contains("preallocation") { "" } else { "-c" };
        let compressed = format!("write {c} -P 3 4M {cs}");
        let writes = ["write -P 1 0 300k", "write -P 2 1M 64k", &compressed, "write -z 3M 64k", "discard 0 64k"];
        let path = image(dir.path(), name, opts, size, &writes);
        assert_same_counts(name, &ours(&path, Repair::None), &qemu_check(&path));
    }
    // Snapshots sharing clusters, then writes that copy them; and bitmaps.
    let writes = ["write -P 1 0 300k", "write -c -P 3 2M 128k", "write -z 3M 64k", "discard 0 4k"];
    let snap = image(dir.path(), "snap", "cluster_size=4096", "8M", &writes);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "one"]).arg(&snap));
    qemu_io(&snap, &["write -P 9 0 8k", "write -c -P 8 5M 4k"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "two"]).arg(&snap));
    run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&snap).arg("b0"));
    assert_same_counts("snapshots", &ours(&snap, Repair::None), &qemu_check(&snap));
    // Bitmaps our writer maintained (loaded, marked in use, stored anew at close): nothing leaks.
    let maintained = copy(&snap, "maintained.qcow2");
    let opened = qcow::Image::open(FileDevice::open(&maintained, &FileOptions::default()).unwrap(), Default::default());
    let opened = opened.unwrap();
    opened.write_at(1 << 20, &[4; 4096]).unwrap();
    opened.close().unwrap();
    let report = ours(&maintained, Repair::None);
    assert!(report.is_clean(), "maintained bitmaps leak nothing: {report:#?}");
    assert_same_counts("maintained bitmaps", &report, &qemu_check(&maintained));
    // Bitmaps an old writer declared stale (autoclear bit cleared): their clusters are leaks to QEMU.
    let stale = copy(&snap, "stale.qcow2");
    clear_bitmaps_bit(&stale);
    let report = ours(&stale, Repair::None);
    assert!(report.leaks > 0, "the stale bitmap's clusters are leaked: {report:#?}");
    assert_same_counts("stale bitmaps", &report, &qemu_check(&stale));
    // Guest data in an external data file is not refcounted.
    let data_file = dir.path().join("data.raw");
    let with_data = image(
        dir.path(),
        "data_file",
        &format!("data_file={}", data_file.display()),
        "8M",
        &["write -P 1 0 300k", "write -z 1M 64k"],
    );
    assert_same_counts("data_file", &ours(&with_data, Repair::None), &qemu_check(&with_data));
    let empty = image(dir.path(), "empty", "", "0", &[]);
    assert_same_counts("empty", &ours(&empty, Repair::None), &qemu_check(&empty));
}

#[test]
fn a_leaked_cluster_is_counted_and_freed_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "leak", "", "8M", &["write -P 1 0 128k"]);
    let map = Map::of(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    let cs = 1u64 << map.cluster_bits;
    let end = len.div_ceil(cs) * cs;
    // One more cluster at the end of the file, with a refcount but nothing pointing at it.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(end + cs).unwrap();
    poke(&path, map.refcount16(&path, end / cs), &1u16.to_be_bytes());
    compare_with_qemu("leak", &path);
}

#[test]
fn refcounts_that_are_too_low_are_corruptions_and_repaired_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // A data cluster's refcount dropped to zero: needs a rebuild.
    let zero = image(dir.path(), "zero_refcount", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&zero);
    let data = map.data(&zero, 1) >> map.cluster_bits;
    poke(&zero, map.refcount16(&zero, data), &0u16.to_be_bytes());
    compare_with_qemu("zero_refcount", &zero);

    // A data cluster referenced twice (two L2 entries) with refcount 1.
    let twice = image(dir.path(), "referenced_twice", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&twice);
    let entry = peek64(&twice, map.l2_entry(&twice, 0));
    poke(&twice, map.l2_entry(&twice, 5), &entry.to_be_bytes());
    compare_with_qemu("referenced_twice", &twice);
    let report = ours(&twice, Repair::None);
    let named =
        report.problems.iter().any(|p| matches!(p, Problem::SharedCluster { referrers, .. } if referrers.len() == 2));
    assert!(named, "both referrers of the shared cluster are named: {:#?}", report.problems);

    // A refcount raised above the references: a leak, and the COPIED flag no longer matches.
    let high = image(dir.path(), "refcount_high", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&high);
    let data = map.data(&high, 2) >> map.cluster_bits;
    poke(&high, map.refcount16(&high, data), &2u16.to_be_bytes());
    compare_with_qemu("refcount_high", &high);
}

#[test]
fn structural_errors_are_reported_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // COPIED flag cleared on an L2 entry whose cluster has refcount 1.
    let copied = image(dir.path(), "copied_cleared", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&copied);
    let at = map.l2_entry(&copied, 1);
    poke(&copied, at, &(peek64(&copied, at) & !(1 << 63)).to_be_bytes());
    compare_with_qemu("copied_cleared", &copied);

    // Reserved bits in an L2 entry.
    let reserved = image(dir.path(), "l2_reserved_bits", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&reserved);
    let at = map.l2_entry(&reserved, 2);
    poke(&reserved, at, &(peek64(&reserved, at) | 0x2).to_be_bytes());
    compare_with_qemu("l2_reserved_bits", &reserved);

    // A data cluster 32 PB into a small file: reported, never allocated for.
    let far = image(dir.path(), "data_at_32pb", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&far);
    let at = map.l2_entry(&far, 3);
    poke(&far, at, &((1u64 << 55) | (1 << 63)).to_be_bytes());
    compare_with_qemu("data_at_32pb", &far);
    let report = ours(&far, Repair::None);
    assert!(
        report.problems.iter().any(|p| matches!(p, Problem::OutsideFile { offset, .. } if *offset == 1 << 55)),
        "the reference outside the file is reported with its target: {:#?}",
        report.problems
    );

    // A misaligned refcount block pointer.
    let refblock = image(dir.path(), "refblock_misaligned", "", "8M", &["write -P 1 0 256k"]);
    let map = Map::of(&refblock);
    let entry = peek64(&refblock, map.reftable);
    poke(&refblock, map.reftable, &(entry + 512).to_be_bytes());
    compare_with_qemu("refblock_misaligned", &refblock);
}

#[test]
fn a_dirty_image_left_by_a_killed_qemu_io_counts_and_repairs_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qcow2");
    qemu_create(&path, "lazy_refcounts=on,cluster_size=4096", "8M");
    let out = qemu("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 200k", "-c", "write -P 8 1M 64k", "-c", "sigraise 9"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io was killed");
    compare_with_qemu("dirty", &path);
    let mine = copy(&path, "repaired");
    ours(&mine, Repair::All);
    let info = run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(&mine));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["dirty-flag"], serde_json::Value::Bool(false), "repair clears the dirty bit: {info:#}");
}

/// Our check of an image must not depend on the image being open through the engine: `Image::check` on an open
/// image we wrote agrees with qemu-img on the same bytes.
#[test]
fn image_check_on_an_open_image_agrees_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.qcow2");
    let dev = FileDevice::create(&path, &FileOptions::default()).unwrap();
    let image = qcow::Image::create(dev, &qcow::CreateOptions::new(64 << 20), qcow::Config::default()).unwrap();
    for i in 0..50u64 {
        image.write_at(i * 3 * 65536 + 4096, &[i as u8; 8192]).unwrap();
    }
    let report = image.check().unwrap();
    assert_same_counts("open image", &report, &qemu_check(&path));
    assert_eq!(report.allocated_clusters, 50);
    image.close().unwrap();
}

/// Repairs cut by power loss after every write, keeping random subsets of what was not yet flushed: the image
/// is never worse than before the repair (no more corruptions, same guest data), and a second repair finishes
/// the job.
/// Runs `qemu-img check -r MODE --output=json`.
fn qemu_repair_report(path: &Path, mode: &str) -> Check {
    let out = qemu("qemu-img").args(["check", "-r", mode, "--output=json", "-f", "qcow2"]).arg(path).output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("qemu-img check -r {mode}: {e}"));
    Check { code: out.status.code().unwrap_or(-1), json }
}

/// Clears autoclear bit 0 (bitmaps), as a program without bitmap support (an old writer) does before it writes.
fn clear_bitmaps_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[95] &= !1;
    std::fs::write(path, bytes).unwrap();
}

/// Whether the header of the image in `bytes` still has a bitmaps extension.
fn has_bitmaps_extension(bytes: &[u8]) -> bool {
    let header = qcow::format::Header::parse(bytes).unwrap();
    header.extension(qcow::format::Extension::BITMAPS).is_some()
}

/// Bitmaps an old writer left stale (autoclear bit 0 cleared): a repair first removes the bitmaps extension, as
/// QEMU's read-write open does, then frees the bitmap clusters as leaks. The counts and the header cluster equal
/// QEMU's repair's; a repair cut by power loss at any write leaves at worst leaks, and a second repair finishes.
#[test]
fn a_repair_removes_stale_bitmaps_from_the_header_then_frees_their_clusters_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "stale", "cluster_size=16k", "16M", &["write -P 1 0 1M"]);
    run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&path).arg("b0"));
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "4096"]).arg(&path).arg("b1"));
    qemu_io(&path, &["write -P 2 4M 1M"]);
    // Written by us (which keeps the bitmaps), then by a program without bitmap support, which clears the bit.
    let image = qcow::Image::open(FileDevice::open(&path, &FileOptions::default()).unwrap(), qcow::Config::default());
    let image = image.unwrap();
    image.write_at(8 << 20, &[3; 4096]).unwrap();
    image.close().unwrap();
    clear_bitmaps_bit(&path);
    let bytes = std::fs::read(&path).unwrap();
    assert!(has_bitmaps_extension(&bytes) && be64(&bytes, 88) & 1 == 0, "the old writer left the bitmaps stale");
    let before = qemu_check(&path);
    assert!(before.leaks() > 0 && before.corruptions() == 0, "{:#}", before.json);
    let report = ours(&path, Repair::None);
    assert_same_counts("stale", &report, &before);
    assert!(report.problems.contains(&Problem::StaleBitmaps { removed: false }), "{report:#?}");
    assert!(std::fs::read(&path).unwrap() == bytes, "a check without repair wrote");
    let original = support::qemu_to_raw(&path, dir.path());
    let cs = 16 << 10;

    let theirs = copy(&path, "qemu-leaks");
    let q = qemu_repair_report(&theirs, "leaks");
    let qemu_header = std::fs::read(&theirs).unwrap()[..cs].to_vec();
    for (mode, repair) in [("leaks", Repair::Leaks), ("all", Repair::All)] {
        let mine = copy(&path, &format!("ours-{mode}"));
        let fixed = ours(&mine, repair);
        assert_same_counts(&format!("stale -r {mode}"), &fixed, &q);
        assert!(fixed.problems.contains(&Problem::StaleBitmaps { removed: true }), "{fixed:#?}");
        assert!(std::fs::read(&mine).unwrap()[..cs] == qemu_header[..], "-r {mode}: header differs from QEMU's");
        support::assert_clean(&mine);
        assert!(support::qemu_to_raw(&mine, dir.path()) == original, "-r {mode}: guest data changed");
    }

    let probe = FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone()));
    check(&probe, Repair::Leaks).unwrap();
    let writes = probe.write_count();
    assert!(writes >= 2, "the repair writes the header and a refcount block ({writes} writes)");
    let mut rng = support::Rng(0xb17);
    for cut in 0..=writes {
        for trial in 0..3 {
            let dev = FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone()));
            dev.crash_after_writes(cut);
            let _ = check(&dev, Repair::Leaks);
            let mask = rng.next();
            dev.power_loss(&|i| trial == 1 || (trial == 2 && mask >> (i % 64) & 1 == 1)).unwrap();
            let crashed = dir.path().join(format!("cut{cut}-{trial}.qcow2"));
            std::fs::write(&crashed, dev.inner().snapshot()).unwrap();
            let _why = support::OnFailure(format!("repair cut after {cut} writes, trial {trial}"));
            support::assert_not_corrupt(&crashed);
            assert!(support::qemu_to_raw(&crashed, dir.path()) == original, "cut {cut}/{trial}: guest data changed");
            let fixed = ours(&crashed, Repair::Leaks);
            assert!(fixed.is_clean(), "cut {cut}/{trial}: second repair: {fixed:#?}");
            support::assert_clean(&crashed);
            assert!(std::fs::read(&crashed).unwrap()[..cs] == qemu_header[..], "cut {cut}/{trial}: header");
            std::fs::remove_file(&crashed).unwrap();
        }
    }
}

#[test]
fn a_repair_cut_by_power_loss_never_makes_the_image_worse() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        image(dir.path(), "needs_rebuild", "cluster_size=4096", "4M", &["write -P 1 0 64k", "write -P 2 1M 16k"]);
    let map = Map::of(&path);
    let data = map.data(&path, 3) >> map.cluster_bits;
    poke(&path, map.refcount16(&path, data), &0u16.to_be_bytes());
    let at = map.l2_entry(&path, 4);
    poke(&path, at, &(peek64(&path, at) & !(1 << 63)).to_be_bytes());
    let before = qemu_check(&path);
    assert!(before.corruptions() > 0);
    let original = support::qemu_to_raw(&path, dir.path());
    let bytes = std::fs::read(&path).unwrap();

    // How many writes a full repair makes.
    let probe = FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone()));
    check(&probe, Repair::All).unwrap();
    let writes = probe.write_count();
    assert!(writes >= 4, "the repair writes blocks, table, header and flags ({writes} writes)");

    let mut rng = support::Rng(0x5eed);
    for cut in 0..=writes {
        for trial in 0..3 {
            let dev = FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone()));
            dev.crash_after_writes(cut);
            let _ = check(&dev, Repair::All);
            let mask = rng.next();
            dev.power_loss(&|i| trial == 1 || (trial == 2 && mask >> (i % 64) & 1 == 1)).unwrap();
            let crashed = dir.path().join(format!("cut{cut}-{trial}.qcow2"));
            std::fs::write(&crashed, dev.inner().snapshot()).unwrap();
            let _why = support::OnFailure(format!("repair cut after {cut} writes, trial {trial}"));
            let after = qemu_check(&crashed);
            assert!(after.check_errors() == 0, "cut {cut}/{trial}: qemu-img cannot check it: {:#}", after.json);
            assert!(
                after.corruptions() <= before.corruptions(),
                "cut {cut}/{trial}: worse than before: {:#} vs {:#}",
                after.json,
                before.json
            );
            assert!(support::qemu_to_raw(&crashed, dir.path()) == original, "cut {cut}/{trial}: guest data changed");
            let fixed = ours(&crashed, Repair::All);
            assert!(fixed.is_clean() || fixed.corruptions == 0, "cut {cut}/{trial}: second repair: {fixed:#?}");
            support::assert_clean(&crashed);
            std::fs::remove_file(&crashed).unwrap();
        }
    }
}
