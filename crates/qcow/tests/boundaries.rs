//! The boundary matrix: writes at and around every structural boundary of a huge image (a cluster, an L2
//! table's span, an L1 cluster's span), from both ends of the disk, each read back at once by our engine, then
//! judged by QEMU (`qemu-img check` clean, `qemu-io read -P` of every region) and read again after reopening.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, CreateOptions, Image};
use support::{assert_clean, qemu, run_ok};

const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;
const PIB: u64 = 1 << 50;

/// The writes of the matrix: offsets at each base, plus and minus each delta, measured from the start and from
/// the end of the disk, with each length clipped to the disk. Duplicates are dropped.
fn matrix(size: u64, cs: u64) -> Vec<(u64, u64)> {
    let l2_span = cs * (cs / 8);
    let l1_cluster_span = (cs / 8) * l2_span;
    let bases = [0, cs, l2_span, l1_cluster_span];
    let deltas: [i128; 7] = [0, -512, 512, -4096, 4096, -65536, 65536];
    let lens = [512, 4096, 65536];
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for base in bases {
        for delta in deltas {
            let p = i128::from(base) + delta;
            if p < 0 {
                continue;
            }
            let p = p as u64;
            for start in [Some(p), size.checked_sub(p)] {
                let Some(offset) = start else { continue };
                if offset >= size {
                    continue;
                }
                for len in lens {
                    let len = len.min(size - offset);
                    if seen.insert((offset, len)) {
                        out.push((offset, len));
                    }
                }
            }
        }
    }
    out
}

/// Maximal runs of sectors holding the same byte in the sparse model: (offset, length, byte).
fn runs(model: &BTreeMap<u64, u8>) -> Vec<(u64, u64, u8)> {
    let mut out: Vec<(u64, u64, u8)> = Vec::new();
    for (&sector, &byte) in model {
        match out.last_mut() {
            Some((o, l, b)) if *b == byte && *o + *l == sector * 512 => *l += 512,
            _ => out.push((sector * 512, 512, byte)),
        }
    }
    out
}

/// The unwritten sectors right before and after every run: they must still read as zeros.
fn guards(model: &BTreeMap<u64, u8>, size: u64) -> Vec<u64> {
    let mut out = BTreeSet::new();
    for &sector in model.keys() {
        if sector > 0 && !model.contains_key(&(sector - 1)) {
            out.insert((sector - 1) * 512);
        }
        if (sector + 1) * 512 < size && !model.contains_key(&(sector + 1)) {
            out.insert((sector + 1) * 512);
        }
    }
    out.into_iter().collect()
}

fn open_ours(path: &Path, read_only: bool) -> Image<FileDevice> {
    let dev = FileDevice::open(path, &FileOptions { read_only, direct: false, ..FileOptions::default() }).unwrap();
    let config = if read_only { Config::read_only() } else { Config::default() };
    Image::open(dev, config).unwrap_or_else(|e| panic!("Image::open({}): {e}", path.display()))
}

fn check_uniform(what: &str, buf: &[u8], offset: u64, byte: u8) {
    if let Some(at) = buf.iter().position(|&b| b != byte) {
        panic!("{what}: byte {:#x} reads {:#04x}, expected {byte:#04x}", offset + at as u64, buf[at]);
    }
}

/// Reads every run and guard with our engine and checks it against the model.
fn verify_ours(what: &str, img: &Image<FileDevice>, model: &BTreeMap<u64, u8>) {
    for (offset, len, byte) in runs(model) {
        let mut buf = vec![0u8; len as usize];
        img.read_at(offset, &mut buf).unwrap_or_else(|e| panic!("{what}: read_at({offset:#x}, {len:#x}): {e}"));
        check_uniform(what, &buf, offset, byte);
    }
    for offset in guards(model, img.virtual_size()) {
        let mut buf = vec![0u8; 512];
        img.read_at(offset, &mut buf).unwrap_or_else(|e| panic!("{what}: read_at({offset:#x}, 512): {e}"));
        check_uniform(&format!("{what} (unwritten neighbour)"), &buf, offset, 0);
    }
}

/// Has qemu-io verify every run and guard with `read -P`, many commands per invocation.
fn verify_with_qemu_io(path: &Path, model: &BTreeMap<u64, u8>, size: u64) {
    let mut commands: Vec<String> =
        runs(model).into_iter().map(|(o, l, b)| format!("read -P {b:#04x} {o} {l}")).collect();
    commands.extend(guards(model, size).into_iter().map(|o| format!("read -P 0 {o} 512")));
    for batch in commands.chunks(128) {
        let mut cmd = qemu("qemu-io");
        cmd.args(["-f", "qcow2", "-r"]);
        for c in batch {
            cmd.args(["-c", c]);
        }
        let out = cmd.arg(path).output().expect("qemu-io starts");
        let text = String::from_utf8_lossy(&out.stdout);
        let failures: Vec<&str> = text.lines().filter(|l| l.contains("Pattern verification failed")).collect();
        assert!(
            failures.is_empty() && out.status.success(),
            "qemu-io read -P disagrees with the model ({}): {failures:#?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn boundary_matrix_case(name: &str, size: u64, cluster_size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    let dev = FileDevice::create(&path, &FileOptions::default()).unwrap();
    let img = Image::create(dev, &opts, Config::default()).unwrap_or_else(|e| panic!("{name}: create: {e}"));
    assert_eq!(img.virtual_size(), size);

    let writes = matrix(size, cluster_size);
    let mut model: BTreeMap<u64, u8> = BTreeMap::new();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        // A distinct nonzero byte per write (the matrix has fewer than 255 writes).
        let byte = (i % 255 + 1) as u8;
        let buf = vec![byte; len as usize];
        img.write_at(offset, &buf).unwrap_or_else(|e| panic!("{name}: write_at({offset:#x}, {len:#x}): {e}"));
        let mut back = vec![0u8; len as usize];
        img.read_at(offset, &mut back).unwrap_or_else(|e| panic!("{name}: read_at({offset:#x}, {len:#x}): {e}"));
        check_uniform(&format!("{name}: read-back of write {i} at {offset:#x}+{len:#x}"), &back, offset, byte);
        for sector in offset / 512..(offset + len) / 512 {
            model.insert(sector, byte);
        }
    }
    verify_ours(&format!("{name}: before close"), &img, &model);
    img.flush().unwrap_or_else(|e| panic!("{name}: flush: {e}"));
    img.close().unwrap_or_else(|e| panic!("{name}: close: {e}"));

    assert_clean(&path);
    let info = run_ok(qemu("qemu-img").args(["info", "--output=json", "-f", "qcow2"]).arg(&path));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "qemu-img info: {info:#}");
    verify_with_qemu_io(&path, &model, size);

    let img = open_ours(&path, true);
    assert_eq!(img.virtual_size(), size);
    verify_ours(&format!("{name}: after reopening"), &img, &model);
    img.close().unwrap();
}

#[test]
fn boundary_matrix_on_a_pebibyte_image_reads_back_and_satisfies_qemu() {
    // 64 KiB clusters: an L2 table spans 512 MiB, an L1 cluster 8192 * 512 MiB = 4 TiB.
    boundary_matrix_case("pebibyte-64k.qcow2", PIB, 64 * KIB);
}

#[test]
fn boundary_matrix_with_512_byte_clusters_reads_back_and_satisfies_qemu() {
    // 512-byte clusters: an L2 table spans 32 KiB, an L1 cluster 64 * 32 KiB = 2 MiB; the disk is as large as
    // the 32 MiB L1 cap allows at this cluster size, halved.
    boundary_matrix_case("64g-512.qcow2", 64 * GIB, 512);
}

#[test]
fn boundary_matrix_with_2m_clusters_on_a_pebibyte_image_reads_back_and_satisfies_qemu() {
    // 2 MiB clusters: an L2 table spans 512 GiB; an L1 cluster spans more than the disk.
    boundary_matrix_case("pebibyte-2m.qcow2", PIB, 2 << 20);
}

#[test]
fn the_matrix_covers_both_ends_and_every_boundary() {
    let w = matrix(PIB, 64 * KIB);
    let offsets: BTreeSet<u64> = w.iter().map(|&(o, _)| o).collect();
    for expected in [0, 512, 64 * KIB - 512, 512 << 20, (4u64 << 40) + 65536, PIB - 512, PIB - (4u64 << 40) - 4096] {
        assert!(offsets.contains(&expected), "offset {expected:#x} missing from the matrix");
    }
    assert!(w.iter().all(|&(o, l)| o % 512 == 0 && l > 0 && o + l <= PIB));
    assert!(w.len() < 255, "patterns must stay distinct");
}
