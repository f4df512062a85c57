//! Image locking against QEMU, both ways: an image a running qemu-io holds is refused to qcow-tool's writes (and
//! its plain reads, as qemu-img refuses them) but read with `-U`; an image we hold is refused to qemu-io's writes;
//! and our opens hold exactly the lock bytes QEMU's do, as /proc/locks lists them.

mod binary;

use binary::{ok, qemu, show, tool, Dir};

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qcow::block::Locking;
use qcow::{BackingPolicy, Config, Image};

fn fails_with(cmd: &mut Command, words: &str) {
    let out = cmd.output().expect("command runs");
    assert!(!out.status.success(), "{cmd:?} should fail:\n{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(words), "{cmd:?}: expected {words:?} in:\n{}", show(&out));
}

/// The bytes of `path` that some open file description holds a lock on, from /proc/locks.
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let inode = format!(":{} ", std::fs::metadata(path).unwrap().ino());
    let table = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = BTreeSet::new();
    for line in table.lines().filter(|l| l.contains("OFDLCK") && l.contains(&inode)) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (start, end): (u64, u64) =
            (fields[fields.len() - 2].parse().unwrap(), fields[fields.len() - 1].parse().unwrap());
        bytes.extend(start..=end);
    }
    bytes
}

/// A qemu-io that holds `path` open, with QEMU's locks, until dropped; `args` go before the file name.
struct Held(Child);

impl Held {
    fn new(path: &Path, args: &[&str]) -> Held {
        let before = locked_bytes(path);
        let child = qemu("qemu-io")
            .args(args)
            .args(["-f", "qcow2"])
            .arg(path)
            // qemu-io reads commands from stdin; a pipe kept open keeps it waiting, and closing it ends it.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while locked_bytes(path) == before {
            assert!(Instant::now() < deadline, "qemu-io took no lock on {}", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Held(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn image(dir: &Dir) -> std::path::PathBuf {
    let img = dir.path("held.qcow2");
    ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("4M"));
    ok(qemu("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"]).arg(&img).stdin(Stdio::null()));
    img
}

#[test]
fn an_image_qemu_io_holds_is_refused_to_our_writes_and_read_with_force_share() {
    let dir = Dir::new();
    let img = image(&dir);
    let bytes = std::fs::read(&img).unwrap();
    let held = Held::new(&img, &[]);
    let shown = img.display().to_string();
    // The words qemu-img uses, on our one line.
    fails_with(tool().args(["resize"]).arg(&img).arg("8M"), "Failed to get \"write\" lock");
    fails_with(tool().args(["check", "-r", "all"]).arg(&img), "Failed to get \"write\" lock");
    fails_with(
        tool().arg("write").arg(&img).args(["--sector", "0", "--text", "ours"]),
        &format!("Is another process using the image [{shown}]?"),
    );
    // A plain read refuses to share writes with the writer, as qemu-img info does.
    fails_with(qemu("qemu-img").arg("info").arg(&img), "Failed to get shared \"write\" lock");
    fails_with(tool().arg("info").arg(&img), "Failed to get shared \"write\" lock");
    // -U reads anyway, before or after the command name, as qemu-img's does.
    let info = ok(tool().args(["-U", "info"]).arg(&img));
    assert!(String::from_utf8_lossy(&info.stdout).contains("virtual size: 4 MiB"), "{}", show(&info));
    ok(tool().args(["info", "-U"]).arg(&img));
    ok(tool().args(["check", "-U"]).arg(&img));
    // -U is for reading only.
    fails_with(
        tool().args(["check", "-U", "-r", "all"]).arg(&img),
        "force-share=on can only be used with read-only images",
    );
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "refused commands changed nothing");
    drop(held);
    ok(tool().args(["resize"]).arg(&img).arg("8M"));
    ok(qemu("qemu-img").args(["check", "-q"]).arg(&img));
}

#[test]
fn an_image_we_hold_is_refused_to_qemus_writes() {
    let dir = Dir::new();
    let img = image(&dir);
    let write = || {
        let mut cmd = qemu("qemu-io");
        cmd.args(["-f", "qcow2", "-c", "write -P 0x11 0 4k"]).arg(&img).stdin(Stdio::null());
        cmd
    };

    let ours = Image::open_path(&img, Config::default()).unwrap();
    fails_with(&mut write(), "Failed to get \"write\" lock");
    fails_with(qemu("qemu-img").arg("info").arg(&img), "Failed to get shared \"write\" lock");
    ok(qemu("qemu-img").args(["info", "-U"]).arg(&img));
    drop(ours);

    // A reader of ours lets QEMU's readers in and keeps its writers out.
    let ours = Image::open_path(&img, Config::read_only()).unwrap();
    fails_with(&mut write(), "Failed to get \"write\" lock");
    ok(qemu("qemu-img").arg("info").arg(&img));
    drop(ours);

    // Closed, it is QEMU's to write again.
    ok(&mut write());
    ok(qemu("qemu-img").args(["check", "-q"]).arg(&img));
}

#[test]
fn our_opens_hold_the_lock_bytes_qemus_opens_hold() {
    let dir = Dir::new();
    let img = image(&dir);
    let cases: [(&str, &[&str], Config, Locking); 3] = [
        ("read-write", &[], Config::default(), Locking::Qemu),
        ("read-only", &["-r"], Config::read_only(), Locking::Qemu),
        ("force-share", &["-r", "-U"], Config::read_only(), Locking::ForceShare),
    ];
    for (name, args, config, locking) in cases {
        let held = Held::new(&img, args);
        let qemus = locked_bytes(&img);
        drop(held);
        assert!(locked_bytes(&img).is_empty(), "{name}: qemu-io left locks");
        let ours = Image::open_path_with(&img, config, BackingPolicy { locking, ..BackingPolicy::default() }).unwrap();
        assert_eq!(locked_bytes(&img), qemus, "{name}: our locks against qemu-io's");
        drop(ours);
        assert!(locked_bytes(&img).is_empty(), "{name}: closing the image releases its locks");
    }
}
