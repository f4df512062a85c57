//! Many threads on one image: eight writers allocating the same clusters at once, each owning its own sectors
//! inside them, plus a disjoint region each, while reader threads check that every sector they see is zeros or
//! its owner's data, never another thread's, and a flusher flushes every millisecond. Then the result must match the model, read by us and by QEMU, and
//! `qemu-img check` must be clean.
//!
//! Every sector's content says who wrote it: each 8-byte word holds a magic byte, the owning thread, the word's
//! index in the sector, a generation number and the sector number. Writers own sectors exclusively, so the final
//! content of every sector is known (its owner's last generation), whatever the interleaving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, CreateOptions, Image};
use support::{assert_clean, qemu_compare_raw, with_deadline, Rng};

const WRITERS: usize = 8;
const READERS: usize = 2;
const MAGIC: u64 = 0xa5;
const NOBODY: u8 = u8::MAX;

/// Which thread owns each sector of the disk.
struct Layout {
    cluster_size: u64,
    size: u64,
    /// Owner of each sector (`NOBODY`: never written).
    owner: Vec<u8>,
    /// For each writer: its sectors inside the shared clusters, in cluster order.
    shared: Vec<Vec<u64>>,
    /// For each writer: its own region, as a sector range.
    region: Vec<(u64, u64)>,
    /// The first sector of each shared cluster.
    shared_clusters: Vec<u64>,
}

impl Layout {
    /// `shared_clusters` clusters spread over the disk, in each of which writer `t` owns the sectors with
    /// `sector % 8 == t`; and a disjoint region of `region_bytes` for each writer.
    fn new(cluster_size: u64, size: u64, shared_clusters: u64, region_bytes: u64) -> Self {
        let sectors = size / 512;
        let cs_sectors = cluster_size / 512;
        let mut owner = vec![NOBODY; sectors as usize];
        let mut shared = vec![Vec::new(); WRITERS];
        let mut shared_starts = Vec::new();
        // Shared clusters sit in the first half of the disk, spaced so that they fall into many L2 tables.
        let stride = (size / 2 / cluster_size / shared_clusters).max(1);
        for k in 0..shared_clusters {
            let first = k * stride * cs_sectors;
            shared_starts.push(first);
            for s in first..first + cs_sectors {
                let t = (s % WRITERS as u64) as usize;
                owner[s as usize] = t as u8;
                shared[t].push(s);
            }
        }
        // Disjoint regions in the second half, one per writer, not cluster aligned.
        let mut region = Vec::new();
        for t in 0..WRITERS as u64 {
            let start = sectors / 2 + t * (sectors / 2 / WRITERS as u64) + 3;
            let end = start + region_bytes / 512;
            for s in start..end {
                owner[s as usize] = t as u8;
            }
            region.push((start, end));
        }
        Layout { cluster_size, size, owner, shared, region, shared_clusters: shared_starts }
    }

    /// Every written-to extent, as sector ranges: the shared clusters and the regions.
    fn extents(&self) -> Vec<(u64, u64)> {
        let cs_sectors = self.cluster_size / 512;
        let mut v: Vec<(u64, u64)> = self.shared_clusters.iter().map(|&s| (s, s + cs_sectors)).collect();
        v.extend(self.region.iter().copied());
        v
    }
}

fn word(thread: u64, index: u64, generation: u64, sector: u64) -> u64 {
    MAGIC << 56 | thread << 48 | index << 40 | (generation & 0xff) << 32 | (sector & 0xffff_ffff)
}

/// Fills `buf` (one sector) with `thread`'s stamp for `sector` at `generation`.
fn stamp(buf: &mut [u8], thread: usize, sector: u64, generation: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(thread as u64, i as u64, generation, sector).to_le_bytes());
    }
}

/// Checks a buffer read at `sector`: every word is zero or a stamp of the sector's owner for that very sector
/// and word (any generation). Word granularity tolerates a read racing an in-place rewrite of the same sector.
fn validate(layout: &Layout, sector: u64, buf: &[u8], who: &str) {
    for (k, data) in buf.chunks_exact(512).enumerate() {
        let s = sector + k as u64;
        let owner = layout.owner[s as usize];
        for (i, w) in data.chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(w.try_into().unwrap());
            if w == 0 {
                continue;
            }
            let ok = owner != NOBODY
                && w >> 56 == MAGIC
                && (w >> 48) & 0xff == u64::from(owner)
                && (w >> 40) & 0xff == i as u64
                && w & 0xffff_ffff == s & 0xffff_ffff;
            assert!(
                ok,
                "{who}: sector {s} (guest {:#x}, owner {owner}) word {i} holds {w:#018x}: thread {} sector {} word {} \
                 generation {} (cluster size {})",
                s * 512,
                (w >> 48) & 0xff,
                w & 0xffff_ffff,
                (w >> 40) & 0xff,
                (w >> 32) & 0xff,
                layout.cluster_size
            );
        }
    }
}

/// One writer: its shared sectors in cluster order (all writers hit the same clusters at about the same time),
/// then a random mix of rewrites of them and multi-sector writes in its own region, reading its own sectors
/// back as it goes. Returns the last generation it wrote to each sector it owns.
fn writer(image: &Image<FileDevice>, layout: &Layout, t: usize, seed: u64, start: &Barrier) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut generation: HashMap<u64, u64> = HashMap::new();
    let mut sector_buf = vec![0u8; 512];
    let mut back = vec![0u8; 512];
    start.wait();
    for (n, &s) in layout.shared[t].iter().enumerate() {
        stamp(&mut sector_buf, t, s, 1);
        image.write_at(s * 512, &sector_buf).unwrap_or_else(|e| panic!("writer {t}: write sector {s}: {e}"));
        generation.insert(s, 1);
        if n % 7 == 0 {
            image.read_at(s * 512, &mut back).unwrap();
            assert!(back == sector_buf, "writer {t}: sector {s} does not read back right after its write");
        }
    }
    let (rstart, rend) = layout.region[t];
    let cs_sectors = layout.cluster_size / 512;
    for n in 0..(layout.shared[t].len() + 192) {
        if rng.below(3) == 0 {
            // An overwrite (or first write) of a shared sector, racing the other writers of its cluster.
            let s = layout.shared[t][rng.below(layout.shared[t].len() as u64) as usize];
            let g = generation.get(&s).copied().unwrap_or(0) + 1;
            stamp(&mut sector_buf, t, s, g);
            image.write_at(s * 512, &sector_buf).unwrap_or_else(|e| panic!("writer {t}: rewrite sector {s}: {e}"));
            generation.insert(s, g);
            image.read_at(s * 512, &mut back).unwrap();
            assert!(back == sector_buf, "writer {t}: sector {s} does not read back its generation {g}");
        } else {
            // A write of up to three clusters in the writer's own region, starting anywhere.
            let s = rstart + rng.below(rend - rstart);
            let count = (1 + rng.below(3 * cs_sectors)).min(rend - s);
            let mut buf = vec![0u8; (count * 512) as usize];
            for k in 0..count {
                let g = generation.get(&(s + k)).copied().unwrap_or(0) + 1;
                stamp(&mut buf[(k * 512) as usize..][..512], t, s + k, g);
                generation.insert(s + k, g);
            }
            image.write_at(s * 512, &buf).unwrap_or_else(|e| panic!("writer {t}: write sectors {s}+{count}: {e}"));
            let mut got = vec![0u8; buf.len()];
            image.read_at(s * 512, &mut got).unwrap();
            assert!(got == buf, "writer {t}: sectors {s}+{count} do not read back right after their write");
        }
        if n % 64 == 63 {
            image.flush().unwrap_or_else(|e| panic!("writer {t}: flush: {e}"));
        }
    }
    generation.into_iter().collect()
}

/// One reader: random reads until the writers are done, mostly around the shared clusters (where the allocation
/// races are) and the regions, each validated sector by sector.
fn reader(image: &Image<FileDevice>, layout: &Layout, r: usize, seed: u64, done: &AtomicBool, reads: &AtomicU64) {
    let mut rng = Rng(seed ^ 0x0dd0_0000 ^ r as u64);
    let sectors = layout.size / 512;
    let cs_sectors = layout.cluster_size / 512;
    while !done.load(Ordering::Acquire) {
        let s = match rng.below(10) {
            0..=5 => {
                let c = layout.shared_clusters[rng.below(layout.shared_clusters.len() as u64) as usize];
                (c + rng.below(cs_sectors)).saturating_sub(rng.below(cs_sectors))
            }
            6..=8 => {
                let (a, b) = layout.region[rng.below(WRITERS as u64) as usize];
                a + rng.below(b - a)
            }
            _ => rng.below(sectors),
        };
        let count = (1 + rng.below(2 * cs_sectors)).min(sectors - s);
        let mut buf = vec![0u8; (count * 512) as usize];
        image.read_at(s * 512, &mut buf).unwrap_or_else(|e| panic!("reader {r}: read sectors {s}+{count}: {e}"));
        validate(layout, s, &buf, &format!("reader {r}"));
        reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs one scenario with a deadline: a deadlock fails the test instead of stalling the suite.
fn run(cluster_size: u64, size: u64, shared_clusters: u64, region_bytes: u64, config: Config, seed: u64) {
    let what = format!("cluster size {cluster_size}, cache {} bytes, seed {seed:#x}", config.cache_size);
    with_deadline(300, &what, move || scenario(cluster_size, size, shared_clusters, region_bytes, config, seed));
}

fn scenario(cluster_size: u64, size: u64, shared_clusters: u64, region_bytes: u64, config: Config, seed: u64) {
    let what = format!("cluster size {cluster_size}, cache {} bytes, seed {seed:#x}", config.cache_size);
    let layout = Layout::new(cluster_size, size, shared_clusters, region_bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concurrent.qcow2");
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    let dev = FileDevice::create(&path, &FileOptions::default()).unwrap();
    let image = Image::create(dev, &opts, config).unwrap();
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let start = Barrier::new(WRITERS);
    let generations: Vec<Vec<(u64, u64)>> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let (image, layout, done, reads) = (&image, &layout, &done, &reads);
                scope.spawn(move || reader(image, layout, r, seed, done, reads))
            })
            .collect();
        // A flusher as a guest issues them, every millisecond: metadata is written back outside the lock while
        // the writers allocate and the readers map.
        let flusher = {
            let (image, done) = (&image, &done);
            scope.spawn(move || {
                while !done.load(Ordering::Acquire) {
                    image.flush().unwrap_or_else(|e| panic!("flusher: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (image, layout, start) = (&image, &layout, &start);
                scope.spawn(move || writer(image, layout, t, seed, start))
            })
            .collect();
        let results: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::Release);
        if let Err(panic) = flusher.join() {
            eprintln!("FAILED: {what}");
            std::panic::resume_unwind(panic);
        }
        for r in readers {
            if let Err(panic) = r.join() {
                eprintln!("FAILED: {what}");
                std::panic::resume_unwind(panic);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|panic| {
                    eprintln!("FAILED: {what}");
                    std::panic::resume_unwind(panic)
                })
            })
            .collect()
    });
    assert!(reads.load(Ordering::Relaxed) > 0, "{what}: the readers never read");

    // The expected disk, extent by extent: every owned sector holds its owner's last generation (or zeros if
    // never written); everything else is zeros. Also written, sparsely, as a raw file for qemu-img compare.
    let last: HashMap<u64, (usize, u64)> =
        generations.iter().enumerate().flat_map(|(t, gens)| gens.iter().map(move |&(s, g)| (s, (t, g)))).collect();
    let raw_path = dir.path().join("expected.raw");
    let raw = std::fs::File::create(&raw_path).unwrap();
    raw.set_len(size).unwrap();
    image.flush().unwrap();
    for (start, end) in layout.extents() {
        let mut want = vec![0u8; ((end - start) * 512) as usize];
        for s in start..end {
            if let Some(&(t, g)) = last.get(&s) {
                stamp(&mut want[((s - start) * 512) as usize..][..512], t, s, g);
            }
        }
        let mut got = vec![0u8; want.len()];
        image.read_at(start * 512, &mut got).unwrap();
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            let s = start + i as u64 / 512;
            validate(&layout, s, &got[(i / 512 * 512)..][..512], &format!("{what}: final read"));
            panic!(
                "{what}: final read differs from the model at guest {:#x} (sector {s}, owner {}): a write was lost",
                start * 512 + i as u64,
                layout.owner[s as usize]
            );
        }
        raw.write_all_at(&want, start * 512).unwrap();
    }
    // Between the extents: a sample of never-written clusters must read as zeros.
    let mut rng = Rng(seed ^ 0x2e60);
    let cs_sectors = cluster_size / 512;
    for _ in 0..256 {
        let s = rng.below(size / 512 - cs_sectors);
        let mut got = vec![0u8; cluster_size as usize];
        image.read_at(s * 512, &mut got).unwrap();
        validate(&layout, s, &got, &format!("{what}: final read"));
    }
    drop(raw);
    image.close().unwrap();
    assert_clean(&path);
    assert!(qemu_compare_raw(&path, &raw_path), "{what}: qemu-img compare: the image differs from the model");
}

#[test]
fn eight_threads_allocating_shared_4k_clusters_keep_every_sector_with_its_owner() {
    run(4096, 64 << 20, 1024, 512 << 10, Config::default(), 0xc0c0_0001);
}

#[test]
fn eight_threads_allocating_shared_64k_clusters_keep_every_sector_with_its_owner() {
    run(65536, 1 << 30, 64, 1 << 20, Config::default(), 0xc0c0_0002);
}

#[test]
fn eight_threads_with_a_small_metadata_cache_keep_every_sector_with_its_owner_at_4k_clusters() {
    // 64 KiB of cache is 16 tables: the 32 L2 tables of a 64 MiB disk at 4 KiB clusters keep evicting each
    // other (and the refcount blocks) while the writers run.
    let config = Config { cache_size: 64 * 1024, ..Config::default() };
    run(4096, 64 << 20, 1024, 512 << 10, config, 0xc0c0_0003);
}

#[test]
fn eight_threads_with_a_small_metadata_cache_keep_every_sector_with_its_owner_at_64k_clusters() {
    // 64 KiB of cache is one 64 KiB table, which the cache raises to its minimum of four. An 8 GiB disk spreads
    // the writers over 16 L2 tables (each maps 512 MiB), so L1, L2 and refcount clusters keep evicting each other.
    let config = Config { cache_size: 64 * 1024, ..Config::default() };
    run(65536, 8 << 30, 64, 1 << 20, config, 0xc0c0_0004);
}
