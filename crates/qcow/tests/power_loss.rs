//! Power loss at every write boundary, and with random subsets of the unflushed writes kept.
//!
//! A seeded workload (allocating writes, overwrites, resizes, flushes) runs on a `FaultyDevice<MemoryDevice>`
//! that loses power at a chosen point. What survives must be an image QEMU finds no corruption in (leaks are
//! allowed), that we open read-write, and in which every write acknowledged before the last completed flush
//! reads back: each sector must hold what the model held at that flush, or data of an operation issued after it
//! (or zeros where a resize issued after it cut the disk). Then we write some more, close, and QEMU must agree
//! with what we read; a lazy-refcounts image that was left dirty must come out fully clean, since opening it
//! read-write rebuilds its refcounts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/power_cut.rs"]
mod power_cut;
mod support;

use std::path::Path;
use std::sync::Arc;

use power_cut::PowerCut;
use qcow::block::{BlockDevice, MemoryDevice};
use qcow::{Compat, Config, CreateOptions, Error, Image};
use support::{assert_clean, assert_matches_model, assert_not_corrupt, with_deadline, OnFailure, Rng};

/// Whether journal entry `i` survives a power loss seeded with `seed`. The seed also picks how much survives:
/// none, about a quarter, half, three quarters, or all.
fn keeps(seed: u64, i: usize) -> bool {
    let mut x = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    x % 4 < seed % 5
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u64 },
    Flush,
    Resize { size: u64 },
}

fn data_for(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; len as usize];
    for chunk in data.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    data
}

/// What a workload does.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    opts: CreateOptions,
    config: Config,
    ops: Vec<Op>,
}

/// A seeded mix of partial-cluster, multi-cluster and aligned writes, overwrites of earlier writes, flushes
/// and (when `max_size` exceeds the initial size) resizes, each resize followed by a flush.
fn mixed_workload(
    name: &'static str,
    opts: CreateOptions,
    config: Config,
    seed: u64,
    ops: usize,
    max_size: u64,
) -> Workload {
    let mut rng = Rng(seed);
    let cs = opts.cluster_size;
    let cs_sectors = cs / 512;
    let mut size = opts.size;
    let mut earlier: Vec<(u64, u64)> = Vec::new();
    let mut list = Vec::new();
    while list.len() < ops {
        let sectors = size / 512;
        match rng.below(20) {
            0..=13 => {
                let (offset, len) = match rng.below(4) {
                    0 => (rng.below(sectors) * 512, (1 + rng.below(cs_sectors)) * 512),
                    1 => (rng.below(sectors) * 512, (cs_sectors * (1 + rng.below(3)) + rng.below(cs_sectors)) * 512),
                    2 => (rng.below(size / cs) * cs, (1 + rng.below(2)) * cs),
                    _ => match earlier.get(rng.below(earlier.len().max(1) as u64) as usize) {
                        Some(&(o, l)) => (o, l),
                        None => (0, 512),
                    },
                };
                let len = len.min(size - offset).max(512);
                earlier.push((offset, len));
                list.push(Op::Write { offset, len, seed: rng.next() });
            }
            14..=16 => list.push(Op::Flush),
            _ if max_size > opts.size => {
                let new = (opts.size / 2 + rng.below((max_size - opts.size / 2) / 512 + 1) * 512).max(64 << 10);
                size = new;
                earlier.retain(|&(o, l)| o + l <= size);
                list.push(Op::Resize { size: new });
                list.push(Op::Flush);
            }
            _ => list.push(Op::Flush),
        }
    }
    Workload { name, opts, config, ops: list }
}

/// Fills most of a disk with `chunk`-sized allocating writes in random order, flushing every few writes, with
/// some overwrites: enough allocation for the refcount table to outgrow its first cluster.
fn filling_workload(name: &'static str, opts: CreateOptions, seed: u64, fill: u64, chunk: u64) -> Workload {
    let mut rng = Rng(seed);
    let mut chunks: Vec<u64> = (0..opts.size / chunk).collect();
    for i in (1..chunks.len()).rev() {
        chunks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut ops = Vec::new();
    for (n, &c) in chunks.iter().take((fill / chunk) as usize).enumerate() {
        ops.push(Op::Write { offset: c * chunk, len: chunk, seed: rng.next() });
        if n % 5 == 2 {
            let o = chunks[rng.below(n as u64 + 1) as usize] * chunk + rng.below(chunk / 512) * 512;
            ops.push(Op::Write { offset: o, len: 512 * (1 + rng.below(8)), seed: rng.next() });
        }
        if n % 6 == 5 {
            ops.push(Op::Flush);
        }
    }
    ops.push(Op::Flush);
    Workload { name, opts, config: Config::default(), ops }
}

#[derive(Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Resize { from: u64, to: u64 },
}

/// The model of what was acknowledged, what the last completed flush made durable, and every operation issued
/// since (including one that was cut short).
struct Tracker {
    model: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

impl Tracker {
    fn new(size: u64) -> Self {
        Tracker { model: vec![0; size as usize], durable: vec![0; size as usize], pending: Vec::new() }
    }
}

type Img = Image<Arc<PowerCut>>;

/// A new image on a fresh device, created and flushed: the starting point every crash is measured from.
fn fresh(w: &Workload) -> (Arc<PowerCut>, Img) {
    let dev = Arc::new(PowerCut::new(Vec::new()));
    let image = Image::create(dev.clone(), &w.opts, w.config.clone()).unwrap();
    image.flush().unwrap();
    (dev, image)
}

/// Runs the workload until it ends or an operation fails; `after_op` sees each completed operation.
fn run(image: &Img, w: &Workload, t: &mut Tracker, mut after_op: impl FnMut(usize)) -> Result<(), (usize, Error)> {
    for (i, op) in w.ops.iter().enumerate() {
        match *op {
            Op::Write { offset, len, seed } => {
                let data = data_for(seed, len);
                t.pending.push(Pending::Write { offset, data });
                let Some(Pending::Write { data, .. }) = t.pending.last() else { unreachable!() };
                image.write_at(offset, data).map_err(|e| (i, e))?;
                t.model[offset as usize..(offset + len) as usize].copy_from_slice(data);
            }
            Op::Flush => {
                image.flush().map_err(|e| (i, e))?;
                t.durable.clone_from(&t.model);
                t.pending.clear();
            }
            Op::Resize { size } => {
                t.pending.push(Pending::Resize { from: t.model.len() as u64, to: size });
                image.resize(size, true).map_err(|e| (i, e))?;
                t.model.resize(size as usize, 0);
            }
        }
        after_op(i);
    }
    Ok(())
}

/// Whether sector `s` of the surviving image may hold `got`.
fn sector_allowed(t: &Tracker, s: u64, got: &[u8]) -> bool {
    const ZERO: [u8; 512] = [0; 512];
    let off = s * 512;
    let base: &[u8] = if off < t.durable.len() as u64 { &t.durable[off as usize..][..512] } else { &ZERO };
    if got == base {
        return true;
    }
    t.pending.iter().any(|p| match p {
        Pending::Write { offset, data } => {
            (*offset..*offset + data.len() as u64).contains(&off) && got == &data[(off - offset) as usize..][..512]
        }
        Pending::Resize { from, to } => off >= (*from).min(*to) && got == ZERO,
    })
}

/// Judges what survived a crash; returns whether the image was left with the dirty bit set.
fn check_survivor(bytes: Vec<u8>, t: &Tracker, dir: &Path, post_seed: u64) -> bool {
    let crashed = dir.join("crashed.qcow2");
    std::fs::write(&crashed, &bytes).unwrap();
    assert_not_corrupt(&crashed);
    let version = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
    let dirty = version >= 3 && u64::from_be_bytes(bytes[72..80].try_into().unwrap()) & 1 != 0;

    let dev = Arc::new(MemoryDevice::from_bytes(bytes));
    let image =
        Image::open(dev.clone(), Config::default()).unwrap_or_else(|e| panic!("read-write open after the crash: {e}"));
    assert!(!image.is_read_only(), "the survivor opened read-only");
    let size = image.virtual_size();
    let mut sizes = vec![t.durable.len() as u64];
    sizes.extend(t.pending.iter().filter_map(|p| match p {
        Pending::Resize { to, .. } => Some(*to),
        Pending::Write { .. } => None,
    }));
    assert!(sizes.contains(&size), "virtual size {size} after the crash; allowed {sizes:?}");

    let mut observed = vec![0u8; size as usize];
    image.read_at(0, &mut observed).unwrap_or_else(|e| panic!("reading the survivor: {e}"));
    for s in 0..size / 512 {
        let got = &observed[(s * 512) as usize..][..512];
        if !sector_allowed(t, s, got) {
            let durable = t.durable.get((s * 512) as usize..(s * 512 + 512) as usize);
            panic!(
                "sector {s} (guest {:#x}) holds {:02x?}.., neither the flushed data {:02x?}.. nor data written after the \
                 last completed flush ({} operations pending: {:?})",
                s * 512,
                &got[..8],
                durable.map(|d| &d[..8]),
                t.pending.len(),
                t.pending
                    .iter()
                    .map(|p| match p {
                        Pending::Write { offset, data } => format!("write {offset:#x}+{:#x}", data.len()),
                        Pending::Resize { from, to } => format!("resize {from}->{to}"),
                    })
                    .collect::<Vec<_>>()
            );
        }
    }

    // The survivor must take new allocations without clobbering anything.
    let cs = image.geometry().cluster_size();
    let mut rng = Rng(post_seed | 1);
    for _ in 0..6 {
        let offset = rng.below(size / 512) * 512;
        let len = ((1 + rng.below(4 * cs / 512)) * 512).min(size - offset);
        let data = data_for(rng.next(), len);
        image
            .write_at(offset, &data)
            .unwrap_or_else(|e| panic!("writing to the survivor at {offset:#x}+{len:#x}: {e}"));
        observed[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }
    let mut back = vec![0u8; size as usize];
    image.read_at(0, &mut back).unwrap();
    assert!(back == observed, "the survivor does not read back what was written to it");
    image.close().unwrap_or_else(|e| panic!("closing the survivor: {e}"));

    let closed = dir.join("closed.qcow2");
    std::fs::write(&closed, dev.snapshot()).unwrap();
    assert_not_corrupt(&closed);
    assert_matches_model(&closed, &observed);
    dirty
}

/// After a lazy-refcounts image left dirty has been opened read-write and closed, QEMU must find it clean.
fn check_lazy_repaired(dir: &Path) {
    assert_clean(&dir.join("closed.qcow2"));
}

#[derive(Debug, Default)]
struct Stats {
    crashes: usize,
    dirty: usize,
}

/// Runs the workload uncut and returns its number of device writes and the write count after each operation.
fn clean_run(w: &Workload, mut after_op: impl FnMut(&Img, usize, u64)) -> u64 {
    let (dev, image) = fresh(w);
    let base = dev.faulty.write_count();
    let mut t = Tracker::new(w.opts.size);
    let counter = dev.clone();
    run(&image, w, &mut t, |i| after_op(&image, i, counter.faulty.write_count() - base)).unwrap();
    let total = dev.faulty.write_count() - base;
    image.close().unwrap();
    total
}

/// Cuts the workload after `n` writes for every `n` in `points`, keeping nothing unflushed.
fn crash_at(w: &Workload, points: &[u64], total: u64, stats: &mut Stats) {
    let dir = tempfile::tempdir().unwrap();
    for &n in points {
        let _report = OnFailure(format!("workload {:?}: crash_after_writes({n}) of {total} writes", w.name));
        let (dev, image) = fresh(w);
        dev.faulty.crash_after_writes(n);
        let mut t = Tracker::new(w.opts.size);
        let result = run(&image, w, &mut t, |_| ());
        if n < total {
            let (op, e) = result.expect_err("the workload outlived its cut");
            assert!(dev.faulty.is_crashed(), "op {op} failed with {e} but the device did not crash");
        } else {
            result.unwrap();
            dev.faulty.power_loss_keep_none().unwrap();
        }
        drop(image);
        let dirty = check_survivor(dev.faulty.inner().snapshot(), &t, dir.path(), n);
        if dirty && w.opts.lazy_refcounts {
            check_lazy_repaired(dir.path());
        }
        stats.crashes += 1;
        stats.dirty += usize::from(dirty);
    }
}

/// Loses power after a random number of writes, `trials` times, keeping a seeded random subset of the
/// unflushed writes each time.
fn crash_keeping_random_writes(w: &Workload, total: u64, trials: usize, seed: u64, stats: &mut Stats) {
    crash_keeping_random_writes_between(w, (0, total), total, trials, seed, stats);
}

/// As [`crash_keeping_random_writes`], with the power loss after a number of writes in `from..=to`.
fn crash_keeping_random_writes_between(
    w: &Workload,
    (from, to): (u64, u64),
    total: u64,
    trials: usize,
    seed: u64,
    stats: &mut Stats,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    for trial in 0..trials {
        let n = from + rng.below(to - from + 1);
        let keep_seed = rng.next();
        let _report = OnFailure(format!(
            "workload {:?}: trial {trial}: power loss after {n} of {total} writes keeping subset seed {keep_seed:#x}",
            w.name
        ));
        let (dev, image) = fresh(w);
        dev.arm(n, move |i, _| keeps(keep_seed, i));
        let mut t = Tracker::new(w.opts.size);
        let result = run(&image, w, &mut t, |_| ());
        if n < total {
            result.expect_err("the workload outlived its power loss");
        } else {
            result.unwrap();
            dev.faulty.power_loss(&|i| keeps(keep_seed, i)).unwrap();
        }
        assert!(dev.faulty.is_crashed());
        drop(image);
        let dirty = check_survivor(dev.faulty.inner().snapshot(), &t, dir.path(), keep_seed);
        if dirty && w.opts.lazy_refcounts {
            check_lazy_repaired(dir.path());
        }
        stats.crashes += 1;
        stats.dirty += usize::from(dirty);
    }
}

/// Every point from 0 to `total`, or about `limit` evenly spaced ones (always including both ends).
fn spaced(total: u64, limit: u64) -> Vec<u64> {
    let step = total.div_ceil(limit).max(1);
    let mut points: Vec<u64> = (0..=total).step_by(step as usize).collect();
    if points.last() != Some(&total) {
        points.push(total);
    }
    points
}

/// The tests take seconds; this leaves room for a slow, loaded machine.
const DEADLINE_SECS: u64 = 300;

fn options(size: u64, cluster_size: u64, refcount_bits: u64, compat: Compat, lazy: bool) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    o.compat = compat;
    o.lazy_refcounts = lazy;
    o
}

#[test]
fn crash_at_every_write_boundary_keeps_flushed_data_and_no_corruption() {
    with_deadline(DEADLINE_SECS, "crash_at_every_write_boundary_keeps_flushed_data_and_no_corruption", || {
        let w = mixed_workload(
            "4k clusters",
            options(2 << 20, 4096, 16, Compat::V3, false),
            Config::default(),
            0x9a55_0001,
            100,
            4 << 20,
        );
        let total = clean_run(&w, |_, _, _| ());
        let mut stats = Stats::default();
        crash_at(&w, &spaced(total, 400), total, &mut stats);
        eprintln!("{}: {total} writes, {stats:?}", w.name);
    });
}

#[test]
fn power_loss_keeping_random_unflushed_writes_keeps_flushed_data_and_no_corruption() {
    with_deadline(
        DEADLINE_SECS,
        "power_loss_keeping_random_unflushed_writes_keeps_flushed_data_and_no_corruption",
        || {
            let w = mixed_workload(
                "4k clusters, random subsets",
                options(2 << 20, 4096, 16, Compat::V3, false),
                Config::default(),
                0x9a55_0002,
                100,
                4 << 20,
            );
            let total = clean_run(&w, |_, _, _| ());
            let mut stats = Stats::default();
            crash_keeping_random_writes(&w, total, 80, 0x5b5e_0002, &mut stats);
            eprintln!("{}: {total} writes, {stats:?}", w.name);
        },
    );
}

#[test]
fn crash_with_a_tiny_metadata_cache_keeps_flushed_data_and_no_corruption() {
    with_deadline(DEADLINE_SECS, "crash_with_a_tiny_metadata_cache_keeps_flushed_data_and_no_corruption", || {
        // Four clusters of cache: writes evict and write back L2 tables and refcount blocks on their own.
        let w = mixed_workload(
            "tiny cache",
            options(4 << 20, 4096, 16, Compat::V3, false),
            Config { cache_size: 4 * 4096, ..Config::default() },
            0x9a55_0003,
            80,
            0,
        );
        let total = clean_run(&w, |_, _, _| ());
        let mut stats = Stats::default();
        crash_at(&w, &spaced(total, 300), total, &mut stats);
        crash_keeping_random_writes(&w, total, 40, 0x5b5e_0003, &mut stats);
        eprintln!("{}: {total} writes, {stats:?}", w.name);
    });
}

#[test]
fn crash_of_a_v2_image_keeps_flushed_data_and_no_corruption() {
    with_deadline(DEADLINE_SECS, "crash_of_a_v2_image_keeps_flushed_data_and_no_corruption", || {
        let w = mixed_workload(
            "v2, 64k clusters",
            options(8 << 20, 65536, 16, Compat::V2, false),
            Config::default(),
            0x9a55_0004,
            60,
            16 << 20,
        );
        let total = clean_run(&w, |_, _, _| ());
        let mut stats = Stats::default();
        crash_at(&w, &spaced(total, 200), total, &mut stats);
        crash_keeping_random_writes(&w, total, 40, 0x5b5e_0004, &mut stats);
        eprintln!("{}: {total} writes, {stats:?}", w.name);
    });
}

#[test]
fn crash_of_a_lazy_refcounts_image_is_rebuilt_clean_by_a_read_write_open() {
    with_deadline(DEADLINE_SECS, "crash_of_a_lazy_refcounts_image_is_rebuilt_clean_by_a_read_write_open", || {
        let w = mixed_workload(
            "lazy refcounts",
            options(2 << 20, 4096, 16, Compat::V3, true),
            Config::default(),
            0x9a55_0005,
            100,
            4 << 20,
        );
        let total = clean_run(&w, |_, _, _| ());
        let mut stats = Stats::default();
        crash_at(&w, &spaced(total, 400), total, &mut stats);
        crash_keeping_random_writes(&w, total, 60, 0x5b5e_0005, &mut stats);
        eprintln!("{}: {total} writes, {stats:?}", w.name);
        assert!(stats.dirty > stats.crashes / 2, "too few crashes left the image dirty: {stats:?}");
    });
}

#[test]
fn crash_while_the_refcount_table_grows_keeps_flushed_data_and_no_corruption() {
    with_deadline(DEADLINE_SECS, "crash_while_the_refcount_table_grows_keeps_flushed_data_and_no_corruption", || {
        // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the one-cluster refcount
        // table 64 blocks, i.e. 2 MiB of file. Filling 3 MiB of guest data makes the table grow mid-workload. Writes
        // of 16 KiB (32 clusters) stay below a refcount block's 64 clusters: a single larger write is a separate case
        // (model.rs: a_single_write_spanning_more_clusters_than_a_refcount_block_covers_completes).
        let w = filling_workload(
            "refcount table growth",
            options(4 << 20, 512, 64, Compat::V3, false),
            0x9a55_0006,
            3 << 20,
            16 << 10,
        );
        // Per operation: device writes before and after it, and where the refcount table is once it is done.
        let mut per_op: Vec<(u64, u64, u64)> = Vec::new();
        let mut before = 0u64;
        let total = clean_run(&w, |image, _, writes| {
            let mut header = vec![0u8; 512];
            image.device().read_at(0, &mut header).unwrap();
            per_op.push((before, writes, u64::from_be_bytes(header[48..56].try_into().unwrap())));
            before = writes;
        });
        let moves: Vec<(usize, u64, u64)> = per_op
            .windows(2)
            .enumerate()
            .filter(|(_, p)| p[0].2 != p[1].2)
            .map(|(i, p)| (i + 1, p[1].0, p[1].1))
            .collect();
        eprintln!("{}: {total} writes; refcount table moved during (op, writes from, to): {moves:?}", w.name);
        assert!(!moves.is_empty(), "the refcount table never grew");
        // Every write boundary (or 250 of them) of the operations during which the table moved, and a spread over
        // the rest.
        let mut points = spaced(total, 150);
        for &(_, from, to) in &moves {
            points.extend(spaced(to - from, 250).into_iter().map(|n| from + n));
        }
        points.sort_unstable();
        points.dedup();
        let mut stats = Stats::default();
        crash_at(&w, &points, total, &mut stats);
        crash_keeping_random_writes(&w, total, 40, 0x5b5e_0006, &mut stats);
        for (k, &(_, from, to)) in moves.iter().enumerate() {
            crash_keeping_random_writes_between(&w, (from, to), total, 24, 0x5b5e_0060 + k as u64, &mut stats);
        }
        eprintln!("{}: {stats:?}", w.name);
    });
}
