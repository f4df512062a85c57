//! The qemu-img vocabulary and the reference's commands beyond create/info/check/convert: map, compare, resize,
//! measure, bench, encode, decode, sha, pattern, dehydrate and rehydrate, each driven as a user would with QEMU
//! on the other side (qemu-img/qemu-io made the input, or qemu-img's own output and verdicts are the oracle).

mod binary;

use binary::{show, tool, Dir};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(ok(cmd).stdout).expect("UTF-8")
}

/// Runs `cmd`, insists it fails with `code` and one line on stderr, and returns that line.
fn fails_with(cmd: &mut Command, code: i32) -> String {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(code), "{cmd:?}:\n{}", show(&out));
    let stderr = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{cmd:?} must print one line:\n{}", show(&out));
    assert!(stderr.starts_with("qcow-tool: "), "{}", show(&out));
    assert!(!stderr.contains("panicked"), "{}", show(&out));
    stderr
}

fn fails(cmd: &mut Command) -> String {
    fails_with(cmd, 1)
}

fn qemu_create(dir: &Dir, name: &str, options: &str, size: &str) -> PathBuf {
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !options.is_empty() {
        cmd.args(["-o", options]);
    }
    ok(dir.here(cmd.arg(name).arg(size)));
    dir.path(name)
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(path));
}

/// The guest's bytes, as `qemu-img convert -O raw` sees them.
fn qemu_raw(path: &Path, dir: &Dir) -> Vec<u8> {
    let out = dir.path("qemu-view.raw");
    ok(qemu_img().args(["convert", "-O", "raw"]).arg(path).arg(&out));
    std::fs::read(&out).expect("read qemu's raw copy")
}

fn assert_clean(path: &Path) {
    let out = run(qemu_img().args(["check", "--output=json"]).arg(path));
    assert!(out.status.success(), "qemu-img check {}:\n{}", path.display(), show(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(key).and_then(Value::as_u64).unwrap_or(0), 0, "{key} in {v}");
    }
}

fn virtual_size(path: &Path) -> u64 {
    let out = ok(qemu_img().args(["info", "--output=json"]).arg(path));
    let v: Value = serde_json::from_slice(&out.stdout).expect("info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

fn digest_of(bytes: &[u8], dir: &Dir, program: &str) -> String {
    let path = dir.path("digest-input.raw");
    std::fs::write(&path, bytes).unwrap();
    let out = stdout(Command::new(program).arg(&path));
    out.split_whitespace().next().expect("digest").to_string()
}

/// An image with data, a zero cluster, a compressed cluster and a partial last cluster, made by qemu-io.
fn varied_image(dir: &Dir, name: &str) -> PathBuf {
    let img = qemu_create(dir, name, "", "10M");
    qemu_io(
        &img,
        &["write -P 1 0 64k", "write -P 2 1M 128k", "write -z 3M 64k", "write -c -P 3 5M 64k", "write -P 4 9M 4k"],
    );
    img
}

/// An image with data only (no compressed clusters), for qemu-img map's human output.
fn plain_image(dir: &Dir, name: &str, options: &str) -> PathBuf {
    let img = qemu_create(dir, name, options, "8M");
    qemu_io(&img, &["write -P 5 0 96k", "write -P 6 2M 64k", "write -P 7 7M 512", "write -z 4M 128k"]);
    img
}

// ------------------------------------------------------------------------------------------------------------
// create: what qemu-img create -o offers beyond the library's own options
// ------------------------------------------------------------------------------------------------------------

#[test]
fn create_preallocates_the_file_for_falloc_and_full_as_qemu_img_does() {
    let dir = Dir::new();
    for (mode, options) in [("full", "preallocation=full"), ("falloc", "preallocation=falloc,lazy_refcounts=on")] {
        let ours = format!("ours-{mode}.qcow2");
        let theirs = format!("qemu-{mode}.qcow2");
        let line = stdout(dir.here(tool().args(["create", "-o", options, &ours, "5M"])));
        let qemu_line = stdout(dir.here(qemu_img().args(["create", "-f", "qcow2", "-o", options, &theirs, "5M"])));
        assert_eq!(line.replace(&ours, "X"), qemu_line.replace(&theirs, "X"));
        assert_clean(&dir.path(&ours));
        let map = |name: &str| stdout(dir.here(qemu_img().args(["map", "--output=json", name])));
        assert_eq!(map(&ours), map(&theirs), "{mode}");
        // Every byte of the file is allocated on disk.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.path(&ours)).unwrap();
        assert!(meta.blocks() * 512 >= meta.len(), "{mode}: {} of {} bytes allocated", meta.blocks() * 512, meta.len());
    }
    let err =
        fails(dir.here(tool().args(["create", "-o", "encrypt.format=luks,encrypt.key-secret=s", "e.qcow2", "1M"])));
    assert!(err.contains("encrypt"), "{err}");
    assert!(!dir.path("e.qcow2").exists());
}

// ------------------------------------------------------------------------------------------------------------
// map
// ------------------------------------------------------------------------------------------------------------

fn same_output(dir: &Dir, ours: &[&str], qemu_args: &[&str]) {
    let a = run(dir.here(tool().args(ours)));
    let b = run(dir.here(qemu_img().args(qemu_args)));
    assert_eq!(
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
        "{ours:?} vs qemu-img {qemu_args:?}:\nours: {}\nqemu: {}",
        show(&a),
        show(&b)
    );
    assert_eq!(a.status.code(), b.status.code(), "{ours:?}: ours {}\nqemu {}", show(&a), show(&b));
}

#[test]
fn map_prints_what_qemu_img_map_prints_byte_for_byte() {
    let dir = Dir::new();
    varied_image(&dir, "varied.qcow2");
    plain_image(&dir, "plain.qcow2", "");
    plain_image(&dir, "small.qcow2", "cluster_size=4096");
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", "over.qcow2"])));
    qemu_io(&dir.path("over.qcow2"), &["write -P 9 32k 64k", "write -P 8 6M 64k"]);
    // A raw backing file with data and a hole.
    let base = dir.path("base.raw");
    let mut raw = vec![0u8; 4 << 20];
    raw[..(128 << 10)].fill(0x11);
    std::fs::write(&base, &raw).unwrap();
    ok(dir.here(qemu_img().args(["convert", "-f", "raw", "-O", "raw", "-S", "4k", "base.raw", "sparse.raw"])));
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "sparse.raw", "-F", "raw", "rawover.qcow2"])));
    qemu_io(&dir.path("rawover.qcow2"), &["write -P 3 1M 64k"]);
    // Zero clusters that keep their host cluster, and QEMU's metadata preallocation (file holes read as zeros).
    let keep = qemu_create(&dir, "keep.qcow2", "", "4M");
    qemu_io(&keep, &["write -P 1 0 256k", "write -z 64k 64k", "write -z -u 128k 64k"]);
    let pre = qemu_create(&dir, "prealloc.qcow2", "preallocation=metadata", "4M");
    qemu_io(&pre, &["write -P 1 1M 64k", "write -P 2 3968k 128k"]);
    ok(dir.here(tool().args(["create", "-q", "-o", "preallocation=metadata", "ours-pre.qcow2", "3M"])));
    for image in [
        "varied.qcow2",
        "plain.qcow2",
        "small.qcow2",
        "over.qcow2",
        "rawover.qcow2",
        "keep.qcow2",
        "prealloc.qcow2",
        "ours-pre.qcow2",
    ] {
        same_output(&dir, &["map", "--output=json", image], &["map", "--output=json", image]);
        same_output(&dir, &["map", image], &["map", image]);
        same_output(&dir, &["map", "--output", "human", image], &["map", "--output=human", image]);
    }
    same_output(
        &dir,
        &["map", "--output=json", "--start-offset", "1M", "--max-length", "2M", "plain.qcow2"],
        &["map", "--output=json", "--start-offset", "1M", "--max-length", "2M", "plain.qcow2"],
    );
    // qemu-img refuses compressed clusters in the human form after printing what comes before; so do we.
    let err = run(dir.here(tool().args(["map", "varied.qcow2"])));
    assert!(String::from_utf8_lossy(&err.stderr).contains("compressed clusters"), "{}", show(&err));
}

/// Extended L2 entries: unallocated subclusters of a cluster that has a host cluster keep their host offset in
/// QEMU's block status, zero where nothing below answers, and from the backing file where it reaches.
#[test]
fn map_lists_unallocated_subclusters_inside_an_allocated_cluster_as_qemu_img_does() {
    let dir = Dir::new();
    let plain = qemu_create(&dir, "plain.qcow2", "extended_l2=on,cluster_size=64k", "1M");
    qemu_io(&plain, &["write -P 1 4k 4k", "write -P 2 64k 64k", "write -P 3 200k 2k"]);
    // Zero subclusters inside an allocated cluster and in one without a host cluster, and a discarded one.
    let small = qemu_create(&dir, "c16k.qcow2", "extended_l2=on,cluster_size=16k", "4M");
    qemu_io(
        &small,
        &["write -P 1 512 1k", "write -z 1536 512", "write -P 2 16k 16k", "write -z 100k 2k", "write -P 3 1M 3k"],
    );
    qemu_io(&small, &["discard 1M 512"]);
    let big = qemu_create(&dir, "c2m.qcow2", "extended_l2=on,cluster_size=2M", "16M");
    qemu_io(&big, &["write -P 1 64k 64k", "write -z 128k 64k", "write -P 2 4M 4M", "write -P 3 9M 100k"]);
    qemu_io(&big, &["discard 4M 64k"]);
    // A backing file shorter than the overlay: it answers below its end, the overlay's zeros past it.
    let base = qemu_create(&dir, "base.qcow2", "", "1M");
    qemu_io(&base, &["write -P 7 0 1M"]);
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.qcow2"]).args([
        "-F",
        "qcow2",
        "over.qcow2",
        "2M",
    ])));
    qemu_io(
        &dir.path("over.qcow2"),
        &["write -P 1 4k 4k", "write -P 2 1020k 8k", "write -P 3 1600k 4k", "write -z 1604k 4k", "write -z 1800k 4k"],
    );
    // Three layers with extended L2 entries in the middle one, and a raw backing file.
    let mid = qemu_create(&dir, "mid.qcow2", "extended_l2=on", "1M");
    qemu_io(&mid, &["write -P 5 4k 4k"]);
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2"]).args([
        "-F",
        "qcow2",
        "top.qcow2",
        "1M",
    ])));
    qemu_io(&dir.path("top.qcow2"), &["write -P 6 8k 4k"]);
    let mut raw = vec![0u8; 512 << 10];
    raw[..128 << 10].fill(1);
    std::fs::write(dir.path("base.raw"), &raw).unwrap();
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k"]).args([
        "-b",
        "base.raw",
        "-F",
        "raw",
        "rawover.qcow2",
        "1M",
    ])));
    qemu_io(&dir.path("rawover.qcow2"), &["write -P 6 500k 20k", "write -z 8k 1k"]);
    for image in ["plain.qcow2", "c16k.qcow2", "c2m.qcow2", "over.qcow2", "top.qcow2", "rawover.qcow2"] {
        same_output(&dir, &["map", "--output=json", image], &["map", "--output=json", image]);
        same_output(&dir, &["map", image], &["map", image]);
        let json = stdout(dir.here(tool().args(["map", "--output=json", image])));
        assert!(
            json.contains("\"present\": false, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\""),
            "{image} lists no unallocated subcluster with a host offset:\n{json}"
        );
    }
    same_output(
        &dir,
        &["map", "--output=json", "--start-offset", "6k", "--max-length", "200k", "plain.qcow2"],
        &["map", "--output=json", "--start-offset", "6k", "--max-length", "200k", "plain.qcow2"],
    );
}

// ------------------------------------------------------------------------------------------------------------
// measure
// ------------------------------------------------------------------------------------------------------------

#[test]
fn measure_gives_qemu_img_measure_numbers() {
    let dir = Dir::new();
    let sized: &[&[&str]] = &[
        &["--size", "1G", "-O", "qcow2"],
        &["--size", "10M", "-O", "qcow2"],
        &["--size", "1000001", "-O", "qcow2"],
        &["--size", "2T", "-O", "qcow2"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
        &["--size", "5G", "-O", "qcow2", "-o", "refcount_bits=1,cluster_size=512"],
        &["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"],
        &["--size", "1G", "-O", "qcow2", "-o", "compat=0.10"],
        &["--size", "1G", "-O", "qcow2", "-o", "preallocation=full"],
        &["--size", "1G", "-O", "qcow2", "-o", "preallocation=metadata"],
        &["--size", "3M", "-O", "raw"],
        &["--size", "1001", "-O", "raw"],
    ];
    for args in sized {
        same_output(&dir, &[&["measure"], *args].concat(), &[&["measure"], *args].concat());
        same_output(
            &dir,
            &[&["measure", "--output=json"], *args].concat(),
            &[&["measure", "--output=json"], *args].concat(),
        );
    }
    varied_image(&dir, "varied.qcow2");
    plain_image(&dir, "plain.qcow2", "cluster_size=4096");
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", "over.qcow2"])));
    qemu_io(&dir.path("over.qcow2"), &["write -P 9 5M 64k"]);
    ok(dir.here(qemu_img().args(["bitmap", "--add", "-g", "4096", "varied.qcow2", "dirty"])));
    let mut raw = vec![0u8; 3 << 20];
    raw[(1 << 20)..(1 << 20) + 5000].fill(0x33);
    std::fs::write(dir.path("data.raw"), &raw).unwrap();
    ok(dir.here(qemu_img().args(["convert", "-f", "raw", "-O", "raw", "-S", "4k", "data.raw", "sparse.raw"])));
    for image in ["varied.qcow2", "plain.qcow2", "over.qcow2", "sparse.raw", "data.raw"] {
        for extra in [
            &[][..],
            &["-o", "cluster_size=4k"],
            &["-o", "cluster_size=1M,compat=0.10"],
            &["-o", "backing_file=x,backing_fmt=raw"],
        ] {
            let args = [&["measure", "-O", "qcow2"], extra, &[image]].concat();
            same_output(&dir, &args, &args);
            let args = [&["measure", "--output=json", "-O", "qcow2"], extra, &[image]].concat();
            same_output(&dir, &args, &args);
        }
        same_output(&dir, &["measure", image], &["measure", image]);
    }
    let err = fails(dir.here(tool().args(["measure", "-O", "qcow2", "--size", "12Q"])));
    assert!(err.contains("invalid size '12Q'"), "{err}");
    let err = fails(dir.here(tool().args(["measure", "-O", "qcow2", "--size", "1G", "varied.qcow2"])));
    assert!(err.contains("--size"), "{err}");
    let err = fails(dir.here(tool().args(["measure", "-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"])));
    assert!(err.contains("cluster"), "{err}");
}

// ------------------------------------------------------------------------------------------------------------
// compare
// ------------------------------------------------------------------------------------------------------------

#[test]
fn compare_agrees_with_qemu_img_compare_in_words_and_exit_code() {
    let dir = Dir::new();
    varied_image(&dir, "a.qcow2");
    varied_image(&dir, "same.qcow2");
    varied_image(&dir, "byte.qcow2");
    qemu_io(&dir.path("byte.qcow2"), &["write -P 7 1001 1"]);
    varied_image(&dir, "zeroed.qcow2");
    qemu_io(&dir.path("zeroed.qcow2"), &["write -z 7M 64k"]);
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "over.qcow2"])));
    qemu_io(&dir.path("over.qcow2"), &["write -P 5 32k 64k"]);
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "clean.qcow2"])));
    qemu_create(&dir, "e10.qcow2", "", "10M");
    qemu_create(&dir, "e20.qcow2", "", "20M");
    qemu_create(&dir, "d20.qcow2", "", "20M");
    qemu_io(&dir.path("d20.qcow2"), &["write -P 9 15M 4k"]);
    ok(dir.here(qemu_img().args(["convert", "-O", "raw", "a.qcow2", "a.raw"])));
    let pairs: &[&[&str]] = &[
        &["a.qcow2", "same.qcow2"],
        &["a.qcow2", "byte.qcow2"],
        &["a.qcow2", "zeroed.qcow2"],
        &["a.qcow2", "over.qcow2"],
        &["a.qcow2", "clean.qcow2"],
        &["a.qcow2", "a.raw"],
        &["a.raw", "a.qcow2"],
        &["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
        &["-f", "raw", "a.qcow2", "same.qcow2"],
        &["e10.qcow2", "e20.qcow2"],
        &["e20.qcow2", "e10.qcow2"],
        &["e10.qcow2", "d20.qcow2"],
        &["-s", "e10.qcow2", "e20.qcow2"],
        &["-s", "a.qcow2", "same.qcow2"],
        &["-s", "a.qcow2", "byte.qcow2"],
        &["-s", "a.qcow2", "zeroed.qcow2"],
        &["-q", "a.qcow2", "byte.qcow2"],
    ];
    for args in pairs {
        same_output(&dir, &[&["compare"], *args].concat(), &[&["compare"], *args].concat());
    }
    // An error exits 2, as qemu-img's does.
    let err = fails_with(dir.here(tool().args(["compare", "a.qcow2", "missing.qcow2"])), 2);
    assert!(err.contains("missing.qcow2") && err.contains("No such file"), "{err}");
    assert_eq!(run(dir.here(qemu_img().args(["compare", "a.qcow2", "missing.qcow2"]))).status.code(), Some(2));
}

// ------------------------------------------------------------------------------------------------------------
// resize
// ------------------------------------------------------------------------------------------------------------

#[test]
fn resize_grows_and_shrinks_images_that_qemu_img_accepts() {
    let dir = Dir::new();
    let img = varied_image(&dir, "r.qcow2");
    let before = qemu_raw(&img, &dir);
    assert_eq!(stdout(tool().arg("resize").arg(&img).arg("+6M")), "Image resized.\n");
    assert_eq!(virtual_size(&img), 16 << 20);
    assert_clean(&img);
    let grown = qemu_raw(&img, &dir);
    assert_eq!(&grown[..before.len()], &before[..]);
    assert!(grown[before.len()..].iter().all(|&b| b == 0));
    qemu_io(&img, &["write -P 8 15M 64k"]);

    let err = fails(tool().arg("resize").arg(&img).arg("-8M"));
    assert!(err.contains("--shrink"), "{err}");
    assert_eq!(virtual_size(&img), 16 << 20);
    ok(tool().args(["resize", "--ignore-data-loss"]).arg(&img).arg("-8M"));
    assert_eq!(virtual_size(&img), 8 << 20);
    assert_clean(&img);
    assert_eq!(qemu_raw(&img, &dir), before[..8 << 20].to_vec());
    // Grown again, what was past the shrunken end reads as zeros.
    ok(tool().args(["resize", "-q"]).arg(&img).arg("16M"));
    assert_clean(&img);
    let again = qemu_raw(&img, &dir);
    assert!(again[8 << 20..].iter().all(|&b| b == 0));

    // A raw file is resized too.
    let raw = dir.path("r.raw");
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    ok(tool().args(["resize", "-f", "raw"]).arg(&raw).arg("1M"));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);

    let err = fails(tool().arg("resize").arg(&img).arg("12Q"));
    assert!(err.contains("invalid size '12Q'"), "{err}");
    let err = fails(tool().arg("resize").arg(&img).arg("-1T"));
    assert!(err.contains("positive"), "{err}");
    let err = fails(tool().arg("resize").arg(dir.path("missing.qcow2")).arg("1M"));
    assert!(err.contains("missing.qcow2") && err.contains("No such file"), "{err}");
}

/// qemu-img's qcow2 driver takes only whole sectors: a size that is not a multiple of 512, absolute or relative,
/// growing or shrinking, is refused in its words and the image is left as it was. A raw file takes any size.
#[test]
fn resize_refuses_a_size_that_is_not_a_multiple_of_512_as_qemu_img_does() {
    let dir = Dir::new();
    let img = varied_image(&dir, "odd.qcow2");
    let before = std::fs::read(&img).unwrap();
    for (shrink, size) in [(false, "20000001"), (false, "+1001"), (true, "999999"), (true, "-1001")] {
        let flags: &[&str] = if shrink { &["--shrink"] } else { &[] };
        let theirs = run(qemu_img().arg("resize").args(flags).arg(&img).arg(size));
        assert_eq!(theirs.status.code(), Some(1), "qemu-img resize {flags:?} {size}: {}", show(&theirs));
        assert_eq!(String::from_utf8_lossy(&theirs.stderr), "qemu-img: The new size must be a multiple of 512\n");
        assert_eq!(std::fs::read(&img).unwrap(), before, "qemu-img resize {size} changed the image");
        let ours = fails(tool().arg("resize").args(flags).arg(&img).arg(size));
        assert_eq!(ours, "qcow-tool: The new size must be a multiple of 512\n", "{flags:?} {size}");
        assert_eq!(std::fs::read(&img).unwrap(), before, "resize {flags:?} {size} changed the image");
    }
    // Without --shrink, both ask for it first.
    let theirs = run(qemu_img().arg("resize").arg(&img).arg("999999"));
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("--shrink"), "{}", show(&theirs));
    assert!(fails(tool().arg("resize").arg(&img).arg("999999")).contains("--shrink"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert_eq!(virtual_size(&img), 10 << 20);
    assert_clean(&img);
    // A size in whole sectors is still taken.
    assert_eq!(stdout(tool().arg("resize").arg(&img).arg("+1536")), "Image resized.\n");
    assert_eq!(virtual_size(&img), (10 << 20) + 1536);
    assert_clean(&img);

    let raw = dir.path("odd.raw");
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    ok(tool().args(["resize", "-f", "raw"]).arg(&raw).arg("2000001"));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 2000001);
    ok(qemu_img().args(["resize", "-q", "-f", "raw"]).arg(&raw).arg("2001002"));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 2001002);
}

// ------------------------------------------------------------------------------------------------------------
// sha, encode, decode
// ------------------------------------------------------------------------------------------------------------

#[test]
fn sha_equals_the_digest_of_qemu_img_convert_output() {
    let dir = Dir::new();
    let img = varied_image(&dir, "s.qcow2");
    ok(dir.here(qemu_img().args(["create", "-q", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "over.qcow2"])));
    let over = dir.path("over.qcow2");
    qemu_io(&over, &["write -P 5 32k 64k"]);
    for path in [&img, &over] {
        let raw = qemu_raw(path, &dir);
        let ours = stdout(tool().arg("sha").arg(path));
        assert_eq!(ours.trim(), digest_of(&raw, &dir, "sha256sum"), "{}", path.display());
        let ours = stdout(tool().args(["sha", "--algorithm", "sha1"]).arg(path));
        assert_eq!(ours.trim(), digest_of(&raw, &dir, "sha1sum"), "{}", path.display());
    }
    // A raw file is digested as it is, odd length and all.
    let raw = dir.path("odd.raw");
    std::fs::write(&raw, b"odd length, not a sector multiple").unwrap();
    let ours = stdout(tool().args(["sha", "-f", "raw"]).arg(&raw));
    assert_eq!(ours.trim(), digest_of(b"odd length, not a sector multiple", &dir, "sha256sum"));
}

/// Runs the tool with `args` and `--progress-fd 3` pointing at a file, in the test directory; returns stdout and
/// the percentages written, after checking that they rise to 100.
fn with_progress_fd(dir: &Dir, args: &[&str]) -> (String, Vec<u64>) {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let log = dir.path("progress");
    let script =
        format!("'{}' {} --progress-fd 3 3>'{}'", env!("CARGO_BIN_EXE_qcow-tool"), quoted.join(" "), log.display());
    let out = stdout(dir.here(Command::new("sh").arg("-c").arg(&script)));
    let lines = std::fs::read_to_string(&log).unwrap();
    let percents: Vec<u64> =
        lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["progress"].as_u64().unwrap()).collect();
    assert_eq!(percents.last(), Some(&100), "{args:?}: {lines}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{args:?}: {lines}");
    (out, percents)
}

#[test]
fn long_operations_report_progress_on_a_descriptor() {
    let dir = Dir::new();
    let img = qemu_create(&dir, "big.qcow2", "cluster_size=4096", "64M");
    qemu_io(&img, &["write -P 1 0 8M", "write -P 2 32M 8M"]);
    let (out, percents) = with_progress_fd(&dir, &["sha", "big.qcow2"]);
    assert_eq!(out.trim(), digest_of(&qemu_raw(&img, &dir), &dir, "sha256sum"));
    assert!(percents.len() > 2, "{percents:?}");
    // check prints what it prints without progress, which is what qemu-img prints.
    let (out, percents) = with_progress_fd(&dir, &["check", "big.qcow2"]);
    assert_eq!(out, stdout(dir.here(qemu_img().args(["check", "big.qcow2"]))));
    assert!(percents.len() > 2, "{percents:?}");
    let out = run(dir.here(tool().args(["check", "-p", "--output=json", "big.qcow2"])));
    assert!(out.status.success(), "{}", show(&out));
    with_progress_fd(&dir, &["dehydrate", "big.qcow2", "dry"]);
    with_progress_fd(&dir, &["pattern", "--size", "8M", "p.qcow2", "2"]);
    with_progress_fd(&dir, &["decode", "big.qcow2", "big.raw"]);
    with_progress_fd(&dir, &["encode", "big.raw", "again.qcow2"]);
    let (out, _) = with_progress_fd(&dir, &["compare", "big.qcow2", "again.qcow2"]);
    assert_eq!(out, "Images are identical.\n");
    let out = run(dir.here(qemu_img().args(["compare", "big.qcow2", "again.qcow2"])));
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn encode_and_decode_agree_with_qemu_img() {
    let dir = Dir::new();
    let mut raw = vec![0u8; 3 << 20];
    for (i, b) in raw.iter_mut().enumerate().skip(100_000).take(300_000) {
        *b = (i % 251) as u8 + 1;
    }
    let raw_path = dir.path("in.raw");
    std::fs::write(&raw_path, &raw).unwrap();
    let img = dir.path("enc.qcow2");
    ok(tool().arg("encode").arg(&raw_path).arg(&img));
    assert_clean(&img);
    let out = run(qemu_img().args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&raw_path).arg(&img));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(virtual_size(&img), 3 << 20);

    let src = varied_image(&dir, "dec.qcow2");
    let dec = dir.path("dec.raw");
    ok(tool().arg("decode").arg(&src).arg(&dec));
    assert_eq!(std::fs::read(&dec).unwrap(), qemu_raw(&src, &dir));

    let err = fails(tool().arg("decode").arg(&raw_path).arg(dir.path("x.raw")));
    assert!(err.contains("not a qcow2 image"), "{err}");
    assert!(!dir.path("x.raw").exists());
    let err = fails(tool().arg("encode").arg(dir.path("missing.raw")).arg(dir.path("x.qcow2")));
    assert!(err.contains("missing.raw") && err.contains("No such file"), "{err}");
    assert!(!dir.path("x.qcow2").exists());
    let err = fails(tool().arg("decode").arg(&src).arg(&src));
    assert!(err.contains("same file"), "{err}");
}

// ------------------------------------------------------------------------------------------------------------
// pattern
// ------------------------------------------------------------------------------------------------------------

#[test]
fn pattern_images_are_what_the_reference_makes_and_qemu_reads_them() {
    let dir = Dir::new();
    let cs = 65536usize;
    let size = 4usize << 20;
    for number in ["1", "2"] {
        let img = dir.path(&format!("p{number}.qcow2"));
        ok(tool().args(["pattern", "--size", "4M"]).arg(&img).arg(number));
        assert_clean(&img);
        let got = qemu_raw(&img, &dir);
        let mut want = vec![0u8; size];
        for sector in 0..size / 512 {
            let cluster = sector * 512 / cs;
            let first_of_cluster = sector * 512 % cs == 0;
            let written = match number {
                "1" => cluster.is_multiple_of(2) && first_of_cluster,
                _ => cluster % 2 == 1,
            };
            if written {
                want[sector * 512..sector * 512 + 8].copy_from_slice(&(sector as u64).to_be_bytes());
            }
        }
        assert!(got == want, "pattern {number}: guest data differs from the reference's pattern");
        // Every other cluster is allocated, as qemu-img map sees it.
        let map = stdout(qemu_img().args(["map", "--output=json"]).arg(&img));
        let data: Vec<u64> = map
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l.trim_start_matches('[').trim_end_matches(']').trim_end_matches(','))
                    .unwrap()
            })
            .filter(|v| v["data"] == Value::Bool(true))
            .map(|v| v["start"].as_u64().unwrap() / cs as u64)
            .collect();
        let parity = if number == "1" { 0 } else { 1 };
        assert_eq!(data, (0..64).filter(|c| c % 2 == parity).collect::<Vec<u64>>(), "pattern {number}: {map}");
    }
    let err = fails(tool().arg("pattern").arg(dir.path("p3.qcow2")).arg("3"));
    assert!(err.contains('3'), "{err}");
    let err = fails(tool().args(["pattern", "--size", "12Q"]).arg(dir.path("p4.qcow2")).arg("1"));
    assert!(err.contains("invalid size '12Q'"), "{err}");
}

// ------------------------------------------------------------------------------------------------------------
// dehydrate / rehydrate
// ------------------------------------------------------------------------------------------------------------

/// qemu-img check's JSON without the file name.
fn check_json(path: &Path) -> Value {
    let out = run(qemu_img().args(["check", "--output=json"]).arg(path));
    let mut v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    v.as_object_mut().unwrap().remove("filename");
    v
}

/// qemu-img map's entries without the zero flag of data ranges: the rehydrated file has holes where data was,
/// which the file layer reports as zeros.
fn map_layout(path: &Path) -> Vec<Value> {
    let out = ok(qemu_img().args(["map", "--output=json"]).arg(path));
    let mut list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("map JSON");
    for v in &mut list {
        if v["data"] == Value::Bool(true) {
            v.as_object_mut().unwrap().remove("zero");
        }
    }
    list
}

#[test]
fn dehydrate_keeps_all_metadata_and_rehydrate_rebuilds_it() {
    let dir = Dir::new();
    let img = qemu_create(&dir, "d.qcow2", "cluster_size=4096", "32M");
    qemu_io(&img, &["write -P 1 0 1M", "write -P 2 8M 64k"]);
    ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&img));
    qemu_io(&img, &["write -P 3 0 128k", "write -P 4 20M 2M", "write -z 9M 64k"]);
    ok(qemu_img().args(["bitmap", "--add"]).arg(&img).arg("bm0"));
    qemu_io(&img, &["write -P 5 30M 64k"]);
    // A leak, so that the check has something to say.
    let damaged = dir.path("leaky.qcow2");
    std::fs::copy(&img, &damaged).unwrap();
    let len = std::fs::metadata(&damaged).unwrap().len();
    let prefix = dir.path("dry").display().to_string();
    ok(tool().arg("dehydrate").arg(&img).arg(&prefix));
    let meta_len = std::fs::metadata(format!("{prefix}.meta")).unwrap().len();
    assert!(meta_len < len / 2, "metadata {meta_len} of {len} bytes");
    // Whole clusters, the file's partial last cluster excepted.
    let map: Value = serde_json::from_str(&std::fs::read_to_string(format!("{prefix}.map")).unwrap()).unwrap();
    assert_eq!(map["file-length"].as_u64(), Some(len));
    let mut sum = 0;
    for range in map["ranges"].as_array().unwrap() {
        let (at, n) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
        assert_eq!(at % 4096, 0, "{map}");
        assert!(n % 4096 == 0 || at + n == len, "{map}");
        sum += n;
    }
    assert_eq!(sum, meta_len);
    let out = dir.path("wet.qcow2");
    ok(tool().arg("rehydrate").arg(&prefix).arg(&out));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), len);
    assert_eq!(check_json(&out), check_json(&img));
    assert_eq!(map_layout(&out), map_layout(&img));
    // QEMU takes the rehydrated file, mostly holes, for metadata-preallocated; map says what qemu-img says.
    let ours = stdout(tool().args(["map", "--output=json"]).arg(&out));
    assert_eq!(ours, stdout(qemu_img().args(["map", "--output=json"]).arg(&out)));
    let info = |p: &Path| {
        let o = ok(qemu_img().args(["info", "--output=json"]).arg(p));
        let mut v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let m = v.as_object_mut().unwrap();
        for k in ["filename", "actual-size", "children"] {
            m.remove(k);
        }
        v
    };
    assert_eq!(info(&out), info(&img));
    // Data clusters read as zeros.
    assert!(qemu_raw(&out, &dir).iter().all(|&b| b == 0));
    // The header cluster and every L1/L2/refcount cluster came across byte for byte.
    let (a, b) = (std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
    assert_eq!(a[..4096], b[..4096]);

    // A leak (a refcount of 1 on a cluster nothing uses, at the end of a grown file) survives the trip.
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes.resize(bytes.len().next_multiple_of(4096) + 8192, 0);
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let refblock = be64(be64(48) as usize) as usize;
    let cluster = len.div_ceil(4096) as usize;
    assert!(cluster < 2048, "the first refcount block covers cluster {cluster}");
    bytes[refblock + 2 * cluster..refblock + 2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    // And the corrupt bit, which makes QEMU open the image read-only only: dehydrate must still read it.
    bytes[79] |= 2;
    std::fs::write(&damaged, &bytes).unwrap();
    assert_eq!(check_json(&damaged)["leaks"].as_u64(), Some(1));
    let prefix2 = dir.path("dry2").display().to_string();
    ok(tool().args(["dehydrate", "-p"]).arg(&damaged).arg(&prefix2));
    let out2 = dir.path("wet2.qcow2");
    ok(tool().arg("rehydrate").arg(&prefix2).arg(&out2));
    assert_eq!(check_json(&out2), check_json(&damaged));

    let err = fails(tool().arg("rehydrate").arg(&prefix).arg(&out));
    assert!(err.contains("wet.qcow2"), "{err}");
    let raw = dir.path("plain.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    let err = fails(tool().arg("dehydrate").arg(&raw).arg(dir.path("x").display().to_string()));
    assert!(err.contains("not a qcow2 image"), "{err}");
    let err = fails(tool().arg("rehydrate").arg(dir.path("nothing").display().to_string()).arg(dir.path("y.qcow2")));
    assert!(err.contains("nothing.map"), "{err}");
}

// ------------------------------------------------------------------------------------------------------------
// bench
// ------------------------------------------------------------------------------------------------------------

#[test]
fn bench_runs_qemu_img_bench_requests_and_leaves_a_checkable_image() {
    let dir = Dir::new();
    let img = qemu_create(&dir, "b.qcow2", "", "8M");
    let out = stdout(
        tool().args(["bench", "-c", "600", "-d", "8", "-w", "-S", "8K", "-o", "4K", "--pattern", "171"]).arg(&img),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 600 write requests, 4096 bytes each, 8 in parallel (starting at offset 4096, step size 8192)"
    );
    assert!(lines[1].starts_with("Run completed in ") && lines[1].ends_with(" seconds."), "{out}");
    assert_clean(&img);
    // Requests k = 1.. land at (4K + k * 8K) mod (8M - 4K): with 600 requests, the odd 4 KiB blocks of the first
    // 4.7 MiB, each filled with the pattern byte; the even ones stay zero.
    let raw = qemu_raw(&img, &dir);
    for k in 0..600usize {
        let at = 4096 + k * 8192;
        assert!(raw[at..at + 4096].iter().all(|&b| b == 171), "request {k}");
        assert!(raw[at - 4096..at].iter().all(|&b| b == 0), "gap before request {k}");
    }
    let out = stdout(
        tool()
            .args(["bench", "-c", "256", "-d", "16", "-w", "-s", "64K", "--flush-interval", "16", "-t", "none"])
            .arg(&img),
    );
    assert!(out.contains("Sending flush every 16 requests\n"), "{out}");
    assert_clean(&img);
    ok(tool()
        .args(["bench", "-c", "300", "-d", "4", "-w", "--flush-interval", "10", "--no-drain", "-t", "unsafe"])
        .arg(&img));
    assert_clean(&img);
    // The smallest metadata cache, on a larger image whose writes touch many L2 slices: QEMU finds it clean.
    let big = qemu_create(&dir, "big.qcow2", "", "64G");
    ok(tool()
        .args(["bench", "--cache-size", "0", "-c", "400", "-d", "8", "-w", "-S", "161M", "--pattern", "77"])
        .arg(&big));
    assert_clean(&big);
    // Request k wrote 4 KiB at k * 161 MiB (400 of them stay below 64 GiB); the bytes between stay zero.
    let reads: Vec<String> = (0..400u64)
        .flat_map(|k| {
            [format!("read -P 77 {} 4k", k * (161 << 20)), format!("read -P 0 {} 4k", k * (161 << 20) + 4096)]
        })
        .collect();
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for r in &reads {
        cmd.args(["-c", r]);
    }
    let out = stdout(cmd.arg(&big));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read 4096/4096").count(), 800, "{out}");
    let out = stdout(tool().args(["bench", "-c", "2000", "-d", "4", "-t", "none"]).arg(&img));
    assert!(
        out.starts_with(
            "Sending 2000 read requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)\n"
        ),
        "{out}"
    );
    // The same arguments mean the same thing to qemu-img bench.
    let out = stdout(qemu_img().args(["bench", "-c", "2000", "-d", "4", "-t", "none"]).arg(&img));
    assert!(
        out.starts_with(
            "Sending 2000 read requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)\n"
        ),
        "{out}"
    );

    // A raw file is benchmarked as it is: qemu-io reads back what the writes left.
    let raw = dir.path("b.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    ok(tool()
        .args(["bench", "-f", "raw", "-w", "-c", "64", "-d", "4", "-s", "16K", "--pattern", "90", "-t", "writethrough"])
        .arg(&raw));
    // Request 63 wraps to offset 0 (modulo 1M - 16K), so the last 16 KiB are never written.
    ok(qemu("qemu-io").args(["-f", "raw", "-c", "read -P 90 0 1008k", "-c", "read -P 0 1008k 16k"]).arg(&raw));

    let err = fails(tool().args(["bench", "--flush-interval", "10"]).arg(&img));
    assert!(err.contains("write"), "{err}");
    let err = fails(tool().args(["bench", "-w", "-d", "8", "--flush-interval", "4"]).arg(&img));
    assert!(err.contains("depth"), "{err}");
    let err = fails(tool().args(["bench", "-s", "12Q"]).arg(&img));
    assert!(err.contains("invalid size '12Q'"), "{err}");
    let err = fails(tool().args(["bench", "--cache-size", "lots"]).arg(&img));
    assert!(err.contains("invalid size 'lots'"), "{err}");
    let err = fails(tool().args(["bench", "-t", "sometimes"]).arg(&img));
    assert!(err.contains("sometimes"), "{err}");
    let err = fails(tool().args(["bench", "-i", "native"]).arg(&img));
    assert!(err.contains("threads"), "{err}");
    let err = fails(tool().args(["bench", "-o", "8M"]).arg(&img));
    assert!(err.contains("past the end"), "{err}");
}

// ------------------------------------------------------------------------------------------------------------
// What a user can get wrong
// ------------------------------------------------------------------------------------------------------------

#[test]
fn a_missing_file_is_one_line_naming_it_for_every_new_command() {
    let dir = Dir::new();
    let missing = dir.path("no-such-image.qcow2");
    let name = missing.display().to_string();
    let other = dir.path("other").display().to_string();
    let commands: Vec<Vec<String>> = vec![
        vec!["map".into(), name.clone()],
        vec!["map".into(), "--output=json".into(), name.clone()],
        vec!["resize".into(), name.clone(), "1M".into()],
        vec!["measure".into(), "-O".into(), "qcow2".into(), name.clone()],
        vec!["bench".into(), name.clone()],
        vec!["encode".into(), name.clone(), other.clone()],
        vec!["decode".into(), name.clone(), other.clone()],
        vec!["sha".into(), name.clone()],
        vec!["dehydrate".into(), name.clone(), other.clone()],
        vec!["bitmap".into(), "--add".into(), name.clone(), "b".into()],
    ];
    for args in commands {
        let err = fails(tool().args(&args));
        assert!(err.contains(&name), "{args:?}: {err}");
        assert!(err.contains("No such file"), "{args:?}: {err}");
    }
    assert!(!dir.path("other").exists());
}

#[test]
fn an_encrypted_image_is_refused_naming_luks_by_every_new_command() {
    let dir = Dir::new();
    let img = dir.path("luks.qcow2");
    ok(qemu_img()
        .args(["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456"])
        .args(["-o", "encrypt.format=luks,encrypt.key-secret=sec0"])
        .arg(&img)
        .arg("1M"));
    let name = img.display().to_string();
    let out = dir.path("out").display().to_string();
    for args in [
        vec!["map", &name],
        vec!["resize", &name, "2M"],
        vec!["measure", "-O", "qcow2", &name],
        vec!["bench", &name],
        vec!["decode", &name, &out],
        vec!["sha", &name],
        vec!["bitmap", "--add", &name, "b"],
    ] {
        let err = fails(tool().args(&args));
        assert!(err.contains("LUKS"), "{args:?}: {err}");
        assert!(err.contains("luks.qcow2"), "{args:?}: {err}");
    }
    let err = fails_with(tool().args(["compare", &name, &name]), 2);
    assert!(err.contains("LUKS"), "{err}");
    let err = fails(tool().args(["measure", "-O", "qcow2", "--size", "1M", "-o", "encrypt.format=luks"]));
    assert!(err.contains("encrypt"), "{err}");
}

#[test]
fn every_new_command_has_help() {
    let top = stdout(tool().arg("--help"));
    for cmd in [
        "map",
        "compare",
        "resize",
        "measure",
        "bench",
        "encode",
        "decode",
        "sha",
        "pattern",
        "dehydrate",
        "rehydrate",
        "create",
        "info",
        "check",
        "repair",
        "convert",
        "read",
        "write",
        "mapped",
        "discard",
        "compact",
        "bitmap",
    ] {
        assert!(top.contains(cmd), "{cmd} missing from:\n{top}");
        let text = stdout(tool().args([cmd, "--help"]));
        assert!(text.contains("Usage: qcow-tool"), "{cmd}: {text}");
    }
}
