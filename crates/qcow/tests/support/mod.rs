//! Test support shared by the integration tests: QEMU as the oracle, and a byte model of a disk.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// A command for one of QEMU's tools; panics with the install hint when it is missing, so that no test
/// ever skips silently.
pub fn qemu(tool: &str) -> Command {
    let found = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{tool} not found: install qemu-utils (apt-get install -y qemu-utils)");
    Command::new(tool)
}

/// Runs a command and returns its output, panicking with its stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command starts");
    assert!(
        out.status.success(),
        "{:?} failed ({}): {}{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
pub fn qemu_create(path: &Path, opts: &str, size: &str) {
    let mut cmd = qemu("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(path).arg(size));
}

/// Runs qemu-io commands against a qcow2 image.
pub fn qemu_io(path: &Path, commands: &[&str]) {
    let mut cmd = qemu("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_ok(cmd.arg(path));
}

/// What `qemu-img check --output=json` says.
#[derive(Debug)]
pub struct Check {
    /// Exit status code.
    pub code: i32,
    /// The parsed JSON.
    pub json: serde_json::Value,
}

impl Check {
    fn field(&self, name: &str) -> u64 {
        self.json.get(name).and_then(|v| v.as_u64()).unwrap_or(0)
    }
    /// Corruptions found.
    pub fn corruptions(&self) -> u64 {
        self.field("corruptions")
    }
    /// Leaked clusters found.
    pub fn leaks(&self) -> u64 {
        self.field("leaks")
    }
    /// Check errors.
    pub fn check_errors(&self) -> u64 {
        self.field("check-errors")
    }
}

/// Runs `qemu-img check --output=json`, with `-U` so that it also judges an image a test still holds open.
pub fn qemu_check(path: &Path) -> Check {
    let out = qemu("qemu-img").args(["check", "-U", "--output=json", "-f", "qcow2"]).arg(path).output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check printed no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Check { code: out.status.code().unwrap_or(-1), json }
}

/// Asserts that `qemu-img check` finds neither corruptions nor leaks.
pub fn assert_clean(path: &Path) {
    let c = qemu_check(path);
    assert_eq!((c.corruptions(), c.leaks(), c.check_errors(), c.code), (0, 0, 0, 0), "qemu-img check: {:#}", c.json);
}

/// Asserts that `qemu-img check` finds no corruption (leaks allowed).
pub fn assert_not_corrupt(path: &Path) {
    let c = qemu_check(path);
    assert_eq!((c.corruptions(), c.check_errors()), (0, 0), "qemu-img check: {:#}", c.json);
}

/// `qemu-img convert -O raw` of an image (with `-U`: the image may still be open), read back into memory.
pub fn qemu_to_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!("{}.expected.raw", path.file_name().unwrap().to_string_lossy()));
    run_ok(qemu("qemu-img").args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(path).arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).ok();
    bytes
}

/// `qemu-img compare -U -f qcow2 -F raw IMG RAW`: true when identical.
pub fn qemu_compare_raw(image: &Path, raw: &Path) -> bool {
    let out =
        qemu("qemu-img").args(["compare", "-U", "-f", "qcow2", "-F", "raw"]).arg(image).arg(raw).output().unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// Writes `model` to a raw file next to `image` and asks `qemu-img compare` whether they match.
pub fn assert_matches_model(image: &Path, model: &[u8]) {
    let raw: PathBuf = image.with_extension("model.raw");
    std::fs::write(&raw, model).unwrap();
    assert!(qemu_compare_raw(image, &raw), "qemu-img compare: {} differs from the model", image.display());
    std::fs::remove_file(&raw).ok();
}

/// A deterministic pseudo-random generator (xorshift), so failures reproduce from their seed.
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Prints what reproduces a failure when the test panics on the way.
pub struct OnFailure(pub String);

impl Drop for OnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("FAILED: {}", self.0);
        }
    }
}

/// Runs `f` on its own thread and fails if it has not finished within `secs` seconds, so that a hang in the
/// library fails the test instead of stalling the suite. The hung thread is left behind (it dies with the test
/// process).
pub fn with_deadline(secs: u64, what: &str, f: impl FnOnce() + Send + 'static) {
    let (done, wait) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(what.chars().take(40).collect())
        .spawn(move || {
            f();
            let _ = done.send(());
        })
        .unwrap();
    match wait.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => worker.join().unwrap(),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("{what}: did not finish within {secs} s (hung)"),
    }
}

/// Runs a command and collects its output, killing it and failing after `secs` seconds so that a hang in QEMU
/// does not stall the suite.
pub fn output_within(cmd: &mut Command, secs: u64) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::Instant;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?}: did not finish within {secs} s (hung)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// The hostile-image corpus made by `tests/hostile/make-corpus.sh`, built once per version of the script and
/// shared by the test binaries that use it (they run one after another under `cargo test`).
pub fn hostile_corpus() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/make-corpus.sh");
    let text = std::fs::read(&script).unwrap();
    // FNV-1a: enough to tell versions of the script apart.
    let hash = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("hostile-corpus-{hash:016x}"));
    if dir.is_dir() {
        return dir;
    }
    qemu("qemu-img");
    qemu("qemu-io");
    let tmp = root.join(format!("hostile-corpus-{hash:016x}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = output_within(Command::new("bash").arg(&script).arg(&tmp), 300);
    assert!(
        out.status.success(),
        "make-corpus.sh failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test binary finished first; its corpus is the same.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.is_dir(), "corpus directory {} missing", dir.display());
    dir
}

/// The images of a corpus directory, sorted by name.
pub fn corpus_images(dir: &Path) -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    images.sort();
    images
}
