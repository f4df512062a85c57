//! `Image::discard` on images QEMU made: discarded ranges read as zeros (never the backing file's data where the
//! format says so), whole clusters give their space back (refcounts drop, empty L2 tables go, holes are punched),
//! and afterwards `qemu-img check` is clean and `qemu-img compare` matches a byte model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcow::block::{FileDevice, FileOptions};
use qcow::{BackingPolicy, Config, ErrorKind, FileResolver, Image};
use support::{assert_clean, assert_matches_model, qemu, qemu_create, qemu_io, qemu_to_raw, run_ok, Rng};

fn open(path: &Path, config: Config) -> Image<FileDevice> {
    let dev =
        FileDevice::open(path, &FileOptions { read_only: config.read_only, direct: false, ..FileOptions::default() })
            .unwrap();
    let resolver = FileResolver::new(path, BackingPolicy::default());
    Image::open_with(dev, config, &resolver).unwrap()
}

fn discarding() -> Config {
    Config { discard: true, runtime_asserts: true, ..Config::default() }
}

/// Random discards (whole clusters, partial clusters, long runs) checked against a model after each one.
fn discard_randomly(path: &Path, seed: u64, rounds: usize) -> Vec<u8> {
    let dir = path.parent().unwrap();
    let mut model = qemu_to_raw(path, dir);
    let image = open(path, discarding());
    let size = image.virtual_size();
    let cs = image.geometry().cluster_size();
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let sectors = size / 512;
        let sector = rng.below(sectors);
        let count = match rng.below(3) {
            0 => 1 + rng.below(16),
            1 => cs / 512 * (1 + rng.below(4)),
            _ => 1 + rng.below(sectors / 4),
        }
        .min(sectors - sector);
        let (lo, hi) = ((sector * 512) as usize, ((sector + count) * 512) as usize);
        image.discard(sector, count).unwrap();
        model[lo..hi].fill(0);
        let mut back = vec![0u8; hi - lo];
        image.read_at(lo as u64, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "seed {seed} round {round}: discarded range reads non-zero");
        if round % 4 == 0 {
            image.flush().unwrap();
        }
    }
    let mut all = vec![0u8; size as usize];
    image.read_at(0, &mut all).unwrap();
    assert!(all == model, "seed {seed}: image differs from the model after discards");
    let stats = image.stats();
    assert!(stats.unmapped_sectors + stats.erased_sectors > 0, "discards are counted: {stats:?}");
    image.close().unwrap();
    assert_clean(path);
    assert_matches_model(path, &model);
    model
}

fn filled(dir: &Path, name: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    qemu_create(&path, opts, size);
    qemu_io(&path, &["write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -z 6M 256k", "write -P 0x33 7M 512k"]);
    path
}

#[test]
fn discards_on_qemu_images_read_zeros_and_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, opts)) in [
        ("v3", ""),
        ("v2", "compat=0.10"),
        ("c4k", "cluster_size=4096"),
        ("c512_r1", "cluster_size=512,refcount_bits=1"),
        ("lazy", "lazy_refcounts=on"),
        ("extl2", "extended_l2=on"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = filled(dir.path(), name, opts, "8M");
        discard_randomly(&path, 0xd15c + i as u64, 40);
    }
}

#[test]
fn discarding_everything_frees_the_space_and_the_l2_tables() {
    let dir = tempfile::tempdir().unwrap();
    // The free tail is cut by refcount, so only once the refcounts are shown trustworthy (here by the check at
    // open); without that the space is still given back, as holes.
    for (opts, verified) in [("", true), ("compat=0.10", true), ("", false)] {
        let path = dir.path().join("all.qcow2");
        qemu_create(&path, opts, "64M");
        qemu_io(&path, &["write -P 0x5a 0 48M"]);
        let blocks_before = std::fs::metadata(&path).unwrap().blocks();
        let len_before = std::fs::metadata(&path).unwrap().len();
        let image = open(&path, Config { check_on_connect: verified, ..discarding() });
        image.discard(0, (64 << 20) / 512).unwrap();
        assert_eq!(image.stats().unmapped_sectors, (64 << 20) / 512);
        image.close().unwrap();
        assert_clean(&path);
        assert_matches_model(&path, &vec![0u8; 64 << 20]);
        let blocks_after = std::fs::metadata(&path).unwrap().blocks();
        let len_after = std::fs::metadata(&path).unwrap().len();
        if verified {
            assert!(len_after < 1 << 20, "{opts}: the free tail is truncated at once: {len_after} bytes left");
        } else {
            assert_eq!(len_after, len_before, "{opts}: unverified refcounts never cut the file");
        }
        assert!(
            blocks_after * 512 < 1 << 20 && blocks_after < blocks_before / 40,
            "{opts}: holes punched: {blocks_before} blocks before, {blocks_after} after"
        );
        let map = run_ok(qemu("qemu-img").args(["map", "--output=json"]).arg(&path));
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        for extent in map.as_array().unwrap() {
            assert_eq!(extent["data"], false, "{opts}: nothing is allocated any more: {map:#}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn discards_over_a_backing_file_read_zeros_not_the_backing_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", "8M");
    qemu_io(&base, &["write -P 0x77 0 8M"]);
    for (i, opts) in ["", "compat=0.10"].into_iter().enumerate() {
        let overlay = dir.path().join(format!("overlay{i}.qcow2"));
        let o = if opts.is_empty() { "backing_fmt=qcow2".to_string() } else { format!("{opts},backing_fmt=qcow2") };
        run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-o", &o]).arg(&overlay));
        qemu_io(&overlay, &["write -P 0x88 1M 1M"]);
        discard_randomly(&overlay, 0xba5e + i as u64, 24);
        // The base is untouched.
        assert!(qemu_to_raw(&base, dir.path()).iter().all(|&b| b == 0x77));
    }
}

#[test]
fn discards_in_compressed_images_and_images_with_snapshots_keep_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 8 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 4096 % 7) as u8 * 17;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let compressed = dir.path().join("compressed.qcow2");
    run_ok(qemu("qemu-img").args(["convert", "-c", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&compressed));
    discard_randomly(&compressed, 0xc0, 30);

    let snap = filled(dir.path(), "snap", "cluster_size=16k", "8M");
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "keep"]).arg(&snap));
    let before = qemu_to_raw(&snap, dir.path());
    discard_randomly(&snap, 0x5a, 30);
    let kept = dir.path().join("kept.raw");
    run_ok(qemu("qemu-img").args(["convert", "-l", "snapshot.name=keep", "-O", "raw"]).arg(&snap).arg(&kept));
    assert!(std::fs::read(&kept).unwrap() == before, "the snapshot still holds the data it was taken with");
}

#[test]
fn discard_is_refused_unless_enabled_and_never_on_read_only_images() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "refuse", "", "8M");
    let before = std::fs::read(&path).unwrap();
    let image = open(&path, Config::default());
    assert_eq!(image.discard(0, 128).unwrap_err().kind(), ErrorKind::Unimplemented);
    image.close().unwrap();
    let image = open(&path, Config { discard: true, ..Config::read_only() });
    assert_eq!(image.discard(0, 128).unwrap_err().kind(), ErrorKind::ReadOnly);
    drop(image);
    assert!(std::fs::read(&path).unwrap() == before, "refused discards change nothing");
    let image = open(&path, discarding());
    assert_eq!(image.discard(u64::MAX / 512, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(image.discard((8 << 20) / 512, 1).unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[test]
fn partial_discards_straddling_clusters_zero_exactly_their_sectors() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["extended_l2=on", "", "extended_l2=on,cluster_size=16k"] {
        let path = filled(dir.path(), "straddle", opts, "8M");
        let mut model = qemu_to_raw(&path, dir.path());
        let image = open(&path, discarding());
        let cs = image.geometry().cluster_size();
        let sub = cs / 32;
        // (start, length) in bytes: inside one subcluster, across a subcluster edge, across a cluster edge by
        // less than a cluster, several whole subclusters plus ragged ends, and a whole cluster plus a sector.
        for (start, len) in
            [(512, 512), (sub - 512, 1024), (3 * cs - 1024, 2048), (5 * cs + 512, 6 * sub), (7 * cs, cs + 512)]
        {
            image.discard(start / 512, len / 512).unwrap();
            model[start as usize..(start + len) as usize].fill(0);
        }
        let mut all = vec![0u8; model.len()];
        image.read_at(0, &mut all).unwrap();
        assert!(all == model, "{opts}: straddling discards zero exactly their sectors");
        image.close().unwrap();
        assert_clean(&path);
        assert_matches_model(&path, &model);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Host clusters with a nonzero refcount, counted straight from the file's bytes (16-bit refcounts).
fn used_clusters_in_file(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let (table, clusters) = (be64(48) as usize, u32::from_be_bytes(b[56..60].try_into().unwrap()) as u64);
    let mut used = 0;
    for i in 0..(clusters * cs / 8) as usize {
        let block = be64(table + i * 8) & !0x1ff;
        if block == 0 {
            continue;
        }
        for j in 0..(cs / 2) as usize {
            let at = block as usize + j * 2;
            if at + 2 <= b.len() && u16::from_be_bytes([b[at], b[at + 1]]) != 0 {
                used += 1;
            }
        }
    }
    used
}

#[test]
fn metrics_count_io_and_space_and_print_as_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(dir.path(), "metrics", "", "8M");
    let image = open(&path, Config { id: Some("disk \"0\"".into()), ..discarding() });
    let mut buf = vec![0u8; 1 << 20];
    image.read_at(0, &mut buf).unwrap();
    image.write_at(4 << 20, &buf[..65536]).unwrap();
    image.discard(0, (2 << 20) / 512).unwrap();
    image.flush().unwrap();
    let m = image.metrics().unwrap();
    assert_eq!((m.read_bytes, m.written_bytes, m.discarded_bytes), (1 << 20, 65536, 2 << 20));
    assert_eq!(m.file_bytes, std::fs::metadata(&path).unwrap().len().next_multiple_of(512));
    assert_eq!(m.used_bytes, used_clusters_in_file(&path) * 65536, "used space as the refcounts on disk say");
    assert!(m.available_bytes >= 2 << 20, "discarded clusters inside the file are available: {m:?}");
    assert_eq!(m.used_bytes + m.available_bytes + m.junk_bytes, m.file_bytes / 65536 * 65536);
    let text = image.prometheus_metrics().unwrap();
    assert!(
        text.contains("# TYPE qcow_read_bytes_total counter\nqcow_read_bytes_total{id=\"disk \\\"0\\\"\"} 1048576\n"),
        "{text}"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.split_once("} ").unwrap();
        assert!(name.starts_with("qcow_") && value.parse::<u64>().is_ok(), "{line}");
    }
    image.close().unwrap();
    assert_clean(&path);
}
