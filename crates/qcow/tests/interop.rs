//! QEMU on the other side of every test.
//!
//! "QEMU writes, we read": images made by qemu-img and written by qemu-io must read through our engine exactly
//! as `qemu-img convert -O raw` reads them. "We write, QEMU judges": images our engine creates, writes, resizes
//! and closes must pass `qemu-img check` with no corruption and no leak, and `qemu-img compare` must find them
//! identical to a byte model of what was written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Compat, Config, CreateOptions, ErrorKind, ExtentKind, Image, Preallocation};
use support::{assert_clean, assert_matches_model, qemu, qemu_check, qemu_create, qemu_io, qemu_to_raw, run_ok, Rng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const PIB: u64 = 1 << 50;

/// Every cluster size qcow2 allows.
const CLUSTER_SIZES: [u64; 13] =
    [512, KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB];

/// Every refcount width qcow2 allows.
const REFCOUNT_WIDTHS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

// ---------------------------------------------------------------------------------------------------------------
// Our engine
// ---------------------------------------------------------------------------------------------------------------

fn open_ours_read_only(path: &Path) -> Image<FileDevice> {
    let dev = FileDevice::open(path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() })
        .unwrap_or_else(|e| panic!("FileDevice::open({}) read-only: {e}", path.display()));
    Image::open(dev, Config::read_only()).unwrap_or_else(|e| panic!("Image::open({}) read-only: {e}", path.display()))
}

fn open_ours_read_write(path: &Path) -> Image<FileDevice> {
    let dev = FileDevice::open(path, &FileOptions::default())
        .unwrap_or_else(|e| panic!("FileDevice::open({}) read-write: {e}", path.display()));
    Image::open(dev, Config::default()).unwrap_or_else(|e| panic!("Image::open({}) read-write: {e}", path.display()))
}

fn create_ours(path: &Path, opts: &CreateOptions) -> Image<FileDevice> {
    let dev = FileDevice::create(path, &FileOptions::default())
        .unwrap_or_else(|e| panic!("FileDevice::create({}): {e}", path.display()));
    Image::create(dev, opts, Config::default())
        .unwrap_or_else(|e| panic!("Image::create({}, {opts:?}): {e}", path.display()))
}

fn read_range(img: &Image<FileDevice>, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    img.read_at(offset, &mut buf).unwrap_or_else(|e| panic!("read_at({offset:#x}, {len:#x}): {e}"));
    buf
}

/// The whole guest disk, read in 4 MiB requests.
fn read_all(img: &Image<FileDevice>) -> Vec<u8> {
    let size = img.virtual_size().next_multiple_of(512);
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut((4 * MIB) as usize).enumerate() {
        let offset = i as u64 * 4 * MIB;
        img.read_at(offset, chunk).unwrap_or_else(|e| panic!("read_at({offset:#x}, {:#x}): {e}", chunk.len()));
    }
    out
}

fn write_ours(img: &Image<FileDevice>, model: &mut [u8], offset: u64, buf: &[u8]) {
    img.write_at(offset, buf).unwrap_or_else(|e| panic!("write_at({offset:#x}, {:#x}): {e}", buf.len()));
    model[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
}

/// A recognisable, position-dependent fill, so that data landing in the wrong place shows.
fn fill(tag: u64, len: u64) -> Vec<u8> {
    (0..len).map(|j| (tag.wrapping_add((j >> 9).wrapping_mul(0x9d)) ^ (j.wrapping_mul(7) % 251)) as u8).collect()
}

/// Writes at the places that matter whatever the geometry: the first sector, a partial cluster, a run across a
/// cluster boundary, and the last sector.
fn fixed_writes(img: &Image<FileDevice>, model: &mut [u8], cs: u64) {
    let size = model.len() as u64;
    let mut at = |offset: u64, len: u64, tag: u64| {
        if offset < size {
            let len = len.min(size - offset);
            write_ours(img, model, offset, &fill(tag, len));
        }
    };
    at(0, 512, 1);
    at(cs + 512, 1024.min(cs - 512).max(512), 2);
    at(3 * cs - 1024, 2048, 3);
    at(size - 512, 512, 4);
}

/// `count` writes of random length (up to `max_len`) at random sector offsets; about a third of them land on
/// or next to an earlier write, so that clusters are overwritten in place and partially.
fn random_writes(img: &Image<FileDevice>, model: &mut [u8], rng: &mut Rng, count: usize, max_len: u64) {
    let sectors = model.len() as u64 / 512;
    assert!(sectors > 0);
    let mut earlier: Vec<u64> = Vec::new();
    for _ in 0..count {
        let len_sectors = if rng.below(2) == 0 { 1 + rng.below(8) } else { 1 + rng.below(max_len / 512) };
        let start = if !earlier.is_empty() && rng.below(3) == 0 {
            let base = earlier[rng.below(earlier.len() as u64) as usize];
            (base + rng.below(16)).saturating_sub(8).min(sectors - 1)
        } else {
            rng.below(sectors)
        };
        let len_sectors = len_sectors.min(sectors - start);
        earlier.push(start);
        let buf = fill(rng.next() | 1, len_sectors * 512);
        write_ours(img, model, start * 512, &buf);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------------------------------------

fn qemu_info(path: &Path) -> serde_json::Value {
    let out = run_ok(qemu("qemu-img").args(["info", "--output=json", "-f", "qcow2"]).arg(path));
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

fn qemu_virtual_size(path: &Path) -> u64 {
    qemu_info(path)["virtual-size"].as_u64().expect("virtual-size in qemu-img info")
}

/// Checks that `qemu-img info` sees what our image was created with.
fn assert_qemu_info_agrees(path: &Path, opts: &CreateOptions, virtual_size: u64) {
    let info = qemu_info(path);
    let data = &info["format-specific"]["data"];
    assert_eq!(info["virtual-size"].as_u64(), Some(virtual_size), "virtual-size: {info:#}");
    assert_eq!(info["cluster-size"].as_u64(), Some(opts.cluster_size), "cluster-size: {info:#}");
    assert_eq!(data["refcount-bits"].as_u64(), Some(opts.refcount_bits), "refcount-bits: {info:#}");
    match opts.compat {
        Compat::V2 => assert_eq!(data["compat"].as_str(), Some("0.10"), "compat: {info:#}"),
        Compat::V3 => {
            assert_eq!(data["compat"].as_str(), Some("1.1"), "compat: {info:#}");
            assert_eq!(data["lazy-refcounts"].as_bool(), Some(opts.lazy_refcounts), "lazy-refcounts: {info:#}");
        }
    }
    assert!(!data["corrupt"].as_bool().unwrap_or(false), "corrupt: {info:#}");
}

/// What QEMU reads at `offset..offset + len`, through a raw window onto the qcow2 image (so that a petabyte
/// image needs no petabyte of output).
fn qemu_read_region(path: &Path, dir: &Path, offset: u64, len: u64) -> Vec<u8> {
    let out = dir.join("qemu-region.raw");
    let spec = format!("driver=raw,offset={offset},size={len},file.driver=qcow2,file.file.filename={}", path.display());
    run_ok(qemu("qemu-img").args(["convert", "--image-opts", &spec, "-O", "raw"]).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    assert_eq!(bytes.len() as u64, len, "qemu-img convert of the window {offset:#x}+{len:#x}");
    bytes
}

/// The incompatible-features field of the header, read straight from the file.
fn raw_incompatible_features(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_be_bytes(bytes[72..80].try_into().unwrap())
}

fn assert_same_bytes(what: &str, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    if let Some(first) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        let run_end = (first..ours.len()).find(|&j| ours[j] == expected[j]).unwrap_or(ours.len());
        let total = ours.iter().zip(expected).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: first difference at byte {first:#x} (got {:#04x}, expected {:#04x}); the first differing run is \
             {first:#x}..{run_end:#x}; {total} bytes differ in all",
            ours[first], expected[first]
        );
    }
}

/// One qemu-io command, with its effect on a byte model.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `write -P byte offset len`.
    Pattern(u8, u64, u64),
    /// `write -z offset len`.
    Zero(u64, u64),
    /// `discard offset len`; always whole clusters here (QEMU ignores the partial clusters of a discard).
    Discard(u64, u64),
}

impl Op {
    fn command(&self) -> String {
        match *self {
            Op::Pattern(p, o, l) => format!("write -P {p:#04x} {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }

    fn range(&self) -> (u64, u64) {
        match *self {
            Op::Pattern(_, o, l) | Op::Zero(o, l) | Op::Discard(o, l) => (o, l),
        }
    }

    fn byte(&self) -> u8 {
        match *self {
            Op::Pattern(p, ..) => p,
            Op::Zero(..) | Op::Discard(..) => 0,
        }
    }
}

/// What the ops leave at `offset..offset + len` of a fresh image.
fn expected_region(ops: &[Op], offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    for op in ops {
        let (o, l) = op.range();
        let lo = o.max(offset);
        let hi = (o + l).min(offset + len);
        if lo < hi {
            buf[(lo - offset) as usize..(hi - offset) as usize].fill(op.byte());
        }
    }
    buf
}

fn run_ops(path: &Path, ops: &[Op]) {
    let commands: Vec<String> = ops.iter().map(Op::command).collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(path, &refs);
}

/// A qemu-io script for an image of `size` bytes at cluster size `cs`: patterns at the start, across cluster
/// boundaries, inside one cluster at unaligned byte offsets, across the first two L2-table boundaries when the
/// image reaches them, and at the end; zero writes (aligned and not) and whole-cluster discards over data; and
/// overwrites.
fn pattern_ops(cs: u64, size: u64) -> Vec<Op> {
    assert!(size >= 15 * cs && size >= 64 * KIB, "pattern_ops needs room: size {size}, cluster {cs}");
    let l2_span = cs * (cs / 8);
    let mut ops = vec![
        Op::Pattern(0x11, 0, 3 * cs + 700),
        Op::Pattern(0x22, 5 * cs - cs / 4 - 300, cs / 2 + 600),
        Op::Pattern(0x33, 8 * cs + cs / 4 + 5, cs / 4),
        Op::Zero(cs, cs),
        Op::Zero(2 * cs + 100, cs / 2),
        Op::Pattern(0x77, 10 * cs, 4 * cs),
        Op::Discard(11 * cs, 2 * cs),
        Op::Pattern(0x88, 10 * cs + cs / 2, cs),
        Op::Pattern(0x99, (size / 2).saturating_sub(4096), 8195),
        Op::Pattern(0x66, size - 5000, 5000),
        Op::Zero(size - 3000, 1000),
    ];
    if l2_span + 3000 <= size {
        ops.push(Op::Pattern(0x44, l2_span - 3000, 6000));
        ops.push(Op::Zero(l2_span - 1000, 2000));
    }
    if 2 * l2_span + cs <= size {
        ops.push(Op::Pattern(0x55, 2 * l2_span - cs, 2 * cs));
        ops.push(Op::Discard(2 * l2_span, cs));
    }
    for op in &ops {
        let (o, l) = op.range();
        assert!(o + l <= size, "{op:?} runs past {size}");
        if let Op::Discard(..) = op {
            assert!(o % cs == 0 && l % cs == 0, "{op:?} is not whole clusters");
        }
    }
    ops
}

/// Our full read of a QEMU-made image equals `qemu-img convert -O raw`, byte for byte; when the test knows
/// what QEMU was asked to write, QEMU's own reading must match that model first. A read-only open must leave
/// the file untouched.
fn assert_reads_like_qemu(path: &Path, dir: &Path, ops: Option<&[Op]>) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let expected = qemu_to_raw(path, dir);
    if let Some(ops) = ops {
        let model = expected_region(ops, 0, expected.len() as u64);
        assert_same_bytes(
            &format!("{name}: qemu-img convert against the model of the qemu-io script"),
            &expected,
            &model,
        );
    }
    let file_before = std::fs::read(path).unwrap();
    let img = open_ours_read_only(path);
    assert_eq!(img.virtual_size(), expected.len() as u64, "{name}: our virtual size against qemu-img convert's length");
    let ours = read_all(&img);
    img.close().unwrap();
    assert_same_bytes(&format!("{name}: our read against qemu-img convert -O raw"), &ours, &expected);
    assert!(std::fs::read(path).unwrap() == file_before, "{name}: a read-only open changed the file");
}

/// For images too large to convert whole: around every op (widened by a cluster on both sides) and at each
/// probe, our read equals QEMU's read of the same window, and both equal the model.
fn assert_regions_read_like_qemu(path: &Path, dir: &Path, ops: &[Op], cs: u64, probes: &[u64]) {
    let img = open_ours_read_only(path);
    let size = img.virtual_size();
    assert_eq!(size, qemu_virtual_size(path), "our virtual size against qemu-img info");
    let mut regions: Vec<(u64, u64)> = ops
        .iter()
        .map(|op| {
            let (o, l) = op.range();
            let start = o.saturating_sub(cs) / 512 * 512;
            let end = (o + l + cs).next_multiple_of(512).min(size);
            (start, end)
        })
        .collect();
    for &p in probes {
        regions.push((p, (p + 64 * KIB).min(size)));
    }
    regions.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in regions {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    for (s, e) in merged {
        let what = format!("{}: window {s:#x}..{e:#x}", path.display());
        let theirs = qemu_read_region(path, dir, s, e - s);
        let model = expected_region(ops, s, e - s);
        assert_same_bytes(&format!("{what}: QEMU against the model of the qemu-io script"), &theirs, &model);
        let ours = read_range(&img, s, e - s);
        assert_same_bytes(&format!("{what}: our read against QEMU's"), &ours, &theirs);
    }
    img.close().unwrap();
}

/// The size used for a cluster size in the full-read matrix: big enough to cross L2-table boundaries where a
/// table maps little, small enough to compare whole.
fn matrix_size(cs: u64) -> u64 {
    let l2_span = cs * (cs / 8);
    (3 * l2_span).clamp(2 * MIB, 48 * MIB).max(20 * cs) + 1536
}

// ---------------------------------------------------------------------------------------------------------------
// QEMU writes, we read
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn qemu_written_images_read_identically_at_every_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTER_SIZES {
        let size = matrix_size(cs);
        let path = dir.path().join(format!("cs{cs}.qcow2"));
        qemu_create(&path, &format!("cluster_size={cs}"), &size.to_string());
        let ops = pattern_ops(cs, size);
        run_ops(&path, &ops);
        assert_reads_like_qemu(&path, dir.path(), Some(&ops));
    }
}

#[test]
fn qemu_written_l2_table_boundaries_read_identically_at_large_cluster_sizes() {
    // From 32 KiB up an L2 table maps 128 MiB to 512 GiB: too much to convert whole, so compare windows.
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTER_SIZES.into_iter().filter(|&cs| cs >= 32 * KIB) {
        let l2_span = cs * (cs / 8);
        let size = 2 * l2_span + 4 * cs + 1536;
        let path = dir.path().join(format!("l2-cs{cs}.qcow2"));
        qemu_create(&path, &format!("cluster_size={cs}"), &size.to_string());
        let ops = pattern_ops(cs, size);
        run_ops(&path, &ops);
        let probes = [l2_span / 2, l2_span + l2_span / 2, size - 64 * KIB];
        assert_regions_read_like_qemu(&path, dir.path(), &ops, cs, &probes);
    }
}

#[test]
fn qemu_written_images_read_identically_at_every_refcount_width() {
    let dir = tempfile::tempdir().unwrap();
    for bits in REFCOUNT_WIDTHS {
        for cs in [512, 64 * KIB] {
            let size = (2 * MIB).max(20 * cs) + 1536;
            let path = dir.path().join(format!("rc{bits}-cs{cs}.qcow2"));
            qemu_create(&path, &format!("cluster_size={cs},refcount_bits={bits}"), &size.to_string());
            let ops = pattern_ops(cs, size);
            run_ops(&path, &ops);
            assert_reads_like_qemu(&path, dir.path(), Some(&ops));
        }
    }
}

#[test]
fn qemu_written_v2_and_v3_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        for cs in [512, 4 * KIB, 64 * KIB] {
            let size = matrix_size(cs);
            let path = dir.path().join(format!("compat{compat}-cs{cs}.qcow2"));
            qemu_create(&path, &format!("compat={compat},cluster_size={cs}"), &size.to_string());
            let ops = pattern_ops(cs, size);
            run_ops(&path, &ops);
            assert_reads_like_qemu(&path, dir.path(), Some(&ops));
        }
    }
}

#[test]
fn qemu_written_lazy_refcount_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [512, 64 * KIB] {
        let size = matrix_size(cs);
        let path = dir.path().join(format!("lazy-cs{cs}.qcow2"));
        qemu_create(&path, &format!("lazy_refcounts=on,cluster_size={cs}"), &size.to_string());
        let ops = pattern_ops(cs, size);
        run_ops(&path, &ops);
        assert_reads_like_qemu(&path, dir.path(), Some(&ops));
    }
}

#[test]
fn qemu_preallocated_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for prealloc in ["metadata", "falloc", "full"] {
        for (compat, cs) in [("1.1", 512), ("1.1", 64 * KIB), ("0.10", 64 * KIB)] {
            let size = (2 * MIB).max(20 * cs) + 1536;
            let path = dir.path().join(format!("prealloc-{prealloc}-{compat}-cs{cs}.qcow2"));
            qemu_create(
                &path,
                &format!("preallocation={prealloc},compat={compat},cluster_size={cs}"),
                &size.to_string(),
            );
            // Untouched, a preallocated image reads as zeros.
            assert_reads_like_qemu(&path, dir.path(), Some(&[]));
            let ops = pattern_ops(cs, size);
            run_ops(&path, &ops);
            assert_reads_like_qemu(&path, dir.path(), Some(&ops));
        }
    }
}

#[test]
fn qemu_zero_clusters_and_discards_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for (compat, cs) in [("1.1", 64 * KIB), ("1.1", 512), ("0.10", 64 * KIB)] {
        let size = 4 * MIB;
        let path = dir.path().join(format!("zero-{compat}-cs{cs}.qcow2"));
        qemu_create(&path, &format!("compat={compat},cluster_size={cs}"), &size.to_string());
        let ops = [
            Op::Pattern(0x5a, 0, size),
            // Whole clusters with and without their allocation kept, and partial clusters around them.
            Op::Zero(4 * cs, 8 * cs),
            Op::Zero(20 * cs + 512, 3 * cs),
            Op::Zero(MIB + 100, 5000),
            Op::Discard(40 * cs, 4 * cs),
            Op::Discard(size - 2 * cs, 2 * cs),
            Op::Pattern(0x6b, 41 * cs, 512),
        ];
        let mut commands: Vec<String> = ops.iter().map(Op::command).collect();
        // `-u` lets QEMU drop the allocation (on v3); reads must not care.
        commands.push(format!("write -z -u {} {}", 2 * MIB, 4 * cs));
        let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&path, &refs);
        let mut all = ops.to_vec();
        all.push(Op::Zero(2 * MIB, 4 * cs));
        assert_reads_like_qemu(&path, dir.path(), Some(&all));
    }
}

#[test]
fn qemu_written_images_of_size_0_and_1000001_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.qcow2");
    qemu_create(&empty, "", "0");
    let img = open_ours_read_only(&empty);
    assert_eq!(img.virtual_size(), 0);
    assert_eq!(img.virtual_size(), qemu_virtual_size(&empty));
    img.close().unwrap();
    assert_reads_like_qemu(&empty, dir.path(), Some(&[]));

    for cs in [512, 64 * KIB] {
        let path = dir.path().join(format!("odd-cs{cs}.qcow2"));
        qemu_create(&path, &format!("cluster_size={cs}"), "1000001");
        let qemu_size = qemu_virtual_size(&path);
        assert_eq!(qemu_size, 1000448, "qemu-img rounds 1000001 up to whole sectors");
        let mut ops = pattern_ops(cs, qemu_size);
        // The very last bytes QEMU exposes, past the requested 1000001.
        ops.push(Op::Pattern(0xee, 1000001 - 1, 448));
        run_ops(&path, &ops);
        assert_reads_like_qemu(&path, dir.path(), Some(&ops));
    }
}

#[test]
fn qemu_written_one_pebibyte_images_read_identically_where_written() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [64 * KIB, 2 * MIB] {
        let path = dir.path().join(format!("huge-cs{cs}.qcow2"));
        qemu_create(&path, &format!("cluster_size={cs}"), "1P");
        let ops = [
            Op::Pattern(0x11, 0, 3 * cs + 100),
            Op::Discard(cs, cs),
            // 512 GiB is an L2-table boundary at both cluster sizes; 4 TiB is an L1-cluster boundary at 64 KiB.
            Op::Pattern(0x22, 512 * GIB - 3000, 6000),
            Op::Pattern(0x33, 512 * GIB + cs + 7, 1000),
            Op::Pattern(0x44, 4 * TIB - 512, 1024),
            Op::Pattern(0x55, PIB - 70000, 70000),
            Op::Zero(PIB - 40000, 4096),
            Op::Pattern(0x66, PIB - 512, 512),
        ];
        run_ops(&path, &ops);
        let probes = [GIB, TIB, 100 * TIB, 512 * TIB, PIB - GIB];
        // Opening must not scan the 16 MiB L1 table, let alone the disk; reads go straight to what they need.
        let img = open_ours_read_only(&path);
        assert_eq!(img.virtual_size(), PIB);
        let mut head = vec![0u8; 512];
        img.read_at(0, &mut head).unwrap();
        assert_eq!(head, vec![0x11; 512]);
        img.close().unwrap();
        assert_regions_read_like_qemu(&path, dir.path(), &ops, cs, &probes);
    }
}

/// Our `map()` against `qemu-img map --output=json`: where QEMU says data, we say data at the same host offset;
/// where QEMU says no data, we say the range reads as zeros.
fn assert_map_agrees_with_qemu(path: &Path) {
    let out = run_ok(qemu("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(path));
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("qemu-img map prints JSON");
    let img = open_ours_read_only(path);
    for e in &entries {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let extents = img.map(start, length).unwrap_or_else(|err| panic!("map({start:#x}, {length:#x}): {err}"));
        assert_eq!(
            extents.iter().map(|x| x.len).sum::<u64>(),
            length,
            "our map of {start:#x}+{length:#x}: {extents:?}"
        );
        assert_eq!(extents.first().map(|x| x.guest.0), Some(start), "our map of {start:#x}+{length:#x}: {extents:?}");
        if data {
            let mut host = e["offset"].as_u64();
            for x in &extents {
                let ExtentKind::Data { host: ours } = x.kind else {
                    panic!("{}: QEMU maps {e} as data, we map {x:?}", path.display());
                };
                if let Some(h) = host {
                    assert_eq!(ours.0, h, "{}: host offset of {x:?}; QEMU: {e}", path.display());
                    host = Some(h + x.len);
                }
            }
        } else {
            for x in &extents {
                assert!(x.kind.reads_zero(), "{}: QEMU maps {e} as zeros without data, we map {x:?}", path.display());
            }
        }
    }
    img.close().unwrap();
}

#[test]
fn our_map_agrees_with_qemu_img_map_on_qemu_written_images() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, cs) in [
        ("cluster_size=65536", 64 * KIB),
        ("cluster_size=512", 512),
        ("compat=0.10,cluster_size=4096", 4 * KIB),
        ("preallocation=metadata,cluster_size=65536", 64 * KIB),
        ("preallocation=falloc,cluster_size=4096", 4 * KIB),
    ] {
        let size = matrix_size(cs).min(8 * MIB + 1536);
        let path = dir.path().join(format!("map-{}.qcow2", opts.replace([',', '='], "-")));
        qemu_create(&path, opts, &size.to_string());
        run_ops(&path, &pattern_ops(cs, size));
        assert_map_agrees_with_qemu(&path);
    }
}

/// A lazy-refcounts image whose writer was killed is dirty: its refcounts are stale. It must read like QEMU
/// reads it when opened read-only (without being modified), and a read-write open must repair it so that
/// `qemu-img check` is clean, with the data unchanged and new writes safe.
fn dirty_image_case(dir: &Path, name: &str, opts: &str, commands: &[&str], seed: u64) {
    let path = dir.join(name);
    qemu_create(&path, opts, "4M");
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands.iter().copied().chain(["sigraise 9"]) {
        cmd.args(["-c", c]);
    }
    // qemu-io dies by SIGKILL: its exit status is expected to be a failure.
    let _ = cmd.arg(&path).output().expect("qemu-io starts");
    assert!(raw_incompatible_features(&path) & 1 != 0, "{name}: the killed qemu-io should leave the dirty bit set");
    assert!(qemu_check(&path).code != 0, "{name}: qemu-img check should see the stale refcounts of the dirty image");

    let expected = qemu_to_raw(&path, dir);
    assert!(expected.iter().any(|&b| b != 0), "{name}: QEMU reads none of the killed writer's data");
    let file_before = std::fs::read(&path).unwrap();
    let img = open_ours_read_only(&path);
    assert!(img.info().dirty, "{name}: our info() should report the dirty bit");
    let ours = read_all(&img);
    img.close().unwrap();
    assert_same_bytes(&format!("{name}: read-only read of the dirty image against qemu-img convert"), &ours, &expected);
    assert!(std::fs::read(&path).unwrap() == file_before, "{name}: a read-only open changed the dirty image");

    let img = open_ours_read_write(&path);
    let ours = read_all(&img);
    assert_same_bytes(&format!("{name}: read after the read-write open (refcount rebuild)"), &ours, &expected);
    img.close().unwrap();
    assert_clean(&path);
    assert!(raw_incompatible_features(&path) & 1 == 0, "{name}: the dirty bit is still set after our close");
    assert_same_bytes(&format!("{name}: qemu-img convert after our repair"), &qemu_to_raw(&path, dir), &expected);

    // The rebuilt refcounts must be right enough for new allocations not to collide with old data.
    let img = open_ours_read_write(&path);
    let mut model = expected;
    random_writes(&img, &mut model, &mut Rng(seed), 40, 96 * KIB);
    img.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

#[test]
fn dirty_lazy_refcount_image_from_a_killed_qemu_io_reads_like_qemu_and_repairs_clean() {
    let dir = tempfile::tempdir().unwrap();
    dirty_image_case(dir.path(), "dirty-64k.qcow2", "lazy_refcounts=on", &["write -P 0x11 0 128k"], 0x5eed_0001);
    dirty_image_case(
        dir.path(),
        "dirty-512.qcow2",
        "lazy_refcounts=on,cluster_size=512",
        &["write -P 0x11 0 128k", "write -P 0x22 1M 40k", "write -z 8k 4k", "write -P 0x33 3000 700"],
        0x5eed_0002,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// We write, QEMU judges
// ---------------------------------------------------------------------------------------------------------------

/// Creates an image with our engine, writes the fixed and `writes` random writes, reads everything back, closes
/// it, and has QEMU judge it: `qemu-img check` clean, `qemu-img compare` identical to the model, `qemu-img info`
/// in agreement. Finally our own read-only open reads the model back.
fn our_writes_case(dir: &Path, name: &str, opts: &CreateOptions, seed: u64, writes: usize, max_len: u64) {
    let path = dir.join(name);
    let img = create_ours(&path, opts);
    let size = img.virtual_size();
    assert_eq!(size, opts.size.next_multiple_of(512), "{name}: virtual size after create");
    let mut model = vec![0u8; size as usize];
    if size > 0 {
        fixed_writes(&img, &mut model, opts.cluster_size);
        random_writes(&img, &mut model, &mut Rng(seed), writes, max_len);
    }
    assert_same_bytes(&format!("{name}: our read-back before close"), &read_all(&img), &model);
    img.flush().unwrap_or_else(|e| panic!("{name}: flush: {e}"));
    img.close().unwrap_or_else(|e| panic!("{name}: close: {e}"));
    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_qemu_info_agrees(&path, opts, size);
    let img = open_ours_read_only(&path);
    assert_same_bytes(&format!("{name}: our read-back after reopening"), &read_all(&img), &model);
    img.close().unwrap();
}

fn options(size: u64, cs: u64) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cs;
    o
}

#[test]
fn our_images_pass_qemu_check_and_compare_at_every_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    for (i, cs) in CLUSTER_SIZES.into_iter().enumerate() {
        let size = (4 * MIB).max(16 * cs) + 1536;
        let max_len = (3 * cs).clamp(16 * KIB, MIB);
        our_writes_case(dir.path(), &format!("ours-cs{cs}.qcow2"), &options(size, cs), 0x1000 + i as u64, 40, max_len);
    }
}

#[test]
fn our_images_pass_qemu_check_and_compare_at_every_refcount_width() {
    // At 512-byte clusters a 64-bit refcount block covers only 32 KiB and the first refcount table 2 MiB, so the
    // refcount structures must grow many times; at 1 bit the counts are packed eight to a byte.
    let dir = tempfile::tempdir().unwrap();
    for (i, bits) in REFCOUNT_WIDTHS.into_iter().enumerate() {
        for (cs, size, writes, max_len) in [(512, 8 * MIB, 60, 256 * KIB), (64 * KIB, 16 * MIB, 40, 512 * KIB)] {
            let mut opts = options(size + 1536, cs);
            opts.refcount_bits = bits;
            our_writes_case(
                dir.path(),
                &format!("ours-rc{bits}-cs{cs}.qcow2"),
                &opts,
                0x2000 + i as u64,
                writes,
                max_len,
            );
        }
    }
}

#[test]
fn our_v2_v3_lazy_and_preallocated_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (Compat::V2, false, Preallocation::Off),
        (Compat::V2, false, Preallocation::Metadata),
        (Compat::V3, false, Preallocation::Off),
        (Compat::V3, false, Preallocation::Metadata),
        (Compat::V3, true, Preallocation::Off),
        (Compat::V3, true, Preallocation::Metadata),
    ];
    for (i, (compat, lazy, prealloc)) in cases.into_iter().enumerate() {
        for cs in [512, 64 * KIB] {
            let mut opts = options(8 * MIB + 1536, cs);
            opts.compat = compat;
            opts.lazy_refcounts = lazy;
            opts.preallocation = prealloc;
            let name = format!("ours-{compat:?}-lazy{lazy}-{prealloc:?}-cs{cs}.qcow2");
            our_writes_case(dir.path(), &name, &opts, 0x3000 + i as u64, 40, 256 * KIB);
        }
    }
}

#[test]
fn our_options_from_a_dash_o_list_make_images_qemu_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = CreateOptions::new(3 * MIB);
    opts.apply("cluster_size=4k,refcount_bits=4,compat=1.1,lazy_refcounts=on").unwrap();
    our_writes_case(dir.path(), "ours-apply-lazy.qcow2", &opts, 0x4001, 30, 64 * KIB);
    let mut opts = CreateOptions::new(3 * MIB);
    opts.apply("cluster_size=1k,compat=0.10,preallocation=metadata").unwrap();
    our_writes_case(dir.path(), "ours-apply-v2.qcow2", &opts, 0x4002, 30, 64 * KIB);
}

#[test]
fn our_images_of_size_0_and_1000001_match_qemu_img_info() {
    let dir = tempfile::tempdir().unwrap();
    // Size 0: a valid image QEMU agrees is empty, which can then grow.
    let path = dir.path().join("ours-empty.qcow2");
    let img = create_ours(&path, &CreateOptions::new(0));
    assert_eq!(img.virtual_size(), 0);
    img.close().unwrap();
    assert_clean(&path);
    assert_eq!(qemu_virtual_size(&path), 0);
    let img = open_ours_read_write(&path);
    assert_eq!(img.virtual_size(), 0);
    img.resize(MIB, false).unwrap();
    let mut model = vec![0u8; MIB as usize];
    fixed_writes(&img, &mut model, 64 * KIB);
    random_writes(&img, &mut model, &mut Rng(0x5001), 20, 64 * KIB);
    img.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_eq!(qemu_virtual_size(&path), MIB);

    // Size 1000001: rounded up to whole sectors, as qemu-img does (1000448).
    for (i, cs) in [512, 64 * KIB].into_iter().enumerate() {
        let name = format!("ours-odd-cs{cs}.qcow2");
        let path = dir.path().join(&name);
        let opts = options(1000001, cs);
        let img = create_ours(&path, &opts);
        assert_eq!(img.virtual_size(), 1000448, "{name}: virtual size");
        img.close().unwrap();
        assert_eq!(qemu_virtual_size(&path), 1000448, "{name}: qemu-img info virtual-size");
        our_writes_case(dir.path(), &name, &opts, 0x5002 + i as u64, 30, 64 * KIB);
    }
}

/// QEMU's qcow2 driver refuses a new size that is not a multiple of 512 ("The new size must be a multiple of
/// 512"); so does the library, growing or shrinking, and the image QEMU wrote is left as it was.
#[test]
fn resizing_to_a_size_that_is_not_a_multiple_of_512_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.qcow2");
    qemu_create(&path, "", "4M");
    qemu_io(&path, &["write -P 0x51 0 64k", "write -P 0x52 4032k 64k"]);
    let raw = qemu_to_raw(&path, dir.path());
    let file = std::fs::read(&path).unwrap();
    let out = qemu("qemu-img").args(["resize", "--shrink"]).arg(&path).arg("1000001").output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("multiple of 512"), "qemu-img resize to 1000001 bytes: {said}");
    assert_eq!(std::fs::read(&path).unwrap(), file, "qemu-img's refused resize changed the file");
    let img = open_ours_read_write(&path);
    for (size, shrink) in [(2000001, false), (4 * MIB + 1, false), (MIB + 511, true), (4 * MIB - 1, true)] {
        let e = img.resize(size, shrink).expect_err(&format!("resize to {size} bytes was taken"));
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "resize to {size}: {e}");
        assert_eq!(img.virtual_size(), 4 * MIB, "resize to {size}");
    }
    img.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), file, "a refused resize changed the file");
    assert_clean(&path);
    assert_eq!(qemu_virtual_size(&path), 4 * MIB);
    assert_eq!(qemu_to_raw(&path, dir.path()), raw);
}

#[test]
fn growing_across_an_l1_cluster_boundary_keeps_data_and_passes_qemu_check() {
    // 512-byte clusters: an L2 table maps 32 KiB and one L1 cluster (64 entries) 2 MiB. From 1 MiB to 64 MiB the
    // L1 table grows from one cluster to 32 and must move.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let img = create_ours(&path, &options(MIB, 512));
    let mut model = vec![0u8; MIB as usize];
    let mut rng = Rng(0x6001);
    fixed_writes(&img, &mut model, 512);
    random_writes(&img, &mut model, &mut rng, 30, 64 * KIB);

    // A grow that needs no new L1 cluster.
    img.resize(MIB + 1536, false).unwrap();
    assert_eq!(img.virtual_size(), MIB + 1536);
    model.resize((MIB + 1536) as usize, 0);
    write_ours(&img, &mut model, MIB + 1024, &fill(0x77, 512));

    img.resize(64 * MIB, false).unwrap();
    assert_eq!(img.virtual_size(), 64 * MIB);
    model.resize((64 * MIB) as usize, 0);
    assert_same_bytes("after growing to 64 MiB, before new writes", &read_all(&img), &model);

    // Data after: at the old end, across the first L1-cluster boundary (2 MiB), far out, and at the new end.
    write_ours(&img, &mut model, MIB + 1536, &fill(0x78, 4096));
    write_ours(&img, &mut model, 2 * MIB - 1024, &fill(0x79, 2048));
    write_ours(&img, &mut model, 33 * MIB + 512, &fill(0x7a, 40 * KIB));
    write_ours(&img, &mut model, 64 * MIB - 512, &fill(0x7b, 512));
    random_writes(&img, &mut model, &mut rng, 40, 128 * KIB);
    assert_same_bytes("after writes past the old end", &read_all(&img), &model);
    img.flush().unwrap();
    img.close().unwrap();

    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_eq!(qemu_virtual_size(&path), 64 * MIB);
    let img = open_ours_read_only(&path);
    assert_eq!(img.virtual_size(), 64 * MIB);
    assert_same_bytes("reopened after growing", &read_all(&img), &model);
    img.close().unwrap();
}

#[test]
fn growing_an_image_with_64k_clusters_keeps_data_and_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow64k.qcow2");
    let img = create_ours(&path, &options(3 * MIB + 512, 64 * KIB));
    let mut model = vec![0u8; (3 * MIB + 512) as usize];
    let mut rng = Rng(0x6002);
    fixed_writes(&img, &mut model, 64 * KIB);
    random_writes(&img, &mut model, &mut rng, 20, 256 * KIB);
    img.resize(40 * MIB, false).unwrap();
    model.resize((40 * MIB) as usize, 0);
    random_writes(&img, &mut model, &mut rng, 30, 512 * KIB);
    img.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_eq!(qemu_virtual_size(&path), 40 * MIB);
}

fn shrink_then_grow_case(dir: &Path, cs: u64, shrink_to: u64, seed: u64) {
    let name = format!("shrink-cs{cs}-to{shrink_to}.qcow2");
    let path = dir.join(&name);
    let full = 8 * MIB;
    let img = create_ours(&path, &options(full, cs));
    let mut model = vec![0u8; full as usize];
    let mut rng = Rng(seed);
    // Data everywhere, and in particular on both sides of the new end.
    write_ours(&img, &mut model, 0, &fill(0x81, 256 * KIB));
    write_ours(&img, &mut model, shrink_to - 64 * KIB, &fill(0x82, 192 * KIB));
    write_ours(&img, &mut model, full - 512 * KIB, &fill(0x83, 512 * KIB));
    random_writes(&img, &mut model, &mut rng, 40, 256 * KIB);

    assert!(img.resize(shrink_to, false).is_err(), "{name}: a shrink that loses data needs allow_shrink");
    assert_eq!(img.virtual_size(), full, "{name}: a refused shrink changed the size");
    img.resize(shrink_to, true).unwrap_or_else(|e| panic!("{name}: shrink: {e}"));
    assert_eq!(img.virtual_size(), shrink_to);
    model.truncate(shrink_to as usize);
    assert_same_bytes(&format!("{name}: after shrinking"), &read_all(&img), &model);
    img.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_eq!(qemu_virtual_size(&path), shrink_to, "{name}: qemu-img info after shrinking");

    let img = open_ours_read_write(&path);
    assert_eq!(img.virtual_size(), shrink_to);
    img.resize(full, false).unwrap_or_else(|e| panic!("{name}: grow after shrink: {e}"));
    model.resize(full as usize, 0);
    let past = read_range(&img, shrink_to, full - shrink_to);
    if let Some(at) = past.iter().position(|&b| b != 0) {
        panic!(
            "{name}: after shrinking to {shrink_to:#x} and growing again, byte {:#x} reads {:#04x}, not zero",
            shrink_to + at as u64,
            past[at]
        );
    }
    random_writes(&img, &mut model, &mut rng, 20, 128 * KIB);
    img.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    assert_eq!(qemu_virtual_size(&path), full, "{name}: qemu-img info after growing again");
}

#[test]
fn shrinking_drops_data_past_the_end_and_growing_again_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    shrink_then_grow_case(dir.path(), 64 * KIB, 3 * MIB, 0x7001);
    shrink_then_grow_case(dir.path(), 512, 3 * MIB, 0x7002);
}

#[test]
fn shrinking_inside_a_cluster_then_growing_reads_zeros_past_the_old_end() {
    // The new end falls inside a cluster that stays allocated: its tail must not reappear after growing.
    let dir = tempfile::tempdir().unwrap();
    shrink_then_grow_case(dir.path(), 64 * KIB, 3 * MIB + 1536, 0x7003);
    shrink_then_grow_case(dir.path(), 4 * KIB, 3 * MIB + 2560, 0x7004);
}

#[test]
fn our_writes_are_read_back_by_qemu_io_patterns() {
    // The other direction of the pattern scripts: our engine writes uniform patterns, qemu-io verifies them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours-patterns.qcow2");
    let cs = 4 * KIB;
    let size = 4 * MIB;
    let img = create_ours(&path, &options(size, cs));
    let regions =
        [(0x21u8, 0u64, 512u64), (0x22, cs - 512, 1024), (0x23, 256 * KIB - 512, 8 * KIB), (0x24, size - 512, 512)];
    for &(p, o, l) in &regions {
        img.write_at(o, &vec![p; l as usize]).unwrap();
    }
    img.close().unwrap();
    assert_clean(&path);
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2", "-r"]);
    for &(p, o, l) in &regions {
        cmd.args(["-c", &format!("read -P {p:#04x} {o} {l}")]);
    }
    cmd.args(["-c", &format!("read -P 0 {} {}", 512, cs - 1024)]);
    let out = cmd.arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("Pattern verification failed"), "qemu-io: {text}");
}

/// Geometries where one refcount block describes few clusters: (cluster size, refcount bits) and so the number
/// of clusters a block describes (cluster_size * 8 / bits).
const SMALL_REFCOUNT_BLOCKS: [(u64, u64); 4] = [(512, 64), (512, 16), (KIB, 64), (4 * KIB, 64)];

/// Single writes that need at least as many new clusters as one refcount block describes: exactly that many
/// from the start, twice that many plus three at an unaligned offset further on, and a write that overwrites
/// part of both. QEMU must find the image clean and identical to the model.
#[test]
#[ignore = "run in a child process, with a deadline, by a_write_needing_a_refcount_block_of_clusters_completes"]
fn refcount_block_sized_writes_child() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, bits) in SMALL_REFCOUNT_BLOCKS {
        let name = format!("big-writes-cs{cs}-rc{bits}.qcow2");
        let path = dir.path().join(&name);
        let size = 16 * MIB;
        let mut opts = options(size, cs);
        opts.refcount_bits = bits;
        let img = create_ours(&path, &opts);
        let block_clusters = cs * 8 / bits;
        let mut model = vec![0u8; size as usize];
        for (tag, offset, len) in [
            (1, 0, block_clusters * cs),
            (2, 4 * MIB + 512, (2 * block_clusters + 3) * cs),
            (3, (cs / 2).max(512), block_clusters * cs),
        ] {
            eprintln!(
                "{name}: one write_at of {len:#x} bytes at {offset:#x} ({block_clusters} clusters per refcount block)"
            );
            let buf = fill(tag, len);
            img.write_at(offset, &buf).unwrap_or_else(|e| panic!("{name}: write_at({offset:#x}, {len:#x}): {e}"));
            model[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
        }
        assert_same_bytes(&format!("{name}: read-back"), &read_all(&img), &model);
        img.close().unwrap();
        assert_clean(&path);
        assert_matches_model(&path, &model);
    }
}

#[test]
fn a_write_needing_a_refcount_block_of_clusters_completes() {
    // Run in a child process so that a write that never returns fails this test instead of hanging the suite.
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "refcount_block_sized_writes_child", "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the test binary starts again");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    let last = err.lines().rfind(|l| l.contains("one write_at")).unwrap_or("(no write started)");
    match status {
        None => panic!("a single write_at did not return within 30 s; the last one started was: {last}"),
        Some(s) => assert!(s.success() && out.contains("1 passed"), "child failed ({s}):\n{out}\n{err}"),
    }
}
