//! Internal snapshots created, applied and deleted by us, with QEMU on the other side: what we make,
//! `qemu-img snapshot -l`, `convert -l snapshot.name=` and `check` judge; what QEMU makes, we apply and delete
//! and the result must equal QEMU's own apply or delete of a copy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/bitmaps.rs"]
mod bitmap_support;
mod support;

use std::path::{Path, PathBuf};

use bitmap_support::{qemu_bitmap_map, qemu_bitmaps};
use qcow::{Config, Error, ErrorKind, Image, SnapshotRefusal};
use support::{assert_clean, qemu, qemu_create, qemu_io, run_ok};

fn open_rw(path: &Path) -> Image<qcow::block::FileDevice> {
    Image::open_path(path, Config { runtime_asserts: true, ..Config::default() }).unwrap()
}

/// `qemu-img convert -O raw`, of snapshot `snapshot` when given.
fn qemu_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("{}.raw", snapshot.unwrap_or("active")));
    let mut cmd = qemu("qemu-img");
    cmd.args(["convert", "-f", "qcow2", "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.args(["-l", &format!("snapshot.name={name}")]);
    }
    run_ok(cmd.arg(path).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    bytes
}

/// `qemu-img snapshot -l`'s rows as (ID, TAG).
fn qemu_list(path: &Path) -> Vec<(String, String)> {
    let out = run_ok(qemu("qemu-img").args(["snapshot", "-l"]).arg(path));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .map(|l| {
            let mut f = l.split_whitespace();
            (f.next().unwrap_or("").to_string(), f.next().unwrap_or("").to_string())
        })
        .collect()
}

fn write(image: &Image<qcow::block::FileDevice>, model: &mut [u8], offset: usize, len: usize, byte: u8) {
    let data = vec![byte; len];
    image.write_at(offset as u64, &data).unwrap();
    model[offset..offset + len].copy_from_slice(&data);
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn snapshots_we_create_keep_their_data(opts: &str, dir: &Path) {
    let path: PathBuf = dir.join(format!("ours-{}.qcow2", opts.replace([',', '='], "-")));
    qemu_create(&path, opts, "4M");
    // QEMU's own data, some of it compressed.
    qemu_io(&path, &["write -P 0x11 0 192k", "write -c -P 0x12 1M 64k", "write -z 2M 64k"]);
    let mut model = qemu_raw(&path, None);
    let image = open_rw(&path);
    let first = image.snapshot_create("first").unwrap();
    assert_eq!((first.id.as_str(), first.name.as_str(), first.disk_size()), ("1", "first", Some(4 << 20)));
    let at_first = model.clone();
    // Overwrites of shared clusters (in part and whole), of a compressed one, and fresh allocations.
    write(&image, &mut model, 4096, 4096, 0x21);
    write(&image, &mut model, 64 << 10, 64 << 10, 0x22);
    write(&image, &mut model, (1 << 20) + 512, 512, 0x23);
    write(&image, &mut model, 3 << 20, 128 << 10, 0x24);
    let second = image.snapshot_create("second").unwrap();
    assert_eq!(second.id, "2");
    let at_second = model.clone();
    write(&image, &mut model, 0, 8192, 0x31);
    write(&image, &mut model, (3 << 20) + 4096, 4096, 0x32);
    image.close().unwrap();

    assert_clean(&path);
    assert_eq!(qemu_list(&path), [("1".into(), "first".into()), ("2".into(), "second".into())]);
    assert!(qemu_raw(&path, Some("first")) == at_first, "snapshot first differs ({opts})");
    assert!(qemu_raw(&path, Some("second")) == at_second, "snapshot second differs ({opts})");
    assert!(qemu_raw(&path, None) == model, "active layer differs ({opts})");
}

#[test]
fn snapshots_we_create_are_listed_and_converted_by_qemu_with_their_original_data() {
    let dir = tempdir();
    for opts in ["", "compat=0.10", "cluster_size=4096,refcount_bits=8", "cluster_size=512", "extended_l2=on"] {
        snapshots_we_create_keep_their_data(opts, dir.path());
    }
}

/// Runs `qemu-img snapshot ARGS FILE`.
fn qemu_snapshot(path: &Path, args: &[&str]) {
    run_ok(qemu("qemu-img").arg("snapshot").args(args).arg(path));
}

fn same_guest_data(a: &Path, b: &Path) -> bool {
    let out = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(a).arg(b).output().unwrap();
    out.status.code() == Some(0)
}

#[test]
fn snapshots_qemu_creates_are_applied_and_deleted_by_us_as_qemu_does_it() {
    let dir = tempdir();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    qemu_create(&ours, "cluster_size=65536", "8M");
    qemu_io(&ours, &["write -P 1 0 256k", "write -c -P 2 1M 128k"]);
    qemu_snapshot(&ours, &["-c", "s1"]);
    qemu_io(&ours, &["write -P 3 64k 64k", "write -P 4 4M 64k", "discard 1M 64k"]);
    qemu_snapshot(&ours, &["-c", "s2"]);
    qemu_io(&ours, &["write -P 5 0 8k", "write -P 6 6M 64k"]);
    std::fs::copy(&ours, &theirs).unwrap();
    let s1 = qemu_raw(&ours, Some("s1"));

    let image = open_rw(&ours);
    assert_eq!(image.snapshot_apply("s1").unwrap().id, "1");
    image.close().unwrap();
    qemu_snapshot(&theirs, &["-a", "s1"]);
    assert_clean(&ours);
    assert!(same_guest_data(&ours, &theirs));
    assert!(qemu_raw(&ours, None) == s1);

    // Writes after the apply copy what the snapshots still share.
    let image = open_rw(&ours);
    image.write_at(0, &[9u8; 4096]).unwrap();
    image.close().unwrap();
    qemu_io(&theirs, &["write -P 9 0 4k"]);
    assert!(qemu_raw(&ours, Some("s1")) == s1, "the snapshot kept its data");

    // By ID (2), then by name.
    let image = open_rw(&ours);
    assert_eq!(image.snapshot_apply("2").unwrap().name, "s2");
    assert_eq!(image.snapshot_delete("s1").unwrap().id, "1");
    image.close().unwrap();
    qemu_snapshot(&theirs, &["-a", "2"]);
    qemu_snapshot(&theirs, &["-d", "s1"]);
    assert_clean(&ours);
    assert!(same_guest_data(&ours, &theirs));
    assert_eq!(qemu_list(&ours), qemu_list(&theirs));

    let image = open_rw(&ours);
    image.snapshot_delete("s2").unwrap();
    assert!(image.snapshots().unwrap().is_empty());
    // With no snapshot left every cluster is the active layer's alone: writes go in place again.
    image.write_at(4 << 20, &[7u8; 65536]).unwrap();
    image.close().unwrap();
    qemu_snapshot(&theirs, &["-d", "s2"]);
    qemu_io(&theirs, &["write -P 7 4M 64k"]);
    assert_clean(&ours);
    assert!(same_guest_data(&ours, &theirs));
    assert!(qemu_list(&ours).is_empty());
}

#[test]
fn applying_a_snapshot_of_another_size_resizes_as_qemu_does() {
    let dir = tempdir();
    let ours = dir.path().join("sizes.qcow2");
    let theirs = dir.path().join("sizes-qemu.qcow2");
    qemu_create(&ours, "", "1M");
    qemu_io(&ours, &["write -P 5 0 64k"]);
    qemu_snapshot(&ours, &["-c", "small"]);
    run_ok(qemu("qemu-img").args(["resize", "-q"]).arg(&ours).arg("3M"));
    qemu_io(&ours, &["write -P 6 2M 64k"]);
    qemu_snapshot(&ours, &["-c", "big"]);
    std::fs::copy(&ours, &theirs).unwrap();
    for name in ["small", "big", "small"] {
        let image = open_rw(&ours);
        image.snapshot_apply(name).unwrap();
        assert_eq!(image.virtual_size(), if name == "small" { 1 << 20 } else { 3 << 20 });
        image.close().unwrap();
        qemu_snapshot(&theirs, &["-a", name]);
        assert_clean(&ours);
        assert!(same_guest_data(&ours, &theirs), "after applying {name}");
        let size = |p: &Path| {
            let out = run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(p));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["virtual-size"].clone()
        };
        assert_eq!(size(&ours), size(&theirs));
    }
}

fn refused(result: qcow::Result<qcow::format::Snapshot>) -> SnapshotRefusal {
    match result {
        Err(Error::Snapshot { why, .. }) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn snapshot_refusals_change_nothing() {
    let dir = tempdir();
    let path = dir.path().join("refuse.qcow2");
    qemu_create(&path, "", "1M");
    qemu_io(&path, &["write -P 1 0 64k"]);
    qemu_snapshot(&path, &["-c", "taken"]);
    open_rw(&path).close().unwrap();
    let before = std::fs::read(&path).unwrap();
    let image = open_rw(&path);
    let long = "n".repeat(256);
    assert!(matches!(refused(image.snapshot_create("taken")), SnapshotRefusal::NameExists { id, .. } if id == "1"));
    assert_eq!(refused(image.snapshot_create(&long)), SnapshotRefusal::NameTooLong { len: 256 });
    assert_eq!(refused(image.snapshot_create("a\0b")), SnapshotRefusal::NameHasNul);
    assert!(matches!(refused(image.snapshot_apply("nosuch")), SnapshotRefusal::NotFound { .. }));
    // Delete looks names up only, as qemu-img does: "1" is an ID.
    assert!(matches!(refused(image.snapshot_delete("1")), SnapshotRefusal::NotFound { .. }));
    assert!(std::fs::read(&path).unwrap() == before, "a refusal changed the file");
    image.snapshot_create(&"n".repeat(255)).unwrap();
    image.snapshot_delete(&"n".repeat(255)).unwrap();
    image.close().unwrap();
    assert_clean(&path);
    let ro = Image::open_path(&path, Config::read_only()).unwrap();
    assert_eq!(ro.snapshot_create("x").unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(ro.snapshot_delete("taken").unwrap_err().kind(), ErrorKind::ReadOnly);
    drop(ro);
    assert_eq!(qemu_list(&path), [("1".into(), "taken".into())]);

    // One-bit refcounts cannot count a second reference: QEMU fails and leaks a cluster; we undo the raises.
    let one = dir.path().join("one-bit.qcow2");
    qemu_create(&one, "refcount_bits=1", "1M");
    qemu_io(&one, &["write -P 1 0 192k"]);
    open_rw(&one).close().unwrap();
    let before_one = std::fs::read(&one).unwrap();
    let image = open_rw(&one);
    assert!(matches!(refused(image.snapshot_create("s")), SnapshotRefusal::RefcountOverflow { .. }));
    image.close().unwrap();
    assert!(std::fs::read(&one).unwrap() == before_one, "a refused snapshot changed the file");
    assert_clean(&one);

    // An external data file: QEMU's refusal, with its kind.
    let data = dir.path().join("data.qcow2");
    run_ok(
        qemu("qemu-img")
            .current_dir(dir.path())
            .args(["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw"])
            .arg(&data)
            .arg("1M"),
    );
    open_rw(&data).close().unwrap();
    let before_data = std::fs::read(&data).unwrap();
    let image = open_rw(&data);
    for result in [image.snapshot_create("s"), image.snapshot_apply("s"), image.snapshot_delete("s")] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(matches!(e, Error::Snapshot { why: SnapshotRefusal::ExternalDataFile, .. }));
    }
    image.close().unwrap();
    assert!(std::fs::read(&data).unwrap() == before_data);
}

#[test]
fn a_qemu_bitmap_survives_snapshot_create_and_delete() {
    let dir = tempdir();
    let path = dir.path().join("bitmap.qcow2");
    qemu_create(&path, "", "16M");
    run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&path).arg("b0"));
    qemu_io(&path, &["write -P 1 0 64k", "write -P 2 8M 1M"]);
    let before = qemu_bitmap_map(&path, "b0");
    assert!(before.iter().any(|r| r.2), "QEMU's writes are in the bitmap");
    let image = open_rw(&path);
    image.snapshot_create("s1").unwrap();
    image.snapshot_create("s2").unwrap();
    image.snapshot_delete("s1").unwrap();
    image.close().unwrap();
    // No guest byte changed, so no bit did: QEMU finds the bitmap consistent, exactly as dirty as before, every
    // one of its clusters counted.
    assert_eq!(qemu_bitmaps(&path), [("b0".to_string(), 65536, vec!["auto".to_string()])]);
    assert_eq!(qemu_bitmap_map(&path, "b0"), before);
    assert_clean(&path);
    assert_eq!(qemu_list(&path), [("2".into(), "s2".into())]);
}

/// Applying a snapshot may change any guest byte, so every enabled (AUTO) bitmap becomes wholly dirty and a
/// disabled one keeps its bits, as QEMU reads them afterwards.
#[test]
fn applying_a_snapshot_makes_the_auto_bitmaps_wholly_dirty() {
    let dir = tempdir();
    let path = dir.path().join("apply.qcow2");
    qemu_create(&path, "", "16M");
    qemu_io(&path, &["write -P 1 0 64k"]);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&path));
    run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&path).arg("auto"));
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "--disable"]).arg(&path).arg("off"));
    qemu_io(&path, &["write -P 2 8M 64k"]);
    let off_before = qemu_bitmap_map(&path, "off");
    let image = open_rw(&path);
    image.snapshot_apply("s1").unwrap();
    image.close().unwrap();
    assert_eq!(qemu_bitmap_map(&path, "auto"), [(0, 16 << 20, true)]);
    assert_eq!(qemu_bitmap_map(&path, "off"), off_before);
    assert_clean(&path);
}
