//! Randomized mutation on stable Rust: thousands of mutants of the hostile corpus and of clean QEMU-made images
//! (bytes flipped or set, biased towards the header, L1, L2 and refcount tables; or the file truncated) are
//! opened read-only, read, listed, checked and repaired in memory. None may panic or hang.
//!
//! Deterministic: mutant `i` depends only on `i` and the seed images, so a failure names the mutant and the
//! mutations that reproduce it (`QCOW_MUTANT=i` runs that one alone, on the corpus cached under the target
//! directory; rebuilt seeds differ only in snapshot timestamps). `QCOW_MUTANTS=N` runs N mutants instead of
//! the default.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod fuzz_bodies;
mod support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuzz_bodies::CompactOutcome;
use qcow::block::MemoryDevice;
use qcow::check::{check, Repair};
use qcow::{Config, Image, NoBacking};
use support::{corpus_images, hostile_corpus, qemu, qemu_create, qemu_io, run_ok, with_deadline, Rng};

/// Mutants run when `QCOW_MUTANTS` is not set: a few thousand, well within a minute on two cores.
const DEFAULT_MUTANTS: u64 = 3000;
/// Mutants the compaction test runs when `QCOW_COMPACT_MUTANTS` is not set.
const DEFAULT_COMPACT_MUTANTS: u64 = 1500;
/// Seconds one mutant may take before it counts as hung.
const DEADLINE: u64 = 20;
/// Guest bytes read from the start of each mutant's disk.
const PREFIX: u64 = 1 << 20;
/// Read size, so a huge virtual size never means a huge buffer.
const CHUNK: usize = 256 << 10;
/// Allocated extents read per mutant, each at most `CHUNK` long.
const EXTENTS: usize = 16;
/// Panics collected before the run stops.
const MAX_PANICS: usize = 5;

/// A seed image and where its tables are, found by reading the header and the tables (clamped to the file).
struct Seed {
    name: String,
    bytes: Vec<u8>,
    /// Byte ranges worth mutating more often than the rest: header, L1, L2, refcount table and blocks, snapshot
    /// table.
    hot: Vec<(u64, u64)>,
    cluster_size: u64,
}

fn be(bytes: &[u8], offset: u64, len: usize) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    let slice = bytes.get(start..start.checked_add(len)?)?;
    Some(slice.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
}

impl Seed {
    fn new(name: String, bytes: Vec<u8>) -> Seed {
        const MASK: u64 = 0x00ff_ffff_ffff_fe00;
        let file = bytes.len() as u64;
        let cluster_bits = be(&bytes, 20, 4).filter(|b| (9..=21).contains(b)).unwrap_or(16);
        let cs = 1u64 << cluster_bits;
        let mut hot = vec![(0, 512.min(file))];
        let clamp = |start: u64, len: u64| (start.min(file), start.saturating_add(len).min(file));
        if let (Some(l1), Some(l1_size)) = (be(&bytes, 40, 8), be(&bytes, 36, 4)) {
            hot.push(clamp(l1, l1_size * 8));
            for i in 0..l1_size.min(64) {
                if let Some(l2) = be(&bytes, l1 + 8 * i, 8).map(|e| e & MASK).filter(|&o| o != 0) {
                    hot.push(clamp(l2, cs));
                }
            }
        }
        if let (Some(rt), Some(clusters)) = (be(&bytes, 48, 8), be(&bytes, 56, 4)) {
            hot.push(clamp(rt, clusters * cs));
            for i in 0..(clusters * cs / 8).min(64) {
                if let Some(rb) = be(&bytes, rt + 8 * i, 8).map(|e| e & !(cs - 1)).filter(|&o| o != 0) {
                    hot.push(clamp(rb, cs));
                }
            }
        }
        if let (Some(n), Some(off)) = (be(&bytes, 60, 4), be(&bytes, 64, 8)) {
            if n > 0 {
                hot.push(clamp(off, 4096));
            }
        }
        hot.retain(|(a, b)| a < b);
        Seed { name, bytes, hot, cluster_size: cs }
    }
}

/// Clean images QEMU makes in shapes the corpus does not cover.
fn clean_seeds(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let shapes: &[(&str, &str, &str, &[&str])] = &[
        ("small_clusters", "cluster_size=4096,refcount_bits=1", "8M", &["write -P 0x11 0 64k", "write -P 0x22 5M 8k"]),
        ("tiny_clusters", "cluster_size=512", "1M", &["write -P 0x33 0 12k", "write -P 0x44 700k 3k"]),
        ("extended_l2", "extended_l2=on", "4M", &["write -P 0x55 4k 8k", "write -P 0x66 1M 64k", "write -z 2M 32k"]),
        ("zstd", "compression_type=zstd", "4M", &["write -c -P 0x77 0 64k", "write -c -P 0x78 128k 64k"]),
        ("v2", "compat=0.10", "4M", &["write -P 0x88 0 64k", "write -P 0x89 2M 4k"]),
        ("refcount64", "refcount_bits=64", "4M", &["write -P 0x99 64k 128k"]),
    ];
    let mut seeds = Vec::new();
    for (name, opts, size, writes) in shapes {
        let path = dir.join(format!("{name}.qcow2"));
        qemu_create(&path, opts, size);
        qemu_io(&path, writes);
        if *name == "v2" || *name == "extended_l2" {
            run_ok(qemu("qemu-img").args(["snapshot", "-c", "snap"]).arg(&path));
            qemu_io(&path, &["write -P 0xaa 0 4k"]);
        }
        if *name == "small_clusters" {
            run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&path).arg("dirty"));
        }
        seeds.push((format!("clean:{name}"), std::fs::read(&path).unwrap()));
    }
    seeds
}

/// Values a hostile writer would choose for an 8-byte field.
fn interesting(rng: &mut Rng, seed: &Seed) -> u64 {
    let file = seed.bytes.len() as u64;
    match rng.below(10) {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << 63,
        3 => (1 << 63) | (rng.below(file / seed.cluster_size + 4) * seed.cluster_size),
        4 => rng.below(file / seed.cluster_size + 4) * seed.cluster_size,
        5 => (1 << 62) | rng.below(1 << 40),
        6 => (1 << 63) | (rng.below(file.max(1)) & !511),
        7 => 0x7fff_ffff_ffff_0000,
        8 => 1 << (rng.below(64)),
        _ => rng.next(),
    }
}

/// Applies one mutant's mutations to a copy of the seed; returns the bytes and what was done.
fn mutate(seed: &Seed, rng: &mut Rng) -> (Vec<u8>, Vec<String>) {
    let mut bytes = seed.bytes.clone();
    let mut done = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len() as u64;
        if len == 0 {
            break;
        }
        // Two mutations in three land in a hot range.
        let (lo, hi) = if rng.below(3) < 2 && !seed.hot.is_empty() {
            let (a, b) = seed.hot[rng.below(seed.hot.len() as u64) as usize];
            (a.min(len), b.min(len))
        } else {
            (0, len)
        };
        if lo >= hi {
            continue;
        }
        let at = lo + rng.below(hi - lo);
        match rng.below(16) {
            0..=4 => {
                let bit = rng.below(8);
                bytes[at as usize] ^= 1 << bit;
                done.push(format!("flip bit {bit} of byte {at}"));
            }
            5..=8 => {
                let v = rng.below(256) as u8;
                bytes[at as usize] = v;
                done.push(format!("set byte {at} to {v:#04x}"));
            }
            9..=13 => {
                // Aligned to its width, as header fields and table entries are.
                let width = [2u64, 4, 8][rng.below(3) as usize];
                let at = at & !(width - 1);
                let v = interesting(rng, seed);
                let end = (at + width).min(len);
                for (i, o) in (at..end).enumerate() {
                    bytes[o as usize] = (v >> (8 * (width as usize - 1 - i))) as u8;
                }
                done.push(format!("set {width} bytes at {at} to {v:#x}"));
            }
            14 => {
                let to = if rng.below(2) == 0 { rng.below(len) } else { (rng.below(len) / 512) * 512 };
                bytes.truncate(to as usize);
                done.push(format!("truncate to {to}"));
            }
            _ => {
                let to = len + seed.cluster_size * (1 + rng.below(3));
                bytes.resize(to as usize, 0);
                done.push(format!("extend with zeros to {to}"));
            }
        }
    }
    (bytes, done)
}

/// How many mutants opened, read without any error, and were repaired; printed and sanity-checked so the run
/// cannot silently degenerate into refusing everything.
static OPENED: AtomicU64 = AtomicU64::new(0);
static READ_CLEANLY: AtomicU64 = AtomicU64::new(0);
static REPAIRED: AtomicU64 = AtomicU64::new(0);

/// Everything a reader of a hostile image might do with it. Errors are fine; only panics and hangs are not.
fn exercise(bytes: Vec<u8>) {
    let dev = MemoryDevice::from_bytes(bytes.clone()).read_only();
    if let Ok(image) = Image::open(dev, Config::read_only()) {
        OPENED.fetch_add(1, Ordering::Relaxed);
        let size = image.virtual_size();
        let mut chunk = vec![0u8; CHUNK];
        let mut offset = 0;
        let mut clean = true;
        while offset < size.min(PREFIX) {
            let len = (size.min(PREFIX) - offset).min(CHUNK as u64) as usize;
            clean &= image.read_at(offset, &mut chunk[..len]).is_ok();
            offset += len as u64;
        }
        if clean {
            READ_CLEANLY.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(extents) = image.map(0, size.min(1 << 30)) {
            for e in extents.iter().filter(|e| !e.kind.reads_zero()).take(EXTENTS) {
                let len = e.len.min(CHUNK as u64) as usize;
                let _ = image.read_at(e.guest.0, &mut chunk[..len]);
            }
        }
        let _ = image.bitmaps();
        if let Ok(snapshots) = image.snapshots() {
            if let Some(s) = snapshots.first() {
                let dev = MemoryDevice::from_bytes(bytes.clone()).read_only();
                if let Ok(view) = Image::open_snapshot(dev, &s.name, &NoBacking) {
                    let len = view.virtual_size().min(CHUNK as u64) as usize;
                    let _ = view.read_at(0, &mut chunk[..len]);
                }
            }
        }
    }
    let dev = MemoryDevice::from_bytes(bytes.clone()).read_only();
    let _ = check(&dev, Repair::None);
    let dev = MemoryDevice::from_bytes(bytes);
    if let Ok(report) = check(&dev, Repair::All) {
        REPAIRED.fetch_add(1, Ordering::Relaxed);
        // A repair that reports nothing left must leave nothing a second look finds.
        if report.exit_code() == 0 {
            let again = check(&dev, Repair::None).map(|r| (r.check_errors, r.corruptions, r.leaks));
            assert_eq!(again.as_ref().ok(), Some(&(0, 0, 0)), "a check after a clean repair found {again:?}");
        }
        // A repaired image must at least open and read.
        if let Ok(image) = Image::open(dev, Config::read_only()) {
            let len = image.virtual_size().min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; len];
            let _ = image.read_at(0, &mut buf);
        }
    }
}

fn mutant_rng(i: u64) -> Rng {
    // SplitMix64 of the index: neighbouring indexes get unrelated streams, and zero never comes out.
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Rng((z ^ (z >> 31)) | 1)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// The seeds: the hostile corpus and the clean images QEMU makes here.
fn seeds(dir: &Path) -> Arc<Vec<Seed>> {
    let corpus = hostile_corpus();
    let mut named: Vec<(String, Vec<u8>)> = corpus_images(&corpus)
        .into_iter()
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    named.extend(clean_seeds(dir));
    Arc::new(named.into_iter().map(|(n, b)| Seed::new(n, b)).collect())
}

/// Runs `body` on `default` mutants (or as `QCOW_MUTANT`/`QCOW_MUTANTS` say) on every core, each under the
/// deadline, and fails naming every mutant that panicked or hung. Returns how many ran.
fn run_mutants(seeds: &Arc<Vec<Seed>>, default: u64, body: fn(Vec<u8>)) -> u64 {
    let (first, count) = match env_u64("QCOW_MUTANT") {
        Some(i) => (i, 1),
        None => (0, env_u64("QCOW_MUTANTS").unwrap_or(default)),
    };
    let next = Arc::new(AtomicU64::new(first));
    let stop = Arc::new(AtomicBool::new(false));
    let panics: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (seeds, next, stop, panics) = (seeds.clone(), next.clone(), stop.clone(), panics.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= first + count || stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut rng = mutant_rng(i);
                let seed = &seeds[rng.below(seeds.len() as u64) as usize];
                let (bytes, done) = mutate(seed, &mut rng);
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    with_deadline(DEADLINE, &format!("mutant {i}"), move || body(bytes))
                }));
                if let Err(panic) = outcome {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let mut p = panics.lock().unwrap();
                    p.push(format!(
                        "mutant {i} (QCOW_MUTANT={i}) of seed {}: {}\n    -> {msg}",
                        seed.name,
                        done.join("; ")
                    ));
                    if p.len() >= MAX_PANICS {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let panics = panics.lock().unwrap();
    assert!(panics.is_empty(), "{} mutants panicked or hung:\n{}", panics.len(), panics.join("\n"));
    count
}

#[test]
fn mutants_of_hostile_and_clean_images_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    let count = run_mutants(&seeds, DEFAULT_MUTANTS, exercise);
    let (opened, read, repaired) =
        (OPENED.load(Ordering::Relaxed), READ_CLEANLY.load(Ordering::Relaxed), REPAIRED.load(Ordering::Relaxed));
    eprintln!(
        "{count} mutants of {} seeds: no panic, no hang; {opened} opened, {read} read without error, {repaired} repaired",
        seeds.len()
    );
    if count >= 100 {
        assert!(opened * 5 >= count, "only {opened} of {count} mutants opened: the mutations are too blunt");
    }
}

/// Mutants compacted (offline, then junk erasing, online compaction and a reclaimer pass) by the compact fuzz
/// target's body, and how it ended for each.
static COMPACT_OUTCOMES: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn compact_mutant(bytes: Vec<u8>) {
    let slot = match fuzz_bodies::compact(&bytes) {
        CompactOutcome::NotOpened => 0,
        CompactOutcome::Refused => 1,
        CompactOutcome::Failed => 2,
        CompactOutcome::Compacted => 3,
    };
    COMPACT_OUTCOMES[slot].fetch_add(1, Ordering::Relaxed);
}

/// The compact fuzz target's properties over mutants: compaction and the reclaimer keep every guest byte that
/// read before, or refuse and change nothing. `QCOW_COMPACT_MUTANTS=N` runs N of them.
#[test]
fn mutants_compact_without_losing_data_or_refuse_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    let default = env_u64("QCOW_COMPACT_MUTANTS").unwrap_or(DEFAULT_COMPACT_MUTANTS);
    let count = run_mutants(&seeds, default, compact_mutant);
    let [not_opened, refused, failed, compacted] = COMPACT_OUTCOMES.each_ref().map(|n| n.load(Ordering::Relaxed));
    eprintln!(
        "{count} mutants compacted: {compacted} compacted, {refused} refused (untrusted refcounts), {failed} failed \
         otherwise, {not_opened} did not open read-write; no data lost"
    );
    if count >= 100 {
        // Most seeds are hostile already, and a read that meets corruption marks the image corrupt before
        // compaction starts: a few percent compact (71 of the default 1500 when this was written).
        assert!(compacted * 50 >= count, "only {compacted} of {count} mutants compacted");
        assert!(refused > 0, "no mutant was refused: the damage never reached the refcounts");
    }
}
