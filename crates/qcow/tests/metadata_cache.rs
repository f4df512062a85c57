//! The metadata cache under pressure, with QEMU on the other side: L2 tables are cached in 4 KiB slices, and a
//! cache far smaller than the slices a workload touches must still read what QEMU wrote and write what QEMU reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, Image};
use support::{assert_clean, qemu, qemu_create, qemu_io, run_ok};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Places spread so that each one falls in its own L2 slice (a 4 KiB slice maps 32 MiB at 64 KiB clusters, 8 MiB
/// with extended L2 entries, 1 GiB at 2 MiB clusters), and far more slices than the smallest cache holds.
fn places(size: u64, spacing: u64, count: u64) -> Vec<u64> {
    (0..count).map(|k| (k * spacing) % (size - MIB) / (64 * KIB) * (64 * KIB)).collect()
}

fn pattern(k: usize, generation: u8) -> u8 {
    (k % 120) as u8 + 1 + generation * 120
}

/// Reads `len` bytes at each place through QEMU and fails naming the first place whose pattern differs.
fn qemu_verifies(path: &Path, places: &[u64], len: u64, generation: u8) {
    let commands: Vec<String> =
        places.iter().enumerate().map(|(k, o)| format!("read -P {} {o} {len}", pattern(k, generation))).collect();
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in &commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed"),
        "QEMU read a wrong pattern from {}:\n{text}",
        path.display()
    );
    assert_eq!(text.matches("read ").count(), places.len(), "QEMU did not report every read:\n{text}");
}

fn exercise(opts: &str, size_gib: u64, spacing: u64, count: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.qcow2");
    let size = size_gib << 30;
    qemu_create(&path, opts, &format!("{size_gib}G"));
    let spots = places(size, spacing, count);
    let commands: Vec<String> =
        spots.iter().enumerate().map(|(k, o)| format!("write -P {} {o} 64k", pattern(k, 0))).collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&path, &refs);

    // Budget 0: the cache keeps its floor of eight clusters, far fewer slices than the places need.
    let config = Config { cache_size: 0, ..Config::default() };
    let dev = FileDevice::open(&path, &FileOptions::default()).unwrap();
    let img = Image::open(dev, config).unwrap();
    let mut buf = vec![0u8; 64 * KIB as usize];
    // Twice, the second time backwards, so that every slice is evicted and read again.
    for pass in 0..2 {
        let order: Vec<usize> = if pass == 0 { (0..spots.len()).collect() } else { (0..spots.len()).rev().collect() };
        for k in order {
            img.read_at(spots[k], &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == pattern(k, 0)), "{opts}: place {k} at {:#x} reads wrong", spots[k]);
        }
    }
    // Overwrite every place (in-place L2 entries already exist) and allocate the cluster after each one (a new
    // L2 entry in the same slice), in an order that scatters the dirty slices.
    for k in (0..spots.len()).step_by(2).chain((1..spots.len()).step_by(2)) {
        img.write_at(spots[k], &vec![pattern(k, 1); 64 * KIB as usize]).unwrap();
        img.write_at(spots[k] + 64 * KIB, &vec![pattern(k, 1); 64 * KIB as usize]).unwrap();
    }
    img.close().unwrap();

    assert_clean(&path);
    qemu_verifies(&path, &spots, 128 * KIB, 1);
}

#[test]
fn a_cache_far_smaller_than_the_slices_in_use_reads_and_writes_what_qemu_sees_64k_clusters() {
    // 300 places 211 MiB apart over 64 GiB: 300 distinct slices against a floor of 128.
    exercise("cluster_size=65536", 64, 211 * MIB, 300);
}

#[test]
fn a_cache_far_smaller_than_the_slices_in_use_reads_and_writes_what_qemu_sees_extended_l2() {
    // Slices of 256 extended entries map 8 MiB each: 300 places 37 MiB apart.
    exercise("cluster_size=65536,extended_l2=on", 16, 37 * MIB, 300);
}

#[test]
fn a_cache_far_smaller_than_the_slices_in_use_reads_and_writes_what_qemu_sees_2m_clusters() {
    // A 2 MiB cluster is one table of 512 slices of 1 GiB each; the floor (16 MiB) holds 4096 slices, so this
    // one checks whole-table operations on tables cut into many slices rather than eviction.
    exercise("cluster_size=2M", 512, 1031 * MIB, 200);
}
