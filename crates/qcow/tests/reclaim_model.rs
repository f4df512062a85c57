//! Randomised sequences of writes, discards, flushes, erasing of junk, online and offline compactions and reopens,
//! checked against a byte model after every step with `runtime_asserts` on (every flush proves the stored
//! refcounts equal what the metadata implies). Each sequence ends with QEMU's judgement: `qemu-img check` clean and `qemu-img compare` equal.
//!
//! CI runs 10,000 operations in all; `QCOW_RECLAIM_OPS=N` runs N per layout instead. A failure prints the seed,
//! the layout and the step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::path::Path;

use qcow::block::{BlockDevice, FileDevice, FileOptions};
use qcow::{Compat, Config, CreateOptions, Image};
use support::{assert_clean, assert_matches_model, with_deadline, OnFailure, Rng};

fn config() -> Config {
    Config { discard: true, runtime_asserts: true, cache_size: 256 << 10, ..Config::default() }
}

fn open(path: &Path) -> Image<FileDevice> {
    Image::open(FileDevice::open(path, &FileOptions::default()).unwrap(), config()).unwrap()
}

/// Reads `[at, at + len)` and compares it with the model.
fn verify(image: &Image<FileDevice>, model: &[u8], at: u64, len: u64, what: &str) {
    let mut back = vec![0u8; len as usize];
    image.read_at(at, &mut back).unwrap();
    if back != model[at as usize..(at + len) as usize] {
        let first = back.iter().zip(&model[at as usize..]).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: byte {:#x} reads {:#x}, the model says {:#x}",
            at + first as u64,
            back[first],
            model[at as usize + first]
        );
    }
}

fn run_sequence(cluster_size: u64, compat: Compat, extended_l2: bool, seed: u64, ops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seq.qcow2");
    let size = (cluster_size * 512).clamp(4 << 20, 16 << 20);
    let mut options = CreateOptions::new(size);
    options.cluster_size = cluster_size;
    options.compat = compat;
    options.extended_l2 = extended_l2;
    Image::create(FileDevice::create(&path, &FileOptions::default()).unwrap(), &options, Config::default())
        .unwrap()
        .close()
        .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let mut image = open(&path);
    for step in 0..ops {
        let _why = OnFailure(format!("seed {seed:#x}, cluster size {cluster_size}, {compat:?}, step {step}"));
        let sectors = size / 512;
        let at = rng.below(sectors) * 512;
        let len = match rng.below(4) {
            0 => 512 * (1 + rng.below(8)),
            1 => cluster_size * (1 + rng.below(3)),
            2 => 512 * (1 + rng.below(sectors / 8)),
            _ => cluster_size / 2,
        }
        .min(size - at)
        .max(512);
        match rng.below(100) {
            0..=44 => {
                let byte = 1 + (rng.next() % 255) as u8;
                image.write_at(at, &vec![byte; len as usize]).unwrap();
                model[at as usize..(at + len) as usize].fill(byte);
                verify(&image, &model, at, len, "after a write");
            }
            45..=79 => {
                image.discard(at / 512, len / 512).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
                verify(&image, &model, at, len, "after a discard");
            }
            80..=89 => image.flush().unwrap(),
            90..=91 => {
                let before = image.device().info().size_bytes();
                let round = image.compact_online(1 + rng.below(64), &|| false).unwrap();
                assert!(round.new_size <= before, "online compaction grew the file: {round:?}");
                verify(&image, &model, 0, size, "after online compaction");
            }
            92 => {
                image.erase_junk(1 + rng.below(256)).unwrap();
                verify(&image, &model, 0, size, "after erasing junk");
            }
            93..=94 => {
                let before = image.device().info().size_bytes();
                let summary = image.compact(&mut |_| true).unwrap();
                assert!(summary.new_size <= before, "compaction grew the file: {summary:?}");
                image.flush().unwrap();
                verify(&image, &model, 0, size, "after a compaction");
            }
            _ => {
                image.close().unwrap();
                image = open(&path);
                verify(&image, &model, 0, size, "after a reopen");
            }
        }
    }
    image.close().unwrap();
    assert_clean(&path);
    assert_matches_model(&path, &model);
}

#[test]
fn random_writes_discards_and_compactions_match_the_model() {
    let per_layout: usize = std::env::var("QCOW_RECLAIM_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1250);
    let layouts = [
        (65536, Compat::V3, false),
        (4096, Compat::V3, false),
        (512, Compat::V3, false),
        (65536, Compat::V2, false),
        (4096, Compat::V2, false),
        (16384, Compat::V3, true),
        (65536, Compat::V3, true),
        (2 << 20, Compat::V3, false),
    ];
    for (i, (cs, compat, ext)) in layouts.into_iter().enumerate() {
        with_deadline(600, &format!("sequence {i}"), move || {
            run_sequence(cs, compat, ext, 0x5eed_0000 + i as u64, per_layout)
        });
    }
}
