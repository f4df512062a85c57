//! `Image::allocation_depth` against QEMU's own answer: the `qemu:allocation-depth` context of a real
//! `qemu-nbd -A` on the same file, read by libnbd's nbdinfo. Chains of qcow2 over qcow2 over raw with data,
//! zero clusters, discards, compressed clusters, unallocated holes, subclusters and v2 images, with backing files
//! both shorter and longer than their overlays (QEMU counts the zeros past a short layer's end as that layer's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/nbd.rs"]
mod nbd;
mod support;

use std::path::Path;

use qcow::{Config, DepthRun, Image};
use support::{qemu, qemu_io, run_ok, with_deadline};

fn create(dir: &Path, name: &str, opts: &str, backing: Option<(&str, &str)>, size: &str) {
    let mut cmd = qemu("qemu-img");
    cmd.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    if let Some((file, format)) = backing {
        cmd.args(["-b", file, "-F", format]);
    }
    run_ok(cmd.arg(name).arg(size));
}

/// Our runs as (offset, length, depth).
fn ours(image: &Path, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let image = Image::open_path(image, Config::read_only()).unwrap();
    let mut at = offset;
    image
        .allocation_depth(offset, len)
        .unwrap()
        .into_iter()
        .map(|DepthRun { len, depth }| {
            let run = (at, len, u64::from(depth));
            at += len;
            run
        })
        .collect()
}

/// QEMU's runs, merged where nbdinfo shows neighbours of one depth, then cut to `offset..offset + len`.
fn qemu_depths(image: &Path, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let server = nbd::QemuNbd::start(image, "qcow2", &["-A"]);
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (start, length, depth) in nbd::nbdinfo_map("qemu:allocation-depth", &server.uri()) {
        let (s, e) = (start.max(offset), (start + length).min(offset + len));
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == depth && last.0 + last.1 == s => last.1 += e - s,
            _ => out.push((s, e - s, depth)),
        }
    }
    out
}

fn assert_same_depths(image: &Path, size: u64) {
    let whole = qemu_depths(image, 0, size);
    assert_eq!(ours(image, 0, size), whole, "{}", image.display());
    assert!(whole.iter().map(|r| r.2).collect::<std::collections::BTreeSet<_>>().len() >= 2, "{whole:?}");
    // Parts of the disk, starting and ending inside runs, answer as the whole does.
    for (offset, len) in [(65536 + 512, 3 << 20), (1 << 20, 4096), (size - 1536, 1536)] {
        let part: Vec<_> = whole
            .iter()
            .filter_map(|&(s, l, d)| {
                let (a, b) = (s.max(offset), (s + l).min(offset + len));
                (a < b).then(|| (a, b - a, d))
            })
            .collect();
        assert_eq!(ours(image, offset, len), part, "{} at {offset:#x}+{len:#x}", image.display());
    }
}

#[test]
fn depths_over_qcow2_over_qcow2_over_raw_equal_qemu_nbds() {
    with_deadline(120, "depth chain", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A raw base of odd length, a qcow2 over it twice its size, an overlay larger still.
        std::fs::write(d.join("base.raw"), vec![0x11u8; (3 << 20) + 1000]).unwrap();
        create(d, "mid.qcow2", "cluster_size=65536", Some(("base.raw", "raw")), "6M");
        qemu_io(
            &d.join("mid.qcow2"),
            &["write -P 2 1M 512k", "write -z 2M 256k", "discard 0 64k", "write -c -P 4 2560k 64k", "write 4M 4k"],
        );
        create(d, "top.qcow2", "cluster_size=65536", Some(("mid.qcow2", "qcow2")), "8M");
        qemu_io(
            &d.join("top.qcow2"),
            &["write -P 3 4M 128k", "write -z 5M 64k", "discard 1M 64k", "write -P 5 7M 512", "write -z 6M 128k"],
        );
        assert_same_depths(&d.join("top.qcow2"), 8 << 20);
        assert_same_depths(&d.join("mid.qcow2"), 6 << 20);
    });
}

#[test]
fn a_backing_file_longer_than_its_overlay_and_a_v2_overlay_agree_with_qemu_nbd() {
    with_deadline(120, "depth v2 and short overlay", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create(d, "base.qcow2", "cluster_size=65536", None, "8M");
        qemu_io(&d.join("base.qcow2"), &["write -P 1 0 2M", "write -z 3M 1M", "write -P 2 7M 1M"]);
        // v2 has no zero flag: its discards deallocate, so the backing file shows through again.
        create(d, "v2.qcow2", "compat=0.10,cluster_size=65536", Some(("base.qcow2", "qcow2")), "4M");
        qemu_io(&d.join("v2.qcow2"), &["write -P 3 512k 1M", "discard 1M 128k", "write -P 4 3584k 64k"]);
        assert_same_depths(&d.join("v2.qcow2"), 4 << 20);
    });
}

#[test]
fn unallocated_subclusters_fall_through_to_the_backing_depth_as_in_qemu_nbd() {
    with_deadline(120, "depth subclusters", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create(d, "base.qcow2", "cluster_size=65536", None, "2M");
        qemu_io(&d.join("base.qcow2"), &["write -P 1 0 1M"]);
        create(d, "sub.qcow2", "cluster_size=65536,extended_l2=on", Some(("base.qcow2", "qcow2")), "2M");
        qemu_io(&d.join("sub.qcow2"), &["write -P 2 4k 4k", "write -z 8k 2k", "write -P 3 1028k 8k", "discard 0 2k"]);
        assert_same_depths(&d.join("sub.qcow2"), 2 << 20);
    });
}

#[test]
fn an_image_without_a_backing_file_has_depths_zero_and_one_as_in_qemu_nbd() {
    with_deadline(120, "depth single image", || {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create(d, "one.qcow2", "cluster_size=65536", None, "4M");
        qemu_io(
            &d.join("one.qcow2"),
            &["write -P 1 0 256k", "write -z 1M 64k", "write -c -P 2 2M 64k", "discard 128k 64k"],
        );
        assert_same_depths(&d.join("one.qcow2"), 4 << 20);
    });
}
