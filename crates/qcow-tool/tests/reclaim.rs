//! `qcow-tool mapped`, `discard` and `compact` driven as a user would, with QEMU judging: `mapped` agrees with
//! `qemu-img map` on where data is, `discard` frees zero clusters without changing what the guest reads, and
//! `compact` shrinks the file while `qemu-img check` stays clean and `qemu-img compare` finds no difference.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod binary;

use binary::tool;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn qemu(program: &str) -> Command {
    let found = Command::new(program).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{program} not found: install qemu-utils (apt-get install -y qemu-utils)");
    Command::new(program)
}

fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Ranges (start, length) that `qemu-img map` says hold data, merged.
fn qemu_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let out = ok(qemu("qemu-img").args(["map", "--output=json"]).arg(path));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    merge(
        map.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    )
}

fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len)),
        }
    }
    out
}

fn our_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let out = ok(tool().args(["mapped", "--ignore-zeroes", "--output=json"]).arg(path));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    merge(list.as_array().unwrap().iter().map(|e| {
        assert_eq!(e["kind"], "data");
        (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())
    }))
}

fn assert_clean(path: &Path) {
    let out = qemu("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "qemu-img check: {}", String::from_utf8_lossy(&out.stdout));
}

fn assert_same(a: &Path, b: &Path) {
    let out = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(a).arg(b).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
}

fn image(dir: &Path, name: &str, opts: &str, io: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts]).arg(&path).arg("64M"));
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in io {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(&path));
    path
}

#[test]
fn mapped_agrees_with_qemu_img_map_and_lists_extents_not_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let io =
        ["write -P 1 0 3M", "write -P 2 10M 64k", "write -c -P 3 20M 128k", "write -z 30M 1M", "write -P 4 63M 1M"];
    for opts in ["cluster_size=65536", "cluster_size=4096", "compat=0.10", "extended_l2=on"] {
        let path = image(dir.path(), "m.qcow2", opts, &io);
        assert_eq!(our_data_ranges(&path), qemu_data_ranges(&path), "{opts}");
        let text = ok(tool().args(["mapped"]).arg(&path));
        let lines = String::from_utf8(text.stdout).unwrap();
        assert!(lines.lines().any(|l| l == "0 3145728 data"), "{opts}: one line per extent: {lines}");
        if !opts.contains("0.10") {
            assert!(lines.lines().any(|l| l.ends_with(" zero")), "{opts}: zero clusters listed: {lines}");
        }
    }
}

#[test]
fn discard_frees_zero_clusters_and_compact_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(
        dir.path(),
        "z.qcow2",
        "cluster_size=65536",
        &["write -P 0 0 32M", "write -P 7 40M 1M", "write -P 0 50M 4M", "write -P 9 60M 64k"],
    );
    let original = dir.path().join("original.qcow2");
    std::fs::copy(&path, &original).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    let out = ok(tool().args(["discard"]).arg(&path));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains(&format!("{} bytes of zero clusters discarded", 36 << 20)), "{said}");
    assert_clean(&path);
    assert_same(&path, &original);
    assert_eq!(qemu_data_ranges(&path), vec![(40 << 20, 1 << 20), (60 << 20, 64 << 10)]);

    // The shell opens descriptor 3 on a file, as a front end reading progress would.
    let progress = dir.path().join("progress.txt");
    let out = ok(Command::new("bash")
        .arg("-c")
        .arg(r#"exec 3>"$1"; exec "$2" compact --progress-fd 3 "$3""#)
        .arg("bash")
        .arg(&progress)
        .arg(env!("CARGO_BIN_EXE_qcow-tool"))
        .arg(&path));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains("bytes smaller"), "{said}");
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(after < before / 10, "compact shrank the file: {before} -> {after}");
    assert_clean(&path);
    assert_same(&path, &original);
    let lines = std::fs::read_to_string(&progress).unwrap();
    assert!(lines.lines().last() == Some("{\"progress\": 100}"), "progress lines: {lines}");
}

#[test]
fn long_commands_refuse_bad_progress_descriptors_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "p.qcow2", "cluster_size=65536", &["write -P 1 0 1M"]);
    for fd in ["1", "97"] {
        let out = tool().args(["compact", "--progress-fd", fd]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--progress-fd"), "{err}");
    }
    let out = tool().args(["discard"]).arg(dir.path().join("missing.qcow2")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// The two images of the issue's reproductions: a refcount table entry zeroed (4 KiB clusters), and the
/// refcount table offset moved far past the end of the file (64 KiB clusters).
fn damaged_images(dir: &Path) -> Vec<std::path::PathBuf> {
    let hr = dir.join("hr.qcow2");
    ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]).arg(&hr).arg("4M"));
    ok(qemu("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 100k"]).arg(&hr));
    poke(&hr, be64_at(&hr, 48), &[0; 8]);
    let hh = dir.join("hh.qcow2");
    ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&hh).arg("4M"));
    ok(qemu("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 100k"]).arg(&hh));
    poke(&hh, 48, &[0, 0, 0xfe, 0, 0, 1, 0, 0]);
    vec![hr, hh]
}

fn qemu_raw(path: &Path, raw: &Path) {
    ok(qemu("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(path).arg(raw));
}

/// Regression (issue: compaction and the reclaimer must never discard data on a damaged image): `compact` on the
/// issue's two images used to truncate the file to its header and exit 0. It must refuse, say why and what to do,
/// and leave the file as it was.
#[test]
fn compact_refuses_images_whose_refcounts_are_damaged_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for path in damaged_images(dir.path()) {
        let before = std::fs::read(&path).unwrap();
        let started = std::time::Instant::now();
        let out = tool().arg("compact").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(stderr.contains("compact refused, the refcounts cannot be trusted"), "{stderr}");
        assert!(stderr.contains("qcow-tool check -r all"), "names the way out: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
        assert!(std::fs::read(&path).unwrap() == before, "{}: the file changed", path.display());
    }
}

/// Regression (same issue): `serve --reclaim` on the damaged image used to fail a discard and then compact and
/// truncate the file anyway. It must refuse to start, and leave the file as it was; so for damage to each kind
/// of metadata the reclaimer gives space back by.
#[test]
fn serve_with_the_reclaimer_refuses_an_image_whose_refcounts_are_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = damaged_images(dir.path());
    // More kinds of damage, to an image with holes and a snapshot: a refcount block zeroed, an L2 entry naming
    // another entry's cluster (refcount 1, two references), the snapshot table overwritten.
    let base = dir.path().join("base.qcow2");
    ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]).arg(&base).arg("4M"));
    ok(qemu("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 100k", "-c", "discard 16k 48k"]).arg(&base));
    ok(qemu("qemu-img").args(["snapshot", "-c", "s1"]).arg(&base));
    let (reftable, l1, snapshots) = (be64_at(&base, 48), be64_at(&base, 40), be64_at(&base, 64));
    let refblock = be64_at(&base, reftable);
    let l2 = be64_at(&base, l1) & 0x00ff_ffff_ffff_fe00;
    let pokes: [(&str, u64, Vec<u8>); 3] = [
        ("refblock-zeroed", refblock, vec![0; 4096]),
        ("l2-shared", l2 + 8 * 20, be64_at(&base, l2).to_be_bytes().to_vec()),
        ("snapshot-table", snapshots, vec![0xff; 64]),
    ];
    for (name, at, bytes) in pokes {
        let path = dir.path().join(format!("{name}.qcow2"));
        std::fs::copy(&base, &path).unwrap();
        poke(&path, at, &bytes);
        images.push(path);
    }
    for path in images {
        let before = std::fs::read(&path).unwrap();
        let socket = dir.path().join("nbd.sock");
        let out = tool()
            .args(["serve", "--reclaim", "--keep-erased", "64", "--compact-after", "4k", "--socket"])
            .arg(&socket)
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(stderr.contains("could not start the reclaimer"), "{stderr}");
        assert!(stderr.contains("reclaim refused, the refcounts cannot be trusted"), "{stderr}");
        if path.ends_with("hr.qcow2") {
            assert!(stderr.contains("refcount table entry 0 (at 0x1000), which names no refcount block"), "{stderr}");
        }
        assert!(!socket.exists(), "nothing was served");
        assert!(std::fs::read(&path).unwrap() == before, "{}: the file changed", path.display());
    }
}

/// The way out, as a user takes it: `compare` the damaged image with what QEMU reads from it, `check -r all`,
/// then `compact`. The data survives each step, and QEMU checks the result clean.
#[test]
fn compare_repair_then_compact_keeps_the_data_of_a_damaged_image() {
    let dir = tempfile::tempdir().unwrap();
    for path in damaged_images(dir.path()) {
        let raw = path.with_extension("raw");
        qemu_raw(&path, &raw);
        ok(tool().args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&path).arg(&raw));
        let out = tool().args(["check", "-r", "all"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "check -r all: {}", String::from_utf8_lossy(&out.stdout));
        ok(tool().arg("compact").arg(&path));
        assert_clean(&path);
        let out = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&path).arg(&raw).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}: {}", path.display(), String::from_utf8_lossy(&out.stdout));
    }
}
