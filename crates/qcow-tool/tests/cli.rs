//! The `qcow-tool` binary, driven as a user would, with QEMU on the other side wherever it applies: images made
//! by qemu-img are read by the tool, and images made by the tool are judged by `qemu-img check`, `info` and
//! `compare`.

mod binary;

use binary::{show, tool, Dir};

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn qemu(program: &str) -> Command {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Command::new(program),
        _ => panic!("{program} not found: install qemu-utils"),
    }
}

fn qemu_img() -> Command {
    qemu("qemu-img")
}

fn qemu_io() -> Command {
    qemu("qemu-io")
}

/// Runs `cmd` and insists it succeeds.
fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    out
}

/// Runs `cmd`, insists it fails with exit code 1 and exactly one line on stderr, and returns that line.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert_eq!(out.status.code(), Some(1), "{cmd:?}:\n{}", show(&out));
    let stderr = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{cmd:?} must print one line:\n{}", show(&out));
    assert!(stderr.starts_with("qcow-tool: "), "{}", show(&out));
    assert!(!stderr.contains("panicked"), "{}", show(&out));
    stderr
}

fn json(cmd: &mut Command) -> Value {
    let out = ok(cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{cmd:?} printed bad JSON ({e}):\n{}", show(&out)))
}

fn qemu_info(path: &Path) -> Value {
    json(qemu_img().args(["info", "--output=json"]).arg(path))
}

fn our_info(path: &Path) -> Value {
    json(tool().args(["info", "--output=json"]).arg(path))
}

/// `qemu-img check` finds nothing wrong: exit 0, no corruptions, no leaks, no check errors.
fn assert_clean(path: &Path) {
    let out = qemu_img().args(["check", "--output=json"]).arg(path).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img check {}:\n{}", path.display(), show(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(key).and_then(Value::as_u64).unwrap_or(0), 0, "{key} in {v}");
    }
}

fn qemu_create(path: &Path, options: &str, size: &str) {
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !options.is_empty() {
        cmd.args(["-o", options]);
    }
    ok(cmd.arg(path).arg(size));
}

fn qemu_io_cmds(path: &Path, cmds: &[&str]) {
    let mut cmd = qemu_io();
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(path));
}

/// The guest's bytes, as `qemu-img convert -O raw` sees them.
fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    ok(qemu_img().args(["convert", "-O", "raw"]).arg(path).arg(&out));
    std::fs::read(&out).expect("read qemu's raw copy")
}

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('/').fold(v, |v, k| &v[k])
}

#[test]
fn created_images_pass_qemu_img_check_and_agree_with_qemu_img_info() {
    let dir = Dir::new();
    // (create arguments, size, virtual size, cluster size, compat, refcount bits)
    type Case<'a> = (&'a [&'a str], &'a str, u64, u64, &'a str, u64);
    let cases: &[Case] = &[
        (&[], "1G", 1 << 30, 65536, "1.1", 16),
        (&["-o", "cluster_size=4k,refcount_bits=1"], "100M", 100 << 20, 4096, "1.1", 1),
        (&["-o", "compat=0.10"], "10M", 10 << 20, 65536, "0.10", 16),
        (&["-o", "cluster_size=2M", "-o", "refcount_bits=64"], "5G", 5 << 30, 2 << 20, "1.1", 64),
        (&["-o", "lazy_refcounts=on", "-o", "preallocation=metadata"], "20M", 20 << 20, 65536, "1.1", 16),
        (&["-o", "cluster_size=512,compat=1.1"], "1000", 1024, 512, "1.1", 16),
    ];
    for (i, &(opts, size, bytes, cluster, compat, bits)) in cases.iter().enumerate() {
        let img = dir.path(&format!("c{i}.qcow2"));
        let out = ok(tool().arg("create").args(["-f", "qcow2"]).args(opts).arg(&img).arg(size));
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(line.starts_with(&format!("Formatting '{}', fmt=qcow2", img.display())), "{line}");
        assert_clean(&img);
        let q = qemu_info(&img);
        assert_eq!(q["virtual-size"], bytes, "case {i}: {q}");
        assert_eq!(q["cluster-size"], cluster, "case {i}: {q}");
        assert_eq!(field(&q, "format-specific/data/compat"), compat, "case {i}: {q}");
        assert_eq!(field(&q, "format-specific/data/refcount-bits"), bits, "case {i}: {q}");
        if opts.contains(&"lazy_refcounts=on") {
            assert_eq!(field(&q, "format-specific/data/lazy-refcounts"), true, "case {i}: {q}");
        }
        // And we read back what we wrote the way qemu-img does.
        let ours = our_info(&img);
        for key in ["virtual-size", "cluster-size", "format", "format-specific", "dirty-flag"] {
            assert_eq!(ours[key], q[key], "case {i}, {key}");
        }
    }
}

#[test]
fn create_with_quiet_prints_nothing_and_overwrites_an_existing_file() {
    let dir = Dir::new();
    let img = dir.path("q.qcow2");
    std::fs::write(&img, vec![0x55u8; 1 << 20]).unwrap();
    let out = ok(tool().args(["create", "-q"]).arg(&img).arg("64M"));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{}", show(&out));
    assert_clean(&img);
    assert_eq!(qemu_info(&img)["virtual-size"], 64u64 << 20);
    assert!(std::fs::metadata(&img).unwrap().len() < 1 << 20);
}

#[test]
fn size_may_be_given_as_an_option() {
    let dir = Dir::new();
    let img = dir.path("s.qcow2");
    ok(tool().args(["create", "-q", "-o", "size=3M"]).arg(&img));
    assert_eq!(qemu_info(&img)["virtual-size"], 3u64 << 20);
}

#[test]
fn info_json_agrees_with_qemu_img_on_its_images() {
    let dir = Dir::new();
    let cases = [
        ("", "1G"),
        ("compat=0.10", "10M"),
        ("cluster_size=4k,refcount_bits=1", "100M"),
        ("cluster_size=2M,refcount_bits=64,lazy_refcounts=on", "3G"),
        ("compression_type=zstd", "64M"),
        ("preallocation=metadata,cluster_size=16k", "8M"),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let img = dir.path(&format!("i{i}.qcow2"));
        qemu_create(&img, opts, size);
        qemu_io_cmds(&img, &["write -P 0x11 0 64k"]);
        let q = qemu_info(&img);
        let ours = our_info(&img);
        for key in
            ["virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific", "dirty-flag"]
        {
            assert_eq!(ours[key], q[key], "case {i} ({opts}), field {key}:\nours {ours}\nqemu {q}");
        }
    }
}

#[test]
fn info_reports_a_dirty_lazy_refcounts_image_as_qemu_img_does() {
    let dir = Dir::new();
    let img = dir.path("dirty.qcow2");
    qemu_create(&img, "lazy_refcounts=on", "64M");
    // A crash while writing leaves the dirty bit set.
    let _ = qemu_io().args(["-f", "qcow2", "-c", "write -P 0x22 0 64k", "-c", "sigraise 9"]).arg(&img).output();
    let q = qemu_info(&img);
    assert_eq!(q["dirty-flag"], true, "{q}");
    let ours = our_info(&img);
    assert_eq!(ours["dirty-flag"], true, "{ours}");
    assert_eq!(ours["format-specific"], q["format-specific"]);
}

/// The lines qemu-img prints, minus the "Child node" section whose layout is QEMU's own business.
fn own_lines(text: &str) -> Vec<String> {
    text.lines().take_while(|l| !l.starts_with("Child node")).map(str::to_string).collect()
}

#[test]
fn human_info_reads_like_qemu_img() {
    let dir = Dir::new();
    for (i, (opts, size)) in
        [("", "1G"), ("compat=0.10", "1000"), ("cluster_size=4k,lazy_refcounts=on", "1.5G")].iter().enumerate()
    {
        let img = dir.path(&format!("h{i}.qcow2"));
        qemu_create(&img, opts, size);
        let q = String::from_utf8(ok(qemu_img().arg("info").arg(&img)).stdout).unwrap();
        let ours = String::from_utf8(ok(tool().arg("info").arg(&img)).stdout).unwrap();
        assert_eq!(own_lines(&ours), own_lines(&q), "case {i}:\nours:\n{ours}\nqemu:\n{q}");
    }
}

#[test]
fn a_file_without_the_qcow2_magic_is_reported_as_raw() {
    let dir = Dir::new();
    let raw = dir.path("plain.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(10 << 20).unwrap();
    drop(file);
    let q = qemu_info(&raw);
    let ours = our_info(&raw);
    for key in ["virtual-size", "filename", "format", "actual-size", "dirty-flag"] {
        assert_eq!(ours[key], q[key], "field {key}:\nours {ours}\nqemu {q}");
    }
    let human = String::from_utf8(ok(tool().arg("info").arg(&raw)).stdout).unwrap();
    assert!(human.contains("file format: raw\nvirtual size: 10 MiB (10485760 bytes)"), "{human}");
}

/// A 64 MiB qcow2 image written by qemu-io: a pattern, an explicit zero range, and a little data far out.
fn qemu_written_image(dir: &Dir, name: &str, options: &str) -> PathBuf {
    let img = dir.path(name);
    qemu_create(&img, options, "64M");
    qemu_io_cmds(&img, &["write -P 0xab 1M 64k", "write -z 2M 64k", "write -P 0x5c 40M 4k", "write -P 0x01 63M 512"]);
    img
}

#[test]
fn convert_to_raw_matches_qemu_img_byte_for_byte_and_is_sparse() {
    let dir = Dir::new();
    for (i, options) in ["", "cluster_size=4k,refcount_bits=1", "compat=0.10"].iter().enumerate() {
        let img = qemu_written_image(&dir, &format!("src{i}.qcow2"), options);
        let ours = dir.path(&format!("ours{i}.raw"));
        ok(tool().args(["convert", "-O", "raw"]).arg(&img).arg(&ours));
        let expected = qemu_raw(&img, dir.0.path());
        let got = std::fs::read(&ours).unwrap();
        assert_eq!(got.len(), expected.len(), "case {i}");
        assert!(got == expected, "case {i}: contents differ from qemu-img convert");
        let meta = std::fs::metadata(&ours).unwrap();
        assert!(
            meta.blocks() * 512 < meta.len() / 4,
            "case {i}: output is not sparse: {} bytes allocated of {}",
            meta.blocks() * 512,
            meta.len()
        );
    }
}

#[test]
fn convert_probes_the_source_format_and_defaults_to_raw_output() {
    let dir = Dir::new();
    let img = qemu_written_image(&dir, "probe.qcow2", "");
    let ours = dir.path("probe.raw");
    ok(tool().arg("convert").arg(&img).arg(&ours));
    assert!(std::fs::read(&ours).unwrap() == qemu_raw(&img, dir.0.path()));
    // And a raw source is probed as raw: converting the copy again changes nothing.
    let again = dir.path("again.raw");
    ok(tool().arg("convert").arg(&ours).arg(&again));
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&ours).unwrap());
}

/// The nonzero pieces `sparse_raw` writes, as (offset, byte, length).
fn sparse_pieces(len: u64) -> Vec<(u64, u8, u64)> {
    vec![(0, 0x11, 512), (1 << 20, 0xab, 65536), (5 << 20, 0x77, 3 << 20), (len - 100, 0xee, 100)]
}

/// A sparse raw file of `len` bytes with data in a few places and one written block of zeros.
fn sparse_raw(path: &Path, len: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(len).unwrap();
    for (off, byte, n) in sparse_pieces(len).into_iter().chain([(3 << 20, 0, 65536)]) {
        file.seek(SeekFrom::Start(off)).unwrap();
        file.write_all(&vec![byte; n as usize]).unwrap();
    }
    file.sync_all().unwrap();
}

/// Bytes of the `len`-byte `sparse_raw` file a copy allocates when it writes exactly the `unit`-aligned blocks that
/// hold nonzero data.
fn allocated_by_copy(len: u64, unit: u64) -> u64 {
    let mut blocks: Vec<u64> =
        sparse_pieces(len).into_iter().flat_map(|(off, _, n)| off / unit..(off + n).div_ceil(unit)).collect();
    blocks.sort_unstable();
    blocks.dedup();
    // qemu-img map stops at the virtual size: the file's length in whole sectors.
    let end = len.next_multiple_of(512);
    blocks.iter().map(|b| ((b + 1) * unit).min(end) - b * unit).sum()
}

#[test]
fn convert_raw_to_qcow2_is_identical_for_qemu_img_compare_and_check_is_clean() {
    let dir = Dir::new();
    let cases: &[(&[&str], u64, u64)] = &[
        (&[], 64 << 20, 65536),
        (&["-o", "cluster_size=4k,refcount_bits=1"], 32 << 20, 4096),
        (&["-o", "compat=0.10", "-o", "cluster_size=2M"], 16 << 20, 2 << 20),
        (&["-o", "lazy_refcounts=on"], (16 << 20) + 1000, 65536),
    ];
    for (i, &(opts, len, cluster)) in cases.iter().enumerate() {
        let raw = dir.path(&format!("in{i}.raw"));
        sparse_raw(&raw, len);
        let img = dir.path(&format!("out{i}.qcow2"));
        ok(tool().args(["convert", "-f", "raw", "-O", "qcow2"]).args(opts).arg(&raw).arg(&img));
        assert_clean(&img);
        let out = qemu_img().args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&img).arg(&raw).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "case {i}: {}", show(&out));
        // Only data was copied: at least the clusters that hold it, at most the 64 KiB blocks (or clusters, when
        // larger) that hold it; never the holes, nor the block of written zeros.
        let map: Value = json(qemu_img().args(["map", "--output=json"]).arg(&img));
        let data: u64 =
            map.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| e["length"].as_u64().unwrap()).sum();
        let (least, most) = (allocated_by_copy(len, cluster), allocated_by_copy(len, cluster.max(65536)));
        assert!((least..=most).contains(&data), "case {i}: {data} bytes mapped, not in {least}..={most}: {map}");
        // And back to raw with our tool gives the original file.
        let back = dir.path(&format!("back{i}.raw"));
        ok(tool().args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&img).arg(&back));
        let original = std::fs::read(&raw).unwrap();
        let round = std::fs::read(&back).unwrap();
        assert_eq!(round.len(), len.next_multiple_of(512) as usize, "case {i}");
        assert!(round[..original.len()] == original[..], "case {i}");
    }
}

#[test]
fn convert_raw_to_raw_keeps_an_odd_length_exactly() {
    let dir = Dir::new();
    let raw = dir.path("odd.raw");
    sparse_raw(&raw, (9 << 20) + 777);
    let out = dir.path("odd-copy.raw");
    ok(tool().args(["convert", "-f", "raw", "-O", "raw"]).arg(&raw).arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    // qemu-img pads its copy to whole sectors; apart from that padding the two agree.
    let expected = dir.path("odd-qemu.raw");
    ok(qemu_img().args(["convert", "-f", "raw", "-O", "raw"]).arg(&raw).arg(&expected));
    let (ours, qemu) = (std::fs::read(&out).unwrap(), std::fs::read(&expected).unwrap());
    assert_eq!(qemu.len(), ours.len().next_multiple_of(512));
    assert!(qemu[..ours.len()] == ours[..] && qemu[ours.len()..].iter().all(|&b| b == 0));
}

#[test]
fn convert_qcow2_to_qcow2_keeps_the_guest_data() {
    let dir = Dir::new();
    let img = qemu_written_image(&dir, "a.qcow2", "");
    let copy = dir.path("b.qcow2");
    ok(tool().args(["convert", "-O", "qcow2", "-o", "cluster_size=4k"]).arg(&img).arg(&copy));
    assert_clean(&copy);
    let out = qemu_img().args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(&copy).arg(&img).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(qemu_info(&copy)["cluster-size"], 4096);
}

#[test]
fn convert_shows_progress_when_asked() {
    let dir = Dir::new();
    let img = qemu_written_image(&dir, "p.qcow2", "");
    // The bar (indicatif) draws only on a terminal; off one, -p must not disturb the copy. The machine-readable
    // form is tested with --progress-fd in tests/convert.rs.
    let out = ok(tool().args(["convert", "-p"]).arg(&img).arg(dir.path("p.raw")));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(dir.path("p.raw")).unwrap() == qemu_raw(&img, dir.0.path()));
}

#[test]
fn convert_refuses_to_overwrite_its_source() {
    let dir = Dir::new();
    let img = qemu_written_image(&dir, "same.qcow2", "");
    let before = std::fs::read(&img).unwrap();
    let err = fails(tool().arg("convert").arg(&img).arg(&img));
    assert!(err.contains("same file"), "{err}");
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn write_then_read_round_trips_and_qemu_agrees() {
    let dir = Dir::new();
    for (i, options) in ["", "lazy_refcounts=on", "compat=0.10,cluster_size=4k"].iter().enumerate() {
        let img = dir.path(&format!("rw{i}.qcow2"));
        qemu_create(&img, options, "16M");
        ok(tool().args(["write"]).arg(&img).args(["--sector", "5", "--text", "hello, qcow"]));
        let long = "x".repeat(700);
        ok(tool().args(["write"]).arg(&img).args(["--sector", "32767", "--text", "last"]));
        ok(tool().args(["write"]).arg(&img).args(["--sector", "100", "--text", &long]));
        let out = ok(tool().args(["read"]).arg(&img).args(["--sector", "5", "--length", "1"]));
        let mut expected = b"hello, qcow".to_vec();
        expected.resize(512, 0);
        assert_eq!(out.stdout, expected, "case {i}");
        let out = ok(tool().args(["read"]).arg(&img).args(["--sector", "100", "--length", "2"]));
        let mut expected = long.clone().into_bytes();
        expected.resize(1024, 0);
        assert_eq!(out.stdout, expected, "case {i}");
        assert_clean(&img);
        let guest = qemu_raw(&img, dir.0.path());
        assert_eq!(&guest[5 * 512..5 * 512 + 11], b"hello, qcow", "case {i}");
        assert_eq!(&guest[32767 * 512..32767 * 512 + 4], b"last", "case {i}");
        assert!(guest[100 * 512..100 * 512 + 700].iter().all(|&b| b == b'x'), "case {i}");
        // qemu-io sees the same bytes.
        qemu_io_cmds(&img, &["read -P 0x78 51200 700", "read -P 0 51900 124"]);
    }
}

#[test]
fn read_shows_what_qemu_io_wrote() {
    let dir = Dir::new();
    let img = qemu_written_image(&dir, "r.qcow2", "");
    let out = ok(tool().args(["read"]).arg(&img).args(["--sector", "2047", "--length", "3"]));
    let mut expected = vec![0u8; 512];
    expected.extend(vec![0xab; 1024]);
    assert_eq!(out.stdout, expected);
}

#[test]
fn reading_past_the_end_is_an_error() {
    let dir = Dir::new();
    let img = dir.path("small.qcow2");
    qemu_create(&img, "", "1M");
    let err = fails(tool().args(["read"]).arg(&img).args(["--sector", "2047", "--length", "2"]));
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn a_closed_pipe_on_stdout_ends_the_tool_quietly() {
    let dir = Dir::new();
    let img = dir.path("big.qcow2");
    qemu_create(&img, "", "256M");
    let mut child = tool()
        .args(["read"])
        .arg(&img)
        .args(["--sector", "0", "--length", "500000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(out.stderr.is_empty(), "{}", show(&out));
}

#[test]
fn a_missing_file_is_one_line_naming_it() {
    let dir = Dir::new();
    let missing = dir.path("no-such-image.qcow2");
    let name = missing.display().to_string();
    let commands: Vec<Vec<String>> = vec![
        vec!["info".into(), name.clone()],
        vec!["info".into(), "--output=json".into(), name.clone()],
        vec!["convert".into(), name.clone(), dir.path("out.raw").display().to_string()],
        vec!["convert".into(), "-f".into(), "raw".into(), name.clone(), dir.path("out.raw").display().to_string()],
        vec!["read".into(), name.clone(), "--sector".into(), "0".into()],
        vec!["write".into(), name.clone(), "--sector".into(), "0".into(), "--text".into(), "x".into()],
    ];
    for args in commands {
        let err = fails(tool().args(&args));
        assert!(err.contains(&name), "{args:?}: {err}");
        assert!(err.contains("No such file"), "{args:?}: {err}");
    }
    assert!(!dir.path("out.raw").exists());
}

#[test]
fn a_raw_file_given_as_qcow2_is_refused_clearly() {
    let dir = Dir::new();
    let raw = dir.path("not-qcow2.raw");
    std::fs::write(&raw, vec![0x42u8; 1 << 20]).unwrap();
    let err = fails(tool().args(["convert", "-f", "qcow2"]).arg(&raw).arg(dir.path("o.raw")));
    assert!(err.contains("not a qcow2 image"), "{err}");
    assert!(err.contains("not-qcow2.raw"), "{err}");
    let err = fails(tool().args(["info", "-f", "qcow2"]).arg(&raw));
    assert!(err.contains("not a qcow2 image"), "{err}");
    // read and write never guess: a raw file is not an image to them.
    let err = fails(tool().args(["write"]).arg(&raw).args(["--sector", "0", "--text", "x"]));
    assert!(err.contains("not a qcow2 image"), "{err}");
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0x42u8; 1 << 20]);
}

#[test]
fn a_bad_size_is_refused_and_creates_nothing() {
    let dir = Dir::new();
    let img = dir.path("bad-size.qcow2");
    let err = fails(tool().args(["create"]).arg(&img).arg("12Q"));
    assert!(err.contains("invalid size '12Q'"), "{err}");
    assert!(!img.exists());
    let err = fails(tool().args(["create"]).arg(&img));
    assert!(err.contains("SIZE"), "{err}");
    assert!(!img.exists());
}

#[test]
fn an_unknown_option_is_named() {
    let dir = Dir::new();
    let img = dir.path("opt.qcow2");
    let err = fails(tool().args(["create", "-o", "cluster_size=4k,colour=red"]).arg(&img).arg("1M"));
    assert!(err.contains("colour"), "{err}");
    assert!(!img.exists());
    let err = fails(tool().args(["create", "-o", "cluster_size=3k"]).arg(&img).arg("1M"));
    assert!(err.contains("cluster"), "{err}");
    let src = qemu_written_image(&dir, "src.qcow2", "");
    let err = fails(tool().args(["convert", "-O", "qcow2", "-o", "flavour=mint"]).arg(&src).arg(dir.path("x.qcow2")));
    assert!(err.contains("flavour"), "{err}");
    assert!(!dir.path("x.qcow2").exists());
    let err = fails(tool().args(["convert", "-O", "raw", "-o", "cluster_size=4k"]).arg(&src).arg(dir.path("x.raw")));
    assert!(err.contains("raw output takes no -o options"), "{err}");
}

#[test]
fn an_unknown_incompatible_feature_is_unsupported() {
    let dir = Dir::new();
    let img = dir.path("feature.qcow2");
    qemu_create(&img, "", "16M");
    // Byte 79 is the low byte of incompatible_features: set bit 7, which no QEMU knows.
    let mut file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.seek(SeekFrom::Start(79)).unwrap();
    file.write_all(&[0x80]).unwrap();
    drop(file);
    let qemu = qemu_img().arg("info").arg(&img).output().unwrap();
    assert!(!qemu.status.success(), "qemu-img must refuse it too: {}", show(&qemu));
    for args in [
        vec!["info"],
        vec!["info", "--output=json"],
        vec!["read", "--sector", "0"],
        vec!["write", "--sector", "0", "--text", "x"],
    ] {
        let (cmd, rest) = args.split_first().unwrap();
        let err = fails(tool().arg(cmd).arg(&img).args(rest));
        assert!(err.to_lowercase().contains("unsupported"), "{args:?}: {err}");
    }
    let err = fails(tool().args(["convert"]).arg(&img).arg(dir.path("o.raw")));
    assert!(err.to_lowercase().contains("unsupported"), "{err}");
}

#[test]
fn usage_errors_are_one_line_and_exit_1() {
    let err = fails(tool().args(["create", "--bogus"]));
    assert!(err.contains("--bogus"), "{err}");
    let err = fails(tool().args(["frobnicate"]));
    assert!(err.contains("frobnicate"), "{err}");
    let err = fails(tool().args(["convert", "-O", "vmdk", "a", "b"]));
    assert!(err.contains("vmdk"), "{err}");
    let err = fails(tool().args(["read"]));
    assert!(err.contains("<FILE>"), "{err}");
    fails(&mut tool());
}

#[test]
fn every_command_has_help() {
    let out = ok(tool().arg("--help"));
    let top = String::from_utf8(out.stdout).unwrap();
    for cmd in ["create", "info", "convert", "read", "write"] {
        assert!(top.contains(cmd), "{top}");
        let out = ok(tool().args([cmd, "--help"]));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: qcow-tool"), "{cmd}: {text}");
        let out = ok(tool().args(["help", cmd]));
        assert!(!out.stdout.is_empty());
    }
}

// ------------------------------------------------------------------------------------------------------------
// Backing files, compression, snapshots, bitmaps, encryption
// ------------------------------------------------------------------------------------------------------------

/// A raw file of `len` bytes with a few patterned stretches and holes between them.
fn patterned_raw(path: &Path, len: u64, seed: u8) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(len).unwrap();
    let mut at = 0;
    let mut k = 0u64;
    while at < len {
        let n = (len - at).min(48 << 10);
        if k % 3 != 1 {
            let bytes: Vec<u8> = (0..n).map(|i| (i / 512 * 7 + k * 13 + u64::from(seed)) as u8 | 1).collect();
            file.seek(SeekFrom::Start(at)).unwrap();
            file.write_all(&bytes).unwrap();
        }
        at += 160 << 10;
        k += 1;
    }
    file.sync_all().unwrap();
}

/// The backing fields of `qemu-img info --output=json`.
const BACKING_FIELDS: [&str; 3] = ["backing-filename", "backing-filename-format", "full-backing-filename"];

/// The line qemu-img prints when it creates `name` with `args`, for comparison with ours.
fn qemu_formatting_line(dir: &Dir, args: &[&str], size: Option<&str>) -> String {
    let img = dir.path("qemu-twin.qcow2");
    let out = ok(qemu_img().args(["create", "-f", "qcow2"]).args(args).arg(&img).args(size));
    let line = String::from_utf8(out.stdout).unwrap();
    let _ = std::fs::remove_file(&img);
    line.replace(&img.display().to_string(), "IMAGE")
}

#[test]
fn create_with_a_backing_file_agrees_with_qemu_img() {
    let dir = Dir::new();
    patterned_raw(&dir.path("base.raw"), 10 << 20, 1);
    let base_q = dir.path("base.qcow2");
    qemu_create(&base_q, "cluster_size=4k", "7M");
    qemu_io_cmds(&base_q, &["write -P 0x61 0 1M", "write -c -P 0x62 2M 64k", "write -z 3M 64k"]);
    // (name, arguments, size, expected virtual size, what it must read like)
    type Case<'a> = (&'a str, &'a [&'a str], Option<&'a str>, u64, &'a str);
    let cases: &[Case] = &[
        ("ov-raw.qcow2", &["-b", "base.raw", "-F", "raw"], None, 10 << 20, "base.raw"),
        (
            "ov-q.qcow2",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4k,compression_type=zstd"],
            None,
            7 << 20,
            "base.qcow2",
        ),
        ("ov-big.qcow2", &["-b", "base.raw", "-F", "raw"], Some("20M"), 20 << 20, ""),
        ("ov-o.qcow2", &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"], None, 7 << 20, "base.qcow2"),
        ("ov-v2.qcow2", &["-o", "compat=0.10", "-b", "base.raw", "-F", "raw"], Some("4M"), 4 << 20, ""),
    ];
    for &(name, args, size, virtual_size, same_as) in cases {
        let img = dir.path(name);
        let out = ok(tool().arg("create").args(args).arg(&img).args(size));
        let ours = String::from_utf8(out.stdout).unwrap().replace(&img.display().to_string(), "IMAGE");
        assert_eq!(ours, qemu_formatting_line(&dir, args, size), "{name}");
        assert_clean(&img);
        let q = qemu_info(&img);
        assert_eq!(q["virtual-size"], virtual_size, "{name}: {q}");
        let backing = if args.contains(&"base.raw") { "base.raw" } else { "base.qcow2" };
        assert_eq!(q["backing-filename"], backing, "{name}: {q}");
        let ours = our_info(&img);
        for key in BACKING_FIELDS.iter().chain(&["virtual-size", "cluster-size", "format-specific"]) {
            assert_eq!(ours[key], q[key], "{name}, field {key}:\nours {ours}\nqemu {q}");
        }
        let theirs = String::from_utf8(ok(qemu_img().arg("info").arg(&img)).stdout).unwrap();
        let human = String::from_utf8(ok(tool().env("TZ", "UTC").arg("info").arg(&img)).stdout).unwrap();
        assert_eq!(own_lines(&human), own_lines(&theirs), "{name}");
        if !same_as.is_empty() {
            let fmt = if same_as.ends_with("raw") { "raw" } else { "qcow2" };
            let out = qemu_img()
                .args(["compare", "-f", "qcow2", "-F", fmt])
                .arg(&img)
                .arg(dir.path(same_as))
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{name}: {}", show(&out));
        }
        // Reading through the tool goes through the chain too.
        let guest = qemu_raw(&img, dir.0.path());
        let out = ok(tool().args(["read"]).arg(&img).args(["--sector", "0", "--length", "2048"]));
        assert!(out.stdout == guest[..1 << 20], "{name}: read through the chain");
    }
    // Writing into an overlay leaves the backing file alone, and QEMU sees the write over the backing data.
    let img = dir.path("ov-raw.qcow2");
    let before = std::fs::read(dir.path("base.raw")).unwrap();
    ok(tool().args(["write"]).arg(&img).args(["--sector", "3", "--text", "overlay"]));
    assert_clean(&img);
    assert!(std::fs::read(dir.path("base.raw")).unwrap() == before);
    let guest = qemu_raw(&img, dir.0.path());
    assert_eq!(&guest[3 * 512..3 * 512 + 7], b"overlay");
    assert!(guest[3 * 512 + 7..4 * 512].iter().all(|&b| b == 0));
    assert!(guest[..3 * 512] == before[..3 * 512] && guest[4 * 512..] == before[4 * 512..]);
}

#[test]
fn create_refuses_a_backing_file_without_its_format() {
    let dir = Dir::new();
    patterned_raw(&dir.path("base.raw"), 1 << 20, 2);
    let img = dir.path("nofmt.qcow2");
    let err = fails(tool().args(["create", "-b", "base.raw"]).arg(&img));
    assert!(err.contains("-F"), "{err}");
    assert!(!img.exists());
    let err = fails(tool().args(["create", "-b", "missing.raw", "-F", "raw"]).arg(&img));
    assert!(err.contains("missing.raw"), "{err}");
    assert!(!img.exists());
    let err = fails(tool().args(["create", "-b", "base.raw", "-F", "raw", "-o", "preallocation=metadata"]).arg(&img));
    assert!(err.contains("preallocation"), "{err}");
}

#[test]
fn absolute_backing_names_are_refused_unless_allowed() {
    let dir = Dir::new();
    let base = dir.path("base.raw");
    patterned_raw(&base, 2 << 20, 3);
    let img = dir.path("abs.qcow2");
    // qemu-img makes such images; the tool reads them only when told to.
    ok(qemu_img().args(["create", "-q", "-f", "qcow2", "-b"]).arg(&base).args(["-F", "raw"]).arg(&img));
    qemu_io_cmds(&img, &["write -P 0x33 64k 4k"]);
    let expected = qemu_raw(&img, dir.0.path());
    for args in [vec!["read", "--sector", "0"], vec!["write", "--sector", "0", "--text", "x"]] {
        let (cmd, rest) = args.split_first().unwrap();
        let err = fails(tool().arg(cmd).arg(&img).args(rest));
        assert!(err.contains("absolute"), "{args:?}: {err}");
        assert!(err.contains("--allow-absolute-backing"), "{args:?}: {err}");
        assert!(err.contains("abs.qcow2"), "{args:?}: {err}");
    }
    let err = fails(tool().arg("convert").arg(&img).arg(dir.path("out.raw")));
    assert!(err.contains("absolute"), "{err}");
    // info only names the backing file, as qemu-img info does.
    let ours = our_info(&img);
    let q = qemu_info(&img);
    for key in BACKING_FIELDS {
        assert_eq!(ours[key], q[key], "{key}");
    }
    ok(tool().args(["--allow-absolute-backing", "convert"]).arg(&img).arg(dir.path("out.raw")));
    assert!(std::fs::read(dir.path("out.raw")).unwrap() == expected);
    // create refuses an absolute name the same way, and takes it when allowed.
    let made = dir.path("made.qcow2");
    let err = fails(tool().args(["create", "-b"]).arg(&base).args(["-F", "raw"]).arg(&made));
    assert!(err.contains("absolute"), "{err}");
    assert!(!made.exists());
    ok(tool().args(["create", "-q", "--allow-absolute-backing", "-b"]).arg(&base).args(["-F", "raw"]).arg(&made));
    assert_eq!(qemu_info(&made)["backing-filename"], base.display().to_string());
    assert_clean(&made);
}

/// Whether `qemu-img map` shows compressed data, and how much data it shows.
fn compressed_and_data(img: &Path) -> (bool, u64) {
    let map: Value = json(qemu_img().args(["map", "--output=json"]).arg(img));
    let entries = map.as_array().unwrap();
    let compressed = entries.iter().any(|e| e["compressed"] == true);
    let data = entries.iter().filter(|e| e["data"] == true).map(|e| e["length"].as_u64().unwrap()).sum();
    (compressed, data)
}

#[test]
fn convert_compressed_is_read_back_identically_by_qemu() {
    let dir = Dir::new();
    let src = qemu_written_image(&dir, "src.qcow2", "");
    // An odd-sized raw source: its last cluster is partial.
    let raw = dir.path("odd.raw");
    patterned_raw(&raw, (3 << 20) + 1000, 4);
    // An overlay source: converted, it stands alone.
    patterned_raw(&dir.path("base.raw"), 4 << 20, 5);
    let overlay = dir.path("overlay.qcow2");
    ok(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"]).arg(&overlay));
    qemu_io_cmds(&overlay, &["write -P 0x44 1M 100k", "write -z 2M 64k"]);
    for (i, (source, opts)) in [
        (&src, vec![]),
        (&src, vec!["-o", "compression_type=zlib"]),
        (&src, vec!["-o", "compression_type=zstd,cluster_size=4k"]),
        (&raw, vec!["-o", "compression_type=zstd"]),
        (&raw, vec!["-o", "compat=0.10,cluster_size=16k"]),
        (&overlay, vec!["-o", "compression_type=zstd"]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path(&format!("c{i}.qcow2"));
        ok(tool().args(["convert", "-c", "-O", "qcow2"]).args(&opts).arg(source).arg(&out));
        assert_clean(&out);
        let expected = if source == &raw {
            let mut bytes = std::fs::read(&raw).unwrap();
            bytes.resize(bytes.len().next_multiple_of(512), 0);
            bytes
        } else {
            qemu_raw(source, dir.0.path())
        };
        let got = qemu_raw(&out, dir.0.path());
        assert!(got == expected, "case {i}: qemu-img convert -O raw of our compressed copy differs");
        let (compressed, _) = compressed_and_data(&out);
        assert!(compressed, "case {i}: qemu-img map shows no compressed data");
        let q = qemu_info(&out);
        let want = if opts.iter().any(|o| o.contains("zstd")) { "zstd" } else { "zlib" };
        assert_eq!(field(&q, "format-specific/data/compression-type"), want, "case {i}");
        assert!(q.get("backing-filename").is_none(), "case {i}: the copy stands alone");
        // And we read our own compressed copy back.
        let back = dir.path(&format!("c{i}.raw"));
        ok(tool().args(["convert", "-O", "raw"]).arg(&out).arg(&back));
        assert!(std::fs::read(&back).unwrap()[..] == expected[..std::fs::metadata(&back).unwrap().len() as usize]);
    }
    // The last, partial cluster of the odd source is compressed too.
    let map: Value = json(qemu_img().args(["map", "--output=json"]).arg(dir.path("c3.qcow2")));
    let last = map.as_array().unwrap().iter().rev().find(|e| e["data"] == true).unwrap().clone();
    assert_eq!(last["compressed"], true, "{map}");
    // Without -c nothing is compressed.
    let plain = dir.path("plain.qcow2");
    ok(tool().args(["convert", "-O", "qcow2"]).arg(&src).arg(&plain));
    assert!(!compressed_and_data(&plain).0);
    // -c needs a qcow2 output.
    let err = fails(tool().args(["convert", "-c", "-O", "raw"]).arg(&src).arg(dir.path("x.raw")));
    assert!(err.contains("-c"), "{err}");
}

#[test]
fn convert_reads_an_overlay_through_its_chain() {
    let dir = Dir::new();
    patterned_raw(&dir.path("base.raw"), 4 << 20, 6);
    let mid = dir.path("mid.qcow2");
    ok(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"]).arg(&mid));
    qemu_io_cmds(&mid, &["write -P 0x55 0 300k"]);
    let top = dir.path("top.qcow2");
    ok(qemu_img()
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2"])
        .arg(&top));
    qemu_io_cmds(&top, &["write -P 0x66 100k 10k", "write -z 200k 8k"]);
    let out = dir.path("flat.raw");
    ok(tool().arg("convert").arg(&top).arg(&out));
    assert!(std::fs::read(&out).unwrap() == qemu_raw(&top, dir.0.path()));
    let flat = dir.path("flat.qcow2");
    ok(tool().args(["convert", "-O", "qcow2"]).arg(&top).arg(&flat));
    assert_clean(&flat);
    let cmp = qemu_img().args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(&flat).arg(&top).output().unwrap();
    assert_eq!(cmp.status.code(), Some(0), "{}", show(&cmp));
}

/// `qemu-img` with the time zone fixed to UTC (the tool is run with it too: both print dates in local time).
fn qemu_img_utc() -> Command {
    let mut cmd = qemu_img();
    cmd.env("TZ", "UTC");
    cmd
}

#[test]
fn info_lists_snapshots_like_qemu_img() {
    let dir = Dir::new();
    for (i, options) in ["", "compat=0.10", "cluster_size=4k,compression_type=zstd"].iter().enumerate() {
        let img = dir.path(&format!("snap{i}.qcow2"));
        qemu_create(&img, options, "16M");
        qemu_io_cmds(&img, &["write -P 0x11 0 64k"]);
        ok(qemu_img().args(["snapshot", "-c", "first"]).arg(&img));
        qemu_io_cmds(&img, &["write -P 0x12 64k 64k"]);
        ok(qemu_img().args(["snapshot", "-c", "a-rather-long-snapshot-name"]).arg(&img));
        let q = json(qemu_img_utc().args(["info", "--output=json"]).arg(&img));
        assert_eq!(q["snapshots"].as_array().map(Vec::len), Some(2), "{q}");
        let ours = our_info(&img);
        assert_eq!(ours["snapshots"], q["snapshots"], "case {i}:\nours {ours}\nqemu {q}");
        for key in ["virtual-size", "format-specific", "dirty-flag"] {
            assert_eq!(ours[key], q[key], "case {i}, {key}");
        }
        let theirs = String::from_utf8(ok(qemu_img_utc().arg("info").arg(&img)).stdout).unwrap();
        let human = String::from_utf8(ok(tool().env("TZ", "UTC").arg("info").arg(&img)).stdout).unwrap();
        assert!(human.contains("Snapshot list:"), "{human}");
        assert_eq!(own_lines(&human), own_lines(&theirs), "case {i}");
    }
}

#[test]
fn info_lists_bitmaps_like_qemu_img() {
    let dir = Dir::new();
    let img = dir.path("bitmaps.qcow2");
    qemu_create(&img, "", "16M");
    qemu_io_cmds(&img, &["write -P 0x11 0 64k"]);
    ok(qemu_img().args(["bitmap", "--add"]).arg(&img).arg("b1"));
    ok(qemu_img().args(["bitmap", "--add", "-g", "128k", "--disable"]).arg(&img).arg("b2"));
    ok(qemu_img().args(["snapshot", "-c", "s"]).arg(&img));
    let check = |label: &str| {
        let q = json(qemu_img_utc().args(["info", "--output=json"]).arg(&img));
        let ours = our_info(&img);
        for key in ["format-specific", "snapshots", "virtual-size", "dirty-flag"] {
            assert_eq!(ours[key], q[key], "{label}, {key}:\nours {ours}\nqemu {q}");
        }
        let theirs = String::from_utf8(ok(qemu_img_utc().arg("info").arg(&img)).stdout).unwrap();
        let human = String::from_utf8(ok(tool().env("TZ", "UTC").arg("info").arg(&img)).stdout).unwrap();
        assert_eq!(own_lines(&human), own_lines(&theirs), "{label}");
        q
    };
    let q = check("fresh");
    assert_eq!(field(&q, "format-specific/data/bitmaps").as_array().map(Vec::len), Some(2), "{q}");
    // A QEMU that dies with the image open leaves its enabled bitmap marked in use.
    let _ = qemu_io().args(["-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "sigraise 9"]).arg(&img).output();
    let q = check("in use");
    assert_eq!(field(&q, "format-specific/data/bitmaps")[0]["flags"], serde_json::json!(["in-use", "auto"]), "{q}");
    // Our write keeps them: the bitmap left in use stays so (inconsistent), and both are still listed.
    ok(tool().args(["write"]).arg(&img).args(["--sector", "0", "--text", "ours"]));
    let q = check("after our write");
    assert_eq!(field(&q, "format-specific/data/bitmaps")[0]["flags"], serde_json::json!(["in-use", "auto"]), "{q}");
    // Removed and added again by us, then written by us: stored consistent, listed as QEMU lists it.
    ok(tool().args(["bitmap", "--remove", "--add", "-g", "512"]).arg(&img).arg("b1"));
    ok(tool().args(["write"]).arg(&img).args(["--sector", "8", "--text", "again"]));
    let q = check("after our bitmap command and write");
    let listed = field(&q, "format-specific/data/bitmaps");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{q}");
    assert_eq!(listed[1], serde_json::json!({"flags": ["auto"], "name": "b1", "granularity": 512}), "{q}");
}

#[test]
fn an_encrypted_image_is_refused_naming_luks() {
    let dir = Dir::new();
    let img = dir.path("luks.qcow2");
    ok(qemu_img()
        .args(["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456"])
        .args(["-o", "encrypt.format=luks,encrypt.key-secret=sec0"])
        .arg(&img)
        .arg("1M"));
    for args in [vec!["info"], vec!["read", "--sector", "0"], vec!["write", "--sector", "0", "--text", "x"]] {
        let (cmd, rest) = args.split_first().unwrap();
        let err = fails(tool().arg(cmd).arg(&img).args(rest));
        assert!(err.contains("LUKS"), "{args:?}: {err}");
        assert!(err.contains("luks.qcow2"), "{args:?}: {err}");
    }
    let err = fails(tool().arg("convert").arg(&img).arg(dir.path("o.raw")));
    assert!(err.contains("LUKS"), "{err}");
}

/// Extended L2 entries and external data files: what the library cannot do with them is refused naming the
/// feature, and what it does agrees with QEMU. Both outcomes are accepted, so the test holds while support grows.
#[test]
fn extended_l2_and_external_data_files_are_refused_by_name_or_handled_like_qemu() {
    let dir = Dir::new();
    // QEMU resolves the data file name against its working directory, the tool against the image's directory:
    // QEMU runs in the image's directory so that both name the same file.
    let in_dir = |mut cmd: Command| {
        cmd.current_dir(dir.0.path());
        cmd
    };
    let qemu_view = |img: &Path| {
        let raw = dir.path("expected.raw");
        ok(in_dir(qemu_img()).args(["convert", "-O", "raw"]).arg(img).arg(&raw));
        std::fs::read(&raw).unwrap()
    };
    let l2 = dir.path("l2.qcow2");
    ok(in_dir(qemu_img()).args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"]).arg(&l2).arg("1M"));
    ok(in_dir(qemu_io()).args(["-f", "qcow2", "-c", "write -P 0x31 0 8k", "-c", "write -z 64k 4k"]).arg(&l2));
    let data = dir.path("data.qcow2");
    ok(in_dir(qemu_img()).args(["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw"]).arg(&data).arg("1M"));
    ok(in_dir(qemu_io()).args(["-f", "qcow2", "-c", "write -P 0x32 4k 8k"]).arg(&data));
    for (img, name) in [(&l2, "extended L2"), (&data, "external data file")] {
        let out = tool().args(["read"]).arg(img).args(["--sector", "0", "--length", "2048"]).output().unwrap();
        if out.status.success() {
            assert!(out.stdout == qemu_view(img), "{name}: read differs from qemu-img convert");
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(name), "{err}");
        }
        let out = tool().args(["write"]).arg(img).args(["--sector", "3", "--text", "tool"]).output().unwrap();
        if out.status.success() {
            let check = in_dir(qemu_img()).args(["check"]).arg(img).output().unwrap();
            assert!(check.status.success(), "{name}: {}", show(&check));
            assert_eq!(&qemu_view(img)[3 * 512..3 * 512 + 4], b"tool", "{name}");
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(name), "{err}");
        }
        // info describes them as qemu-img does.
        let q = json(in_dir(qemu_img()).args(["info", "--output=json"]).arg(img));
        let ours = our_info(img);
        for key in ["virtual-size", "cluster-size", "format-specific"] {
            assert_eq!(ours[key], q[key], "{name}, {key}");
        }
    }
}
