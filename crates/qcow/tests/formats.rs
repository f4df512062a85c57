//! Every kind of qcow2 image QEMU makes, opened, read and written by us, with QEMU as the judge.
//!
//! - A generated matrix of QEMU-made images (cluster sizes, refcount widths, v2/v3, zlib/zstd, backing files,
//!   snapshots, bitmaps), each filled by qemu-io with data, zero, compressed and discard requests. Our full read
//!   must equal `qemu-img convert -O raw`, and our `map()` must agree with `qemu-img map --output=json` about
//!   the top image's own allocation (the rule is spelled out at [`qemu_classes`]).
//! - A realistic image: an ext4 file system made from a real directory tree, compressed by qemu-img both ways.
//! - Our writes into each kind (overlays, compressed clusters, snapshots, bitmaps), judged by `qemu-img check`
//!   and `qemu-img compare` against a byte model.
//! - Our compressed output, read back by QEMU.
//! - Refusals, each by name: extended L2, external data files, encryption, backing loops, absolute backing
//!   names, backing files without a recorded format.
//!
//! Everything is deterministic (fixed patterns and seeds) and small, so the file runs in well under three
//! minutes on two cores; the matrix is split over four tests so that they run in parallel.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use qcow::block::{BlockDevice, FileDevice};
use qcow::format::CompressionType;
use qcow::{BackingPolicy, Config, CreateOptions, ErrorKind, ExtentKind, Image};
use serde_json::Value;
use support::{assert_clean, assert_matches_model, qemu, qemu_check, qemu_create, qemu_io, run_ok, OnFailure, Rng};

// ------------------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------------------

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

fn qemu_img(args: &[&str]) -> Output {
    run_ok(qemu("qemu-img").args(args))
}

/// `qemu-img` that is expected to fail; returns its stderr.
fn qemu_img_fails(args: &[&str]) -> String {
    let out = qemu("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(!out.status.success(), "qemu-img {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `qemu-img convert -O raw` (optionally of a snapshot), read back.
fn qemu_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("{}.qemu.raw", snapshot.unwrap_or("current")));
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let opt;
    if let Some(name) = snapshot {
        opt = format!("snapshot.name={name}");
        args.extend(["-l", opt.as_str()]);
    }
    args.extend([s(path), s(&out)]);
    qemu_img(&args);
    let bytes = std::fs::read(&out).expect("read qemu's copy");
    std::fs::remove_file(&out).ok();
    bytes
}

/// Reads the whole guest of `image`, up to its virtual size.
fn read_all<D: BlockDevice>(image: &Image<D>) -> qcow::Result<Vec<u8>> {
    let size = image.virtual_size();
    let mut out = vec![0u8; size.next_multiple_of(512) as usize];
    let chunk = 4usize << 20;
    for (i, part) in out.chunks_mut(chunk).enumerate() {
        image.read_at((i * chunk) as u64, part)?;
    }
    out.truncate(size as usize);
    Ok(out)
}

fn open_ro(path: &Path) -> qcow::Result<Image<FileDevice>> {
    Image::open_path(path, Config::read_only())
}

/// The first offset where two buffers differ, for messages that say where, not just that.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths differ: {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i:#x}: {:#04x} vs {:#04x}", a[i], b[i]),
        None => "identical".into(),
    }
}

/// How a guest range is stored in the top image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A normal data cluster of the top image.
    Data,
    /// A compressed cluster of the top image.
    Compressed,
    /// Reads as zeros because the top image says so (zero flag), whatever the backing holds.
    Zero,
    /// The top image does not say: zeros without a backing file, the backing file's contents with one.
    Unallocated,
}

/// Merges adjacent ranges of one class, so that two maps that split ranges differently compare equal.
fn normalize(ranges: impl IntoIterator<Item = (u64, u64, Class)>) -> Vec<(u64, u64, Class)> {
    let mut out: Vec<(u64, u64, Class)> = Vec::new();
    for (start, end, class) in ranges {
        if start == end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == start && last.2 == class => last.1 = end,
            _ => out.push((start, end, class)),
        }
    }
    out
}

/// Our map, classified.
fn our_classes<D: BlockDevice>(image: &Image<D>) -> qcow::Result<Vec<(u64, u64, Class)>> {
    let extents = image.map(0, image.virtual_size())?;
    Ok(normalize(extents.into_iter().map(|e| {
        let class = match e.kind {
            ExtentKind::Data { .. } => Class::Data,
            ExtentKind::Compressed { .. } => Class::Compressed,
            ExtentKind::Zero => Class::Zero,
            ExtentKind::Unallocated => Class::Unallocated,
        };
        (e.guest.0, e.guest.0 + e.len, class)
    })))
}

/// QEMU's map of the top image, classified.
///
/// The comparison rule: `qemu-img map --output=json` describes the whole chain. An entry with `"depth": 0` and
/// `"present": true` is stored in the top image itself: compressed when `"compressed"`, a data cluster when
/// `"data"`, and otherwise a zero cluster (reads zeros, hiding the backing file). Everything else is not
/// stored in the top image: either a deeper layer supplies it (`depth` > 0) or nothing does (`"present":
/// false`, which QEMU reports at depth 0 for a standalone image and at the chain's length for an overlay); our
/// map calls both `Unallocated`, since it only ever describes its own layer. The `"zero"` flag is not used: QEMU
/// also sets it for data clusters whose host range happens to be a hole in the file.
fn qemu_classes(path: &Path) -> Vec<(u64, u64, Class)> {
    let out = qemu_img(&["map", "-f", "qcow2", "--output=json", s(path)]);
    let map: Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let entries = map.as_array().expect("map is a list");
    normalize(entries.iter().map(|e| {
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        let top = e["depth"].as_u64() == Some(0) && e["present"] == true;
        let class = match (top, e["compressed"] == true, e["data"] == true) {
            (false, _, _) => Class::Unallocated,
            (true, true, _) => Class::Compressed,
            (true, false, true) => Class::Data,
            (true, false, false) => Class::Zero,
        };
        (start, start + len, class)
    }))
}

/// Bytes of a deterministic pattern: every 512-byte sector different, so misplaced sectors show.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let v = rng.next();
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible bytes: text-like, with a seed-dependent twist per sector.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let words = b"the quick brown fox jumps over the lazy dog while qcow2 clusters compress nicely ";
    let mut out: Vec<u8> = words.iter().copied().cycle().take(len).collect();
    for (i, sector) in out.chunks_mut(512).enumerate() {
        sector[0] = (seed as u8).wrapping_add(i as u8);
    }
    out
}

/// A sparse raw file of `len` bytes with patterned data in a few places.
fn make_raw(path: &Path, len: u64, seed: u64) {
    let mut f = std::fs::File::create(path).expect("create raw");
    f.set_len(len).expect("size raw");
    let stripe = (len / 16).max(512);
    for k in 0..16u64 {
        let at = k * stripe + (k * 1536) % stripe.max(1);
        let n = (stripe / 2).min(256 << 10).min(len.saturating_sub(at));
        if n == 0 || k % 3 == 2 {
            continue;
        }
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(&pattern(n as usize, seed * 100 + k)).expect("write raw");
    }
    f.sync_all().ok();
}

/// Makes `path` read a backing file without a recorded format: the backing-format header extension is renamed
/// to an unknown extension type, which QEMU (and we) keep but ignore.
fn forget_backing_format(path: &Path) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open image");
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).expect("read header");
    let header_length = u32::from_be_bytes(head[100..104].try_into().unwrap()) as usize;
    let mut at = header_length;
    loop {
        let ty = u32::from_be_bytes(head[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(head[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "no backing format extension in {}", path.display());
        if ty == 0xe279_2aca {
            f.seek(SeekFrom::Start(at as u64)).expect("seek");
            f.write_all(&0x0bad_f00du32.to_be_bytes()).expect("poke");
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

fn autoclear(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read image");
    u64::from_be_bytes(bytes[88..96].try_into().unwrap())
}

// ------------------------------------------------------------------------------------------------------------
// The matrix
// ------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackingKind {
    None,
    Raw,
    Qcow2,
    /// top -> mid.qcow2 -> base.raw
    Chain,
}

/// The backing file's size relative to the overlay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Same,
    /// The overlay is larger: its tail reads zeros unless written.
    Half,
    /// The overlay is smaller: it sees only the backing file's head.
    Double,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    cluster: u64,
    refcount: u64,
    v3: bool,
    zstd: bool,
    backing: BackingKind,
    scale: Scale,
    snapshots: bool,
    bitmaps: bool,
}

impl Case {
    fn size(&self) -> u64 {
        (self.cluster * 16).max(1 << 20)
    }

    fn backing_size(&self) -> u64 {
        match self.scale {
            Scale::Same => self.size(),
            Scale::Half => self.size() / 2,
            Scale::Double => self.size() * 2,
        }
    }

    fn options(&self) -> String {
        let mut o = format!("cluster_size={},refcount_bits={}", self.cluster, self.refcount);
        o.push_str(if self.v3 { ",compat=1.1" } else { ",compat=0.10" });
        if self.zstd {
            o.push_str(",compression_type=zstd");
        }
        o
    }
}

/// The generated matrix: every combination of cluster size, backing kind, snapshots and bitmaps (64 cases), with
/// refcount width, version, compression type and backing size cycling through their values underneath. QEMU's
/// own limits shape it: v2 has only 16-bit refcounts, zlib and no bitmaps; internal snapshots need refcounts
/// wider than one bit (a 1-bit case with snapshots uses 8 bits instead).
fn matrix() -> Vec<Case> {
    (0..64)
        .map(|n| {
            let cluster = [512, 4096, 65536, 2 << 20][n % 4];
            let backing = [BackingKind::None, BackingKind::Raw, BackingKind::Qcow2, BackingKind::Chain][(n / 4) % 4];
            let snapshots = (n / 16) % 2 == 1;
            let v3 = n % 5 != 0;
            let bitmaps = v3 && (n / 32) % 2 == 1;
            let refcount = match (v3, [1, 16, 64][n % 3]) {
                (false, _) => 16,
                (true, 1) if snapshots => 8,
                (true, r) => r,
            };
            let zstd = v3 && (n / 2) % 2 == 1;
            let scale = [Scale::Same, Scale::Half, Scale::Double][(n / 2) % 3];
            Case { n, cluster, refcount, v3, zstd, backing, scale, snapshots, bitmaps }
        })
        .collect()
}

#[test]
fn the_matrix_covers_every_dimension() {
    let m = matrix();
    assert!(m.len() >= 60);
    for cluster in [512, 4096, 65536, 2 << 20] {
        assert!(m.iter().filter(|c| c.cluster == cluster).count() >= 8, "cluster {cluster}");
    }
    for refcount in [1, 16, 64] {
        assert!(m.iter().filter(|c| c.refcount == refcount).count() >= 8, "refcount {refcount}");
    }
    for backing in [BackingKind::None, BackingKind::Raw, BackingKind::Qcow2, BackingKind::Chain] {
        assert!(m.iter().filter(|c| c.backing == backing).count() >= 8, "{backing:?}");
        assert!(m.iter().any(|c| c.backing == backing && c.snapshots), "{backing:?} with snapshots");
        assert!(m.iter().any(|c| c.backing == backing && c.bitmaps), "{backing:?} with bitmaps");
        assert!(m.iter().any(|c| c.backing == backing && c.zstd), "{backing:?} with zstd");
        assert!(m.iter().any(|c| c.backing == backing && !c.v3), "{backing:?} v2");
    }
    for scale in [Scale::Same, Scale::Half, Scale::Double] {
        assert!(m.iter().any(|c| c.backing != BackingKind::None && c.scale == scale), "{scale:?}");
    }
    assert!(m.iter().filter(|c| !c.v3).count() >= 8);
    assert!(m.iter().filter(|c| c.zstd).count() >= 16);
    assert!(m.iter().any(|c| c.zstd && c.cluster == 2 << 20));
    assert!(m.iter().any(|c| c.snapshots && c.bitmaps));
    assert!(m.iter().any(|c| c.snapshots && !c.v3));
    assert!(m.iter().any(|c| c.refcount == 1 && c.cluster == 512));
}

/// The qemu-io requests that fill a top image: data (unaligned), compressed whole clusters, zeros (whole and
/// partial), a discard, data across the middle (where a half-size backing file ends) and at the end.
fn first_fill(cs: u64, size: u64) -> Vec<String> {
    let part = (cs / 2).max(512) & !511;
    vec![
        format!("write -P 0x11 {} {}", cs / 2, 3 * cs),
        format!("write -c -P 0x22 {} {}", 4 * cs, 2 * cs),
        format!("write -P 0x33 {} {}", 8 * cs, 4 * cs),
        format!("write -z {} {}", 9 * cs, 2 * cs),
        format!("write -z {} {}", 11 * cs + part, part.min(cs - part).max(512)),
        format!("discard {} {}", cs, cs),
        format!("write -P 0x55 {} {}", size / 2 - cs / 2, cs),
        format!("write -c -P 0x66 {} {}", size - 2 * cs, cs),
        format!("write -P 0x44 {} 512", size - 512),
    ]
}

/// The qemu-io requests after the snapshot (if any): they overwrite shared and compressed clusters, and compress
/// into clusters that the first fill left unallocated.
fn second_fill(cs: u64, size: u64) -> Vec<String> {
    vec![
        format!("write -P 0x77 {} {}", cs / 2, cs),
        // QEMU writes compressed clusters only where the top image has none allocated.
        format!("write -c -P 0x88 {} {}", 6 * cs, cs),
        format!("write -P 0x99 {} 512", 4 * cs + 512.min(cs / 2)),
        format!("discard {} {}", 5 * cs, cs),
        format!("write -z {} {}", size - cs, cs),
        format!("write -c -P 0xaa {} {}", 13 * cs, cs),
    ]
}

fn io(path: &Path, cmds: &[String]) {
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(path, &refs);
}

/// Builds the case's images in `dir` and returns the top image.
fn build(case: &Case, dir: &Path) -> PathBuf {
    let top = dir.join("top.qcow2");
    let (size, bsize) = (case.size(), case.backing_size());
    let seed = case.n as u64;
    let backing: Option<(&str, &str)> = match case.backing {
        BackingKind::None => None,
        BackingKind::Raw => {
            make_raw(&dir.join("base.raw"), bsize, seed);
            Some(("base.raw", "raw"))
        }
        BackingKind::Qcow2 => {
            let base = dir.join("base.qcow2");
            let bcs: u64 = if case.n % 2 == 0 { 65536 } else { 4096 };
            qemu_create(&base, &format!("cluster_size={bcs}"), &bsize.to_string());
            io(
                &base,
                &[
                    format!("write -P 0xa1 0 {}", bsize / 4),
                    format!("write -c -P 0xa2 {} {}", bsize / 2, 2 * bcs),
                    format!("write -z {} {}", bsize / 8, bcs),
                    format!("write -P 0xa3 {} {}", bsize - 3 * bcs, 2 * bcs + 512),
                ],
            );
            Some(("base.qcow2", "qcow2"))
        }
        BackingKind::Chain => {
            make_raw(&dir.join("base.raw"), bsize, seed);
            let mid = dir.join("mid.qcow2");
            run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"]).args([
                "-b",
                "base.raw",
                "-F",
                "raw",
                s(&mid),
                &bsize.to_string(),
            ]));
            io(
                &mid,
                &[
                    format!("write -P 0xc1 {} {}", bsize / 4, bsize / 8),
                    format!("write -z {} 4096", bsize / 16),
                    format!("write -c -P 0xc2 {} 8192", bsize / 2),
                ],
            );
            Some(("mid.qcow2", "qcow2"))
        }
    };
    let mut create = qemu("qemu-img");
    create.args(["create", "-q", "-f", "qcow2", "-o", &case.options()]);
    if let Some((name, format)) = backing {
        create.args(["-b", name, "-F", format]);
    }
    run_ok(create.args([s(&top), &size.to_string()]));
    io(&top, &first_fill(case.cluster, size));
    if case.snapshots {
        qemu_img(&["snapshot", "-c", "s1", s(&top)]);
    }
    if case.bitmaps {
        qemu_img(&["bitmap", "--add", s(&top), "b1"]);
        qemu_img(&["bitmap", "--add", "--disable", "-g", "131072", s(&top), "b2"]);
    }
    io(&top, &second_fill(case.cluster, size));
    if case.snapshots {
        qemu_img(&["snapshot", "-c", "s2", s(&top)]);
    }
    top
}

/// Checks one case; returns what disagrees (empty when all agrees), and adds the classes QEMU's map showed to
/// `seen`.
fn check_case(case: &Case, seen: &mut Vec<Class>) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let top = build(case, dir.path());
    let mut problems = Vec::new();
    let expected = qemu_raw(&top, None);
    match open_ro(&top) {
        Err(e) => problems.push(format!("open: {e}")),
        Ok(image) => {
            match read_all(&image) {
                Ok(ours) if ours == expected => {}
                Ok(ours) => {
                    problems.push(format!("read differs from qemu-img convert: {}", first_difference(&ours, &expected)))
                }
                Err(e) => problems.push(format!("read: {e}")),
            }
            match our_classes(&image) {
                Ok(ours) => {
                    let theirs = qemu_classes(&top);
                    seen.extend(theirs.iter().map(|r| r.2));
                    if ours != theirs {
                        problems.push(format!("map differs:\n  ours {ours:?}\n  qemu {theirs:?}"));
                    }
                }
                Err(e) => problems.push(format!("map: {e}")),
            }
            if case.snapshots {
                match image.snapshots() {
                    Ok(list) => {
                        let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
                        if names != ["s1", "s2"] {
                            problems.push(format!("snapshots listed: {names:?}"));
                        }
                    }
                    Err(e) => problems.push(format!("snapshots: {e}")),
                }
            }
            if case.bitmaps {
                match image.bitmaps() {
                    Ok(list) => {
                        let got: Vec<(&str, bool)> = list.iter().map(|b| (b.name.as_str(), b.auto())).collect();
                        if got != [("b1", true), ("b2", false)] {
                            problems.push(format!("bitmaps listed: {got:?}"));
                        }
                    }
                    Err(e) => problems.push(format!("bitmaps: {e}")),
                }
            }
        }
    }
    if case.snapshots {
        let expected = qemu_raw(&top, Some("s1"));
        match Image::open_snapshot_path(&top, "s1").and_then(|snap| read_all(&snap)) {
            Ok(ours) if ours == expected => {}
            Ok(ours) => problems.push(format!("snapshot s1 differs: {}", first_difference(&ours, &expected))),
            Err(e) => problems.push(format!("snapshot s1: {e}")),
        }
    }
    problems
}

fn run_matrix_part(part: usize) {
    // A hang in the library fails the part instead of stalling the suite.
    support::with_deadline(150, &format!("matrix part {part}"), move || {
        let mut failures = Vec::new();
        let mut seen = Vec::new();
        for case in matrix().into_iter().filter(|c| c.n % 4 == part) {
            let problems = check_case(&case, &mut seen);
            if !problems.is_empty() {
                failures.push(format!("case {case:?} (options {}):\n  {}", case.options(), problems.join("\n  ")));
            }
        }
        assert!(failures.is_empty(), "{} case(s) disagree with QEMU:\n{}", failures.len(), failures.join("\n"));
        // The comparison is not vacuous: every kind of range occurred.
        for class in [Class::Data, Class::Compressed, Class::Zero, Class::Unallocated] {
            assert!(seen.contains(&class), "no {class:?} range in any image of part {part}");
        }
    });
}

// Part k holds the cases with n % 4 == k, so each part holds a quarter of every other dimension; the four
// cluster sizes spread over the parts (part 3 holds the 2 MiB ones).
#[test]
fn matrix_part_0_agrees_with_qemu() {
    run_matrix_part(0);
}

#[test]
fn matrix_part_1_agrees_with_qemu() {
    run_matrix_part(1);
}

#[test]
fn matrix_part_2_agrees_with_qemu() {
    run_matrix_part(2);
}

#[test]
fn matrix_part_3_agrees_with_qemu() {
    run_matrix_part(3);
}

// ------------------------------------------------------------------------------------------------------------
// Backing files, one behaviour at a time
// ------------------------------------------------------------------------------------------------------------

#[test]
fn unallocated_clusters_fall_through_and_zero_clusters_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xbbu8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&top)]);
    qemu_io(&top, &["write -z 64k 64k", "write -P 0x11 192k 512"]);
    let image = open_ro(&top).unwrap();
    assert!(image.has_backing());
    let got = read_all(&image).unwrap();
    assert!(got[..64 << 10].iter().all(|&b| b == 0xbb), "unallocated reads the backing file");
    assert!(got[64 << 10..128 << 10].iter().all(|&b| b == 0), "a zero cluster hides the backing file");
    assert!(got[192 << 10..(192 << 10) + 512].iter().all(|&b| b == 0x11));
    assert!(got[(192 << 10) + 512..256 << 10].iter().all(|&b| b == 0xbb), "copy-up kept the backing bytes");
    assert!(got == qemu_raw(&top, None));
}

#[test]
fn relative_backing_names_resolve_against_the_overlay_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bases")).unwrap();
    std::fs::create_dir_all(dir.path().join("overlays")).unwrap();
    make_raw(&dir.path().join("bases/base.raw"), 2 << 20, 7);
    let top = dir.path().join("overlays/top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "../bases/base.raw", "-F", "raw", s(&top)]);
    qemu_io(&top, &["write -P 0x5a 100k 8k"]);
    // The test's working directory is not the overlay's: the name must not be resolved against it.
    assert_ne!(std::env::current_dir().unwrap(), dir.path().join("overlays"));
    let image = open_ro(&top).unwrap();
    assert!(read_all(&image).unwrap() == qemu_raw(&top, None));
}

#[test]
fn a_raw_backing_file_of_odd_length_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("odd.raw");
    std::fs::write(&base, pattern(1_000_001, 3)).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "odd.raw", "-F", "raw", s(&top)]);
    qemu_io(&top, &["write -P 0x21 8k 4k"]);
    let image = open_ro(&top).unwrap();
    let expected = qemu_raw(&top, None);
    let got = read_all(&image).unwrap();
    assert!(got == expected, "{}", first_difference(&got, &expected));
}

// ------------------------------------------------------------------------------------------------------------
// A realistic image
// ------------------------------------------------------------------------------------------------------------

/// Compares our read of `image` with the raw file, a few MiB at a time.
fn assert_reads_like_raw(image: &Image<FileDevice>, raw: &Path) {
    let mut file = std::fs::File::open(raw).unwrap();
    let len = file.metadata().unwrap().len();
    assert_eq!(image.virtual_size(), len);
    let chunk = 4u64 << 20;
    let (mut ours, mut theirs) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at) as usize;
        image.read_at(at, &mut ours[..n]).unwrap_or_else(|e| panic!("read at {at:#x}: {e}"));
        file.read_exact(&mut theirs[..n]).unwrap();
        assert!(ours[..n] == theirs[..n], "at {at:#x}: {}", first_difference(&ours[..n], &theirs[..n]));
        at += n as u64;
    }
}

#[test]
fn an_ext4_file_system_compressed_by_qemu_reads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("fs.raw");
    let tree = ["/usr/share/doc", "/usr/share/common-licenses", "/etc"]
        .into_iter()
        .find(|p| Path::new(p).is_dir())
        .expect("a directory tree to copy");
    run_ok(std::process::Command::new("/usr/sbin/mke2fs").args(["-q", "-t", "ext4", "-d", tree, s(&raw), "256M"]));
    for (name, options) in [("zstd", "compression_type=zstd"), ("zlib", "compression_type=zlib")] {
        let img = dir.path().join(format!("fs-{name}.qcow2"));
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, s(&raw), s(&img)]);
        let image = open_ro(&img).unwrap();
        let compressed = image.map(0, image.virtual_size()).unwrap();
        assert!(
            compressed.iter().filter(|e| matches!(e.kind, ExtentKind::Compressed { .. })).count() > 100,
            "{name}: qemu-img convert -c made compressed clusters"
        );
        assert_reads_like_raw(&image, &raw);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Our writes into each kind of image
// ------------------------------------------------------------------------------------------------------------

/// Applies `n` random writes (whole sectors, up to three clusters long, some partial clusters) to the image and
/// the model alike.
fn random_writes(image: &Image<FileDevice>, model: &mut [u8], seed: u64, n: usize) {
    let cs = image.geometry().cluster_size();
    let sectors = model.len() as u64 / 512;
    let mut rng = Rng(seed | 1);
    for i in 0..n {
        let len = (1 + rng.below(3 * cs / 512)).min(sectors) * 512;
        let at = rng.below(sectors - len / 512 + 1) * 512;
        let data = pattern(len as usize, seed * 1000 + i as u64);
        image.write_at(at, &data).unwrap_or_else(|e| panic!("write {len:#x} at {at:#x}: {e}"));
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
}

/// Writes `data` at `at` into the image and the model.
fn write_both(image: &Image<FileDevice>, model: &mut [u8], at: u64, data: &[u8]) {
    image.write_at(at, data).unwrap_or_else(|e| panic!("write {:#x} at {at:#x}: {e}", data.len()));
    model[at as usize..at as usize + data.len()].copy_from_slice(data);
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn partial_writes_into_overlays_copy_up_from_the_backing_file() {
    // (label, top options, backing kind, backing cluster size, backing size, top size)
    let cases: &[(&str, &str, &str, u64, u64)] = &[
        ("raw backing, same size", "", "raw", 4 << 20, 4 << 20),
        ("qcow2 backing with 4K clusters under 64K", "", "qcow2", 4 << 20, 4 << 20),
        ("overlay larger than its backing", "cluster_size=4096", "raw", 1 << 20, 3 << 20),
        ("overlay smaller than its backing, v2", "compat=0.10", "qcow2", 6 << 20, 2 << 20),
        ("2-deep chain, 512-byte clusters", "cluster_size=512", "chain", 2 << 20, 2 << 20),
        ("zstd overlay, 1-bit refcounts", "compression_type=zstd,refcount_bits=1", "raw", 2 << 20, 2 << 20),
    ];
    for (i, &(label, options, kind, bsize, size)) in cases.iter().enumerate() {
        let _guard = OnFailure(format!("overlay case {i}: {label}"));
        let dir = tempfile::tempdir().unwrap();
        let (name, format) = match kind {
            "raw" => {
                make_raw(&dir.path().join("base.raw"), bsize, i as u64);
                ("base.raw", "raw")
            }
            "qcow2" => {
                let base = dir.path().join("base.qcow2");
                qemu_create(&base, "cluster_size=4096", &bsize.to_string());
                qemu_io(&base, &["write -P 0xb1 0 1M", "write -c -P 0xb2 1M 64k", "write -z 256k 4k"]);
                ("base.qcow2", "qcow2")
            }
            _ => {
                make_raw(&dir.path().join("base.raw"), bsize, i as u64);
                let mid = dir.path().join("mid.qcow2");
                qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&mid)]);
                qemu_io(&mid, &["write -P 0xc1 512k 256k", "write -z 0 4k"]);
                ("mid.qcow2", "qcow2")
            }
        };
        let top = dir.path().join("top.qcow2");
        let mut create = qemu("qemu-img");
        create.args(["create", "-q", "-f", "qcow2"]);
        if !options.is_empty() {
            create.args(["-o", options]);
        }
        run_ok(create.args(["-b", name, "-F", format, s(&top), &size.to_string()]));
        // Some clusters allocated in the top image already, and (v3) a zero cluster over backing data.
        let mut pre = vec!["write -P 0x31 0 4k"];
        if !options.contains("compat=0.10") {
            pre.push("write -z 128k 64k");
        }
        qemu_io(&top, &pre);
        let backing_files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &top)
            .map(|p| {
                let bytes = file_bytes(&p);
                (p, bytes)
            })
            .collect();
        // The model starts as what QEMU sees: the backing file's contents under the top image's.
        let mut model = qemu_raw(&top, None);
        let image = Image::open_path(&top, Config::default()).unwrap();
        assert!(image.has_backing());
        assert!(read_all(&image).unwrap() == model, "{label}: read before writing");
        let cs = image.geometry().cluster_size();
        // A sector in the middle of an unallocated cluster: the rest of the cluster comes from the backing file.
        write_both(&image, &mut model, 3 * cs + 512.min(cs / 2) / 512 * 512, &pattern(512, 1));
        // Across the end of the backing file (when the overlay is larger), or its last sector the overlay sees.
        let edge = bsize.min(size) - 512;
        let len = if size > bsize { 1024 } else { 512 };
        write_both(&image, &mut model, edge, &pattern(len, 2));
        // Into the zero cluster: what is around the new data must stay zero, not come from the backing file.
        write_both(&image, &mut model, 128 << 10, &pattern(1024, 3));
        random_writes(&image, &mut model, 77 + i as u64, 40);
        assert!(read_all(&image).unwrap() == model, "{label}: read after writing");
        image.close().unwrap();
        assert_clean(&top);
        assert_matches_model(&top, &model);
        for (path, bytes) in backing_files {
            assert!(file_bytes(&path) == bytes, "{label}: {} changed", path.display());
        }
    }
}

#[test]
fn overwriting_parts_of_compressed_clusters_keeps_the_rest() {
    for (i, options) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "cluster_size=4096,compression_type=zstd",
        "compat=0.10,cluster_size=4096",
    ]
    .iter()
    .enumerate()
    {
        let _guard = OnFailure(format!("compressed case {i}: {options}"));
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("c.qcow2");
        qemu_create(&img, options, "4M");
        let cs: u64 = if options.contains("4096") { 4096 } else { 65536 };
        let cmds: Vec<String> = (0..24u64)
            .map(|k| format!("write -c -P {} {} {}", 0x10 + k, k * 2 * cs, if k % 3 == 0 { 2 * cs } else { cs }))
            .collect();
        io(&img, &cmds);
        let mut model = qemu_raw(&img, None);
        let image = Image::open_path(&img, Config::default()).unwrap();
        assert!(read_all(&image).unwrap() == model);
        // Partial writes into compressed clusters: the head, the middle, the tail, and across two of them.
        write_both(&image, &mut model, 0, &pattern(512, 10));
        write_both(&image, &mut model, 2 * cs + cs / 2, &pattern(512, 11));
        write_both(&image, &mut model, 5 * cs - 1024, &pattern(1024, 12));
        write_both(&image, &mut model, 6 * cs - 512, &pattern(1024, 13));
        // A whole compressed cluster replaced by another compressed one, and a normal one compressed.
        let text = compressible(cs as usize, 14);
        image.write_compressed(8 * cs, &text).unwrap();
        model[(8 * cs) as usize..(9 * cs) as usize].copy_from_slice(&text);
        write_both(&image, &mut model, 30 * cs, &pattern(cs as usize, 15));
        let text = compressible(cs as usize, 16);
        image.write_compressed(30 * cs, &text).unwrap();
        model[(30 * cs) as usize..(31 * cs) as usize].copy_from_slice(&text);
        random_writes(&image, &mut model, 99 + i as u64, 30);
        assert!(read_all(&image).unwrap() == model);
        image.close().unwrap();
        assert_clean(&img);
        assert_matches_model(&img, &model);
    }
}

#[test]
fn writes_into_an_image_with_snapshots_leave_the_snapshots_alone() {
    let mut problems = Vec::new();
    for (i, options) in ["", "compat=0.10,cluster_size=4096", "cluster_size=512,refcount_bits=8,compression_type=zstd"]
        .iter()
        .enumerate()
    {
        let _guard = OnFailure(format!("snapshot case {i}: {options}"));
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.qcow2");
        qemu_create(&img, options, "2M");
        qemu_io(&img, &["write -P 0x41 0 1M", "write -c -P 0x42 1M 64k", "write -z 1536k 64k"]);
        qemu_img(&["snapshot", "-c", "s1", s(&img)]);
        qemu_io(&img, &["write -P 0x43 256k 64k"]);
        let s1 = qemu_raw(&img, Some("s1"));
        let mut model = qemu_raw(&img, None);
        let image = Image::open_path(&img, Config::default()).unwrap();
        let names: Vec<String> = image.snapshots().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s1"]);
        // Over clusters shared with the snapshot (data and compressed), partially and whole.
        write_both(&image, &mut model, 512, &pattern(1024, 20));
        write_both(&image, &mut model, 64 << 10, &pattern(64 << 10, 21));
        write_both(&image, &mut model, (1 << 20) + 4096, &pattern(512, 22));
        random_writes(&image, &mut model, 123 + i as u64, 30);
        assert!(read_all(&image).unwrap() == model);
        image.close().unwrap();
        // Everything is checked, and then every disagreement (of every case) reported at once.
        let case = format!("case {i} ({options})");
        let check = qemu_check(&img);
        if (check.corruptions(), check.leaks(), check.check_errors()) != (0, 0, 0) {
            problems.push(format!("{case}: qemu-img check: {}", check.json));
        }
        let raw = img.with_extension("model.raw");
        std::fs::write(&raw, &model).unwrap();
        if !support::qemu_compare_raw(&img, &raw) {
            problems.push(format!("{case}: qemu-img compare: the current state differs from the model"));
        }
        let after = qemu_raw(&img, Some("s1"));
        if after != s1 {
            problems.push(format!("{case}: qemu-img convert -l snapshot.name=s1: {}", first_difference(&after, &s1)));
        }
        for name in ["s1", "1"] {
            match Image::open_snapshot_path(&img, name).and_then(|snap| {
                assert!(snap.is_read_only());
                read_all(&snap)
            }) {
                Ok(ours) if ours == s1 => {}
                Ok(ours) => {
                    problems.push(format!("{case}: our read of snapshot {name}: {}", first_difference(&ours, &s1)))
                }
                Err(e) => problems.push(format!("{case}: our read of snapshot {name}: {e}")),
            }
        }
        if Image::open_snapshot_path(&img, "no-such-snapshot").is_ok() {
            problems.push(format!("{case}: a snapshot that does not exist opened"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Bitmaps are maintained: a read-write open keeps autoclear bit 0 and marks the bitmap in use (QEMU's
/// "inconsistent while open"), our writes set its bits, and at close it is stored consistent: QEMU lists it
/// without the in-use flag, warns of nothing, and finds the image clean (no leaked bitmap clusters).
#[test]
fn writing_an_image_with_bitmaps_keeps_them_consistent_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, &["write -P 0x51 0 64k"]);
    qemu_img(&["bitmap", "--add", s(&img), "b1"]);
    qemu_io(&img, &["write -P 0x52 1M 128k"]);
    assert_eq!(autoclear(&img) & 1, 1, "qemu-img sets the bitmaps bit");
    let before = qemu_check(&img);
    assert_eq!((before.corruptions(), before.leaks()), (0, 0));
    let mut model = qemu_raw(&img, None);
    let listed = {
        let image = Image::open_path(&img, Config::read_only()).unwrap();
        assert!(image.bitmaps_consistent());
        image.bitmaps().map(|list| list.iter().map(|b| (b.name.clone(), b.granularity(), b.auto())).collect::<Vec<_>>())
    };
    assert_eq!(autoclear(&img) & 1, 1, "a read-only open changes nothing");
    let image = Image::open_path(&img, Config::default()).unwrap();
    assert!(image.bitmaps_consistent(), "a read-write open keeps the bit");
    assert!(image.bitmaps().unwrap()[0].in_use(), "and marks the bitmap in use while the image is open");
    write_both(&image, &mut model, 2 << 20, &pattern(4096, 30));
    image.close().unwrap();
    assert_eq!(autoclear(&img) & 1, 1, "autoclear bit 0 stays set");
    let info = qemu("qemu-img").args(["info", "--output=json", s(&img)]).output().unwrap();
    assert!(info.status.success());
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(!stderr.contains("inconsistent"), "qemu-img info warns of nothing: {stderr}");
    let json: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        json["format-specific"]["data"]["bitmaps"],
        serde_json::json!([{"flags": ["auto"], "name": "b1", "granularity": 65536}]),
        "{json}"
    );
    assert_clean(&img);
    assert_matches_model(&img, &model);
    // What the bitmap holds: QEMU's write at 1 MiB and ours at 2 MiB, and not QEMU's write from before it existed.
    let image = Image::open_path(&img, Config::read_only()).unwrap();
    let runs = image.bitmap_status("b1", 0, 4 << 20).unwrap();
    let dirty: Vec<(u64, u64)> = runs
        .iter()
        .scan(0u64, |at, r| {
            let start = *at;
            *at += r.len;
            Some((start, r.len, r.dirty))
        })
        .filter(|r| r.2)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(dirty, [(1 << 20, 128 << 10), (2 << 20, 64 << 10)]);
    // Checked last, so that a failure to list does not hide the rest.
    match listed {
        Ok(list) => assert_eq!(list, [("b1".to_string(), 65536, true)]),
        Err(e) => panic!("listing the bitmaps of a qemu-img made image: {e}"),
    }
}

// ------------------------------------------------------------------------------------------------------------
// Our compressed output
// ------------------------------------------------------------------------------------------------------------

#[test]
fn our_compressed_clusters_read_back_in_qemu() {
    for (i, (ty, cs)) in [
        (CompressionType::Deflate, 65536u64),
        (CompressionType::Zstd, 65536),
        (CompressionType::Zstd, 4096),
        (CompressionType::Deflate, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let _guard = OnFailure(format!("compressed output case {i}: {ty:?}, {cs}-byte clusters"));
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ours.qcow2");
        // Not a whole number of clusters (where clusters are larger than a sector): the last one is partial.
        let tail_len = if cs >= 4096 { 5 * 512 } else { 0 };
        let size = 40 * cs + tail_len;
        let mut options = CreateOptions::new(size);
        options.cluster_size = cs;
        options.compression_type = ty;
        let image = Image::create_path(&img, &options, Config::default()).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut compressed_at = Vec::new();
        for k in 0..40u64 {
            let at = k * cs;
            let data = match k % 4 {
                0 | 1 => compressible(cs as usize, k),
                2 => pattern(cs as usize, k), // incompressible: stored as a normal cluster
                _ => continue,
            };
            image.write_compressed(at, &data).unwrap();
            model[at as usize..(at + cs) as usize].copy_from_slice(&data);
            if k % 4 != 2 {
                compressed_at.push(at);
            }
        }
        if tail_len > 0 {
            let tail = compressible(tail_len as usize, 99);
            image.write_compressed(40 * cs, &tail).unwrap();
            model[(40 * cs) as usize..].copy_from_slice(&tail);
            compressed_at.push(40 * cs);
        }
        // A partial write into a compressed cluster, through the normal path.
        write_both(&image, &mut model, cs + (cs / 2) / 512 * 512, &pattern(512, 7));
        compressed_at.retain(|&a| a != cs);
        if cs > 512 {
            assert!(image.write_compressed(512, &vec![1u8; cs as usize]).is_err(), "misaligned is refused");
            assert!(image.write_compressed(0, &vec![1u8; 512]).is_err(), "part of a cluster is refused");
        }
        image.close().unwrap();
        assert_clean(&img);
        let got = qemu_raw(&img, None);
        assert!(got == model, "{}", first_difference(&got, &model));
        let map = qemu_classes(&img);
        for at in compressed_at {
            assert!(
                map.iter().any(|&(a, b, c)| a <= at && at < b && c == Class::Compressed),
                "cluster at {at:#x} is not compressed in qemu-img map: {map:?}"
            );
        }
        let info: Value = serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&img)]).stdout).unwrap();
        let want = if ty == CompressionType::Zstd { "zstd" } else { "zlib" };
        assert_eq!(info["format-specific"]["data"]["compression-type"], want);
    }
}

#[test]
fn our_compressed_clusters_in_qemu_made_images() {
    for options in ["compression_type=zlib", "compression_type=zstd,cluster_size=16384"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("q.qcow2");
        qemu_create(&img, options, "2M");
        qemu_io(&img, &["write -P 0x61 0 512k", "write -c -P 0x62 512k 128k"]);
        let mut model = qemu_raw(&img, None);
        let image = Image::open_path(&img, Config::default()).unwrap();
        let cs = image.geometry().cluster_size();
        for (k, at) in [0, 2 * cs, 512 << 10, (1 << 20) + cs].into_iter().enumerate() {
            let data = compressible(cs as usize, k as u64);
            image.write_compressed(at, &data).unwrap();
            model[at as usize..(at + cs) as usize].copy_from_slice(&data);
        }
        image.close().unwrap();
        assert_clean(&img);
        assert_matches_model(&img, &model);
        let map = qemu_classes(&img);
        assert!(map.iter().any(|&(a, _, c)| a == 0 && c == Class::Compressed), "{options}: {map:?}");
    }
}

// ------------------------------------------------------------------------------------------------------------
// Refusals
// ------------------------------------------------------------------------------------------------------------

fn open_error(path: &Path) -> qcow::Error {
    match open_ro(path) {
        Ok(_) => panic!("{} opened, but must be refused", path.display()),
        Err(e) => e,
    }
}

/// Extended L2 entries and external data files: what this version cannot do with them is refused naming the
/// feature ("extended L2", "external data file"); what it does (reading, and writing where supported), it does
/// as QEMU does. Both outcomes are accepted for each open mode, so the test holds while support grows.
#[test]
fn extended_l2_and_external_data_files_are_refused_by_name_or_handled_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU resolves the data file name against its working directory when it creates and opens the image, and
    // we against the image's directory: QEMU runs in the image's directory so that both name the same file.
    let in_dir = |program: &str| {
        let mut cmd = qemu(program);
        cmd.current_dir(dir.path());
        cmd
    };
    let qemu_view = |img: &Path| {
        let raw = dir.path().join("expected.raw");
        // -U: the image is still open while QEMU reads it.
        run_ok(in_dir("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]));
        std::fs::read(&raw).unwrap()
    };
    let l2 = dir.path().join("l2.qcow2");
    run_ok(in_dir("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", s(&l2), "1M"]));
    run_ok(in_dir("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x31 0 8k", "-c", "write -z 64k 4k", s(&l2)]));
    let data = dir.path().join("data.qcow2");
    run_ok(in_dir("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", s(&data), "1M"]));
    run_ok(in_dir("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x32 4k 8k", s(&data)]));
    for (img, name) in [(&l2, "extended L2"), (&data, "external data file")] {
        match open_ro(img) {
            Ok(image) => {
                let got = read_all(&image).unwrap();
                let expected = qemu_view(img);
                assert!(got == expected, "{name}: {}", first_difference(&got, &expected));
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(e.to_string().contains(name), "{e}");
            }
        }
        match Image::open_path(img, Config::default()) {
            Ok(image) => {
                let mut model = qemu_view(img);
                write_both(&image, &mut model, 2048, &pattern(8192, 40));
                write_both(&image, &mut model, 64 << 10, &pattern(512, 41));
                image.close().unwrap();
                let check = in_dir("qemu-img").args(["check", "--output=json", s(img)]).output().unwrap();
                assert_eq!(check.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&check.stdout));
                let got = qemu_view(img);
                assert!(got == model, "{name}: after our writes, {}", first_difference(&got, &model));
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
}

#[test]
fn encrypted_images_are_refused_naming_the_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks.qcow2");
    run_ok(qemu("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&img),
        "1M",
    ]));
    let e = open_error(&img);
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let text = e.to_string();
    assert!(text.contains("LUKS") || text.to_lowercase().contains("encrypt"), "{text}");
}

#[test]
fn a_backing_chain_loop_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_create(&a, "", "1M");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", s(&b)]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    // QEMU refuses it too.
    assert!(qemu_img_fails(&["info", "--backing-chain", s(&a)]).contains("loop"));
    support::with_deadline(30, "opening a looped chain", move || {
        for path in [&a, &b] {
            let e = open_error(path);
            assert!(e.to_string().contains("loop"), "{e}");
            // Even a policy that allows everything else stops at the loop.
            let policy = BackingPolicy { allow_absolute: true, max_depth: 1000, ..BackingPolicy::default() };
            let e = Image::open_path_with(path, Config::read_only(), policy).err().expect("refused");
            assert!(e.to_string().contains("loop"), "{e}");
        }
    });
}

#[test]
fn absolute_backing_names_are_followed_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    make_raw(&base, 1 << 20, 5);
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&top)]);
    qemu_io(&top, &["write -P 0x71 4k 4k"]);
    let e = open_error(&top);
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("absolute"), "{e}");
    let policy = BackingPolicy { allow_absolute: true, ..BackingPolicy::default() };
    let image = Image::open_path_with(&top, Config::read_only(), policy).unwrap();
    assert!(read_all(&image).unwrap() == qemu_raw(&top, None));
    // Not following backing files at all refuses even a relative one.
    let rel = dir.path().join("rel.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&rel)]);
    let policy = BackingPolicy { follow: false, ..BackingPolicy::default() };
    assert!(Image::open_path_with(&rel, Config::read_only(), policy).is_err());
}

#[test]
fn a_backing_file_without_a_recorded_format_is_never_probed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    make_raw(&base, 1 << 20, 6);
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&top)]);
    qemu_io(&top, &["write -P 0x72 64k 4k"]);
    forget_backing_format(&top);
    let info: Value = serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&top)]).stdout).unwrap();
    assert!(info.get("backing-filename-format").is_none(), "the format is gone: {info}");
    let e = open_error(&top);
    assert!(e.to_string().contains("never probed"), "{e}");
    let policy = BackingPolicy { default_format: Some("raw".into()), ..BackingPolicy::default() };
    let image = Image::open_path_with(&top, Config::read_only(), policy).unwrap();
    assert!(read_all(&image).unwrap() == qemu_raw(&top, None));
}
