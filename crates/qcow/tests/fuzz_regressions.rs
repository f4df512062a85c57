//! Replays the fuzz targets' inputs through the targets' own bodies (`tests/fuzz_bodies/`): every input a fuzzer
//! tripped on (`tests/fuzz-regressions/<target>/`) and the qemu-img-made seed corpora (`fuzz/corpus/<target>/`).
//! For the seeds QEMU is also the oracle: what we read must be what `qemu-img convert` reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod fuzz_bodies;
mod support;

use std::path::{Path, PathBuf};

use qcow::block::MemoryDevice;
use qcow::check::{check, Repair};
use qcow::format::Header;
use qcow::{Config, Image};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        // Dot files (`.gitkeep`) only keep an empty directory in git.
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    files
}

fn regressions(target: &str) -> Vec<PathBuf> {
    inputs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions").join(target))
}

fn seeds(target: &str) -> Vec<PathBuf> {
    let files = inputs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target));
    assert!(!files.is_empty(), "the {target} seed corpus is empty");
    files
}

/// Whether a seed names a backing file or an external data file, which QEMU would need beside it.
fn names_a_side_file(bytes: &[u8]) -> bool {
    let header = Header::parse(bytes).unwrap();
    header.backing_file.is_some() || header.has_external_data_file()
}

/// Runs `body` on every file, each under a deadline: a fuzzer timeout must fail here too, not stall the suite.
fn replay(files: Vec<PathBuf>, body: fn(&[u8])) {
    for path in files {
        let data = std::fs::read(&path).unwrap();
        support::with_deadline(30, &path.display().to_string(), move || body(&data));
    }
}

#[test]
fn header_regressions_and_seeds_pass_the_header_target() {
    let mut files = regressions("header");
    files.extend(seeds("header"));
    replay(files, fuzz_bodies::header);
}

#[test]
fn open_read_regressions_and_seeds_pass_the_open_read_target() {
    let mut files = regressions("open_read");
    files.extend(seeds("open_read"));
    replay(files, fuzz_bodies::open_read);
}

#[test]
fn check_regressions_and_seeds_pass_the_check_target() {
    let mut files = regressions("check");
    files.extend(seeds("check"));
    replay(files, fuzz_bodies::check);
}

#[test]
fn compact_regressions_and_seeds_pass_the_compact_target() {
    let mut files = regressions("compact");
    files.extend(seeds("compact"));
    replay(files, |data| {
        fuzz_bodies::compact(data);
    });
}

/// The compaction seeds are compacted where their refcounts can be trusted and refused where not: the target is
/// not a campaign that refuses everything.
#[test]
fn the_compact_seeds_compact_unless_their_refcounts_are_damaged() {
    use fuzz_bodies::CompactOutcome;
    for path in seeds("compact") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let outcome = fuzz_bodies::compact(&std::fs::read(&path).unwrap());
        let expected = match name.as_str() {
            "v3-512-reftable-zeroed" | "v3-512-leak" => CompactOutcome::Refused,
            _ => CompactOutcome::Compacted,
        };
        assert_eq!(outcome, expected, "{name}");
    }
}

/// The check seeds include deliberate leaks and corruptions; our findings must be qemu-img's.
#[test]
fn the_check_seeds_check_as_qemu_checks_them() {
    let mut compared = 0;
    for path in seeds("check") {
        let bytes = std::fs::read(&path).unwrap();
        if names_a_side_file(&bytes) {
            continue;
        }
        let qemu = support::qemu_check(&path);
        let ours = check(&MemoryDevice::from_bytes(bytes), Repair::None).unwrap();
        assert_eq!(
            (ours.corruptions, ours.leaks, ours.check_errors, i32::from(ours.exit_code())),
            (qemu.corruptions(), qemu.leaks(), qemu.check_errors(), qemu.code),
            "{}: ours {ours:?}, qemu-img {:#}",
            path.display(),
            qemu.json
        );
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} seeds could be compared");
}

/// The seeds are what the fuzzer mutates; if we misread them, its zero-extent and tiling checks are built on
/// sand. Seeds naming a backing file or data file are left to the target (QEMU cannot open them alone).
#[test]
fn the_open_read_seeds_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for path in seeds("open_read") {
        let bytes = std::fs::read(&path).unwrap();
        if names_a_side_file(&bytes) {
            continue;
        }
        let image = Image::open(MemoryDevice::from_bytes(bytes), Config::read_only()).unwrap();
        let mut ours = vec![0u8; image.virtual_size() as usize];
        image.read_at(0, &mut ours).unwrap();
        assert!(ours == support::qemu_to_raw(&path, dir.path()), "{} reads differently from QEMU", path.display());
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} seeds could be compared");
}
