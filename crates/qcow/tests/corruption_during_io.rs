//! Metadata corruption met during normal I/O. Each case pokes one pointer of an image qemu-io wrote so that it
//! names metadata or a misaligned offset, shows what QEMU does with a copy (the I/O fails and the image is marked
//! corrupt), and asserts that we do the same with another copy: the request fails with `Corrupt`, nothing but the
//! corrupt bit is written, reads of sane clusters keep returning what QEMU wrote, and a read-write reopen is
//! refused while a read-only open works.
//!
//! Deliberate differences: after marking an image corrupt QEMU fails every later request ("No medium found"); we
//! keep serving reads whose mapping is sane and refuse writes only. And a table that sits on other metadata (an L2
//! table on a refcount block, say) is not used for reads either, where QEMU reads through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, ErrorKind, Image};
use support::{qemu, qemu_create, qemu_io, run_ok};

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const K64: u64 = 64 << 10;
const M: u64 = 1 << 20;
/// Guest ranges qemu-io fills in the base image, with their patterns.
const WRITTEN: [(u64, u8); 4] = [(0, 0x11), (K64, 0x22), (M, 0x33), (600 * M, 0x55)];

fn be64_at(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn poke64(path: &Path, offset: u64, value: u64) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(&value.to_be_bytes(), offset).unwrap();
}

fn open_rw(path: &Path) -> qcow::Result<Image<FileDevice>> {
    Image::open(FileDevice::open(path, &FileOptions::default())?, Config::default())
}

fn open_ro(path: &Path) -> qcow::Result<Image<FileDevice>> {
    let opts = FileOptions { read_only: true, direct: false, ..FileOptions::default() };
    Image::open(FileDevice::open(path, &opts)?, Config::read_only())
}

/// Where the base image keeps its metadata, read from the file as QEMU laid it out.
#[derive(Debug, Clone, Copy)]
struct Layout {
    l1: u64,
    reftable: u64,
    refblock: u64,
    /// The L2 table of L1 entry 0.
    l2: u64,
    /// Bytes per L2 entry (16 with extended L2 entries).
    l2_entry: u64,
}

impl Layout {
    fn read(path: &Path, extended: bool) -> Layout {
        let l1 = be64_at(path, 40);
        let reftable = be64_at(path, 48);
        Layout {
            l1,
            reftable,
            refblock: be64_at(path, reftable) & OFFSET_MASK,
            l2: be64_at(path, l1) & OFFSET_MASK,
            l2_entry: if extended { 16 } else { 8 },
        }
    }

    /// Byte offset of the L2 entry of guest cluster `index` (below 512 MiB).
    fn l2_slot(&self, index: u64) -> u64 {
        self.l2 + index * self.l2_entry
    }

    /// Host offset the L2 entry of guest cluster `index` names.
    fn data(&self, path: &Path, index: u64) -> u64 {
        be64_at(path, self.l2_slot(index)) & OFFSET_MASK
    }
}

/// A 1 GiB image (two L1 entries) with four 64 KiB clusters written by qemu-io.
fn base(dir: &Path, opts: &str) -> PathBuf {
    let img = dir.join("base.qcow2");
    qemu_create(&img, opts, "1G");
    let cmds: Vec<String> = WRITTEN.iter().map(|(at, p)| format!("write -P {p:#x} {at} 64k")).collect();
    qemu_io(&img, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    img
}

fn copy(from: &Path, name: &str) -> PathBuf {
    let to = from.with_file_name(name);
    std::fs::copy(from, &to).unwrap();
    to
}

/// The guest bytes of `ranges` as QEMU reads them (`qemu-img convert -O raw`).
fn qemu_ranges(image: &Path, ranges: &[(u64, u64)]) -> Vec<Vec<u8>> {
    let raw = image.with_extension("raw");
    run_ok(qemu("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(image).arg(&raw));
    let file = File::open(&raw).unwrap();
    let out = ranges
        .iter()
        .map(|&(at, len)| {
            let mut b = vec![0u8; len as usize];
            file.read_exact_at(&mut b, at).unwrap();
            b
        })
        .collect();
    std::fs::remove_file(&raw).ok();
    out
}

fn our_ranges(image: &Image<FileDevice>, ranges: &[(u64, u64)]) -> Vec<Vec<u8>> {
    ranges
        .iter()
        .map(|&(at, len)| {
            let mut b = vec![0u8; len as usize];
            image.read_at(at, &mut b).unwrap_or_else(|e| panic!("read of sane range {at:#x}: {e}"));
            b
        })
        .collect()
}

/// Asserts that QEMU, opening `image` read-only, reads in each range the bytes `expected` holds (each range is
/// filled with one byte). Used where `qemu-img convert` fails: it reads the whole disk, bad clusters included.
fn assert_qemu_reads(image: &Path, ranges: &[(u64, u64)], expected: &[Vec<u8>]) {
    for (&(at, len), bytes) in ranges.iter().zip(expected) {
        let pattern = bytes[0];
        assert!(bytes.iter().all(|&b| b == pattern), "range {at:#x} is not one pattern");
        let (ok, said) = qemu_io_result(image, &[&format!("read -P {pattern:#x} {at} {len}")], true);
        assert!(ok, "QEMU reads something else than {pattern:#x} at {at:#x} of {}: {said}", image.display());
    }
}

/// `qemu-io` with the given commands: whether it succeeded, and what it printed.
fn qemu_io_result(path: &Path, commands: &[&str], read_only: bool) -> (bool, String) {
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    if read_only {
        cmd.arg("-r");
    }
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed"), text)
}

/// `"corrupt"` in `qemu-img info`'s format-specific data.
fn qemu_says_corrupt(path: &Path) -> bool {
    let out = run_ok(qemu("qemu-img").args(["info", "--output=json", "-f", "qcow2"]).arg(path));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["format-specific"]["data"]["corrupt"].as_bool().expect("qemu-img info reports the corrupt flag")
}

/// Asserts that the only change to the file is the corrupt bit (incompatible bit 1, byte 79).
fn assert_only_corrupt_bit_written(before: &[u8], after: &[u8]) {
    let mut expected = before.to_vec();
    expected[79] |= 0x02;
    assert_eq!(after.len(), expected.len(), "the file changed size");
    let differs = expected.iter().zip(after).position(|(a, b)| a != b);
    assert_eq!(differs, None, "bytes other than the corrupt bit were written (first at {differs:#x?})");
}

/// One poked pointer and the write that runs into it.
struct Case {
    /// Builds the base image with these qemu-img options.
    opts: &'static str,
    /// The byte offset of the poked pointer and its new value.
    poke: fn(&Path, &Layout) -> (u64, u64),
    /// Guest offset of the 4 KiB write that meets the corruption.
    write_at: u64,
    /// What our error must name.
    what: &'static str,
    /// Guest ranges whose mapping stays sane.
    sane: &'static [(u64, u64)],
}

const ALL_SANE: &[(u64, u64)] = &[(0, K64), (M, K64), (600 * M, K64), (2 * M, K64)];
const SECOND_L2_ONLY: &[(u64, u64)] = &[(600 * M, K64), (700 * M, K64)];

fn run(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let orig = base(dir.path(), case.opts);
    let layout = Layout::read(&orig, case.opts.contains("extended_l2=on"));
    let expected = qemu_ranges(&orig, case.sane);
    for (range, (at, _)) in expected.iter().zip(case.sane) {
        let want = WRITTEN.iter().find(|w| w.0 == *at).map_or(0, |w| w.1);
        assert!(range.iter().all(|&b| b == want), "base image: {at:#x} should hold {want:#x}");
    }
    let (slot, value) = (case.poke)(&orig, &layout);
    let poked = copy(&orig, "poked.qcow2");
    poke64(&poked, slot, value);
    let write = format!("write -P 0x77 {} 4k", case.write_at);

    // QEMU refuses the write and marks its copy corrupt; the sane clusters keep their data.
    let theirs = copy(&poked, "qemu.qcow2");
    let (ok, said) = qemu_io_result(&theirs, &[&write], false);
    assert!(!ok, "QEMU accepted the write: {said}");
    assert!(said.contains("Marking image as corrupt"), "{said}");
    assert!(qemu_says_corrupt(&theirs));
    assert_qemu_reads(&theirs, case.sane, &expected);

    // So do we.
    let ours = copy(&poked, "ours.qcow2");
    let before = std::fs::read(&ours).unwrap();
    let image = open_rw(&ours).unwrap();
    let err = image.write_at(case.write_at, &[0x77; 4096]).expect_err("the write must be refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(case.what), "error {err:?} should name {:?}", case.what);
    assert!(image.info().corrupt);
    let again = image.write_at(case.sane[0].0, &[0x78; 4096]).expect_err("every later write is refused");
    assert_eq!(again.kind(), ErrorKind::Corrupt, "{again}");
    assert_eq!(our_ranges(&image, case.sane), expected, "reads of sane clusters");
    assert_eq!(image.flush().unwrap_err().kind(), ErrorKind::Corrupt);
    assert_eq!(image.close().unwrap_err().kind(), ErrorKind::Corrupt);
    assert_only_corrupt_bit_written(&before, &std::fs::read(&ours).unwrap());
    assert!(qemu_says_corrupt(&ours), "qemu-img info must see the corrupt bit we set");
    assert_qemu_reads(&ours, case.sane, &expected);

    let reopen = open_rw(&ours).err().expect("a read-write open of a corrupt image is refused");
    assert_eq!(reopen.kind(), ErrorKind::Corrupt, "{reopen}");
    let ro = open_ro(&ours).unwrap();
    assert_eq!(our_ranges(&ro, case.sane), expected, "read-only reopen");
}

#[test]
fn a_write_through_an_l2_entry_naming_a_refcount_block_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l2_slot(1), COPIED | l.refblock),
        write_at: K64,
        what: "refcount block",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_through_an_l2_entry_naming_the_l1_table_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l2_slot(1), COPIED | l.l1),
        write_at: K64 + 8192,
        what: "active L1 table",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_through_an_l2_entry_naming_the_refcount_table_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l2_slot(1), COPIED | l.reftable),
        write_at: K64,
        what: "refcount table",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_through_an_l2_entry_naming_its_own_l2_table_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l2_slot(1), COPIED | l.l2),
        write_at: K64,
        what: "active L2 table",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_through_an_l2_entry_pointing_into_the_header_is_refused() {
    // Offset 0x200 lies inside cluster 0 and is not cluster aligned, which QEMU signals as corruption.
    run(&Case {
        opts: "",
        poke: |_, l| (l.l2_slot(1), COPIED | 0x200),
        write_at: K64,
        what: "not cluster aligned",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_through_a_misaligned_l2_entry_is_refused() {
    run(&Case {
        opts: "",
        poke: |p, l| (l.l2_slot(1), COPIED | (l.data(p, 1) + 0x1000)),
        write_at: K64,
        what: "not cluster aligned",
        sane: ALL_SANE,
    });
}

#[test]
fn a_write_below_an_l1_entry_naming_the_refcount_table_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l1, COPIED | l.reftable),
        write_at: K64,
        what: "refcount table",
        sane: SECOND_L2_ONLY,
    });
}

#[test]
fn a_write_below_an_l1_entry_naming_the_l1_table_is_refused() {
    run(&Case {
        opts: "",
        poke: |_, l| (l.l1, COPIED | l.l1),
        write_at: 0,
        what: "active L1 table",
        sane: SECOND_L2_ONLY,
    });
}

#[test]
fn an_allocation_through_a_refcount_table_entry_naming_an_l2_table_is_refused() {
    // The new cluster's refcount would be stored in "block" 0, which is really the L2 table.
    run(&Case {
        opts: "",
        poke: |_, l| (l.reftable, l.l2),
        write_at: 2 * M + K64,
        // Found when the L2 table is loaded: it now sits where the refcount table says a block is. We cannot tell
        // which pointer is wrong, so that L2 table is not trusted for reads either (QEMU still reads through it).
        what: "refcount block",
        sane: SECOND_L2_ONLY,
    });
}

#[test]
fn a_subcluster_write_through_an_extended_l2_entry_naming_a_refcount_block_is_refused() {
    run(&Case {
        opts: "extended_l2=on",
        poke: |_, l| (l.l2_slot(1), COPIED | l.refblock),
        write_at: K64 + 4096,
        what: "refcount block",
        sane: ALL_SANE,
    });
}

/// Reads through a misaligned L2 entry: QEMU fails them with EIO, and marks the image corrupt only when it is
/// open read-write. We fail them with `Corrupt` and do the same with the corrupt bit.
#[test]
fn a_read_through_a_misaligned_l2_entry_fails_and_marks_only_writable_images() {
    let dir = tempfile::tempdir().unwrap();
    let orig = base(dir.path(), "");
    let layout = Layout::read(&orig, false);
    let sane = [(0, K64), (M, K64), (600 * M, K64)];
    let expected = qemu_ranges(&orig, &sane);
    let poked = copy(&orig, "poked.qcow2");
    poke64(&poked, layout.l2_slot(1), COPIED | (layout.data(&orig, 1) + 0x200));
    let read = format!("read -P 0x22 {K64} 4k");

    let theirs = copy(&poked, "qemu-ro.qcow2");
    let (ok, said) = qemu_io_result(&theirs, &[&read], true);
    assert!(!ok && said.contains("read failed"), "{said}");
    assert!(!qemu_says_corrupt(&theirs), "a read-only QEMU must not mark the image");
    let (ok, said) = qemu_io_result(&theirs, &[&read], false);
    assert!(!ok && said.contains("Marking image as corrupt"), "{said}");
    assert!(qemu_says_corrupt(&theirs));

    let ours = copy(&poked, "ours.qcow2");
    let before = std::fs::read(&ours).unwrap();
    let ro = open_ro(&ours).unwrap();
    let err = ro.read_at(K64, &mut [0u8; 4096]).expect_err("read refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(our_ranges(&ro, &sane), expected);
    ro.close().unwrap();
    assert_eq!(std::fs::read(&ours).unwrap(), before, "a read-only open wrote to the file");
    assert!(!qemu_says_corrupt(&ours));

    let rw = open_rw(&ours).unwrap();
    let err = rw.read_at(K64, &mut [0u8; 4096]).expect_err("read refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("not cluster aligned"), "{err}");
    assert_eq!(our_ranges(&rw, &sane), expected, "sane clusters stay readable");
    assert_eq!(rw.write_at(0, &[1u8; 512]).unwrap_err().kind(), ErrorKind::Corrupt);
    drop(rw);
    assert_only_corrupt_bit_written(&before, &std::fs::read(&ours).unwrap());
    assert!(qemu_says_corrupt(&ours));
    assert_qemu_reads(&ours, &sane, &expected);
    assert!(open_rw(&ours).is_err());
    assert_eq!(our_ranges(&open_ro(&ours).unwrap(), &sane), expected);
}

/// The checks must never fire on a healthy image: writes in place and new allocations around a snapshot table,
/// snapshot L1 tables and a bitmap directory, then `qemu-img check` and QEMU's reading of the result.
#[test]
fn healthy_images_with_snapshots_and_bitmaps_are_written_without_false_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "");
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&img));
    qemu_io(&img, &["write -P 0x66 2M 128k"]);
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "-f", "qcow2"]).arg(&img).arg("b0"));
    let image = open_rw(&img).unwrap();
    let mut model: Vec<(u64, u8)> = Vec::new();
    // In place (2M.., written after the snapshot), copy-on-write (shared with the snapshot) and fresh clusters.
    for (i, at) in [2 * M, 2 * M + K64, 0, M + 8192, 600 * M, 5 * M, 800 * M, 2 * M + 4096].into_iter().enumerate() {
        let pattern = 0xa0 + i as u8;
        image.write_at(at, &[pattern; 4096]).unwrap_or_else(|e| panic!("write at {at:#x}: {e}"));
        model.push((at, pattern));
    }
    image.flush().unwrap();
    for (i, at) in [2 * M + 8192, 5 * M + 4096, 0].into_iter().enumerate() {
        image.write_at(at, &[0xc0 + i as u8; 4096]).unwrap_or_else(|e| panic!("write at {at:#x}: {e}"));
        model.push((at, 0xc0 + i as u8));
    }
    assert!(!image.info().corrupt);
    image.close().unwrap();
    assert!(!qemu_says_corrupt(&img));
    // The bitmap was maintained and stored anew, its directory moved: nothing corrupt, nothing leaked.
    support::assert_clean(&img);
    let ranges: Vec<(u64, u64)> = model.iter().map(|&(at, _)| (at, 4096)).collect();
    let got = qemu_ranges(&img, &ranges);
    let mut last: std::collections::BTreeMap<u64, u8> = std::collections::BTreeMap::new();
    for &(at, p) in &model {
        last.insert(at, p);
    }
    for ((at, _), bytes) in model.iter().zip(got) {
        let want = last[at];
        assert!(bytes.iter().all(|&b| b == want), "QEMU reads {at:#x} differently");
    }
}
