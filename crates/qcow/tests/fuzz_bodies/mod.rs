//! The bodies of the fuzz targets in `fuzz/`, shared with `tests/fuzz_regressions.rs` so that every input a
//! fuzzer ever tripped on is replayed by a plain `cargo test`, against exactly the checks the fuzzer ran.
//!
//! Each body takes arbitrary bytes and must never panic on them; the assertions inside are the properties
//! being fuzzed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::OnceLock;

use qcow::block::{BlockDevice, MemoryDevice};
use qcow::check::{check as check_image, CheckReport, Repair, MAX_PROBLEMS};
use qcow::format::{
    parse_bitmap_directory, parse_snapshot_table, serialize_bitmap_directory, serialize_snapshot_table,
    snapshot_table_size, BitmapsExtension, Extension, Header,
};
use qcow::{Backing, BackingResolver, Config, Extent, Image};

/// Header parsing on arbitrary bytes: `parse` and `validate` never panic, and whatever parses survives
/// `layout` + `serialize` + `parse` unchanged. The bytes after the first sector also go to the snapshot table and
/// bitmap directory parsers, with their serialize round trips.
pub fn header(data: &[u8]) {
    // The engine hands over exactly cluster 0, zero-padded past the end of a short file; do the same, and also
    // try the bytes exactly as given (shorter or longer than a cluster).
    let _ = Header::parse(data);
    let Ok(bits) = Header::peek_cluster_bits(data) else { return };
    let mut cluster0 = data.to_vec();
    cluster0.resize(1 << bits, 0);
    let Ok(header) = Header::parse(&cluster0) else { return };
    let _ = header.validate(false);
    let _ = header.validate(true);
    let _ = header.feature_names();
    let _ = header.backing_format();
    let _ = header.external_data_file();

    let mut laid_out = header.clone();
    if laid_out.layout().is_ok() {
        let bytes = laid_out.serialize().unwrap_or_else(|e| panic!("layout succeeded but serialize failed: {e}"));
        assert!(bytes.len() <= 1 << bits, "serialized header of {} bytes exceeds the cluster", bytes.len());
        let mut again = bytes;
        again.resize(1 << bits, 0);
        let back = Header::parse(&again).unwrap_or_else(|e| panic!("serialized header does not parse: {e}"));
        assert_eq!(back, laid_out, "header changed in a serialize round trip");
        assert_eq!(back.validate(false).is_ok(), header.validate(false).is_ok(), "validity changed in a round trip");
    }

    let rest = data.get(512..).unwrap_or(&[]);
    if let Ok(snaps) = parse_snapshot_table(rest, header.nb_snapshots.min(64), header.version) {
        let bytes = serialize_snapshot_table(&snaps);
        assert_eq!(bytes.len() as u64, snapshot_table_size(&snaps));
        let back = parse_snapshot_table(&bytes, snaps.len() as u32, header.version)
            .unwrap_or_else(|e| panic!("serialized snapshot table does not parse: {e}"));
        assert_eq!(back, snaps, "snapshot table changed in a serialize round trip");
    }
    if let Some(ext) = header.extension(Extension::BITMAPS) {
        if let Ok(bitmaps) = BitmapsExtension::parse(&ext.data) {
            let _ = bitmaps.validate(header.cluster_size());
            if let Ok(entries) = parse_bitmap_directory(rest, bitmaps.nb_bitmaps) {
                let bytes = serialize_bitmap_directory(&entries);
                let back = parse_bitmap_directory(&bytes, entries.len() as u32)
                    .unwrap_or_else(|e| panic!("serialized bitmap directory does not parse: {e}"));
                assert_eq!(back, entries, "bitmap directory changed in a serialize round trip");
            }
        }
    }
}

/// A chunk of zeros to compare reads with: slice equality is one `memcmp`, which the fuzzer does not instrument
/// byte by byte.
static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];

/// Guest bytes mapped from the start of the disk; huge virtual sizes must not make a run slow.
const WINDOW: u64 = 64 << 20;
/// Guest bytes read per input, across every range.
const READ_BUDGET: u64 = 8 << 20;
/// Length of each scattered range and of each read.
const CHUNK: u64 = 256 << 10;
/// Size of the in-memory backing file and external data file offered to images that name one.
const SIDE_FILE: u64 = 256 << 10;

/// A device of `len` bytes whose every byte is non-zero and depends on its offset, so misplaced reads show.
fn patterned(len: u64, salt: u8) -> MemoryDevice {
    // Built once: the fuzzer instruments every loop iteration, so per-input generation would dominate a run.
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| (0..SIDE_FILE).map(|i| (i as u8 ^ (i >> 9) as u8) | 1).collect());
    let mut bytes = pattern[..len as usize].to_vec();
    if salt != 0 {
        bytes.rotate_left(usize::from(salt));
    }
    MemoryDevice::from_bytes(bytes)
}

/// Offers every image a patterned backing file and data file, so those read paths are fuzzed too.
struct SideFiles;

impl BackingResolver for SideFiles {
    fn open_backing(&self, _name: &str, _format: Option<&str>) -> qcow::Result<Backing> {
        Ok(Backing::new(Box::new(patterned(SIDE_FILE, 0x40)), SIDE_FILE))
    }

    fn open_data_file(&self, _name: &str, _read_only: bool) -> qcow::Result<Box<dyn BlockDevice>> {
        Ok(Box::new(patterned(SIDE_FILE, 0x80)))
    }
}

fn check_tiling(extents: &[Extent], start: u64, end: u64) {
    let mut at = start;
    for e in extents {
        assert_eq!(e.guest.0, at, "map left a gap or overlap at {at}: {extents:?}");
        assert!(e.len > 0, "map returned an empty extent at {at}");
        at = e.guest.0.checked_add(e.len).unwrap_or_else(|| panic!("extent overflows: {e:?}"));
    }
    assert_eq!(at, end, "map of {start}..{end} stops at {at}");
}

/// An arbitrary byte string as an image file, opened read-only and read. Nothing may panic, hang or allocate
/// without bound; the file comes out byte-for-byte unchanged; `map` tiles the range it was asked about; and guest
/// ranges `map` calls zero read as zeros.
pub fn open_read(data: &[u8]) {
    let device = MemoryDevice::from_bytes(data.to_vec());
    let before = device.snapshot();
    let Ok(image) = Image::open_with(device, Config::read_only(), &SideFiles) else { return };
    let _ = image.info();
    let _ = image.header();
    let _ = image.snapshots();
    let _ = image.bitmaps();
    let _ = image.bitmaps_consistent();
    let _ = image.verify_refcounts();

    let size = image.virtual_size();
    // Zeros are only promised where nothing else can show through.
    let plain = !image.has_backing() && !image.header().has_external_data_file();
    let mut ranges = vec![(0, size.min(WINDOW))];
    for k in 1..=4u64 {
        let start = (size / 5).saturating_mul(k) & !511;
        ranges.push((start, size.min(start.saturating_add(CHUNK))));
    }
    ranges.push((size.saturating_sub(CHUNK) & !511, size));

    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, end) in ranges {
        let mut at = start;
        while at < end && budget > 0 {
            let len = (end - at).min(CHUNK).min(budget);
            budget -= len;
            let buf = &mut buf[..len as usize];
            let read = image.read_at(at, buf);
            if let Ok(extents) = image.map(at, len) {
                check_tiling(&extents, at, at + len);
                if plain && read.is_ok() {
                    for e in extents.iter().filter(|e| e.kind.reads_zero()) {
                        let off = (e.guest.0 - at) as usize;
                        let bytes = &buf[off..off + e.len as usize];
                        assert!(bytes == &ZEROS[..bytes.len()], "extent {e:?} reads non-zero data");
                    }
                }
            }
            at += len;
        }
    }
    // Unaligned and zero-length reads go through the bounce paths.
    let mut odd = [0u8; 1000];
    let _ = image.read_at(size.saturating_sub(777), &mut odd[..size.min(777) as usize]);
    let _ = image.read_at(size / 3 + 1, &mut odd[..size.saturating_sub(size / 3 + 1).min(1000) as usize]);
    let _ = image.read_at(size, &mut []);
    let _ = image.read_at(size, &mut odd[..1]);
    if let Ok(extents) = image.map(size / 2, WINDOW) {
        check_tiling(&extents, size / 2, size.min(size / 2 + WINDOW));
    }

    let _ = image.flush();
    // Read-only means the file is never touched, the header's dirty bit included.
    assert!(image.device().snapshot() == before, "a read-only open modified the file");
}

/// Whether a known, reported finding is to be skipped, so that a fuzzing campaign can look past it:
/// `QCOW_FUZZ_TOLERATE` holds a comma-separated list of the names used at the assertions. Unset (as in
/// `cargo test`), every property is enforced.
fn tolerated(name: &str) -> bool {
    static LIST: OnceLock<Vec<String>> = OnceLock::new();
    LIST.get_or_init(|| {
        std::env::var("QCOW_FUZZ_TOLERATE").unwrap_or_default().split(',').map(|s| s.trim().to_owned()).collect()
    })
    .iter()
    .any(|n| n == name)
}

fn check_report_consistent(r: &CheckReport, what: &str) {
    assert!(r.problems.len() <= MAX_PROBLEMS, "{what}: {} problems kept, over the cap", r.problems.len());
    assert!(r.problems_omitted == 0 || r.problems.len() == MAX_PROBLEMS, "{what}: problems omitted below the cap");
    for p in &r.problems {
        let line = p.to_string();
        assert!(!line.is_empty() && !line.contains('\n'), "{what}: a problem is not one line: {line:?}");
    }
}

/// `check` on an arbitrary byte string as an image file. `Repair::None` never writes and never panics. On a copy,
/// `Repair::All` must leave an image that checks exactly as that repair reported it; an image it calls clean
/// must check clean again, be left alone by a second repair, pass the engine's own refcount verification and open
/// read-write.
pub fn check(data: &[u8]) {
    let dev = MemoryDevice::from_bytes(data.to_vec());
    let before = dev.snapshot();
    let Ok(first) = check_image(&dev, Repair::None) else {
        assert!(dev.snapshot() == before, "a failed check without repair modified the file");
        return;
    };
    assert!(dev.snapshot() == before, "a check without repair modified the file");
    check_report_consistent(&first, "check");
    assert_eq!((first.corruptions_fixed, first.leaks_fixed), (0, 0), "a check without repair claims fixes");
    let again = check_image(&dev, Repair::None).unwrap_or_else(|e| panic!("a second check fails: {e}"));
    assert_eq!(again, first, "checking the same bytes twice gave different reports");

    let Ok(repaired) = check_image(&dev, Repair::All) else { return };
    check_report_consistent(&repaired, "check -r all");
    let after = check_image(&dev, Repair::None).unwrap_or_else(|e| panic!("the repaired image no longer checks: {e}"));
    check_report_consistent(&after, "check after -r all");
    // What a repair says is left is what a check then finds; a repair may add check errors of its own (a rebuild
    // it refused), never hide the image's.
    let left = |r: &CheckReport| (r.corruptions, r.leaks);
    if !tolerated("repair-report") {
        assert_eq!(left(&after), left(&repaired), "-r all reported {repaired:?} left, a check then finds {after:?}");
        assert!(repaired.check_errors >= after.check_errors, "-r all reported {repaired:?}, a check finds {after:?}");
    }
    if !repaired.is_clean() {
        return;
    }
    assert!(after.is_clean(), "repair reported a clean image, but it checks as {after:?}");
    let settled = dev.snapshot();
    let second = check_image(&dev, Repair::All).unwrap_or_else(|e| panic!("a second repair fails: {e}"));
    assert!(second.is_clean() && second.corruptions_fixed == 0 && second.leaks_fixed == 0, "{second:?}");
    assert!(dev.snapshot() == settled, "repairing a clean image modified it");
    // The engine's own verifier must agree with the checker about the repaired refcounts.
    if let Ok(image) = Image::open_with(MemoryDevice::from_bytes(settled.clone()), Config::read_only(), &SideFiles) {
        if let Err(e) = image.verify_refcounts() {
            assert!(tolerated("verify-vs-check"), "check calls the image clean, verify_refcounts: {e}");
        }
    }
    let rw = Config { read_only: false, ..Config::default() };
    if let Err(e) = Image::open_with(MemoryDevice::from_bytes(settled), rw, &SideFiles) {
        // Only refusals by feature are acceptable for an image the checker calls clean.
        assert_eq!(e.kind(), qcow::ErrorKind::Unsupported, "a repaired, clean image is refused read-write: {e}");
    }
}

/// Guest bytes the compaction body compares before and after, across every range.
const COMPARE_BUDGET: u64 = 2 << 20;

/// How [`compact`] ended, so that a campaign can tell a run that compacts from one that refuses everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactOutcome {
    /// The image did not open read-write.
    NotOpened,
    /// Offline compaction refused it for want of trustworthy refcounts (the file unchanged).
    Refused,
    /// Offline compaction failed some other way.
    Failed,
    /// Offline compaction succeeded.
    Compacted,
}

/// The guest ranges worth comparing: the start of the disk and what `map` says is not plain zeros, in pieces of
/// at most [`CHUNK`] bytes, [`COMPARE_BUDGET`] bytes in all.
fn compared_ranges<D: BlockDevice>(image: &Image<D>) -> Vec<(u64, u64)> {
    let size = image.virtual_size();
    let mut ranges = vec![(0, size.min(64 << 10))];
    if let Ok(extents) = image.map(0, size.min(WINDOW)) {
        for e in extents.iter().filter(|e| !e.kind.reads_zero()) {
            let mut at = e.guest.0 & !511;
            let end = e.guest.0.saturating_add(e.len).min(size);
            while at < end {
                let len = (end - at).min(CHUNK);
                ranges.push((at, len));
                at += len;
            }
        }
    }
    let mut budget = COMPARE_BUDGET;
    ranges.retain(|&(_, len)| {
        let keep = len <= budget;
        budget = budget.saturating_sub(len);
        keep
    });
    ranges
}

/// What the guest reads in each range (`None` where the read fails).
fn guest_reads<D: BlockDevice>(image: &Image<D>, ranges: &[(u64, u64)]) -> Vec<Option<Vec<u8>>> {
    ranges
        .iter()
        .map(|&(at, len)| {
            let mut buf = vec![0u8; len.next_multiple_of(512) as usize];
            let len = buf.len().min(image.virtual_size().saturating_sub(at).next_multiple_of(512) as usize);
            image.read_at(at, &mut buf[..len]).ok().map(|()| buf)
        })
        .collect()
}

/// Every range that read before and reads now must read the same; with `strict`, every range that read before
/// must still read.
fn same_reads(before: &[Option<Vec<u8>>], now: &[Option<Vec<u8>>], ranges: &[(u64, u64)], strict: bool, step: &str) {
    for ((b, n), (at, _)) in before.iter().zip(now).zip(ranges) {
        match (b, n) {
            (Some(b), Some(n)) => assert!(b == n, "{step}: guest bytes at {at:#x} changed"),
            (Some(_), None) if strict => panic!("{step}: guest bytes at {at:#x} read before and fail now"),
            _ => {}
        }
    }
}

/// Runs one step of space reclaiming and judges it: a refusal for want of trust changes nothing on the device;
/// any other outcome leaves every guest byte that read before reading the same (success also leaves every one
/// readable). Returns whether the step succeeded and whether it was a refusal.
fn judged_step<D: BlockDevice>(
    image: &Image<D>,
    ranges: &[(u64, u64)],
    before: &[Option<Vec<u8>>],
    step: &str,
    snapshot: impl Fn() -> Vec<u8>,
    run: impl FnOnce() -> qcow::Result<()>,
) -> (bool, bool) {
    let file = snapshot();
    let result = run();
    let refused = matches!(result, Err(qcow::Error::Untrusted { .. }));
    if refused {
        assert!(snapshot() == file, "{step} refused for want of trust but changed the file");
    }
    same_reads(before, &guest_reads(image, ranges), ranges, result.is_ok(), step);
    (result.is_ok(), refused)
}

/// Offline compaction, junk erasing, online compaction and a reclaimer pass on an arbitrary byte string as an
/// image file, opened read-write. Nothing may panic or hang; each step either refuses before changing anything or
/// keeps every guest byte that read before; an image whose refcounts checked trustworthy before still checks
/// without corruption after; and what was compacted reads the same once closed and opened again.
pub fn compact(data: &[u8]) -> CompactOutcome {
    let config = Config { discard: true, keep_erased: 16, compact_after_unmaps: 1, ..Config::default() };
    let dev = MemoryDevice::from_bytes(data.to_vec());
    let Ok(image) = Image::open_with(&dev, config, &SideFiles) else {
        return CompactOutcome::NotOpened;
    };
    let snapshot = || dev.snapshot();
    let trusted_before = check_image(&MemoryDevice::from_bytes(snapshot()), Repair::None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);
    let ranges = compared_ranges(&image);
    let before = guest_reads(&image, &ranges);

    let (compacted, refused) =
        judged_step(&image, &ranges, &before, "compact", snapshot, || image.compact(&mut |_| true).map(|_| ()));
    judged_step(&image, &ranges, &before, "erase_junk", snapshot, || image.erase_junk(64).map(|_| ()));
    judged_step(&image, &ranges, &before, "compact_online", snapshot, || {
        for _ in 0..4 {
            if image.compact_online(16, &|| false)?.moved == 0 {
                break;
            }
        }
        Ok(())
    });
    let options = qcow::ReclaimerOptions::default();
    judged_step(&image, &ranges, &before, "reclaim_pass", snapshot, || {
        image.reclaim_pass(&options, &|| false).map(|_| ())
    });
    let closed = image.close().is_ok();

    // Closed means written back and flushed: a fresh open reads the same bytes.
    if closed {
        let settled = dev.snapshot();
        if let Ok(again) = Image::open_with(MemoryDevice::from_bytes(settled.clone()), Config::read_only(), &SideFiles)
        {
            same_reads(&before, &guest_reads(&again, &ranges), &ranges, compacted, "reopen");
        } else {
            assert!(!compacted, "the compacted image no longer opens");
        }
        if compacted && trusted_before {
            let report = check_image(&MemoryDevice::from_bytes(settled), Repair::None)
                .unwrap_or_else(|e| panic!("the compacted image no longer checks: {e}"));
            assert!(report.corruptions == 0 && report.check_errors == 0, "compaction corrupted the image: {report:?}");
        }
    }
    match (compacted, refused) {
        (true, _) => CompactOutcome::Compacted,
        (false, true) => CompactOutcome::Refused,
        (false, false) => CompactOutcome::Failed,
    }
}
