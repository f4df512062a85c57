//! Opening images: what is refused and by which name, what a read-write open repairs, what read-only guarantees,
//! and images stacked on images. QEMU makes the inputs and judges the outputs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow::block::{BlockDevice, FileDevice, FileOptions, MemoryDevice};
use qcow::{Config, CreateOptions, ErrorKind, Image};
use support::{assert_clean, qemu_check, qemu_create, qemu_io, qemu_to_raw, run_ok};

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn open_rw(path: &Path) -> qcow::Result<Image<FileDevice>> {
    Image::open(FileDevice::open(path, &FileOptions::default())?, Config::default())
}

fn open_ro(path: &Path) -> qcow::Result<Image<FileDevice>> {
    let opts = FileOptions { read_only: true, direct: false, ..FileOptions::default() };
    Image::open(FileDevice::open(path, &opts)?, Config::read_only())
}

fn read_all<D: BlockDevice>(image: &Image<D>) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn an_unknown_incompatible_feature_is_refused_by_the_name_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "", "1M");
    // Set incompatible bit 7 and give it a name in the feature-name table's first entry (type 0, bit 7).
    poke(&img, 79, &[0x80]);
    let table_entry = 112 + 8;
    let mut entry = [0u8; 48];
    entry[0] = 0;
    entry[1] = 7;
    entry[2..2 + 15].copy_from_slice(b"teleport frames");
    poke(&img, table_entry, &entry);
    let err = open_ro(&img).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("teleport frames"), "{err}");
}

#[test]
fn the_corrupt_bit_allows_read_only_opens_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_create(&img, "", "1M");
    qemu_io(&img, &["write -P 0x5a 0 64k"]);
    poke(&img, 79, &[0x02]);
    assert!(open_rw(&img).is_err());
    let image = open_ro(&img).unwrap();
    assert!(read_all(&image)[..65536].iter().all(|&b| b == 0x5a));
}

#[test]
fn read_only_opens_never_modify_the_file_even_when_dirty_or_with_autoclear_bits() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_create(&img, "lazy_refcounts=on", "4M");
    let _ = support::qemu("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 128k", "-c", "sigraise 9"])
        .arg(&img)
        .output();
    poke(&img, 95, &[0x81]);
    let before = std::fs::read(&img).unwrap();
    let image = open_ro(&img).unwrap();
    assert!(image.info().dirty);
    assert!(read_all(&image)[..131072].iter().all(|&b| b == 0x11));
    assert_eq!(image.write_at(0, &[0u8; 512]).unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(image.resize(8 << 20, false).unwrap_err().kind(), ErrorKind::ReadOnly);
    image.flush().unwrap();
    image.close().unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), before, "a read-only open changed the file");
}

#[test]
fn a_read_write_open_clears_unknown_autoclear_bits_and_rebuilds_dirty_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    qemu_create(&img, "lazy_refcounts=on", "4M");
    let _ = support::qemu("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 64k 192k", "-c", "write -P 0x33 1M 64k", "-c", "sigraise 9"])
        .arg(&img)
        .output();
    poke(&img, 95, &[0x80]);
    let expected = qemu_to_raw(&img, dir.path());
    assert_ne!(
        qemu_check(&img).corruptions() + qemu_check(&img).leaks(),
        0,
        "qemu-io was meant to leave stale refcounts"
    );
    let image = open_rw(&img).unwrap();
    let header = image.header();
    assert_eq!(header.autoclear_features, 0);
    assert_eq!(header.incompatible_features & 1, 0, "dirty bit cleared after the rebuild");
    assert_eq!(read_all(&image), expected);
    image.write_at(2 << 20, &[0x44; 4096]).unwrap();
    image.close().unwrap();
    assert_clean(&img);
    let after = qemu_to_raw(&img, dir.path());
    assert_eq!(after[..2 << 20], expected[..2 << 20]);
    assert!(after[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0x44));
}

#[test]
fn lazy_refcount_images_we_write_are_dirty_while_open_and_clean_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lazy.qcow2");
    let mut opts = CreateOptions::new(16 << 20);
    opts.lazy_refcounts = true;
    let image =
        Image::create(FileDevice::create(&img, &FileOptions::default()).unwrap(), &opts, Config::default()).unwrap();
    image.write_at(0, &[0x77; 65536]).unwrap();
    image.flush().unwrap();
    let check = qemu_check(&img);
    assert_eq!(check.corruptions(), 0, "{:#}", check.json);
    assert!(image.info().dirty);
    image.close().unwrap();
    assert_clean(&img);
    let out = run_ok(support::qemu("qemu-img").args(["info", "--output=json"]).arg(&img));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
    assert_eq!(info["dirty-flag"], false);
}

#[test]
fn check_on_connect_refuses_an_image_whose_refcounts_are_too_low() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, &["write -P 0x66 0 64k"]);
    // The first refcount block is at 0x20000; entry 5 (the data cluster at 0x50000) set to 0.
    poke(&img, 0x20000 + 5 * 2, &[0, 0]);
    assert!(qemu_check(&img).corruptions() > 0);
    let config = Config { check_on_connect: true, ..Config::default() };
    let err = Image::open(FileDevice::open(&img, &FileOptions::default()).unwrap(), config).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(open_rw(&img).is_ok(), "without check_on_connect the open is O(1) and does not look");
}

#[test]
fn images_with_backing_files_are_refused_by_name_until_backing_support_lands() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let img = dir.path().join("overlay.qcow2");
    run_ok(support::qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&base).arg(&img));
    let err = open_ro(&img).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("backing file"), "{err}");
}

#[test]
fn garbage_is_refused_with_a_format_error_not_a_panic() {
    for bytes in [vec![], vec![0u8; 100], b"QFI\xfb\0\0\0\x07".to_vec(), vec![0xffu8; 70000]] {
        let err = Image::open(MemoryDevice::from_bytes(bytes), Config::read_only()).err().expect("refused");
        assert!(
            matches!(err.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported | ErrorKind::InvalidArgument),
            "{err}"
        );
    }
}

#[test]
fn an_image_stacked_inside_an_image_is_valid_qcow2_at_both_levels() {
    let dir = tempfile::tempdir().unwrap();
    let outer_path = dir.path().join("outer.qcow2");
    let outer_dev = FileDevice::create(&outer_path, &FileOptions::default()).unwrap();
    let outer = Image::create(outer_dev, &CreateOptions::new(64 << 20), Config::default()).unwrap();
    let mut inner_opts = CreateOptions::new(32 << 20);
    inner_opts.cluster_size = 4096;
    // The inner image grows its device: the outer image must accept resizes through the device interface.
    let inner = Image::create(outer, &inner_opts, Config::default()).unwrap();
    let mut model = vec![0u8; 32 << 20];
    for (i, offset) in [0usize, 4096, 1 << 20, (32 << 20) - 8192].into_iter().enumerate() {
        let data = vec![0x10 + i as u8; 8192];
        inner.write_at(offset as u64, &data).unwrap();
        model[offset..offset + 8192].copy_from_slice(&data);
    }
    assert_eq!(read_all(&inner), model);
    inner.close().unwrap();
    assert_clean(&outer_path);
    let inner_path = dir.path().join("inner.qcow2");
    run_ok(support::qemu("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&outer_path).arg(&inner_path));
    assert_clean(&inner_path);
    support::assert_matches_model(&inner_path, &model);
}

#[test]
fn runtime_asserts_catch_a_refcount_that_disagrees_with_the_metadata_at_flush() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    qemu_create(&img, "", "4M");
    let config = Config { runtime_asserts: true, ..Config::default() };
    let image = Image::open(FileDevice::open(&img, &FileOptions::default()).unwrap(), config.clone()).unwrap();
    image.write_at(0, &[1; 4096]).unwrap();
    image.flush().unwrap();
    image.close().unwrap();
    // Cluster 5 holds the data (after header, table, block, L1 and L2): one reference, refcount raised to 2.
    poke(&img, 0x20000 + 5 * 2, &[0, 2]);
    assert_eq!(qemu_check(&img).leaks(), 1);
    let image = Image::open(FileDevice::open(&img, &FileOptions::default()).unwrap(), config).unwrap();
    let err = image.flush().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("higher"), "{err}");
}
