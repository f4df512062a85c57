//! Randomised operation sequences checked against a byte model of the disk.
//!
//! Every sequence mixes allocating writes of random ranges and sizes (partial clusters, whole clusters and
//! multi-cluster spans), overwrites of earlier data, zero writes, resizes (growing, and shrinking once allowed),
//! flushes, close + reopen, internal snapshots created, applied and deleted (with a model kept per snapshot), and
//! persistent-bitmap operations (add, clear, disable and enable, store; on v2 images add is refused). After every
//! step the touched clusters are read back and compared with a `Vec<u8>` model, and after every bitmap operation
//! each bitmap is compared with a model of its dirty granules; every few steps the whole disk and every bitmap
//! are. At the end of each deterministic sequence QEMU judges the image: `qemu-img check` must be clean,
//! `qemu-img compare` must match the model, `qemu-img convert -l snapshot.name=` of every snapshot left must match
//! that snapshot's model, and each bitmap as `qemu-nbd -B` exports it (`nbdinfo --map`) must match its model.
//!
//! A failure prints the seed and the layout that reproduce it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/bitmaps.rs"]
mod bitmap_support;
mod support;

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use bitmap_support::{as_triples, qemu_bitmap_map, Model as BitmapModel};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};
use qcow::block::{BlockDevice, FileDevice, FileOptions, MemoryDevice};
use qcow::{Compat, Config, CreateOptions, Image};
use support::{assert_clean, assert_matches_model, with_deadline, OnFailure, Rng};

/// The shape of an image under test.
#[derive(Debug, Clone, Copy)]
struct Layout {
    cluster_size: u64,
    refcount_bits: u64,
    compat: Compat,
    lazy_refcounts: bool,
    /// Metadata cache budget; a small one forces evictions and writebacks in the middle of writes.
    cache_size: u64,
}

impl Layout {
    const fn new(cluster_size: u64, refcount_bits: u64, compat: Compat) -> Self {
        Layout { cluster_size, refcount_bits, compat, lazy_refcounts: false, cache_size: 32 << 20 }
    }

    fn create_options(&self, size: u64) -> CreateOptions {
        let mut o = CreateOptions::new(size);
        o.cluster_size = self.cluster_size;
        o.refcount_bits = self.refcount_bits;
        o.compat = self.compat;
        o.lazy_refcounts = self.lazy_refcounts;
        o
    }

    fn config(&self) -> Config {
        // runtime_asserts: every flush also proves the stored refcounts equal what the metadata implies.
        Config { cache_size: self.cache_size, runtime_asserts: true, ..Config::default() }
    }

    /// Initial and largest virtual sizes: big enough for several L2 tables, and (for 512-byte clusters) for
    /// the L1 table to outgrow its first cluster when the disk grows.
    fn sizes(&self) -> (u64, u64) {
        match self.cluster_size {
            512 => (1 << 20, 4 << 20),
            4096 => (4 << 20, 12 << 20),
            _ => (8 << 20, 24 << 20),
        }
    }
}

/// Where an image lives between a close and the next open.
trait Store {
    type Dev: BlockDevice + 'static;
    /// An empty device for `Image::create`.
    fn fresh(&mut self) -> Self::Dev;
    /// The device holding what the last closed image left behind.
    fn reopen(&mut self) -> Self::Dev;
    /// A file holding the closed image, for QEMU.
    fn image_file(&mut self) -> PathBuf;
}

struct MemoryStore {
    dir: PathBuf,
    current: Option<Arc<MemoryDevice>>,
}

impl Store for MemoryStore {
    type Dev = Arc<MemoryDevice>;

    fn fresh(&mut self) -> Arc<MemoryDevice> {
        let dev = Arc::new(MemoryDevice::new(0));
        self.current = Some(dev.clone());
        dev
    }

    fn reopen(&mut self) -> Arc<MemoryDevice> {
        let bytes = self.current.as_ref().expect("an image was created").snapshot();
        let dev = Arc::new(MemoryDevice::from_bytes(bytes));
        self.current = Some(dev.clone());
        dev
    }

    fn image_file(&mut self) -> PathBuf {
        let path = self.dir.join("image.qcow2");
        std::fs::write(&path, self.current.as_ref().expect("an image was created").snapshot()).unwrap();
        path
    }
}

struct FileStore {
    path: PathBuf,
}

impl Store for FileStore {
    type Dev = FileDevice;

    fn fresh(&mut self) -> FileDevice {
        FileDevice::create(&self.path, &FileOptions::default()).unwrap()
    }

    fn reopen(&mut self) -> FileDevice {
        FileDevice::open(&self.path, &FileOptions::default()).unwrap()
    }

    fn image_file(&mut self) -> PathBuf {
        self.path.clone()
    }
}

/// Fills `buf` with pseudo-random bytes.
fn fill_random(rng: &mut Rng, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// Describes where two byte slices first differ, for assertion messages.
fn first_difference(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = i + got[i..].iter().zip(&want[i..]).take_while(|(a, b)| a != b).count();
    Some(format!(
        "first difference at guest offset {:#x} (sector {}): got {:02x?}.. want {:02x?}.. ({} differing bytes from there)",
        base + i as u64,
        (base + i as u64) / 512,
        &got[i..(i + 8).min(got.len())],
        &want[i..(i + 8).min(want.len())],
        end - i
    ))
}

/// Reads `[offset, offset + len)` and compares it with the model.
fn verify_range<D: BlockDevice>(image: &Image<D>, model: &[u8], offset: u64, len: u64, what: &str) {
    let mut got = vec![0u8; len as usize];
    image.read_at(offset, &mut got).unwrap_or_else(|e| panic!("{what}: read {offset:#x}+{len:#x}: {e}"));
    if let Some(diff) = first_difference(&got, &model[offset as usize..(offset + len) as usize], offset) {
        panic!("{what}: {diff}");
    }
}

/// Reads the whole disk in 1 MiB pieces and compares it with the model.
fn verify_all<D: BlockDevice>(image: &Image<D>, model: &[u8], what: &str) {
    assert_eq!(image.virtual_size(), model.len() as u64, "{what}: virtual size");
    let mut offset = 0u64;
    while offset < model.len() as u64 {
        let len = (1u64 << 20).min(model.len() as u64 - offset);
        verify_range(image, model, offset, len, what);
        offset += len;
    }
}

/// The clusters around `[offset, offset + len)`, clamped to the disk: what a write may have disturbed.
fn cluster_span(offset: u64, len: u64, cluster_size: u64, size: u64) -> (u64, u64) {
    let start = offset / cluster_size * cluster_size;
    let end = (offset + len).next_multiple_of(cluster_size).min(size);
    (start, end - start)
}

/// A random write: offset and length in bytes, both sector multiples, inside `size`.
fn pick_write(rng: &mut Rng, cluster_size: u64, size: u64, earlier: &[(u64, u64)]) -> (u64, u64) {
    let sectors = size / 512;
    let cluster_sectors = cluster_size / 512;
    let (offset, len) = match rng.below(10) {
        // Inside one cluster, or straddling two: a partial-cluster write.
        0..=3 => (rng.below(sectors) * 512, (1 + rng.below(cluster_sectors)) * 512),
        // A multi-cluster span starting and ending anywhere.
        4..=5 => (rng.below(sectors) * 512, (cluster_sectors * (1 + rng.below(4)) + rng.below(cluster_sectors)) * 512),
        // Whole, aligned clusters.
        6..=7 => (rng.below(size / cluster_size) * cluster_size, (1 + rng.below(3)) * cluster_size),
        // An overwrite of (part of) an earlier write, shifted a little.
        _ => match earlier.get(rng.below(earlier.len().max(1) as u64) as usize) {
            Some(&(o, l)) => {
                let shift = rng.below(cluster_sectors * 2) * 512;
                let o = if rng.below(2) == 0 { o.saturating_sub(shift) } else { o + shift };
                (o.min((sectors - 1) * 512), l)
            }
            None => (rng.below(sectors) * 512, 512),
        },
    };
    let len = len.min(512 << 10).min(size - offset).max(512);
    (offset, len)
}

/// A random new size: a sector multiple in `[min, max]`, sometimes cluster aligned.
fn pick_size(rng: &mut Rng, cluster_size: u64, min: u64, max: u64) -> u64 {
    let size = min + rng.below((max - min) / 512 + 1) * 512;
    if rng.below(3) == 0 {
        (size / cluster_size * cluster_size).max(min)
    } else {
        size
    }
}

/// The image's bitmaps, each read whole through `bitmap_status`, against their models.
fn verify_bitmaps<D: BlockDevice>(image: &Image<D>, bitmaps: &[(String, bool, BitmapModel)], what: &str) {
    let listed: Vec<(String, bool)> = image
        .list_bitmaps()
        .unwrap_or_else(|e| panic!("{what}: list: {e}"))
        .into_iter()
        .map(|b| (b.name, b.enabled))
        .collect();
    let want: Vec<(String, bool)> = bitmaps.iter().map(|(n, e, _)| (n.clone(), *e)).collect();
    assert_eq!(listed, want, "{what}: bitmaps listed");
    for (name, _, model) in bitmaps {
        let runs = image.bitmap_status(name, 0, u64::MAX).unwrap_or_else(|e| panic!("{what}: status of {name}: {e}"));
        assert_eq!(as_triples(0, &runs), model.runs(), "{what}: bitmap {name}");
    }
}

/// A bitmap operation on the image and on the models: add (up to three bitmaps, granularities from 512 bytes to
/// 1 MiB), clear, disable or enable, or store.
fn bitmap_step<D: BlockDevice>(
    rng: &mut Rng,
    image: &Image<D>,
    bitmaps: &mut Vec<(String, bool, BitmapModel)>,
    v3: bool,
    step: usize,
    trace: bool,
) -> String {
    let size = image.virtual_size();
    let pick = rng.below(bitmaps.len().max(1) as u64) as usize;
    let op = if bitmaps.is_empty() { 0 } else { rng.below(5) };
    let what = match op {
        0 | 1 if bitmaps.len() < 3 => {
            let granularity = 512u64 << rng.below(12);
            let name = format!("b{step}");
            let enabled = rng.below(4) != 0;
            let added = image.add_bitmap(&name, granularity, enabled);
            if v3 {
                added.unwrap_or_else(|e| panic!("step {step}: add {name}: {e}"));
                bitmaps.push((name.clone(), enabled, BitmapModel::new(granularity, size)));
            } else {
                let e = added.expect_err("a version 2 image took a bitmap");
                assert_eq!(e.kind(), qcow::ErrorKind::InvalidArgument, "step {step}: {e}");
            }
            format!("add {name} at {granularity} bytes, enabled {enabled}")
        }
        2 => {
            let (name, _, model) = &mut bitmaps[pick];
            image.clear_bitmap(name).unwrap_or_else(|e| panic!("step {step}: clear {name}: {e}"));
            model.clear();
            format!("clear {name}")
        }
        3 => {
            let (name, enabled, _) = &mut bitmaps[pick];
            *enabled = !*enabled;
            let r = if *enabled { image.enable_bitmap(name) } else { image.disable_bitmap(name) };
            r.unwrap_or_else(|e| panic!("step {step}: enable/disable {name}: {e}"));
            format!("{} {name}", if *enabled { "enable" } else { "disable" })
        }
        _ => {
            image.store_bitmaps().unwrap_or_else(|e| panic!("step {step}: store: {e}"));
            "store".into()
        }
    };
    if trace {
        eprintln!("step {step}: bitmap {what}");
    }
    what
}

/// Runs one seeded sequence of `steps` operations on images kept in `store`, then asks QEMU.
fn run_sequence<S: Store>(mut store: S, layout: Layout, seed: u64, steps: usize) {
    let _report = OnFailure(format!("seed {seed:#x}, layout {layout:?}, {steps} steps"));
    let mut rng = Rng(seed);
    let cs = layout.cluster_size;
    let (initial, max) = layout.sizes();
    let min = 64 << 10;
    let mut image = Image::create(store.fresh(), &layout.create_options(initial), layout.config()).unwrap();
    let mut model = vec![0u8; initial as usize];
    let mut earlier: Vec<(u64, u64)> = Vec::new();
    let mut counts = [0usize; 7];
    // The snapshots the image holds, each with the model as it was taken.
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    let mut taken = 0;
    // Persistent bitmaps: name, whether enabled, which granules are dirty.
    let mut bitmaps: Vec<(String, bool, BitmapModel)> = Vec::new();
    let v3 = layout.compat == Compat::V3;
    // QCOW_MODEL_TRACE=1 prints every operation, to turn a failure into a reproduction.
    let trace = std::env::var_os("QCOW_MODEL_TRACE").is_some();
    for step in 0..steps {
        let size = model.len() as u64;
        match rng.below(100) {
            67..=70 => {
                counts[6] += 1;
                let what = bitmap_step(&mut rng, &image, &mut bitmaps, v3, step, trace);
                verify_bitmaps(&image, &bitmaps, &format!("step {step}: after bitmap {what}"));
            }
            // Writes of fresh random data, or of zeros.
            0..=66 => {
                counts[0] += 1;
                let (offset, len) = pick_write(&mut rng, cs, size, &earlier);
                let mut data = vec![0u8; len as usize];
                if rng.below(12) != 0 {
                    fill_random(&mut rng, &mut data);
                }
                if trace {
                    eprintln!("step {step}: write_at({offset:#x}, {len:#x} bytes)");
                }
                image
                    .write_at(offset, &data)
                    .unwrap_or_else(|e| panic!("step {step}: write {offset:#x}+{len:#x}: {e}"));
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                for (_, _, m) in bitmaps.iter_mut().filter(|b| b.1) {
                    m.mark(offset, len);
                }
                earlier.push((offset, len));
                let (start, span) = cluster_span(offset, len, cs, size);
                verify_range(&image, &model, start, span, &format!("step {step}: after write {offset:#x}+{len:#x}"));
            }
            // Snapshots: created (at most four kept), applied, deleted.
            71..=74 => {
                counts[5] += 1;
                let pick = rng.below(snapshots.len().max(1) as u64) as usize;
                match rng.below(3) {
                    0 if snapshots.len() < 4 => {
                        taken += 1;
                        let name = format!("s{taken}");
                        if trace {
                            eprintln!("step {step}: snapshot_create({name})");
                        }
                        match image.snapshot_create(&name) {
                            Ok(s) => {
                                assert_eq!((s.name.as_str(), s.disk_size()), (name.as_str(), Some(size)));
                                snapshots.push((name, model.clone()));
                            }
                            // One-bit refcounts cannot count a second reference: refused, nothing changed.
                            Err(qcow::Error::Snapshot {
                                why: qcow::SnapshotRefusal::RefcountOverflow { .. }, ..
                            }) if layout.refcount_bits == 1 => {}
                            Err(e) => panic!("step {step}: snapshot_create({name}): {e}"),
                        }
                        verify_all(&image, &model, &format!("step {step}: after snapshot_create"));
                    }
                    1 if !snapshots.is_empty() => {
                        let (name, kept) = &snapshots[pick];
                        if trace {
                            eprintln!("step {step}: snapshot_apply({name})");
                        }
                        image.snapshot_apply(name).unwrap_or_else(|e| panic!("step {step}: apply {name}: {e}"));
                        model.clone_from(kept);
                        assert_eq!(image.virtual_size(), model.len() as u64, "step {step}: size after apply");
                        earlier.retain(|&(o, l)| o + l <= model.len() as u64);
                        // Every bitmap follows the size; the enabled ones (AUTO) are wholly dirty.
                        for (_, enabled, m) in bitmaps.iter_mut() {
                            m.resize(model.len() as u64);
                            if *enabled {
                                m.mark(0, model.len() as u64);
                            }
                        }
                        verify_all(&image, &model, &format!("step {step}: after snapshot_apply({name})"));
                        verify_bitmaps(&image, &bitmaps, &format!("step {step}: bitmaps after snapshot_apply"));
                    }
                    _ if !snapshots.is_empty() => {
                        let (name, _) = snapshots.remove(pick);
                        if trace {
                            eprintln!("step {step}: snapshot_delete({name})");
                        }
                        image.snapshot_delete(&name).unwrap_or_else(|e| panic!("step {step}: delete {name}: {e}"));
                        verify_all(&image, &model, &format!("step {step}: after snapshot_delete({name})"));
                    }
                    _ => {}
                }
                let names: Vec<String> = image.snapshots().unwrap().into_iter().map(|s| s.name).collect();
                assert_eq!(names, snapshots.iter().map(|s| s.0.clone()).collect::<Vec<_>>(), "step {step}");
            }
            // Resizes: grow, or shrink once a refused shrink has changed nothing.
            75..=84 => {
                counts[1] += 1;
                let new = pick_size(&mut rng, cs, min, max);
                if trace {
                    eprintln!("step {step}: resize({size} -> {new})");
                }
                if new < size {
                    let refused = image.resize(new, false);
                    assert!(refused.is_err(), "step {step}: shrink {size} -> {new} without allow_shrink succeeded");
                    assert_eq!(image.virtual_size(), size, "step {step}: a refused shrink changed the size");
                }
                image.resize(new, true).unwrap_or_else(|e| panic!("step {step}: resize {size} -> {new}: {e}"));
                assert_eq!(image.virtual_size(), new, "step {step}: size after resize {size} -> {new}");
                model.resize(new as usize, 0);
                bitmaps.iter_mut().for_each(|b| b.2.resize(new));
                earlier.retain(|&(o, l)| o + l <= new);
                // The old end's cluster is where stale data would show after a shrink and a grow.
                let edge = size.min(new).saturating_sub(1) / cs * cs;
                let span = (2 * cs).min(new - edge);
                verify_range(&image, &model, edge, span, &format!("step {step}: after resize {size} -> {new}"));
            }
            85..=92 => {
                counts[2] += 1;
                if trace {
                    eprintln!("step {step}: flush");
                }
                image.flush().unwrap_or_else(|e| panic!("step {step}: flush: {e}"));
            }
            _ => {
                counts[3] += 1;
                if trace {
                    eprintln!("step {step}: close and reopen");
                }
                image.close().unwrap_or_else(|e| panic!("step {step}: close: {e}"));
                image =
                    Image::open(store.reopen(), layout.config()).unwrap_or_else(|e| panic!("step {step}: reopen: {e}"));
                verify_all(&image, &model, &format!("step {step}: after reopen"));
                verify_bitmaps(&image, &bitmaps, &format!("step {step}: after reopen"));
            }
        }
        if step % 8 == 7 {
            counts[4] += 1;
            verify_all(&image, &model, &format!("step {step}: whole disk"));
            verify_bitmaps(&image, &bitmaps, &format!("step {step}: every bitmap"));
        }
    }
    verify_all(&image, &model, "end of sequence");
    verify_bitmaps(&image, &bitmaps, "end of sequence");
    image.close().unwrap();
    assert!(counts.iter().all(|&n| n > 0), "operation mix {counts:?}");
    let path = store.image_file();
    assert_clean(&path);
    assert_matches_model(&path, &model);
    for (name, kept) in &snapshots {
        let raw = path.with_extension(format!("{name}.raw"));
        let opt = format!("snapshot.name={name}");
        support::run_ok(
            support::qemu("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", "-l", &opt]).arg(&path).arg(&raw),
        );
        // QEMU reads a snapshot at the image's current size: past the snapshot's own size it shows what the
        // snapshot's last cluster holds there, then zeros.
        let got = std::fs::read(&raw).unwrap();
        let first = got.iter().zip(kept.iter()).position(|(a, b)| a != b);
        let end = (kept.len() as u64).next_multiple_of(layout.cluster_size) as usize;
        assert!(
            first.is_none() && got.len() == model.len() && got.iter().skip(end).all(|&b| b == 0),
            "snapshot {name} differs from its model ({layout:?}, seed {seed:#x}): {} bytes, the model {}, first \
             difference at {first:?}",
            got.len(),
            kept.len()
        );
        std::fs::remove_file(&raw).ok();
    }
    assert!(!v3 || !bitmaps.is_empty(), "a version 3 sequence added no bitmap");
    for (name, _, m) in &bitmaps {
        assert_eq!(qemu_bitmap_map(&path, name), m.runs(), "QEMU's reading of bitmap {name} at the end");
    }
}

/// A sequence normally takes about a second; this leaves room for a slow, loaded machine.
const DEADLINE_SECS: u64 = 120;

fn on_memory(layout: Layout, seed: u64, steps: usize) {
    with_deadline(DEADLINE_SECS, &format!("memory sequence {seed:#x}"), move || {
        let dir = tempfile::tempdir().unwrap();
        run_sequence(MemoryStore { dir: dir.path().to_path_buf(), current: None }, layout, seed, steps);
    });
}

fn on_file(layout: Layout, seed: u64, steps: usize) {
    with_deadline(DEADLINE_SECS, &format!("file sequence {seed:#x}"), move || {
        let dir = tempfile::tempdir().unwrap();
        run_sequence(FileStore { path: dir.path().join("image.qcow2") }, layout, seed, steps);
    });
}

const STEPS: usize = 400;

#[test]
fn random_operations_match_the_model_on_memory_with_512_byte_clusters_and_1_bit_refcounts() {
    on_memory(Layout::new(512, 1, Compat::V3), 0x5eed_0001, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_512_byte_clusters_and_64_bit_refcounts() {
    on_memory(Layout::new(512, 64, Compat::V3), 0x5eed_0002, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_512_byte_clusters_v2() {
    on_memory(Layout::new(512, 16, Compat::V2), 0x5eed_0003, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_4k_clusters_and_16_bit_refcounts() {
    on_memory(Layout::new(4096, 16, Compat::V3), 0x5eed_0004, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_4k_clusters_v2() {
    on_memory(Layout::new(4096, 16, Compat::V2), 0x5eed_0005, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_64k_clusters_and_64_bit_refcounts() {
    on_memory(Layout::new(65536, 64, Compat::V3), 0x5eed_0006, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_64k_clusters_and_1_bit_refcounts() {
    on_memory(Layout::new(65536, 1, Compat::V3), 0x5eed_0007, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_lazy_refcounts() {
    let layout = Layout { lazy_refcounts: true, ..Layout::new(4096, 16, Compat::V3) };
    on_memory(layout, 0x5eed_0008, STEPS);
}

#[test]
fn random_operations_match_the_model_on_memory_with_a_tiny_metadata_cache() {
    // Four clusters of cache: L2 tables and refcount blocks are evicted and written back inside writes.
    let layout = Layout { cache_size: 4 * 4096, ..Layout::new(4096, 16, Compat::V3) };
    on_memory(layout, 0x5eed_0009, STEPS);
}

#[test]
fn random_operations_match_the_model_on_file_with_512_byte_clusters_and_1_bit_refcounts() {
    on_file(Layout::new(512, 1, Compat::V3), 0x5eed_0101, STEPS);
}

#[test]
fn random_operations_match_the_model_on_file_with_4k_clusters_and_64_bit_refcounts() {
    on_file(Layout::new(4096, 64, Compat::V3), 0x5eed_0102, STEPS);
}

#[test]
fn random_operations_match_the_model_on_file_with_64k_clusters_and_16_bit_refcounts() {
    on_file(Layout::new(65536, 16, Compat::V3), 0x5eed_0103, STEPS);
}

#[test]
fn random_operations_match_the_model_on_file_with_64k_clusters_v2() {
    on_file(Layout::new(65536, 16, Compat::V2), 0x5eed_0104, STEPS);
}

#[test]
fn random_operations_match_the_model_on_file_with_a_tiny_metadata_cache_and_512_byte_clusters() {
    let layout = Layout { cache_size: 8 * 512, ..Layout::new(512, 16, Compat::V3) };
    on_file(layout, 0x5eed_0105, STEPS);
}

/// One write that needs more new clusters than a refcount block describes (with 512-byte clusters: 64 clusters
/// at 64-bit refcounts, 256 at 16-bit, 4096 at 1-bit; with 4 KiB clusters and 64-bit refcounts, 512), so its
/// contiguous run of clusters must span refcount blocks that do not exist yet.
#[test]
fn a_single_write_spanning_more_clusters_than_a_refcount_block_covers_completes() {
    for (cluster_size, refcount_bits, clusters) in
        [(512u64, 64u64, 64u64), (512, 16, 300), (512, 1, 4100), (4096, 64, 520)]
    {
        let what = format!("{clusters} clusters of {cluster_size} bytes at {refcount_bits}-bit refcounts in one write");
        let layout = Layout::new(cluster_size, refcount_bits, Compat::V3);
        let w = what.clone();
        with_deadline(30, &what, move || {
            let _report = OnFailure(w.clone());
            let size = 8 << 20;
            let dev = Arc::new(MemoryDevice::new(0));
            let image = Image::create(dev.clone(), &layout.create_options(size), layout.config()).unwrap();
            let mut data = vec![0u8; (clusters * cluster_size) as usize];
            fill_random(&mut Rng(clusters), &mut data);
            image.write_at(cluster_size, &data).unwrap_or_else(|e| panic!("{w}: {e}"));
            let mut model = vec![0u8; size as usize];
            model[cluster_size as usize..][..data.len()].copy_from_slice(&data);
            verify_all(&image, &model, &w);
            image.close().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("image.qcow2");
            std::fs::write(&path, dev.snapshot()).unwrap();
            assert_clean(&path);
            assert_matches_model(&path, &model);
        });
    }
}

/// The smallest sequence the tiny-cache model test was reduced to: with room for four metadata clusters, a flush
/// and two writes that each need a new L2 table must not lose the data mapped by the first L2 table.
#[test]
fn a_small_metadata_cache_evicting_l2_tables_keeps_earlier_data() {
    with_deadline(30, "small cache eviction", || {
        let layout = Layout { cache_size: 4 * 4096, ..Layout::new(4096, 16, Compat::V3) };
        let size: u64 = 8 << 20;
        let dev = Arc::new(MemoryDevice::new(0));
        let image = Image::create(dev.clone(), &layout.create_options(size), layout.config()).unwrap();
        let mut model = vec![0u8; size as usize];
        for (offset, byte, flush) in [(0u64, 1u8, true), (4 << 20, 2, false), (2 << 20, 3, false)] {
            image.write_at(offset, &[byte; 4096]).unwrap();
            model[offset as usize..][..4096].fill(byte);
            if flush {
                image.flush().unwrap();
            }
            verify_all(&image, &model, &format!("after writing {byte:#x}s at {offset:#x}"));
        }
        image.close().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.qcow2");
        std::fs::write(&path, dev.snapshot()).unwrap();
        assert_clean(&path);
        assert_matches_model(&path, &model);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// The proptest variant: generated operation sequences on MemoryDevice, checked against the model after every
// operation (no QEMU in the loop).

#[derive(Debug, Clone)]
enum PropOp {
    /// Write `sectors` sectors at `at` (taken modulo the disk), filled from `byte`.
    Write {
        at: u32,
        sectors: u16,
        byte: u8,
    },
    /// Resize to `kib` KiB (at least 64), shrinking allowed.
    Resize {
        kib: u16,
    },
    Flush,
    Reopen,
}

fn prop_op() -> impl Strategy<Value = PropOp> {
    prop_oneof![
        6 => (any::<u32>(), 1u16..400, any::<u8>()).prop_map(|(at, sectors, byte)| PropOp::Write { at, sectors, byte }),
        1 => (64u16..3072).prop_map(|kib| PropOp::Resize { kib }),
        1 => Just(PropOp::Flush),
        1 => Just(PropOp::Reopen),
    ]
}

fn prop_layout() -> impl Strategy<Value = Layout> {
    (prop::sample::select(vec![512u64, 4096, 65536]), prop::sample::select(vec![1u64, 16, 64]), any::<bool>()).prop_map(
        |(cluster_size, refcount_bits, v2)| {
            if v2 {
                Layout::new(cluster_size, 16, Compat::V2)
            } else {
                Layout::new(cluster_size, refcount_bits, Compat::V3)
            }
        },
    )
}

/// The bytes of a generated write: `byte` varied by position, so misplaced sectors show.
fn prop_data(byte: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| byte ^ (i / 512) as u8 ^ (i as u8).rotate_left(3)).collect()
}

fn prop_check(
    image: &Image<Arc<MemoryDevice>>,
    model: &[u8],
    offset: u64,
    len: u64,
    what: &str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(image.virtual_size(), model.len() as u64, "{}: virtual size", what);
    let mut got = vec![0u8; len as usize];
    image.read_at(offset, &mut got).map_err(|e| TestCaseError::fail(format!("{what}: read: {e}")))?;
    if let Some(diff) = first_difference(&got, &model[offset as usize..(offset + len) as usize], offset) {
        return Err(TestCaseError::fail(format!("{what}: {diff}")));
    }
    Ok(())
}

fn prop_sequence(layout: Layout, ops: &[PropOp]) -> Result<(), TestCaseError> {
    let fail = |what: String| TestCaseError::fail(what);
    let initial: u64 = 1 << 20;
    let mut dev = Arc::new(MemoryDevice::new(0));
    let mut image = Image::create(dev.clone(), &layout.create_options(initial), layout.config())
        .map_err(|e| fail(format!("create: {e}")))?;
    let mut model = vec![0u8; initial as usize];
    for (step, op) in ops.iter().enumerate() {
        let size = model.len() as u64;
        match *op {
            PropOp::Write { at, sectors, byte } => {
                let offset = u64::from(at) % (size / 512) * 512;
                let len = (u64::from(sectors) * 512).min(size - offset);
                let data = prop_data(byte, len as usize);
                image.write_at(offset, &data).map_err(|e| fail(format!("step {step}: {op:?}: {e}")))?;
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                let (start, span) = cluster_span(offset, len, layout.cluster_size, size);
                prop_check(&image, &model, start, span, &format!("step {step}: {op:?}"))?;
            }
            PropOp::Resize { kib } => {
                let new = u64::from(kib) << 10;
                image.resize(new, true).map_err(|e| fail(format!("step {step}: {op:?}: {e}")))?;
                model.resize(new as usize, 0);
                prop_check(&image, &model, 0, new, &format!("step {step}: {op:?}"))?;
            }
            PropOp::Flush => image.flush().map_err(|e| fail(format!("step {step}: flush: {e}")))?,
            PropOp::Reopen => {
                image.close().map_err(|e| fail(format!("step {step}: close: {e}")))?;
                dev = Arc::new(MemoryDevice::from_bytes(dev.snapshot()));
                image =
                    Image::open(dev.clone(), layout.config()).map_err(|e| fail(format!("step {step}: open: {e}")))?;
                prop_check(&image, &model, 0, model.len() as u64, &format!("step {step}: after reopen"))?;
            }
        }
    }
    prop_check(&image, &model, 0, model.len() as u64, "end of sequence")?;
    image.close().map_err(|e| fail(format!("close: {e}")))?;
    let reopened = Image::open(MemoryDevice::from_bytes(dev.snapshot()), Config::read_only())
        .map_err(|e| fail(format!("read-only open after close: {e}")))?;
    let mut all = vec![0u8; model.len()];
    reopened.read_at(0, &mut all).map_err(|e| fail(format!("read after close: {e}")))?;
    if let Some(diff) = first_difference(&all, &model, 0) {
        return Err(fail(format!("after close and read-only reopen: {diff}")));
    }
    Ok(())
}

#[test]
fn generated_operation_sequences_match_the_model() {
    let config = ProptestConfig {
        cases: 16,
        // Shrinking a hanging case costs a deadline per attempt; a few attempts are enough to simplify it.
        max_shrink_iters: 6,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x9e37_79b9_7f4a_7c15),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (prop_layout(), prop::collection::vec(prop_op(), 1..40));
    let result = runner.run(&strategy, |(layout, ops)| {
        // A case takes milliseconds; one that hangs fails (and leaves its thread behind) instead of stalling.
        let (done, wait) = mpsc::channel();
        let case = format!("{layout:?} {ops:?}");
        std::thread::spawn(move || {
            let _ = done.send(prop_sequence(layout, &ops));
        });
        match wait.recv_timeout(Duration::from_secs(5)) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!("hung for 5 s: {case}"))),
            Err(RecvTimeoutError::Disconnected) => Err(TestCaseError::fail(format!("panicked: {case}"))),
        }
    });
    if let Err(e) = result {
        panic!("generated sequence failed (proptest seed 0x9e3779b97f4a7c15): {e}");
    }
}
