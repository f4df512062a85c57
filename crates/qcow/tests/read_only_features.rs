//! Features this version reads but does not write yet: extended L2 entries (subclusters) and external data
//! files. QEMU makes the images; our reads must equal `qemu-img convert -O raw`, and read-write opens must be
//! refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;

use qcow::{Config, ErrorKind, Image};
use support::{qemu, qemu_io, run_ok};

fn qemu_raw(dir: &Path, image: &str) -> Vec<u8> {
    let out = dir.join(format!("{image}.expected.raw"));
    run_ok(qemu("qemu-img").current_dir(dir).args(["convert", "-O", "raw", image]).arg(&out));
    std::fs::read(out).unwrap()
}

fn our_raw(path: &Path) -> Vec<u8> {
    let image = Image::open_path(path, Config::read_only()).unwrap();
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut buf).unwrap();
    buf
}

fn assert_read_write_refused(path: &Path, name: &str) {
    let err = Image::open_path(path, Config::default()).err().expect("read-write open refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains(name), "{err}");
}

#[test]
fn subcluster_images_read_like_qemu_at_every_subcluster_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_ok(qemu("qemu-img").current_dir(d).args(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]));
    qemu_io(&d.join("base.qcow2"), &["write -P 0x11 0 4M"]);
    for (name, opts) in [
        ("x64k.qcow2", "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2"),
        ("x16k.qcow2", "extended_l2=on,cluster_size=16k"),
        ("x2m.qcow2", "extended_l2=on,cluster_size=2M,compression_type=zstd"),
    ] {
        run_ok(qemu("qemu-img").current_dir(d).args(["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]));
        let path = d.join(name);
        // Partial subclusters, zero subclusters, a compressed cluster, and a run across clusters.
        qemu_io(
            &path,
            &[
                "write -P 0x22 4k 2k",
                "write -P 0x33 70k 10k",
                "write -z 200k 6k",
                "write -z 256k 64k",
                "write -c -P 0x44 2M 2M",
                "write -P 0x55 1500k 100k",
            ],
        );
        assert_eq!(our_raw(&path), qemu_raw(d, name), "{name}");
        assert_read_write_refused(&path, "extended L2");
    }
}

#[test]
fn external_data_file_images_read_like_qemu_raw_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, opts) in [("df.qcow2", "data_file=df.data"), ("dfraw.qcow2", "data_file=dfraw.data,data_file_raw=on")] {
        run_ok(qemu("qemu-img").current_dir(d).args(["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]));
        // qemu-io resolves the data file name against its working directory.
        run_ok(qemu("qemu-io").current_dir(d).args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 100k",
            "-c",
            "write -z 2M 64k",
            name,
        ]));
        let path = d.join(name);
        assert_eq!(our_raw(&path), qemu_raw(d, name), "{name}");
        assert_read_write_refused(&path, "external data file");
    }
}
