//! `Image::compact` on images QEMU made: after discards, compaction moves the highest clusters into the lowest
//! holes and truncates the file; `qemu-img check` stays clean, `qemu-img compare` matches the model, snapshots
//! keep their contents, a cancelled compaction leaves a consistent image, and power loss at any write of a
//! compaction never corrupts the image or loses data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;
use std::sync::Arc;

use qcow::block::{BlockDevice, FaultyDevice, FileDevice, FileOptions, MemoryDevice};
use qcow::{Config, Image};
use support::{assert_clean, assert_matches_model, qemu, qemu_create, qemu_io, qemu_to_raw, run_ok, Rng};

fn config() -> Config {
    Config { discard: true, runtime_asserts: true, ..Config::default() }
}

fn open(path: &Path) -> Image<FileDevice> {
    Image::open(FileDevice::open(path, &FileOptions::default()).unwrap(), config()).unwrap()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn no_progress() -> impl FnMut(qcow::CompactProgress) -> bool {
    |_| true
}

#[test]
fn the_reference_scenario_keeps_both_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.qcow2");
    qemu_create(&path, "", "1G");
    let cs = 65536u64;
    qemu_io(&path, &[&format!("write -P 0x61 0 {}", 8 * cs), &format!("write -P 0x62 {} {}", 8193 * cs, 7 * cs)]);
    let mut model = qemu_to_raw(&path, dir.path());
    let image = open(&path);
    image.discard(0, 8 * cs / 512).unwrap();
    model[..(8 * cs) as usize].fill(0);
    let summary = image.compact(&mut no_progress()).unwrap();
    assert!(summary.clusters_copied > 0, "the high clusters moved down: {summary:?}");
    assert!(summary.new_size < summary.old_size, "the file shrank: {summary:?}");
    let mut back = vec![0u8; (7 * cs) as usize];
    image.read_at(8193 * cs, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x62), "clusters 8193-8199 kept their data");
    image.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "clusters 0-7 read zeros");
    image.close().unwrap();
    assert_eq!(file_len(&path), summary.new_size);
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

#[test]
fn discarding_everything_and_compacting_leaves_a_file_no_larger_than_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, n) in [("", 0u64), ("", 1), ("", 2), ("cluster_size=4096", 16384), ("cluster_size=16k", 16384)] {
        // A fresh image as qcow creates it (its last cluster whole), and as qemu-img does (the file ending inside
        // the L1 table's cluster; a block device's length is in sectors, so ours cannot end mid-sector).
        let fresh = dir.path().join("fresh.qcow2");
        let mut create = qcow::CreateOptions::new(4 << 30);
        if !opts.is_empty() {
            create.apply(opts).unwrap();
        }
        Image::create(FileDevice::create(&fresh, &FileOptions::default()).unwrap(), &create, Config::default())
            .unwrap()
            .close()
            .unwrap();
        let qemu_fresh = dir.path().join("qemu-fresh.qcow2");
        qemu_create(&qemu_fresh, opts, "4G");
        let path = dir.path().join("full.qcow2");
        qemu_create(&path, opts, "4G");
        let image = open(&path);
        let cs = image.geometry().cluster_size();
        let chunk = vec![0x3cu8; (cs * 64) as usize];
        let mut c = 0;
        while c < n {
            let k = (n - c).min(64);
            image.write_at(c * cs, &chunk[..(k * cs) as usize]).unwrap();
            c += k;
        }
        image.flush().unwrap();
        image.discard(0, image.virtual_size() / 512).unwrap();
        let summary = image.compact(&mut no_progress()).unwrap();
        image.close().unwrap();
        let (fresh_len, len) = (file_len(&fresh), file_len(&path));
        assert!(
            len <= fresh_len,
            "{opts} N={n}: {len} bytes after compaction, a fresh image has {fresh_len}: {summary:?}"
        );
        let qemu_len = file_len(&qemu_fresh).next_multiple_of(cs);
        assert!(len <= qemu_len, "{opts} N={n}: {len} bytes, qemu-img's fresh image rounds up to {qemu_len}");
        assert_clean(&path);
        let out = run_ok(qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(&path).arg(&fresh));
        assert!(out.status.success());
        std::fs::remove_file(&path).unwrap();
    }
}

/// Random writes and discards, then compaction; repeated, with reopening, against a byte model.
/// Tables the header names move down too: an L1 table moved to the end by growing the disk, and a refcount table
/// moved to the end by growing the file (512-byte clusters with 64-bit refcounts need a new table every 2 MiB).
#[test]
fn the_l1_and_refcount_tables_move_down_into_free_space() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, size, grown, data) in
        [("", "1G", 8u64 << 40, 4u64 << 20), ("cluster_size=512,refcount_bits=64", "64M", 64 << 20, 8 << 20)]
    {
        let _why = support::OnFailure(opts.to_string());
        let path = dir.path().join("tables.qcow2");
        qemu_create(&path, opts, size);
        qemu_io(&path, &[&format!("write -P 0x3c 0 {data}")]);
        let image = open(&path);
        image.resize(grown, false).unwrap();
        image.write_at(data, &vec![0x3d; 65536]).unwrap();
        image.flush().unwrap();
        let before = image.header();
        image.discard(0, data / 512).unwrap();
        let summary = image.compact(&mut no_progress()).unwrap();
        let after = image.header();
        image.close().unwrap();
        assert!(summary.tables_moved >= 1, "{summary:?}");
        assert!(
            after.l1_table_offset < before.l1_table_offset
                || after.refcount_table_offset < before.refcount_table_offset,
            "a table moved down: {before:?} -> {after:?}"
        );
        let fresh = dir.path().join("fresh.qcow2");
        qemu_create(&fresh, opts, &grown.to_string());
        qemu_io(&fresh, &[&format!("write -P 0x3d {data} 65536")]);
        assert!(
            file_len(&path) <= file_len(&fresh) + 65536,
            "compacted {} bytes, a fresh image with the same data {}",
            file_len(&path),
            file_len(&fresh)
        );
        assert_clean(&path);
        if grown <= 64 << 20 {
            let mut model = vec![0u8; grown as usize];
            model[data as usize..data as usize + 65536].fill(0x3d);
            assert_matches_model(&path, &model);
        } else {
            // 8 TiB of model is too much: QEMU reads the written piece and the zeros around it instead.
            let out = run_ok(
                qemu("qemu-io")
                    .args(["-f", "qcow2", "-c"])
                    .arg(format!("read -P 0x3d {data} 65536"))
                    .args(["-c", &format!("read -P 0 0 {data}"), "-c", &format!("read -P 0 {} 1M", data + 65536)])
                    .arg(&path),
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains("Pattern verification failed"), "{text}");
        }
    }
}

#[test]
fn random_workloads_compact_to_the_same_contents() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in ["cluster_size=4096", "cluster_size=512,refcount_bits=8", "compat=0.10", "extended_l2=on"]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("random{i}.qcow2"));
        qemu_create(&path, opts, "16M");
        qemu_io(&path, &["write -P 0x44 0 2M", "write -c -P 0x45 4M 1M", "write -z 8M 1M"]);
        let mut model = qemu_to_raw(&path, dir.path());
        let mut rng = Rng(0xc0ffee + i as u64);
        for round in 0..4 {
            let image = open(&path);
            let size = image.virtual_size();
            for _ in 0..40 {
                let at = rng.below(size / 512) * 512;
                let len = ((1 + rng.below(256)) * 512).min(size - at);
                if rng.below(2) == 0 {
                    let byte = rng.next() as u8;
                    image.write_at(at, &vec![byte; len as usize]).unwrap();
                    model[at as usize..(at + len) as usize].fill(byte);
                } else {
                    image.discard(at / 512, len / 512).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
            }
            let before = image.device().info().size_bytes();
            let summary = image.compact(&mut no_progress()).unwrap();
            assert!(summary.new_size <= before, "{opts} round {round}: compaction never grows the file");
            let mut all = vec![0u8; size as usize];
            image.read_at(0, &mut all).unwrap();
            assert!(all == model, "{opts} round {round}: contents changed by compaction");
            image.close().unwrap();
            assert_clean(&path);
            assert_matches_model(&path, &model);
        }
    }
}

#[test]
fn snapshots_keep_their_contents_through_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    qemu_create(&path, "cluster_size=4096", "8M");
    qemu_io(&path, &["write -P 0x10 0 4M"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&path));
    let snapshot = qemu_to_raw(&path, dir.path());
    qemu_io(&path, &["write -P 0x20 6M 1M", "write -P 0x30 1M 1M"]);
    let mut model = qemu_to_raw(&path, dir.path());
    let image = open(&path);
    image.discard(0, (2 << 20) / 512).unwrap();
    model[..2 << 20].fill(0);
    image.compact(&mut no_progress()).unwrap();
    image.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    let kept = dir.path().join("s1.raw");
    run_ok(qemu("qemu-img").args(["convert", "-l", "snapshot.name=s1", "-O", "raw"]).arg(&path).arg(&kept));
    assert!(std::fs::read(&kept).unwrap() == snapshot, "the snapshot still reads as it was taken");
}

#[test]
fn a_cancelled_compaction_leaves_a_consistent_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cancel.qcow2");
    qemu_create(&path, "cluster_size=4096", "64M");
    qemu_io(&path, &["write -P 0x71 0 32M"]);
    let mut model = qemu_to_raw(&path, dir.path());
    let image = open(&path);
    image.discard(0, (16 << 20) / 512).unwrap();
    model[..16 << 20].fill(0);
    let mut calls = 0;
    let summary = image
        .compact(&mut |p| {
            calls += 1;
            assert!(p.moved <= p.planned);
            false
        })
        .unwrap();
    assert!(summary.cancelled && calls == 1, "stopped after the first batch: {summary:?}");
    assert!(summary.clusters_copied > 0);
    image.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

/// Power loss after every write of a compaction (keeping none, all, or a random subset of the writes since the
/// last flush): the image is never corrupt and always reads as the model.
#[test]
fn power_loss_during_compaction_never_corrupts_or_loses_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.qcow2");
    qemu_create(&path, "cluster_size=4096", "4M");
    qemu_io(&path, &["write -P 0x51 0 1M", "write -P 0x52 2M 1M", "write -P 0x53 3M 512k"]);
    let model = {
        let image = open(&path);
        image.discard(0, (2 << 20) / 512).unwrap();
        image.close().unwrap();
        qemu_to_raw(&path, dir.path())
    };
    let bytes = std::fs::read(&path).unwrap();
    let probe = Image::open(FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone())), config()).unwrap();
    probe.compact(&mut no_progress()).unwrap();
    let writes = probe.device().write_count();
    drop(probe);
    assert!(writes > 8, "compaction writes in several steps ({writes})");
    let mut rng = Rng(0xfa11);
    let step = (writes / 40).max(1);
    let mut cut = 0;
    while cut <= writes {
        for trial in 0..3u64 {
            let dev = Arc::new(FaultyDevice::new(MemoryDevice::from_bytes(bytes.clone())));
            {
                let image = Image::open(Arc::clone(&dev), config()).unwrap();
                dev.crash_after_writes(cut);
                let _ = image.compact(&mut no_progress());
                std::mem::forget(image);
            }
            let mask = rng.next();
            dev.power_loss(&|i| trial == 1 || (trial == 2 && mask >> (i % 64) & 1 == 1)).unwrap();
            let crashed = dir.path().join("after.qcow2");
            std::fs::write(&crashed, dev.inner().snapshot()).unwrap();
            let _why = support::OnFailure(format!("compaction cut after {cut} writes, trial {trial}"));
            support::assert_not_corrupt(&crashed);
            assert_matches_model(&crashed, &model);
        }
        cut += step;
    }
}
