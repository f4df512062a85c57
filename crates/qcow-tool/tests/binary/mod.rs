//! Running the `qcow-tool` binary in integration tests: the command, a readable dump of what it did, and a
//! temporary directory for its files. Shared by every test file of the crate.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `qcow-tool` binary cargo built for these tests.
pub fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qcow-tool"))
}

/// A command for a QEMU tool; panics naming the package when it is missing, so no test skips silently.
pub fn qemu(program: &str) -> Command {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Command::new(program),
        _ => panic!("{program} not found: install qemu-utils (apt-get install -y qemu-utils)"),
    }
}

/// Runs `cmd` and returns its output, panicking with what it printed when it fails.
pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    out
}

/// Exit status, stdout and stderr of a run, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A temporary directory, removed when dropped.
pub struct Dir(pub tempfile::TempDir);

impl Dir {
    /// A new empty directory.
    pub fn new() -> Self {
        Dir(tempfile::tempdir().expect("temp dir"))
    }

    /// The path of `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Runs `cmd` in this directory, so that file names print as given.
    pub fn here<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.current_dir(self.0.path())
    }
}
