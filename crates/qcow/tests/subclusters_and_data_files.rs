//! Extended L2 entries (subclusters) and external data files, read and written.
//! QEMU makes or judges the images: our reads must equal `qemu-img convert -O raw`, and after our writes
//! `qemu-img check` is clean and `qemu-img compare` matches a model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;

use qcow::{Config, CreateOptions, Image};
use support::{qemu, qemu_io, run_ok, Rng};

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

/// `qemu-img check` run in `dir`, because QEMU resolves data file names against its working directory.
fn assert_clean_in(dir: &Path, name: &str) {
    let out = qemu("qemu-img").current_dir(dir).args(["check", "--output=json", name]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img check prints JSON");
    let field = |f: &str| json.get(f).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(
        (field("corruptions"), field("leaks"), field("check-errors"), out.status.code()),
        (0, 0, 0, Some(0)),
        "{json:#}"
    );
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
        let expected = qemu_raw(d, name);
        assert_eq!(our_raw(&path), expected, "{name}");
        // Our writes into QEMU's subcluster image: partial subclusters, whole clusters, compressed clusters,
        // zero subclusters and unallocated ones over the backing file.
        let mut model = expected;
        let image = Image::open_path(&path, Config::default()).unwrap();
        let mut rng = Rng(0x5c + name.len() as u64);
        for _ in 0..60 {
            let offset = (rng.below(4 << 20) & !511) as usize;
            let len = ((rng.below(150_000) + 512) as usize & !511).min((4 << 20) - offset);
            let byte = rng.below(255) as u8 + 1;
            image.write_at(offset as u64, &vec![byte; len]).unwrap();
            model[offset..offset + len].fill(byte);
        }
        image.close().unwrap();
        support::assert_clean(&path);
        assert_eq!(qemu_raw(d, name), model, "{name}: QEMU reads our writes");
    }
}

#[test]
fn subcluster_images_we_create_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["16k", "64k", "2M"] {
        let path = dir.path().join(format!("sub{cluster}.qcow2"));
        let mut opts = CreateOptions::new(16 << 20);
        opts.apply(&format!("extended_l2=on,cluster_size={cluster}")).unwrap();
        let image = Image::create_path(&path, &opts, Config::default()).unwrap();
        let mut model = vec![0u8; 16 << 20];
        let mut rng = Rng(0x5ab + cluster.len() as u64);
        for _ in 0..60 {
            let offset = (rng.below(16 << 20) & !511) as usize;
            let len = ((rng.below(100_000) + 512) as usize & !511).min((16 << 20) - offset);
            let byte = rng.below(255) as u8 + 1;
            image.write_at(offset as u64, &vec![byte; len]).unwrap();
            model[offset..offset + len].fill(byte);
        }
        image.close().unwrap();
        support::assert_clean(&path);
        support::assert_matches_model(&path, &model);
        let out = run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(&path));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["format-specific"]["data"]["extended-l2"], true);
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
        let expected = qemu_raw(d, name);
        assert_eq!(our_raw(&path), expected, "{name}");
        // Then we write into QEMU's data-file image, and QEMU judges.
        let mut model = expected;
        let image = Image::open_path(&path, Config::default()).unwrap();
        for (offset, len, byte) in [(0usize, 512usize, 0x31u8), (1 << 20, 65536, 0x32), (3 << 20, 4096, 0x33)] {
            image.write_at(offset as u64, &vec![byte; len]).unwrap();
            model[offset..offset + len].fill(byte);
        }
        image.close().unwrap();
        assert_clean_in(d, name);
        let raw = d.join(format!("{name}.model.raw"));
        std::fs::write(&raw, &model).unwrap();
        let out = qemu("qemu-img")
            .current_dir(d)
            .args(["compare", "-f", "qcow2", "-F", "raw", name])
            .arg(&raw)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn data_file_images_we_create_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (i, raw) in [false, true].into_iter().enumerate() {
        let path = dir.path().join(format!("ours{i}.qcow2"));
        let mut opts = CreateOptions::new(8 << 20);
        opts.apply(&format!("data_file=ours{i}.data,data_file_raw={}", if raw { "on" } else { "off" })).unwrap();
        let image = Image::create_path(&path, &opts, Config::default()).unwrap();
        let mut model = vec![0u8; 8 << 20];
        let mut rng = Rng(0xda7a + i as u64);
        for _ in 0..40 {
            let offset = (rng.below(8 << 20) & !511) as usize;
            let len = ((rng.below(200_000) + 512) as usize & !511).min((8 << 20) - offset);
            let byte = rng.below(255) as u8 + 1;
            image.write_at(offset as u64, &vec![byte; len]).unwrap();
            model[offset..offset + len].fill(byte);
        }
        image.close().unwrap();
        assert_clean_in(dir.path(), &format!("ours{i}.qcow2"));
        // qemu-img resolves the data file name against its working directory.
        let raw_model = dir.path().join(format!("ours{i}.model.raw"));
        std::fs::write(&raw_model, &model).unwrap();
        let out = qemu("qemu-img")
            .current_dir(dir.path())
            .args(["compare", "-f", "qcow2", "-F", "raw", &format!("ours{i}.qcow2")])
            .arg(&raw_model)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
        if raw {
            // A raw data file is itself the disk.
            assert_eq!(
                std::fs::read(dir.path().join("ours1.data")).unwrap()[..],
                model[..std::fs::metadata(dir.path().join("ours1.data")).unwrap().len() as usize]
            );
        }
    }
}
