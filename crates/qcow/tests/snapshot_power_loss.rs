//! Power loss at every write boundary of snapshot create, apply and delete, keeping none or a seeded subset of
//! the writes not yet flushed. What survives must be an image `qemu-img check` finds no corruption in (leaks
//! allowed; see below for the COPIED flags), that `qemu-img check -r all` makes clean, and that holds either the
//! old state or the new one: the guest data, the snapshot list, and each listed snapshot's data.
//!
//! QEMU's check also counts a COPIED flag that disagrees with a stored refcount. Two such states are unavoidable
//! (the flag and the refcount are in different clusters) and harmless, and they are the only ones allowed: an
//! entry without COPIED over a refcount of one (a write copies once more than needed), and an entry with COPIED
//! over a refcount above one that the same check reports as leaked with one reference (it is not shared).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/power_cut.rs"]
mod power_cut;
mod support;

use std::path::Path;
use std::sync::Arc;

use power_cut::PowerCut;
use qcow::block::MemoryDevice;
use qcow::{Config, Image, NoBacking};
use support::{qemu, qemu_create, qemu_io, run_ok};

type Img = Image<Arc<PowerCut>>;

fn open(bytes: &[u8], config: Config) -> (Arc<PowerCut>, Img) {
    let dev = Arc::new(PowerCut::new(bytes.to_vec()));
    let image = Image::open_with(dev.clone(), config, &NoBacking).unwrap();
    image.flush().unwrap();
    (dev, image)
}

/// Guest data, snapshot names, and each snapshot's data, as read from an image's bytes.
#[derive(Debug, PartialEq, Eq)]
struct State {
    data: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
}

fn read_all(image: &Image<MemoryDevice>) -> Vec<u8> {
    let mut data = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut data).unwrap();
    data
}

fn state_of(bytes: &[u8]) -> State {
    let image = Image::open_with(MemoryDevice::from_bytes(bytes.to_vec()), Config::read_only(), &NoBacking).unwrap();
    let mut snapshots = Vec::new();
    for s in image.snapshots().unwrap() {
        let view = Image::open_snapshot(MemoryDevice::from_bytes(bytes.to_vec()), &s.name, &NoBacking).unwrap();
        snapshots.push((s.name.clone(), read_all(&view)));
    }
    State { data: read_all(&image), snapshots }
}

/// `qemu-img check`'s findings, judged as the module says; panics naming the first finding not allowed.
fn assert_only_harmless_findings(path: &Path, cluster_bits: u32, what: &str) {
    let out = qemu("qemu-img").args(["check", "-f", "qcow2"]).arg(path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let leaked_once: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Leaked cluster "))
        .filter(|l| l.ends_with("reference=1"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let number = |l: &str, key: &str| -> u64 {
        let v = l.split(key).nth(1).unwrap().split_whitespace().next().unwrap();
        u64::from_str_radix(v, if key.ends_with("entry=") { 16 } else { 10 }).unwrap()
    };
    let mut allowed = 0;
    for line in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(line.starts_with("ERROR OFLAG_COPIED"), "{what}: {line}\n{text}");
        let key = if line.contains("data cluster") { "l2_entry=" } else { "l1_entry=" };
        let (entry, refcount) = (number(line, key), number(line, "refcount="));
        let copied = entry >> 63 == 1;
        let cluster = (entry & 0x00ff_ffff_ffff_fe00) >> cluster_bits;
        let harmless = (!copied && refcount == 1) || (copied && refcount > 1 && leaked_once.contains(&cluster));
        assert!(harmless, "{what}: {line}\n{text}");
        allowed += 1;
    }
    let corruptions =
        text.lines().find_map(|l| l.strip_suffix(" errors were found on the image.")?.parse().ok()).unwrap_or(0);
    assert_eq!(corruptions, allowed, "{what}:\n{text}");
    assert!(!text.contains("check-errors") && out.status.code() != Some(1), "{what}:\n{text}");
}

/// Runs `op` on the image at every write boundary, and judges each survivor.
fn crash_everywhere(name: &str, base: &[u8], dir: &Path, op: &dyn Fn(&Img) -> qcow::Result<()>) {
    let old = state_of(base);
    let cluster_bits = u32::from_be_bytes(base[20..24].try_into().unwrap());
    let (dev, image) = open(base, Config::default());
    let before = dev.faulty.write_count();
    op(&image).unwrap();
    let writes = dev.faulty.write_count() - before;
    image.close().unwrap();
    dev.faulty.power_loss_keep_all().unwrap();
    let new = state_of(&dev.faulty.inner().snapshot());
    assert_ne!(old, new, "{name} changes something");
    assert!(writes > 3, "{name}: {writes} writes");
    for k in 0..=writes {
        for seed in [0u64, 0x5eed + k] {
            let (dev, image) = open(base, Config::default());
            dev.arm(k, move |i, _| seed != 0 && (seed ^ (i as u64).wrapping_mul(0x9e37_79b9)) % 3 != 0);
            let result = op(&image);
            drop(image);
            if dev.armed() {
                // The cut came after the last write: lose what was not flushed.
                assert!(result.is_ok(), "{name}: {result:?}");
                dev.faulty.power_loss(&|i| seed != 0 && i % 2 == 0).unwrap();
            }
            let bytes = dev.faulty.inner().snapshot();
            let path = dir.join("crashed.qcow2");
            std::fs::write(&path, &bytes).unwrap();
            let what = format!("{name}, cut after {k} of {writes} writes, seed {seed:#x}");
            assert_only_harmless_findings(&path, cluster_bits, &what);
            let state = state_of(&bytes);
            assert!(state == old || state == new, "{what}: neither the old state nor the new one");
            run_ok(qemu("qemu-img").args(["check", "-q", "-r", "all", "-f", "qcow2"]).arg(&path));
            let repaired = qemu("qemu-img").args(["check", "-f", "qcow2"]).arg(&path).output().unwrap();
            assert_eq!(
                repaired.status.code(),
                Some(0),
                "{what}: after repair {}",
                String::from_utf8_lossy(&repaired.stdout)
            );
        }
    }
}

fn qemu_image(dir: &Path) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    qemu_create(&path, "cluster_size=4096", "1M");
    qemu_io(&path, &["write -P 1 0 64k", "write -c -P 2 256k 16k"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&path));
    qemu_io(&path, &["write -P 3 8k 16k", "write -P 4 512k 8k"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "s2"]).arg(&path));
    qemu_io(&path, &["write -P 5 0 4k", "write -P 6 768k 4k"]);
    std::fs::read(&path).unwrap()
}

#[test]
fn power_loss_during_snapshot_create_leaves_the_old_state_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    crash_everywhere("create", &base, dir.path(), &|image| image.snapshot_create("s3").map(|_| ()));
}

#[test]
fn power_loss_during_snapshot_apply_leaves_the_old_state_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    crash_everywhere("apply", &base, dir.path(), &|image| image.snapshot_apply("s1").map(|_| ()));
}

#[test]
fn power_loss_during_snapshot_delete_leaves_the_old_state_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    crash_everywhere("delete", &base, dir.path(), &|image| image.snapshot_delete("s1").map(|_| ()));
    // The last one: the table goes away entirely.
    let path = dir.path().join("base.qcow2");
    run_ok(qemu("qemu-img").args(["snapshot", "-d", "s2"]).arg(&path));
    let one_left = std::fs::read(&path).unwrap();
    crash_everywhere("delete the last", &one_left, dir.path(), &|image| image.snapshot_delete("s1").map(|_| ()));
}
