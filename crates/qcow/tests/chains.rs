//! Power loss at every write boundary of a safe rebase, a commit (into the base, then emptying the top) and an
//! amend of the refcount width, keeping none, all or seeded subsets of the unflushed writes. QEMU made the images
//! and QEMU judges what survives: `qemu-img check` finds no corruption, and the image holds either the old state or
//! the new one (the backing file it names, the refcount width), reading exactly the guest data it read before.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/power_cut.rs"]
mod power_cut;
mod support;

use std::path::Path;
use std::sync::Arc;

use power_cut::PowerCut;
use qcow::{AmendOptions, BackingPolicy, CommitRange, Config, ExtentKind, FileResolver, Image, NewBacking};
use support::{assert_not_corrupt, qemu, qemu_compare_raw, qemu_to_raw, run_ok};

/// Which unflushed writes survive a power loss.
#[derive(Debug, Clone, Copy)]
enum Keep {
    None,
    All,
    /// Only the newest: what a write cache that reorders lets through first.
    Newest,
    /// All but the oldest.
    AllButOldest,
    Seeded(u64),
}

impl Keep {
    /// Whether entry `i` of a journal of `len` entries survives.
    fn keeps(self, i: usize, len: usize) -> bool {
        match self {
            Keep::None => false,
            Keep::All => true,
            Keep::Newest => i + 1 == len,
            Keep::AllButOldest => i > 0,
            Keep::Seeded(seed) => {
                let mut x = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x ^= x >> 31;
                x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x ^= x >> 29;
                x % 2 == 0
            }
        }
    }
}

const KEEPS: [Keep; 6] =
    [Keep::None, Keep::All, Keep::Newest, Keep::AllButOldest, Keep::Seeded(7), Keep::Seeded(12345)];

/// A device holding `bytes` that loses power at writes and at flushes, as armed by [`arm`].
fn device(bytes: Vec<u8>) -> Arc<PowerCut> {
    Arc::new(PowerCut::new(bytes).cutting_at_flushes())
}

/// Arms `dev` to lose power after `after` boundaries, keeping what `keep` picks.
fn arm(dev: &PowerCut, after: u64, keep: Keep) {
    dev.arm(after, move |i, len| keep.keeps(i, len));
}

/// Runs `script` with bash in `dir` (qemu-img and qemu-io build the images).
fn sh(dir: &Path, script: &str) {
    qemu("qemu-img");
    qemu("qemu-io");
    run_ok(std::process::Command::new("bash").args(["-euc", script]).current_dir(dir));
}

/// A field of `qemu-img info --output=json`, as text.
fn info_field(path: &Path, field: &str) -> String {
    let out = run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(path));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = if field == "refcount-bits" { &v["format-specific"]["data"][field] } else { &v[field] };
    value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string())
}

/// Runs `op` once without a cut, and returns how many writes and flushes it made.
fn writes_of(bytes: &[u8], op: &dyn Fn(Arc<PowerCut>)) -> u64 {
    let dev = device(bytes.to_vec());
    op(dev.clone());
    dev.faulty.write_count() + dev.faulty.flush_count()
}

#[test]
fn power_loss_during_a_safe_rebase_leaves_the_old_or_the_new_backing_file_and_the_same_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sh(
        dir,
        "qemu-img create -q -f qcow2 base.qcow2 1M
         qemu-io -c 'write -P 1 0 256k' -c 'write -P 7 900k 100k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M
         qemu-io -c 'write -P 2 64k 64k' -c 'write -P 8 70k 1k' -c 'write -z 512k 64k' top.qcow2 >/dev/null
         qemu-img create -q -f qcow2 new.qcow2 2M
         qemu-io -c 'write -P 3 0 32k' -c 'write -P 1 128k 64k' -c 'write -P 9 1536k 64k' new.qcow2 >/dev/null",
    );
    let top = std::fs::read(dir.join("top.qcow2")).unwrap();
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, qemu_to_raw(&dir.join("top.qcow2"), dir)).unwrap();
    let resolver = FileResolver::new(&dir.join("top.qcow2"), BackingPolicy::default());
    let rebase = |dev: Arc<PowerCut>| {
        let Ok(mut image) = Image::open_with(dev, Config::default(), &resolver) else { return };
        let new = Image::open_path(dir.join("new.qcow2"), Config::read_only()).unwrap();
        let size = new.virtual_size();
        let new = NewBacking {
            name: "new.qcow2".into(),
            format: "qcow2".into(),
            backing: qcow::Backing::new(Box::new(new), size),
        };
        if image.rebase(Some(new), Default::default(), &mut |_, _| {}).is_ok() {
            let _ = image.close();
        }
    };
    let total = writes_of(&top, &rebase);
    eprintln!("rebase: {total} writes and flushes");
    assert!(total > 4, "a rebase that copies clusters writes more than {total} times");
    let (mut old, mut new) = (0, 0);
    for n in 0..=total {
        for keep in KEEPS {
            let dev = device(top.clone());
            arm(&dev, n, keep);
            rebase(dev.clone());
            let cut = dir.join("cut.qcow2");
            std::fs::write(&cut, dev.survivor()).unwrap();
            let what = format!("cut after {n} of {total} writes and flushes, keeping {keep:?}");
            assert_not_corrupt(&cut);
            match info_field(&cut, "backing-filename").as_str() {
                "base.qcow2" => old += 1,
                "new.qcow2" => new += 1,
                other => panic!("{what}: backing file {other}"),
            }
            assert!(qemu_compare_raw(&cut, &expected), "{what}: the guest data changed");
        }
    }
    assert!(old > 0 && new > 0, "cuts left {old} old and {new} new states: both must occur");
}

#[test]
fn power_loss_during_a_commit_leaves_every_base_cluster_old_or_new_and_the_top_reading_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sh(
        dir,
        "qemu-img create -q -f qcow2 base.qcow2 1M
         qemu-io -c 'write -P 1 0 512k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M
         qemu-io -c 'write -P 2 64k 128k' -c 'write -z 256k 64k' -c 'write -P 3 1536k 64k' -c 'write -P 4 400k 2k' \
             top.qcow2 >/dev/null
         cp base.qcow2 base.orig.qcow2",
    );
    let cs = 64 << 10;
    let top_view = qemu_to_raw(&dir.join("top.qcow2"), dir);
    let old_base = qemu_to_raw(&dir.join("base.qcow2"), dir);
    let top = Image::open_path(dir.join("top.qcow2"), Config::read_only()).unwrap();
    let ranges: Vec<CommitRange> = top
        .map(0, top.virtual_size())
        .unwrap()
        .into_iter()
        .filter(|e| e.kind != ExtentKind::Unallocated)
        .map(|e| CommitRange { offset: e.guest.0, len: e.len, zero: e.kind == ExtentKind::Zero })
        .collect();
    assert!(ranges.iter().any(|r| r.zero) && ranges.iter().any(|r| !r.zero), "{ranges:?}");
    let committed = |offset: u64| ranges.iter().any(|r| (r.offset..r.offset + r.len).contains(&offset));

    // The base takes the top's data; the top only reads.
    let base = std::fs::read(dir.join("base.qcow2")).unwrap();
    let commit = |dev: Arc<PowerCut>| {
        let Ok(base) = Image::open(dev, Config { discard: true, ..Config::default() }) else { return };
        if top.commit_to(&base, &ranges, &mut |_, _| {}).is_ok() {
            let _ = base.close();
        }
    };
    let total = writes_of(&base, &commit);
    eprintln!("commit into the base: {total} writes and flushes");
    for n in 0..=total {
        for keep in KEEPS {
            let dev = device(base.clone());
            arm(&dev, n, keep);
            commit(dev.clone());
            let cut = dir.join("cut-base.qcow2");
            std::fs::write(&cut, dev.survivor()).unwrap();
            let what = format!("base cut after {n} of {total} writes and flushes, keeping {keep:?}");
            assert_not_corrupt(&cut);
            let got = qemu_to_raw(&cut, dir);
            for (i, cluster) in got.chunks(cs).enumerate() {
                let at = i * cs;
                let old =
                    old_base.get(at..at + cluster.len()).map_or(cluster.iter().all(|&b| b == 0), |o| o == cluster);
                let new = committed(at as u64) && &top_view[at..at + cluster.len()] == cluster;
                assert!(old || new, "{what}: base cluster {i} is neither the old nor the committed data");
            }
        }
    }

    // With the base committed, emptying the top never changes what it reads.
    {
        let dev = device(base.clone());
        commit(dev.clone());
        std::fs::write(dir.join("base.qcow2"), dev.survivor()).unwrap();
    }
    drop(top);
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, &top_view).unwrap();
    let top_bytes = std::fs::read(dir.join("top.qcow2")).unwrap();
    let resolver = FileResolver::new(&dir.join("top.qcow2"), BackingPolicy::default());
    let empty = |dev: Arc<PowerCut>| {
        let Ok(image) = Image::open_with(dev, Config::default(), &resolver) else { return };
        if image.make_empty().is_ok() {
            let _ = image.close();
        }
    };
    let total = writes_of(&top_bytes, &empty);
    eprintln!("emptying the top: {total} writes and flushes");
    let mut emptied = 0;
    for n in 0..=total {
        for keep in KEEPS {
            let dev = device(top_bytes.clone());
            arm(&dev, n, keep);
            empty(dev.clone());
            let cut = dir.join("cut-top.qcow2");
            std::fs::write(&cut, dev.survivor()).unwrap();
            let what = format!("top cut after {n} of {total} writes and flushes, keeping {keep:?}");
            assert_not_corrupt(&cut);
            assert!(qemu_compare_raw(&cut, &expected), "{what}: the top's guest data changed");
            let map = run_ok(qemu("qemu-img").args(["map", "--output=json"]).arg(&cut));
            let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
            if map.as_array().unwrap().iter().all(|e| e["depth"] != 0 || e["present"] == false) {
                emptied += 1;
            }
        }
    }
    assert!(emptied > 0, "no cut left the top emptied");
}

#[test]
fn power_loss_while_changing_the_refcount_width_leaves_the_old_or_the_new_width_and_the_same_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sh(
        dir,
        "qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 4M
         qemu-io -c 'write -P 1 0 1M' -c 'write -z 1M 64k' -c 'write -c -P 2 2M 64k' a.qcow2 >/dev/null
         qemu-img snapshot -c s1 a.qcow2
         qemu-io -c 'write -P 3 512k 64k' a.qcow2 >/dev/null",
    );
    let bytes = std::fs::read(dir.join("a.qcow2")).unwrap();
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, qemu_to_raw(&dir.join("a.qcow2"), dir)).unwrap();
    for bits in [8u64, 64] {
        let amend = |dev: Arc<PowerCut>| {
            let Ok(mut image) = Image::open(dev, Config::default()) else { return };
            let options = AmendOptions { refcount_bits: Some(bits), ..AmendOptions::default() };
            if image.amend(&options, &mut |_, _| {}).is_ok() {
                let _ = image.close();
            }
        };
        let total = writes_of(&bytes, &amend);
        eprintln!("refcount width 16 -> {bits}: {total} writes and flushes");
        let (mut old, mut new) = (0, 0);
        for n in 0..=total {
            for keep in KEEPS {
                let dev = device(bytes.clone());
                arm(&dev, n, keep);
                amend(dev.clone());
                let cut = dir.join("cut.qcow2");
                std::fs::write(&cut, dev.survivor()).unwrap();
                let what = format!("{bits} bits, cut after {n} of {total} writes and flushes, keeping {keep:?}");
                assert_not_corrupt(&cut);
                match info_field(&cut, "refcount-bits").parse::<u64>() {
                    Ok(16) => old += 1,
                    Ok(b) if b == bits => new += 1,
                    other => panic!("{what}: refcount width {other:?}"),
                }
                assert!(qemu_compare_raw(&cut, &expected), "{what}: the guest data changed");
            }
        }
        assert!(old > 0 && new > 0, "{bits} bits: cuts left {old} old and {new} new states");
    }
}
