//! `qcow-tool check` and `qcow-tool repair` against `qemu-img check` on images QEMU made: clean ones of many
//! shapes, leaky ones and corrupted ones (damaged by pokes at known metadata entries). Our output must be
//! qemu-img's byte for byte (JSON and human summary), with the same exit code; our repairs must leave what
//! qemu-img's repairs leave, judged by `qemu-img check` and `qemu-img compare`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../../qcow/tests/support/mod.rs"]
mod support;

mod binary;

use binary::{show, tool, Dir};

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use support::{qemu, qemu_create, qemu_io, run_ok, with_deadline};

/// What one check run printed, and its exit code.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: &Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8"),
            stderr: String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8"),
        }
    }

    /// The JSON on stdout, without `filename` (which names different copies when the images differ).
    fn json(&self) -> Value {
        let mut v: Value =
            serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("no JSON on stdout ({e}):\n{self:?}"));
        v.as_object_mut().expect("a JSON object").remove("filename");
        v
    }
}

fn qemu_img_check(path: &Path, args: &[&str]) -> Run {
    Run::of(&qemu("qemu-img").arg("check").args(args).arg(path).output().expect("qemu-img runs"))
}

fn our_check(path: &Path, args: &[&str]) -> Run {
    let out = tool().arg("check").args(args).arg(path).output().expect("qcow-tool runs");
    let run = Run::of(&out);
    assert!(!run.stderr.contains("panicked"), "{}", show(&out));
    run
}

// --- Pokes at qcow2 metadata, to damage images the way crashes and bugs do. -----------------------------------

fn read_u64(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn read_u32(path: &Path, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u32::from_be_bytes(b)
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// Low bits of a table entry that are flags, not the offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

fn cluster_size(path: &Path) -> u64 {
    1 << read_u32(path, 20)
}

/// Where the 16-bit refcount of host cluster `cluster` is stored.
fn refcount_entry(path: &Path, cluster: u64) -> u64 {
    assert_eq!(read_u32(path, 96), 4, "pokes know 16-bit refcounts only");
    let per_block = cluster_size(path) / 2;
    let table = read_u64(path, 48);
    let block = read_u64(path, table + 8 * (cluster / per_block)) & OFFSET_MASK;
    assert_ne!(block, 0, "no refcount block for cluster {cluster}");
    block + 2 * (cluster % per_block)
}

fn set_refcount(path: &Path, cluster: u64, value: u16) {
    write_at(path, refcount_entry(path, cluster), &value.to_be_bytes());
}

/// Where the L2 entry of guest cluster `index` (in the first L2 table) is stored.
fn l2_entry(path: &Path, index: u64) -> u64 {
    let l1 = read_u64(path, 40);
    let l2 = read_u64(path, l1) & OFFSET_MASK;
    assert_ne!(l2, 0, "guest cluster {index} has no L2 table");
    l2 + 8 * index
}

fn set_l2(path: &Path, index: u64, value: u64) {
    write_at(path, l2_entry(path, index), &value.to_be_bytes());
}

// --- The images. ----------------------------------------------------------------------------------------------

/// A 64 MiB image with 1 MiB of data at guest offset 0 (guest clusters 0.. are allocated in order).
fn written(dir: &Dir, name: &str, options: &str) -> PathBuf {
    let img = dir.path(name);
    qemu_create(&img, options, "64M");
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    img
}

/// Clean images of many shapes, made by QEMU.
fn clean_images(dir: &Dir) -> Vec<PathBuf> {
    let mut images = Vec::new();
    let empty = dir.path("empty.qcow2");
    qemu_create(&empty, "", "1G");
    images.push(empty);
    for (i, options) in [
        "cluster_size=512",
        "cluster_size=4k",
        "",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
        "lazy_refcounts=on",
        "extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path(&format!("clean{i}.qcow2"));
        qemu_create(&img, options, "64M");
        qemu_io(&img, &["write -P 0x21 0 200k", "write -P 0x22 10M 4k", "write -z 20M 64k", "write -P 0x23 63M 1k"]);
        images.push(img);
    }
    // Internal snapshots: clusters shared by two trees (refcount 2, no COPIED flag), then copied on write.
    let snap = written(dir, "snapshots.qcow2", "cluster_size=16k");
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "one"]).arg(&snap));
    qemu_io(&snap, &["write -P 0x31 64k 64k", "write -P 0x32 5M 16k"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "two"]).arg(&snap));
    qemu_io(&snap, &["discard 0 32k"]);
    images.push(snap);
    // Compressed clusters, deflate and zstd.
    for (i, kind) in ["zlib", "zstd"].iter().enumerate() {
        let img = dir.path(&format!("compressed{i}.qcow2"));
        qemu_create(&img, &format!("compression_type={kind}"), "64M");
        qemu_io(&img, &["write -c -P 0x41 0 256k", "write -P 0x42 128k 64k", "write -c -P 0x43 8M 64k"]);
        images.push(img);
    }
    // Preallocated metadata: every cluster allocated, none written.
    let pre = dir.path("prealloc.qcow2");
    qemu_create(&pre, "preallocation=metadata,cluster_size=8k", "16M");
    images.push(pre);
    images
}

/// Images with leaked clusters and nothing worse.
fn leaky_images(dir: &Dir) -> Vec<PathBuf> {
    // Two clusters past the last one used, given a refcount of 1 that nothing accounts for.
    let grown = written(dir, "leak-refcount.qcow2", "");
    let len = std::fs::metadata(&grown).unwrap().len();
    let cs = cluster_size(&grown);
    let first_free = len.div_ceil(cs);
    OpenOptions::new().write(true).open(&grown).unwrap().set_len((first_free + 2) * cs).unwrap();
    set_refcount(&grown, first_free, 1);
    set_refcount(&grown, first_free + 1, 1);
    // A data cluster whose L2 entry was dropped: its refcount stays.
    let dropped = written(dir, "leak-l2.qcow2", "cluster_size=4k");
    set_l2(&dropped, 3, 0);
    vec![grown, dropped]
}

/// Images with corruptions.
fn corrupt_images(dir: &Dir) -> Vec<PathBuf> {
    // A used data cluster whose refcount was lowered to 0.
    let zero = written(dir, "refcount-zero.qcow2", "");
    let host = read_u64(&zero, l2_entry(&zero, 1)) & OFFSET_MASK;
    set_refcount(&zero, host / cluster_size(&zero), 0);
    // COPIED cleared on a cluster with refcount 1.
    let copied = written(dir, "copied-cleared.qcow2", "");
    let entry = read_u64(&copied, l2_entry(&copied, 3));
    set_l2(&copied, 3, entry & !COPIED);
    // An L2 entry pointing far beyond the end of the file.
    let beyond = written(dir, "beyond-eof.qcow2", "");
    set_l2(&beyond, 3, COPIED | 0x1000_0000);
    // A crash while writing to a lazy-refcounts image: the refcounts of the new clusters were never written.
    let crashed = dir.path("lazy-crash.qcow2");
    qemu_create(&crashed, "lazy_refcounts=on", "64M");
    let out = qemu("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x51 0 1M", "-c", "sigraise 9"])
        .arg(&crashed)
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io should have died by its own signal:\n{}", show(&out));
    // The same COPIED damage in an image QEMU has marked corrupt (incompatible feature bit 1).
    let marked = dir.path("marked-corrupt.qcow2");
    std::fs::copy(&copied, &marked).unwrap();
    write_at(&marked, 72, &(read_u64(&marked, 72) | 2).to_be_bytes());
    vec![zero, copied, beyond, crashed, marked]
}

/// Our plain check prints what qemu-img's prints, byte for byte, in both forms, with the same exit code.
fn assert_same_check(img: &Path) {
    let before = std::fs::read(img).unwrap();
    for args in [&["--output=json"][..], &[]] {
        let q = qemu_img_check(img, args);
        let ours = our_check(img, args);
        assert_eq!(ours.code, q.code, "{} {args:?}: exit code\nours {ours:?}\nqemu {q:?}", img.display());
        assert_eq!(ours.stdout, q.stdout, "{} {args:?}: stdout\nours {ours:?}\nqemu {q:?}", img.display());
        // Findings on stderr: one per line, as many as qemu-img's (their wording is the library's business).
        assert_eq!(
            ours.stderr.lines().count(),
            q.stderr.lines().count(),
            "{} {args:?}: findings\nours {ours:?}\nqemu {q:?}",
            img.display()
        );
    }
    assert!(std::fs::read(img).unwrap() == before, "{}: a check without -r changed the file", img.display());
}

/// Repairs a copy with qemu-img and a copy with us, in `mode`, and compares what is reported and what is left.
fn assert_same_repair(dir: &Dir, img: &Path, mode: &str, ours_cmd: &[&str]) {
    let stem = img.file_stem().unwrap().to_string_lossy();
    let theirs = dir.path(&format!("{stem}.{mode}.qemu.qcow2"));
    let ours = dir.path(&format!("{stem}.{mode}.ours.qcow2"));
    std::fs::copy(img, &theirs).unwrap();
    std::fs::copy(img, &ours).unwrap();
    let q = qemu_img_check(&theirs, &["-r", mode, "--output=json"]);
    let out = tool().args(ours_cmd).arg("--output=json").arg(&ours).output().unwrap();
    let o = Run::of(&out);
    let what = format!("{} repaired with {ours_cmd:?}", img.display());
    assert_eq!(o.code, q.code, "{what}: exit code\nours {o:?}\nqemu {q:?}");
    if q.code == 1 && q.stdout.is_empty() {
        // qemu-img could not complete this repair (it needs a refcount rebuild that -r leaks may not do); we must
        // not claim more, and must not have made the image worse than qemu-img's attempt.
        assert_eq!(o.stderr.lines().filter(|l| l.starts_with("qcow-tool: ")).count(), 1, "{what}: {o:?}");
    } else {
        assert_eq!(o.json(), q.json(), "{what}: JSON\nours {o:?}\nqemu {q:?}");
    }
    let after_q = qemu_img_check(&theirs, &["--output=json"]);
    let after_o = qemu_img_check(&ours, &["--output=json"]);
    assert_eq!(after_o.code, after_q.code, "{what}: qemu-img check afterwards\nours {after_o:?}\nqemu {after_q:?}");
    if after_q.code == 0 {
        assert_eq!(after_o.json(), after_q.json(), "{what}: qemu-img check afterwards");
        // The header bits a repair clears (dirty, corrupt) are cleared in ours too.
        let info = |p: &Path| -> Value {
            let out = run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(p));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            serde_json::json!([v["dirty-flag"], v["format-specific"]])
        };
        assert_eq!(info(&ours), info(&theirs), "{what}: qemu-img info afterwards");
        // The guest sees the same bytes in both repaired copies.
        let cmp = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(&ours).arg(&theirs).output();
        let cmp = cmp.unwrap();
        assert_eq!(cmp.status.code(), Some(0), "{what}: qemu-img compare:\n{}", show(&cmp));
    }
}

#[test]
fn clean_images_check_exactly_as_qemu_img_checks_them() {
    with_deadline(300, "clean images", || {
        let dir = Dir::new();
        let images = clean_images(&dir);
        for img in &images {
            assert_same_check(img);
            let q = qemu_img_check(img, &[]);
            assert_eq!(q.code, 0, "{} should be clean: {q:?}", img.display());
        }
        // And some of them exercised what they were made for.
        let json = |name: &str| our_check(&dir.path(name), &["--output=json"]).json();
        assert!(json("compressed0.qcow2")["compressed-clusters"].as_u64().unwrap() > 0);
        assert!(json("compressed1.qcow2")["compressed-clusters"].as_u64().unwrap() > 0);
        assert_eq!(json("prealloc.qcow2")["allocated-clusters"], 2048);
        // Repairing a clean image changes nothing and finds nothing.
        for img in &images[..3] {
            let before = qemu_img_check(img, &["--output=json"]);
            let r = Run::of(&tool().arg("repair").arg("--output=json").arg(img).output().unwrap());
            assert_eq!((r.code, r.json()), (0, before.json()), "{}: {r:?}", img.display());
        }
    });
}

#[test]
fn leaky_images_check_and_repair_as_qemu_img_does() {
    with_deadline(300, "leaky images", || {
        let dir = Dir::new();
        for img in leaky_images(&dir) {
            assert_same_check(&img);
            assert_eq!(qemu_img_check(&img, &[]).code, 3, "{} should leak", img.display());
            assert_same_repair(&dir, &img, "leaks", &["check", "-r", "leaks"]);
            assert_same_repair(&dir, &img, "all", &["repair"]);
        }
    });
}

#[test]
fn corrupt_images_check_and_repair_as_qemu_img_does() {
    with_deadline(300, "corrupt images", || {
        let dir = Dir::new();
        for img in corrupt_images(&dir) {
            assert_same_check(&img);
            assert_eq!(qemu_img_check(&img, &[]).code, 2, "{} should be corrupt", img.display());
            assert_same_repair(&dir, &img, "leaks", &["check", "-r", "leaks"]);
            assert_same_repair(&dir, &img, "all", &["check", "-r", "all"]);
        }
    });
}

#[test]
fn human_repair_report_reads_like_qemu_img() {
    with_deadline(120, "human repair", || {
        let dir = Dir::new();
        let copied = corrupt_images(&dir).into_iter().find(|p| p.ends_with("copied-cleared.qcow2")).unwrap();
        let leaky = leaky_images(&dir);
        for img in leaky.iter().chain([&copied]) {
            let theirs = dir.path("human.qemu.qcow2");
            let ours = dir.path("human.ours.qcow2");
            std::fs::copy(img, &theirs).unwrap();
            std::fs::copy(img, &ours).unwrap();
            let q = qemu_img_check(&theirs, &["-r", "all"]);
            let o = Run::of(&tool().arg("repair").arg(&ours).output().unwrap());
            assert!(q.stdout.contains("The following inconsistencies were found and repaired:"), "{q:?}");
            assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{}:\nours {o:?}\nqemu {q:?}", img.display());
        }
    });
}

/// The first cluster of an image: its header, extensions and backing file name.
fn header_cluster(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.truncate(cluster_size(path) as usize);
    bytes
}

/// Whether `qemu-img info` warns that the image's bitmaps are stale.
fn qemu_warns_of_stale_bitmaps(path: &Path) -> bool {
    let out = run_ok(qemu("qemu-img").args(["info"]).arg(path));
    String::from_utf8_lossy(&out.stderr).contains("lacking bitmap support")
}

/// Bitmaps left stale by a program without bitmap support (it clears autoclear bit 0): a plain check
/// writes nothing; a repair removes the bitmaps extension as QEMU's read-write open does, then frees the bitmap
/// clusters as leaks. Reports, exit codes and the whole header cluster equal qemu-img's, for an image with a
/// backing file too (its name moves up when the extension goes).
#[test]
fn a_repair_removes_stale_bitmaps_from_the_header_as_qemu_img_does() {
    with_deadline(300, "stale bitmaps", || {
        let dir = Dir::new();
        let plain = written(&dir, "stale.qcow2", "");
        qemu_create(&dir.path("base.qcow2"), "", "64M");
        let over = dir.path("stale-over.qcow2");
        qemu_create(&over, "backing_file=base.qcow2,backing_fmt=qcow2", "64M");
        for img in [&plain, &over] {
            run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(img).arg("bm0"));
            run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "4096"]).arg(img).arg("bm1"));
            qemu_io(img, &["write -P 0x12 2M 1M"]);
            assert!(!qemu_warns_of_stale_bitmaps(img));
            // Our write keeps the bitmaps; then a program without bitmap support clears autoclear bit 0.
            run_ok(tool().args(["write"]).arg(img).args(["--sector", "0", "--text", "hi"]));
            assert!(!qemu_warns_of_stale_bitmaps(img), "{}: our write keeps the bitmaps", img.display());
            let mut bytes = std::fs::read(img).unwrap();
            bytes[95] &= !1;
            std::fs::write(img, bytes).unwrap();
            assert!(qemu_warns_of_stale_bitmaps(img), "{}: the old writer left the bitmaps stale", img.display());
            assert_same_check(img);
            assert_eq!(qemu_img_check(img, &[]).code, 3, "{}: the bitmap clusters leak", img.display());
            let stem = img.file_stem().unwrap().to_string_lossy().into_owned();
            for (mode, ours_cmd) in
                [("leaks", &["check", "-r", "leaks"][..]), ("all", &["check", "-r", "all"]), ("all", &["repair"])]
            {
                assert_same_repair(&dir, img, mode, ours_cmd);
                let theirs = dir.path(&format!("{stem}.{mode}.qemu.qcow2"));
                let ours = dir.path(&format!("{stem}.{mode}.ours.qcow2"));
                assert!(!qemu_warns_of_stale_bitmaps(&ours), "{}: {ours_cmd:?} left the extension", img.display());
                assert!(
                    header_cluster(&ours) == header_cluster(&theirs),
                    "{}: {ours_cmd:?}: header differs",
                    img.display()
                );
            }
            // The human report too.
            let theirs = dir.path("human.qemu.qcow2");
            let ours = dir.path("human.ours.qcow2");
            std::fs::copy(img, &theirs).unwrap();
            std::fs::copy(img, &ours).unwrap();
            let q = qemu_img_check(&theirs, &["-r", "leaks"]);
            let o = our_check(&ours, &["-r", "leaks"]);
            assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{}:\nours {o:?}\nqemu {q:?}", img.display());
        }
    });
}

/// Autoclear bits QEMU does not know are cleared by its read-write open, so by a repair; a plain check keeps them.
#[test]
fn a_repair_clears_unknown_autoclear_bits_as_qemu_img_does() {
    let dir = Dir::new();
    let img = written(&dir, "autoclear.qcow2", "");
    write_at(&img, 88, &(read_u64(&img, 88) | 1 << 5).to_be_bytes());
    assert_same_check(&img);
    for (mode, ours_cmd) in [("leaks", &["check", "-r", "leaks"][..]), ("all", &["repair"])] {
        assert_same_repair(&dir, &img, mode, ours_cmd);
        let theirs = dir.path(&format!("autoclear.{mode}.qemu.qcow2"));
        let ours = dir.path(&format!("autoclear.{mode}.ours.qcow2"));
        assert_eq!(read_u64(&theirs, 88), 0, "qemu-img -r {mode} clears the bit");
        assert!(header_cluster(&ours) == header_cluster(&theirs), "{ours_cmd:?}: header differs");
    }
}

#[test]
fn quiet_prints_nothing_on_stdout_and_keeps_the_exit_code() {
    let dir = Dir::new();
    let img = leaky_images(&dir).remove(0);
    let r = our_check(&img, &["-q"]);
    assert_eq!((r.code, r.stdout.as_str()), (3, ""), "{r:?}");
    assert_eq!(r.stderr.lines().count(), qemu_img_check(&img, &["-q"]).stderr.lines().count(), "{r:?}");
}

/// Runs our check expecting exit 1 and exactly one line on stderr, and returns that line.
fn fails(args: &[&str], file: &Path) -> String {
    let out = tool().args(args).arg(file).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?} {}:\n{}", file.display(), show(&out));
    assert!(out.stdout.is_empty(), "{}", show(&out));
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{args:?} must print one line:\n{}", show(&out));
    assert!(stderr.starts_with("qcow-tool: ") && !stderr.contains("panicked"), "{}", show(&out));
    stderr
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let dir = Dir::new();
    let missing = dir.path("missing.qcow2");
    let line = fails(&["check"], &missing);
    assert!(line.contains("missing.qcow2") && line.contains("No such file"), "{line}");
    assert_eq!(qemu_img_check(&missing, &[]).code, 1);
    fails(&["repair"], &missing);

    // qemu-img says raw images have no checks and exits 63; we know qcow2 only, and say the file is not qcow2.
    let raw = dir.path("disk.raw");
    std::fs::write(&raw, vec![0x42u8; 1 << 20]).unwrap();
    assert_eq!(qemu_img_check(&raw, &[]).code, 63);
    for args in [&["check"][..], &["check", "-r", "all"], &["repair"], &["check", "-f", "raw"]] {
        let line = fails(args, &raw);
        assert!(line.contains("disk.raw") && line.contains("not a qcow2 image"), "{args:?}: {line}");
    }
    assert!(std::fs::read(&raw).unwrap() == vec![0x42u8; 1 << 20], "a refused repair wrote to the file");

    let img = written(&dir, "fine.qcow2", "");
    let line = fails(&["check", "-r", "everything"], &img);
    assert!(line.contains("everything") && line.contains("leaks") && line.contains("all"), "{line}");
    let line = fails(&["check", "--output=xml"], &img);
    assert!(line.contains("xml") && line.contains("json"), "{line}");
    assert_eq!(qemu_img_check(&img, &["--output=xml"]).code, 1);

    // A header qemu-img refuses to open is a check that could not run: exit 1 for both.
    let bad = dir.path("bad-header.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    write_at(&bad, 20, &40u32.to_be_bytes()); // cluster_bits 40
    assert_eq!(qemu_img_check(&bad, &[]).code, 1);
    let line = fails(&["check"], &bad);
    assert!(line.contains("bad-header.qcow2"), "{line}");
    let line = fails(&["check", "--output=json"], &bad);
    assert!(line.contains("bad-header.qcow2"), "{line}");
}

#[test]
fn file_names_appear_in_json_as_qemu_img_writes_them() {
    let dir = Dir::new();
    let img = written(&dir, "plain.qcow2", "");
    let odd = dir.path("é x\"y\t😀.qcow2");
    std::fs::copy(&img, &odd).unwrap();
    // Relative and absolute names, and names JSON must escape.
    for (cwd, name) in
        [(dir.0.path(), Path::new("plain.qcow2")), (Path::new("/"), img.as_path()), (dir.0.path(), odd.as_path())]
    {
        let q =
            Run::of(&qemu("qemu-img").current_dir(cwd).args(["check", "--output=json"]).arg(name).output().unwrap());
        let o = Run::of(&tool().current_dir(cwd).args(["check", "--output=json"]).arg(name).output().unwrap());
        assert_eq!((o.code, &o.stdout), (q.code, &q.stdout), "{}", name.display());
    }
}

/// A version 3 snapshot entry whose extra data is only the 8-byte VM state size (QEMU wants at least 16 bytes:
/// the disk size too): `check` reports it as qemu-img does, and `check -r all` rewrites the snapshot table as qemu-img's
/// repair does, leaving the same report, a clean image and the same snapshot data.
#[test]
fn a_snapshot_entry_with_short_extra_data_is_repaired_as_qemu_img_repairs_it() {
    let dir = Dir::new();
    let img = written(&dir, "short-extra", "");
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "one"]).arg(&img));
    qemu_io(&img, &["write -P 0x77 0 64k"]);
    // Rewrite the one entry in place with extra_data_size 8: fixed part (40 bytes), 8 bytes of extra data, the
    // id and the name, padded to 8 bytes. It is shorter than the original, so it fits where it was.
    let table = read_u64(&img, 64);
    let id_len = u64::from(u16::from_be_bytes(read_u32(&img, table + 12).to_be_bytes()[..2].try_into().unwrap()));
    let name_len = u64::from(u16::from_be_bytes(read_u32(&img, table + 12).to_be_bytes()[2..].try_into().unwrap()));
    let extra = u64::from(read_u32(&img, table + 36));
    assert!(extra >= 16, "QEMU wrote a version 3 entry with {extra} bytes of extra data, fewer than 16");
    let mut entry = vec![0u8; (40 + extra + id_len + name_len) as usize];
    std::fs::File::open(&img).unwrap().read_exact_at(&mut entry, table).unwrap();
    let mut short = entry[..40].to_vec();
    short[36..40].copy_from_slice(&8u32.to_be_bytes());
    short.extend_from_slice(&entry[40..48]);
    short.extend_from_slice(&entry[(40 + extra) as usize..]);
    short.resize(short.len().next_multiple_of(8), 0);
    let mut padded = short.clone();
    padded.resize(entry.len().next_multiple_of(8), 0);
    write_at(&img, table, &padded);
    let damaged = qemu_img_check(&img, &[]);
    assert!(
        damaged.code != 0 || damaged.stderr.contains("extra data"),
        "qemu-img sees no defect in the shortened entry: {damaged:?}"
    );
    assert_same_check(&img);
    assert_same_repair(&dir, &img, "all", &["check", "-r", "all"]);
    // Both repaired copies list the snapshot and give the same data for it.
    let theirs = dir.path("short-extra.all.qemu.qcow2");
    let ours = dir.path("short-extra.all.ours.qcow2");
    let list = |p: &Path| {
        let out = run_ok(qemu("qemu-img").args(["snapshot", "-l"]).arg(p));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(list(&ours), vec!["one".to_string()]);
    assert_eq!(list(&ours), list(&theirs));
    let raw = |p: &Path, name: &str| {
        let out = dir.path(name);
        run_ok(qemu("qemu-img").args(["convert", "-l", "snapshot.name=one", "-O", "raw"]).arg(p).arg(&out));
        std::fs::read(&out).unwrap()
    };
    assert!(raw(&ours, "ours-one.raw") == raw(&theirs, "theirs-one.raw"), "the snapshot's data differ");
}
