//! NBD oracles for the integration tests: a real qemu-nbd serving an image on a Unix socket, and libnbd's
//! nbdinfo reading what a server says. Included by path (`#[path = ".../support/nbd.rs"] mod nbd;`) by the
//! tests that compare a server with qemu-nbd; it needs only std, tempfile and serde_json.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A command for `tool`; panics naming the package to install when it is missing, so no test skips silently.
pub fn need(tool: &str, package: &str) -> Command {
    let found = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{tool} not found: install {package} (apt-get install -y {package})");
    Command::new(tool)
}

/// A qemu-nbd serving one image read-only on a Unix socket of its own, killed when dropped.
pub struct QemuNbd {
    child: Child,
    dir: tempfile::TempDir,
}

impl QemuNbd {
    /// `qemu-nbd -r -t -f FORMAT --socket=... EXTRA FILE`, once its socket exists.
    pub fn start(file: &Path, format: &str, extra: &[&str]) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qemu-nbd.sock");
        let mut child = need("qemu-nbd", "qemu-utils")
            .args(["-r", "-t", "-f", format, "--socket"])
            .arg(&socket)
            .args(extra)
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-nbd starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("qemu-nbd {extra:?} {} exited with {status}: {err}", file.display());
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not create its socket within 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd { child, dir }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("qemu-nbd.sock")
    }

    /// Its URI (the default export).
    pub fn uri(&self) -> String {
        unix_uri(&self.socket(), "")
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The URI of export `name` on the Unix socket `socket`.
pub fn unix_uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// `nbdinfo ARGS URI`: its stdout, asserting it succeeded within a minute.
pub fn nbdinfo(args: &[&str], uri: &str) -> String {
    let mut child = need("nbdinfo", "libnbd-bin")
        .args(args)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("nbdinfo {args:?} {uri}: did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "nbdinfo {args:?} {uri} exited with {status}: {out}{err}");
    out
}

/// `nbdinfo --map=CONTEXT --json URI` as (offset, length, type) extents.
pub fn nbdinfo_map(context: &str, uri: &str) -> Vec<(u64, u64, u64)> {
    let out = nbdinfo(&[&format!("--map={context}"), "--json"], uri);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

/// The `contexts:` lines of `nbdinfo --list URI`: what a LIST with no query shows.
pub fn nbdinfo_contexts(uri: &str) -> Vec<String> {
    let out = nbdinfo(&["--list"], uri);
    out.lines()
        .skip_while(|l| l.trim() != "contexts:")
        .skip(1)
        .take_while(|l| l.starts_with("\t\t"))
        .map(|l| l.trim().to_string())
        .collect()
}
