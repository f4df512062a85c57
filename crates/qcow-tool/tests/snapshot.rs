//! `qcow-tool snapshot` against `qemu-img snapshot`: the same table byte for byte, the same refusals in the
//! same words, and snapshots either tool makes that the other lists, applies and deletes.

mod binary;

use binary::{ok, qemu, show, tool, Dir};

use std::path::Path;
use std::process::Command;

/// Both tools with the time zone fixed to `tz`.
fn ours(tz: &str) -> Command {
    let mut cmd = tool();
    cmd.env("TZ", tz);
    cmd
}

fn qemu_img(tz: &str) -> Command {
    let mut cmd = qemu("qemu-img");
    cmd.env("TZ", tz);
    cmd
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(ok(cmd).stdout).unwrap()
}

/// The one line a failing run prints, without the program's name; the exit code must be 1 for both tools.
fn refusal(cmd: &mut Command, program: &str) -> String {
    let out = cmd.output().expect("command runs");
    assert_eq!(out.status.code(), Some(1), "{cmd:?}:\n{}", show(&out));
    let text = String::from_utf8(out.stderr).unwrap();
    let line = text.lines().find(|l| l.starts_with(program)).unwrap_or_else(|| panic!("{cmd:?}: {text}"));
    line.trim_start_matches(program).trim_start_matches(": ").to_string()
}

fn qemu_create(path: &Path, opts: &str) {
    let mut cmd = qemu("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    ok(cmd.arg(path).arg("16M"));
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut cmd = qemu("qemu-io");
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(path));
}

fn assert_clean(path: &Path) {
    let out = qemu("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "qemu-img check:\n{}", show(&out));
}

#[test]
fn the_list_is_qemu_imgs_byte_for_byte_in_any_time_zone() {
    let dir = Dir::new();
    let img = dir.path("list.qcow2");
    qemu_create(&img, "");
    qemu_io(&img, &["write -P 1 0 64k"]);
    ok(qemu_img("UTC").args(["snapshot", "-c", "first"]).arg(&img));
    ok(ours("UTC").args(["snapshot", "-c", "a-name-longer-than-sixteen-columns"]).arg(&img));
    ok(qemu_img("UTC").args(["snapshot", "-c", ""]).arg(&img));
    ok(ours("UTC").args(["snapshot", "-q", "-c", "fourth"]).arg(&img));
    for tz in ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", ":Australia/Lord_Howe", "EST5EDT", "UTC0"] {
        for args in [&["snapshot", "-l"][..], &["snapshot"][..], &["snapshot", "-l", "-U", "-q"][..]] {
            let theirs = stdout(qemu_img(tz).args(args).arg(&img));
            let mine = stdout(ours(tz).args(args).arg(&img));
            assert!(theirs.starts_with("Snapshot list:\n") && theirs.lines().count() == 6, "{theirs}");
            assert_eq!(mine, theirs, "TZ={tz} {args:?}");
        }
        let theirs = stdout(qemu_img(tz).arg("info").arg(&img));
        let mine = stdout(ours(tz).arg("info").arg(&img));
        let table = |t: &str| t.lines().skip_while(|l| *l != "Snapshot list:").take(6).collect::<Vec<_>>().join("\n");
        assert_eq!(table(&mine), table(&theirs), "info, TZ={tz}");
    }
    // No snapshots: nothing at all.
    let empty = dir.path("empty.qcow2");
    qemu_create(&empty, "");
    assert_eq!(stdout(ours("UTC").args(["snapshot", "-l"]).arg(&empty)), "");
    assert_eq!(stdout(qemu_img("UTC").args(["snapshot", "-l"]).arg(&empty)), "");
}

#[test]
fn snapshots_made_by_either_tool_are_applied_and_deleted_by_the_other() {
    let dir = Dir::new();
    let img = dir.path("both.qcow2");
    qemu_create(&img, "");
    qemu_io(&img, &["write -P 0x11 0 128k"]);
    ok(ours("UTC").args(["snapshot", "-c", "ours"]).arg(&img));
    qemu_io(&img, &["write -P 0x22 0 64k"]);
    ok(qemu_img("UTC").args(["snapshot", "-c", "theirs"]).arg(&img));
    qemu_io(&img, &["write -P 0x33 64k 64k"]);
    assert_clean(&img);
    // QEMU applies ours, we apply theirs.
    ok(qemu_img("UTC").args(["snapshot", "-a", "ours"]).arg(&img));
    qemu_io(&img, &["read -P 0x11 0 128k"]);
    ok(ours("UTC").args(["snapshot", "-a", "theirs"]).arg(&img));
    qemu_io(&img, &["read -P 0x22 0 64k", "read -P 0x11 64k 64k"]);
    assert_clean(&img);
    ok(qemu_img("UTC").args(["snapshot", "-d", "ours"]).arg(&img));
    ok(ours("UTC").args(["snapshot", "-d", "theirs"]).arg(&img));
    assert_eq!(stdout(qemu_img("UTC").args(["snapshot", "-l"]).arg(&img)), "");
    assert_clean(&img);
    qemu_io(&img, &["read -P 0x22 0 64k", "read -P 0x11 64k 64k"]);
}

#[test]
fn refusals_are_worded_as_qemu_img_words_them() {
    let dir = Dir::new();
    let img = dir.path("r.qcow2");
    qemu_create(&img, "");
    ok(qemu_img("UTC").args(["snapshot", "-c", "s"]).arg(&img));
    let data = dir.path("d.qcow2");
    ok(dir.here(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "d.qcow2", "16M"])));
    let raw = dir.path("plain.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let missing = dir.path("missing.qcow2");
    let cases: Vec<(Vec<&str>, &Path)> = vec![
        (vec!["-a", "nosuch"], &img),
        (vec!["-d", "nosuch"], &img),
        (vec!["-d", "1"], &img),
        (vec!["-U", "-c", "x"], &img),
        (vec!["-U", "-a", "s"], &img),
        (vec!["-l", "-c", "x"], &img),
        (vec!["-c", "x"], &data),
        (vec!["-a", "x"], &data),
        (vec!["-d", "x"], &data),
        (vec!["-l"], &missing),
        (vec!["-c", "x"], &raw),
    ];
    for (args, file) in cases {
        let before = std::fs::read(file).ok();
        let theirs = refusal(dir.here(qemu_img("UTC").arg("snapshot").args(&args).arg(file)), "qemu-img");
        let mine = refusal(dir.here(ours("UTC").arg("snapshot").args(&args).arg(file)), "qcow-tool");
        assert_eq!(mine, theirs, "{args:?} {}", file.display());
        assert!(std::fs::read(file).ok() == before, "{args:?} changed {}", file.display());
    }
    // A refusal of our own, where qemu-img would make a second "s": the name is taken.
    let before = std::fs::read(&img).unwrap();
    assert_eq!(
        refusal(ours("UTC").args(["snapshot", "-c", "s"]).arg(&img), "qcow-tool"),
        "Could not create snapshot 's': File exists"
    );
    assert!(std::fs::read(&img).unwrap() == before);
    // A file we may not write is refused as qemu-img refuses it (root may write anything: check as the owner).
    let ro = dir.path("ro.qcow2");
    std::fs::copy(&img, &ro).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&ro, perms).unwrap();
    if std::fs::OpenOptions::new().write(true).open(&ro).is_err() {
        let theirs = refusal(qemu_img("UTC").args(["snapshot", "-c", "x"]).arg(&ro), "qemu-img");
        let mine = refusal(ours("UTC").args(["snapshot", "-c", "x"]).arg(&ro), "qcow-tool");
        assert_eq!(mine, theirs);
    }
}
