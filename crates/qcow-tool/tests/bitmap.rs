//! `qcow-tool bitmap` against `qemu-img bitmap`: the same command lines on two copies of the same image give the
//! same exit code, the same error (where qemu-img names a block node, we name the file), the same bitmaps in
//! `qemu-img info` and the same bits through `qemu-nbd -B`; and `qcow-tool info` lists bitmaps where qemu-img
//! does.

mod binary;

use binary::{ok, qemu, show, tool, Dir};

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// qemu-img info's JSON of `file` (with -U, so that a killed writer's lock does not matter).
fn info(dir: &Dir, file: &str) -> Value {
    let out = ok(dir.here(qemu("qemu-img").args(["info", "-U", "--output=json", file])));
    serde_json::from_slice(&out.stdout).expect("info JSON")
}

fn bitmaps(dir: &Dir, file: &str) -> Value {
    info(dir, file)["format-specific"]["data"]["bitmaps"].clone()
}

/// `nbdinfo --map=qemu:dirty-bitmap:NAME` of `qemu-nbd -r -B NAME FILE`.
fn dirty_map(dir: &Dir, file: &str, name: &str) -> String {
    let found = Command::new("nbdinfo").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "nbdinfo not found: install libnbd-bin");
    let out = ok(dir.here(
        Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{name}"))
            .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, file, "]"]),
    ));
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn check_clean(dir: &Dir, file: &str) {
    let out = dir.here(qemu("qemu-img").args(["check", "--output=json", file])).output().expect("check runs");
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(key).and_then(Value::as_u64).unwrap_or(0), 0, "{file}: {key} in {v}");
    }
}

/// qemu-img's error, first line, without its prefix and with block node names ("#block123") replaced by `file`.
fn qemu_error(stderr: &[u8], file: &str) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text.lines().find(|l| l.starts_with("qemu-img: ")).unwrap_or("");
    let mut out = String::new();
    let mut rest = line.trim_start_matches("qemu-img: ");
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at]);
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push_str(file);
    }
    out.push_str(rest);
    out
}

/// Our error without its prefix and without the hint that stands for qemu-img's second line.
fn our_error(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    assert!(text.lines().count() <= 1, "one line: {text}");
    let line = text.trim_end().trim_start_matches("qcow-tool: ");
    match line.find(" (try 'qcow-tool bitmap --remove ") {
        Some(at) if line.ends_with("' to delete this bitmap from disk)") => line[..at].to_string(),
        _ => line.to_string(),
    }
}

/// Runs `args` (after `bitmap`) as qemu-img on `theirs` and as us on `ours` (the last but one operand, or the only
/// file, is replaced), and asserts both agree on the exit code, the error and the resulting bitmaps.
fn both(dir: &Dir, ours: &str, theirs: &str, args: &[&str]) {
    let swap = |file: &str| -> Vec<String> {
        args.iter().map(|a| if *a == "IMG" { file.to_string() } else { a.to_string() }).collect()
    };
    let q = dir.here(qemu("qemu-img").arg("bitmap").args(swap(theirs))).output().expect("qemu-img runs");
    let o = dir.here(tool().arg("bitmap").args(swap(ours))).output().expect("qcow-tool runs");
    assert_eq!(o.status.code(), q.status.code(), "{args:?}:\nours {}\nqemu {}", show(&o), show(&q));
    if !q.status.success() {
        assert_eq!(our_error(&o.stderr), qemu_error(&q.stderr, ours).replace(theirs, ours), "{args:?}");
    }
    if Path::new(&dir.path(ours)).exists() && info(dir, theirs)["format"] == "qcow2" {
        assert_eq!(bitmaps(dir, ours), bitmaps(dir, theirs), "{args:?}: bitmaps differ");
    }
}

fn qemu_create(dir: &Dir, file: &str, options: &str, size: &str) {
    let mut cmd = qemu("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !options.is_empty() {
        cmd.args(["-o", options]);
    }
    ok(dir.here(cmd.args([file, size])));
}

fn qemu_io(dir: &Dir, file: &str, cmds: &[&str]) {
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(dir.here(cmd.arg(file)));
}

fn copy(dir: &Dir, from: &str, to: &str) {
    std::fs::copy(dir.path(from), dir.path(to)).expect("copy");
}

#[test]
fn bitmap_commands_do_what_qemu_img_bitmap_does() {
    let dir = Dir::new();
    for (cluster, i) in [("512", 0), ("4096", 1), ("65536", 2), ("2M", 3)] {
        qemu_create(&dir, "base.qcow2", &format!("cluster_size={cluster}"), "64M");
        let (ours, theirs) = (format!("ours{i}.qcow2"), format!("theirs{i}.qcow2"));
        copy(&dir, "base.qcow2", &ours);
        copy(&dir, "base.qcow2", &theirs);
        let run = |args: &[&str]| both(&dir, &ours, &theirs, args);
        // The default granularity, then explicit ones, repeated and ordered actions, and every refusal.
        run(&["--add", "IMG", "b0"]);
        run(&["--add", "-g", "4k", "IMG", "b4k"]);
        run(&["--add", "--disable", "-g", "1M", "IMG", "off"]);
        run(&["--add", "IMG", "b0"]);
        run(&["--add", "-g", "1000", "IMG", "x"]);
        run(&["--add", "-g", "256", "IMG", "x"]);
        run(&["--add", "-g", "4G", "IMG", "x"]);
        run(&["--add", "-g", "abc", "IMG", "x"]);
        run(&["--add", "-g", "-5", "IMG", "x"]);
        run(&["--add", "IMG", ""]);
        run(&["--add", "IMG", &"n".repeat(1024)]);
        run(&["--add", "IMG", &"n".repeat(1023)]);
        run(&["--remove", "IMG", &"n".repeat(1023)]);
        run(&["--remove", "IMG", "none"]);
        run(&["--clear", "IMG", "none"]);
        run(&["--enable", "IMG", "none"]);
        run(&["--disable", "-g", "64k", "IMG", "b0"]);
        run(&["--clear", "-F", "qcow2", "IMG", "b0"]);
        run(&["--clear", "-b", "IMG", "IMG", "b0"]);
        run(&["--clear", "IMG"]);
        run(&["IMG", "b0"]);
        run(&["--merge", "none", "IMG", "b0"]);
        run(&["--merge", "b0", "IMG", "none"]);
        run(&["--remove", "--add", "-g", "8k", "--disable", "--enable", "IMG", "b0"]);
        run(&["--add", "--remove", "IMG", "gone"]);
        // Writes by QEMU, then merges and clears by both tools: the bits must agree.
        for file in [&ours, &theirs] {
            qemu_io(&dir, file, &["write 0 4k", "write 5M 100k", "write 63M 512"]);
        }
        run(&["--merge", "b4k", "IMG", "off"]);
        run(&["--merge", "off", "--clear", "IMG", "b0"]);
        run(&["--merge", "b4k", "--merge", "off", "IMG", "b0"]);
        run(&["--clear", "IMG", "b4k"]);
        for name in ["b0", "b4k", "off"] {
            assert_eq!(dirty_map(&dir, &ours, name), dirty_map(&dir, &theirs, name), "{name} at {cluster}");
        }
        check_clean(&dir, &ours);
    }
}

#[test]
fn merges_from_another_file_and_inconsistent_bitmaps_are_handled_as_qemu_img_does() {
    let dir = Dir::new();
    qemu_create(&dir, "src.qcow2", "", "16M");
    ok(dir.here(qemu("qemu-img").args(["bitmap", "--add", "-g", "16k", "src.qcow2", "s"])));
    qemu_io(&dir, "src.qcow2", &["write 1M 4k", "write 9M 64k"]);
    qemu_create(&dir, "small.qcow2", "", "8M");
    ok(dir.here(qemu("qemu-img").args(["bitmap", "--add", "small.qcow2", "s"])));
    qemu_create(&dir, "base.qcow2", "", "16M");
    ok(dir.here(qemu("qemu-img").args(["bitmap", "--add", "base.qcow2", "d"])));
    ok(dir.here(qemu("qemu-img").args(["bitmap", "--add", "base.qcow2", "lost"])));
    // A QEMU killed with the image open leaves its bitmaps in use: inconsistent.
    let _ =
        dir.here(qemu("qemu-io").args(["-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9", "base.qcow2"])).output();
    ok(dir.here(qemu("qemu-img").args(["bitmap", "--add", "base.qcow2", "fresh"])));
    copy(&dir, "base.qcow2", "ours.qcow2");
    copy(&dir, "base.qcow2", "theirs.qcow2");
    let run = |args: &[&str]| both(&dir, "ours.qcow2", "theirs.qcow2", args);
    run(&["--merge", "s", "-b", "src.qcow2", "IMG", "fresh"]);
    run(&["--merge", "s", "-b", "src.qcow2", "-F", "qcow2", "IMG", "fresh"]);
    run(&["--merge", "s", "-b", "small.qcow2", "IMG", "fresh"]);
    run(&["--merge", "none", "-b", "src.qcow2", "IMG", "fresh"]);
    run(&["--merge", "s", "-b", "src.qcow2", "IMG", "lost"]);
    run(&["--merge", "lost", "IMG", "fresh"]);
    run(&["--clear", "IMG", "lost"]);
    run(&["--enable", "IMG", "d"]);
    run(&["--disable", "IMG", "lost"]);
    assert_eq!(dirty_map(&dir, "ours.qcow2", "fresh"), dirty_map(&dir, "theirs.qcow2", "fresh"));
    // Resizing is refused while a bitmap is inconsistent, in qemu-img's words.
    let q = dir.here(qemu("qemu-img").args(["resize", "theirs.qcow2", "32M"])).output().expect("runs");
    let o = dir.here(tool().args(["resize", "ours.qcow2", "32M"])).output().expect("runs");
    assert_eq!((o.status.code(), q.status.code()), (Some(1), Some(1)), "{}", show(&o));
    assert_eq!(our_error(&o.stderr), qemu_error(&q.stderr, "ours.qcow2"));
    run(&["--remove", "IMG", "lost"]);
    run(&["--remove", "IMG", "d"]);
    ok(dir.here(tool().args(["resize", "ours.qcow2", "32M"])));
    ok(dir.here(qemu("qemu-img").args(["resize", "theirs.qcow2", "32M"])));
    assert_eq!(bitmaps(&dir, "ours.qcow2"), bitmaps(&dir, "theirs.qcow2"));
    assert_eq!(dirty_map(&dir, "ours.qcow2", "fresh"), dirty_map(&dir, "theirs.qcow2", "fresh"));
    check_clean(&dir, "ours.qcow2");
    // A version 2 image cannot keep bitmaps, and a raw file has none.
    qemu_create(&dir, "v2.qcow2", "compat=0.10", "1M");
    copy(&dir, "v2.qcow2", "v2-theirs.qcow2");
    both(&dir, "v2.qcow2", "v2-theirs.qcow2", &["--add", "IMG", "b"]);
    std::fs::write(dir.path("r.raw"), vec![0u8; 1 << 20]).expect("raw");
    std::fs::write(dir.path("r2.raw"), vec![0u8; 1 << 20]).expect("raw");
    both(&dir, "r.raw", "r2.raw", &["-f", "raw", "--add", "IMG", "b"]);
    both(&dir, "r.raw", "r2.raw", &["-f", "raw", "--clear", "IMG", "b"]);
    let o = dir.here(tool().args(["bitmap", "--add", "missing.qcow2", "b"])).output().expect("runs");
    assert!(our_error(&o.stderr).contains("missing.qcow2") && !o.status.success(), "{}", show(&o));
}
