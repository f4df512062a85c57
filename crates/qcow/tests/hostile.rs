//! The hostile-image corpus (`tests/hostile/make-corpus.sh`): every image is opened, read in full, checked and
//! repaired, each under a deadline, and our verdict on it (refused / fine / repairable / unrepairable) must be
//! QEMU's. QEMU also judges our repairs, and the guest data they leave.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::collections::BTreeSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use qcow::block::{BlockDevice, FileDevice, FileOptions};
use qcow::check::{check, CheckReport, Repair};
use qcow::{Config, Image};
use support::{corpus_images, hostile_corpus, output_within, qemu, with_deadline};

/// Seconds any one of our operations on one image may take before it counts as hung.
const DEADLINE: u64 = 30;
/// Seconds any one QEMU command may take.
const QEMU_DEADLINE: u64 = 120;
/// Reads are made in chunks of this size, so a huge virtual size never means a huge buffer.
const CHUNK: usize = 1 << 20;
/// At most this much of a virtual disk is read (the corpus's disks are all smaller).
const READ_CAP: u64 = 256 << 20;
/// Peak resident memory the whole test process may reach, in KiB.
const MEMORY_BUDGET_KIB: u64 = 512 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The check cannot run at all, nor can a repair.
    Refused,
    /// The check finds nothing.
    Fine,
    /// The check finds something, and after a full repair `qemu-img check` finds nothing.
    Repairable,
    /// The check finds something a full repair does not fix (or the repair fails).
    Unrepairable,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Verdict::Refused => "refused",
            Verdict::Fine => "fine",
            Verdict::Repairable => "repairable",
            Verdict::Unrepairable => "unrepairable",
        };
        f.write_str(s)
    }
}

/// One `qemu-img check` run.
struct QemuCheck {
    code: i32,
    json: Option<serde_json::Value>,
    stderr: String,
}

impl QemuCheck {
    fn field(&self, name: &str) -> u64 {
        self.json.as_ref().and_then(|j| j.get(name)).and_then(|v| v.as_u64()).unwrap_or(0)
    }

    /// check-errors / corruptions / leaks, as our report names them.
    fn counts(&self) -> String {
        match &self.json {
            Some(_) => {
                format!("e{} c{} l{}", self.field("check-errors"), self.field("corruptions"), self.field("leaks"))
            }
            None => format!("exit {} ({})", self.code, first_line(&self.stderr)),
        }
    }

    fn clean(&self) -> bool {
        self.code == 0
    }
}

/// The first non-empty line of a message, without the path QEMU quotes in it.
fn first_line(s: &str) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let line = line.rsplit_once("': ").map_or(line, |(_, rest)| rest);
    line.chars().take(90).collect()
}

fn qemu_check(path: &Path, repair: bool) -> QemuCheck {
    let mut cmd = qemu("qemu-img");
    cmd.args(["check", "--output=json", "-f", "qcow2"]);
    if repair {
        cmd.args(["-r", "all"]);
    }
    let out = output_within(cmd.arg(path), QEMU_DEADLINE);
    QemuCheck {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_slice(&out.stdout).ok(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The guest data as `qemu-img convert -O raw` reads it, or None when QEMU cannot read the image.
fn qemu_raw(path: &Path, scratch: &Path) -> Option<Vec<u8>> {
    let raw = scratch.join("convert.raw");
    let _ = std::fs::remove_file(&raw);
    let out = output_within(
        qemu("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(path).arg(&raw),
        QEMU_DEADLINE,
    );
    let bytes = if out.status.success() { std::fs::read(&raw).ok() } else { None };
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn copy_to(path: &Path, scratch: &Path, tag: &str) -> PathBuf {
    let copy = scratch.join(format!("{tag}-{}", path.file_name().unwrap().to_string_lossy()));
    std::fs::copy(path, &copy).unwrap();
    copy
}

/// What QEMU makes of an image.
struct QemuSide {
    verdict: Verdict,
    check: QemuCheck,
    /// The data before any repair, where QEMU can read it.
    raw_before: Option<Vec<u8>>,
    /// The data after QEMU's own repair, where it repaired the image.
    raw_after_repair: Option<Vec<u8>>,
}

fn qemu_side(path: &Path, scratch: &Path) -> QemuSide {
    let check = qemu_check(path, false);
    let raw_before = qemu_raw(path, scratch);
    if check.clean() {
        return QemuSide { verdict: Verdict::Fine, check, raw_before, raw_after_repair: None };
    }
    let copy = copy_to(path, scratch, "qemu-repaired");
    let repair = qemu_check(&copy, true);
    let after = qemu_check(&copy, false);
    let (verdict, raw_after_repair) = if after.clean() {
        (Verdict::Repairable, qemu_raw(&copy, scratch))
    } else if check.json.is_none() && repair.json.is_none() {
        (Verdict::Refused, None)
    } else {
        (Verdict::Unrepairable, None)
    };
    std::fs::remove_file(&copy).unwrap();
    QemuSide { verdict, check, raw_before, raw_after_repair }
}

/// Runs `f` under the deadline; a panic or a hang becomes an Err naming it, so that one bad image shows up in
/// the table with all the others instead of ending the test.
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        with_deadline(DEADLINE, what, move || {
            let _ = tx.send(f());
        })
    }));
    match outcome {
        Ok(()) => Ok(rx.recv().unwrap()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("PANIC or HANG in {what}: {msg}"))
        }
    }
}

fn open_file(path: &Path, read_write: bool) -> qcow::Result<FileDevice> {
    FileDevice::open(path, &FileOptions { read_only: !read_write, direct: false, ..FileOptions::default() })
}

/// What a read-only open and a full chunked read gave.
struct ReadOutcome {
    /// The open's error, if it refused.
    open_error: Option<String>,
    /// The first read error, if any chunk failed.
    read_error: Option<String>,
    /// The data read, when every chunk succeeded.
    data: Option<Vec<u8>>,
}

fn open_and_read(path: PathBuf) -> ReadOutcome {
    let image = match open_file(&path, false).and_then(|dev| Image::open(dev, Config::read_only())) {
        Ok(image) => image,
        Err(e) => return ReadOutcome { open_error: Some(e.to_string()), read_error: None, data: None },
    };
    let size = image.virtual_size().min(READ_CAP);
    let mut data = Vec::new();
    let mut read_error = None;
    let mut chunk = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64) as usize;
        match image.read_at(offset, &mut chunk[..len]) {
            Ok(()) => data.extend_from_slice(&chunk[..len]),
            Err(e) => {
                read_error.get_or_insert_with(|| format!("at {offset}: {e}"));
            }
        }
        offset += len as u64;
    }
    let complete = read_error.is_none() && size == image.virtual_size();
    ReadOutcome { open_error: None, read_error, data: complete.then_some(data) }
}

fn summary(r: &CheckReport) -> String {
    format!("e{} c{} l{}", r.check_errors, r.corruptions, r.leaks)
}

/// What our library makes of an image.
struct OurSide {
    verdict: Verdict,
    read: ReadOutcome,
    check: Result<CheckReport, String>,
    repair: Result<CheckReport, String>,
    /// QEMU's check of our repaired copy.
    judged: Option<QemuCheck>,
    /// The data of our repaired copy, as QEMU reads it.
    raw_after_repair: Option<Vec<u8>>,
}

fn our_side(path: &Path, scratch: &Path) -> Result<OurSide, String> {
    let p = path.to_path_buf();
    let read = guarded("open and read", move || open_and_read(p))?;
    let p = path.to_path_buf();
    let check_none = guarded("check", move || {
        let dev = open_file(&p, false).map_err(|e| e.to_string())?;
        check(&dev, Repair::None).map_err(|e| e.to_string())
    })?;
    let copy = copy_to(path, scratch, "ours-repaired");
    let c = copy.clone();
    let repair = guarded("repair", move || {
        let dev = open_file(&c, true).map_err(|e| e.to_string())?;
        let report = check(&dev, Repair::All).map_err(|e| e.to_string())?;
        dev.flush().map_err(|e| e.to_string())?;
        Ok(report)
    })?;
    let (judged, raw_after_repair) = match &repair {
        Ok(_) => (Some(qemu_check(&copy, false)), qemu_raw(&copy, scratch)),
        Err(_) => (None, None),
    };
    std::fs::remove_file(&copy).unwrap();
    let verdict = match (&check_none, &repair, &judged) {
        (Ok(r), _, _) if r.exit_code() == 0 => Verdict::Fine,
        (_, Ok(_), Some(j)) if j.clean() => Verdict::Repairable,
        (Err(_), Err(_), _) => Verdict::Refused,
        _ => Verdict::Unrepairable,
    };
    Ok(OurSide { verdict, read, check: check_none, repair, judged, raw_after_repair })
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What one image came to: its table row, what failed, and where our counts differ from QEMU's.
#[derive(Default)]
struct Judged {
    qemu: Option<Verdict>,
    row: String,
    failures: Vec<String>,
    findings: Vec<String>,
    /// Where we do better than QEMU (a repair it cannot make).
    better: Option<String>,
}

fn judge(path: &Path, scratch: &Path) -> Judged {
    let mut out = Judged::default();
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let q = qemu_side(path, scratch);
    out.qemu = Some(q.verdict);
    let ours = match our_side(path, scratch) {
        Ok(ours) => ours,
        Err(e) => {
            out.row = format!("{name:<42} {:<13} {:<13} {e}", q.verdict.to_string(), "-");
            out.failures.push(format!("{name}: {e}"));
            return out;
        }
    };
    let our_counts = match &ours.check {
        Ok(r) => summary(r),
        Err(e) => format!("Err({})", first_line(e)),
    };
    let read = match (&ours.read.open_error, &ours.read.read_error) {
        (Some(_), _) => "open refused",
        (None, Some(_)) => "read errors",
        (None, None) => "read ok",
    };
    out.row = format!(
        "{name:<42} {:<13} {:<13} {read:<13} qemu[{}] ours[{}]",
        q.verdict.to_string(),
        ours.verdict.to_string(),
        q.check.counts(),
        our_counts
    );

    // The one difference allowed: we repair an image QEMU's repair cannot, QEMU then finds it clean, and the guest
    // data is unchanged (asserted below).
    let better = q.verdict == Verdict::Unrepairable
        && ours.verdict == Verdict::Repairable
        && matches!(&ours.judged, Some(j) if j.clean());
    if better {
        out.better = Some(format!("{name}: QEMU cannot repair it, ours does and qemu-img check agrees"));
    } else if ours.verdict != q.verdict {
        out.failures.push(format!("{name}: QEMU says {}, we say {}", q.verdict, ours.verdict));
    }
    if let Some(e) = &ours.read.open_error {
        if e.trim().is_empty() {
            out.failures.push(format!("{name}: the open failed with an empty message"));
        }
    }
    if let Err(e) = &ours.check {
        if e.trim().is_empty() {
            out.failures.push(format!("{name}: the check failed with an empty message"));
        }
    }
    // Where both sides read the whole disk, they read the same bytes.
    if let (Some(ours_data), Some(qemu_data)) = (&ours.read.data, &q.raw_before) {
        if ours_data != qemu_data {
            let at = ours_data.iter().zip(qemu_data).position(|(a, b)| a != b);
            out.failures.push(format!(
                "{name}: our read differs from QEMU's (lengths {} and {}, first difference at {at:?})",
                ours_data.len(),
                qemu_data.len()
            ));
        }
    }
    // A repair must never damage a fine image, and QEMU must find nothing after our repair of one it repairs.
    if matches!(q.verdict, Verdict::Fine | Verdict::Repairable) {
        match (&ours.repair, &ours.judged) {
            (Ok(_), Some(j)) if j.clean() => {}
            (Ok(_), Some(j)) => out.failures.push(format!("{name}: qemu-img check after our repair: {}", j.counts())),
            (Err(e), _) => out.failures.push(format!("{name}: our repair failed: {e}")),
            (Ok(_), None) => unreachable!(),
        }
    }
    // Where QEMU's repair kept the guest data, ours must keep it too.
    if q.verdict == Verdict::Repairable || q.verdict == Verdict::Fine {
        let kept = match q.verdict {
            Verdict::Fine => q.raw_before.as_ref(),
            _ => q.raw_after_repair.as_ref().filter(|after| Some(*after) == q.raw_before.as_ref()),
        };
        if let Some(expected) = kept {
            if ours.raw_after_repair.as_ref() != Some(expected) {
                out.failures.push(format!("{name}: our repair changed guest data that QEMU's repair kept"));
            }
        }
    }
    // A repair QEMU cannot make must not buy its clean bill of health with the guest data.
    if ours.verdict == Verdict::Repairable && q.verdict != Verdict::Repairable {
        if let Some(before) = &q.raw_before {
            if ours.raw_after_repair.as_ref() != Some(before) {
                out.failures.push(format!("{name}: our repair (one QEMU cannot make) changed the guest data"));
            }
        }
    }
    if let (Ok(r), Some(json)) = (&ours.check, &q.check.json) {
        let theirs = (
            json.get("check-errors").and_then(|v| v.as_u64()).unwrap_or(0),
            json.get("corruptions").and_then(|v| v.as_u64()).unwrap_or(0),
            json.get("leaks").and_then(|v| v.as_u64()).unwrap_or(0),
        );
        if theirs != (r.check_errors, r.corruptions, r.leaks) {
            out.findings.push(format!("{name}: counts differ: qemu[{}] ours[{}]", q.check.counts(), summary(r)));
        }
    }
    out
}

#[test]
fn every_hostile_image_gets_qemus_verdict_without_panics_hangs_or_huge_allocations() {
    let corpus = hostile_corpus();
    let images = corpus_images(&corpus);
    assert!(images.len() >= 45, "the corpus has only {} images", images.len());
    let scratch = tempfile::tempdir().unwrap();

    // Two workers, each with its own scratch directory: most of the time goes to waiting for qemu-img.
    let next = AtomicUsize::new(0);
    let mut judged: Vec<(usize, Judged)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (images, next) = (&images, &next);
                let scratch = scratch.path().join(format!("worker{w}"));
                std::fs::create_dir_all(&scratch).unwrap();
                s.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = images.get(i) else { break done };
                        done.push((i, judge(path, &scratch)));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    judged.sort_by_key(|(i, _)| *i);
    let rows: Vec<String> = judged.iter().map(|(_, j)| j.row.clone()).collect();
    let failures: Vec<String> = judged.iter().flat_map(|(_, j)| j.failures.clone()).collect();
    let findings: Vec<String> = judged.iter().flat_map(|(_, j)| j.findings.clone()).collect();
    let better: Vec<String> = judged.iter().filter_map(|(_, j)| j.better.clone()).collect();
    let verdicts_seen: BTreeSet<String> = judged.iter().filter_map(|(_, j)| j.qemu).map(|v| v.to_string()).collect();

    let peak = peak_rss_kib();
    let table = format!(
        "{:<42} {:<13} {:<13} {:<13} counts (check-errors, corruptions, leaks)\n{}",
        "image",
        "QEMU",
        "ours",
        "our open",
        rows.join("\n")
    );
    eprintln!("{table}\n\npeak resident memory: {} MiB", peak >> 10);
    if !better.is_empty() {
        eprintln!("\nrepairs QEMU cannot make:\n{}", better.join("\n"));
    }
    if !findings.is_empty() {
        eprintln!("\ncounts that differ from QEMU's (verdicts may still agree):\n{}", findings.join("\n"));
    }
    assert!(
        verdicts_seen.len() == 4,
        "the corpus should hold images of every verdict, QEMU gave only {verdicts_seen:?}"
    );
    assert!(failures.is_empty(), "{} failures:\n{}\n\n{table}", failures.len(), failures.join("\n"));
    assert!(
        peak < MEMORY_BUDGET_KIB,
        "peak resident memory {} MiB exceeds the {} MiB budget",
        peak >> 10,
        MEMORY_BUDGET_KIB >> 10
    );
}
