//! Test support for persistent bitmaps: a model of dirty granules, and QEMU's reading of a bitmap
//! (`qemu-nbd -B NAME` with `nbdinfo --map=qemu:dirty-bitmap:NAME`, `qemu-img info`). Included by the test files
//! that need it with `#[path]`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;

use qcow::BitmapRun;

use super::support::{qemu, run_ok};

/// Which granules of a disk a bitmap should have dirty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Bytes per granule.
    pub granularity: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// One flag per granule.
    pub dirty: Vec<bool>,
}

impl Model {
    /// A clean bitmap of a `size`-byte disk.
    pub fn new(granularity: u64, size: u64) -> Self {
        Model { granularity, size, dirty: vec![false; size.div_ceil(granularity) as usize] }
    }

    /// A write of `len` bytes at `offset` dirties every granule it touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = (offset + len).min(self.size);
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            self.dirty[g as usize] = true;
        }
    }

    /// The disk is now `size` bytes: granules past the end go, new ones are clean, as a bitmap follows a resize.
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        self.dirty.resize(size.div_ceil(self.granularity) as usize, false);
    }

    /// Every granule clean.
    pub fn clear(&mut self) {
        self.dirty.iter_mut().for_each(|d| *d = false);
    }

    /// The model as merged `(offset, len, dirty)` runs of the whole disk.
    pub fn runs(&self) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, &d) in self.dirty.iter().enumerate() {
            let start = i as u64 * self.granularity;
            let len = self.granularity.min(self.size - start);
            match out.last_mut() {
                Some(last) if last.2 == d => last.1 += len,
                _ => out.push((start, len, d)),
            }
        }
        out
    }
}

/// `runs` of `bitmap_status` as `(offset, len, dirty)` from `offset`.
pub fn as_triples(offset: u64, runs: &[BitmapRun]) -> Vec<(u64, u64, bool)> {
    let mut at = offset;
    runs.iter()
        .map(|r| {
            let t = (at, r.len, r.dirty);
            at += r.len;
            t
        })
        .collect()
}

/// What QEMU says the bitmap `name` of `path` holds: `nbdinfo --map=qemu:dirty-bitmap:NAME` of a read-only
/// `qemu-nbd -B NAME` export (sharing the image, which a test may hold open), as `(offset, len, dirty)` runs.
pub fn qemu_bitmap_map(path: &Path, name: &str) -> Vec<(u64, u64, bool)> {
    let found = Command::new("nbdinfo").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "nbdinfo not found: install libnbd-bin (apt-get install -y libnbd-bin)");
    qemu("qemu-nbd");
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(format!("--map=qemu:dirty-bitmap:{name}"))
            // qemu-nbd has no -U: force-share=on through --image-opts, since a test may still hold the image.
            .args(["--", "[", "qemu-nbd", "-r", "--image-opts", "-B", name])
            .arg(format!(
                "driver=qcow2,force-share=on,read-only=on,file.driver=file,file.filename={}",
                path.display().to_string().replace(',', ",,")
            ))
            .arg("]"),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in json.as_array().unwrap() {
        let (offset, len, dirty) =
            (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap() & 1 == 1);
        match runs.last_mut() {
            Some(last) if last.2 == dirty && last.0 + last.1 == offset => last.1 += len,
            _ => runs.push((offset, len, dirty)),
        }
    }
    runs
}

/// `qemu-img info --output=json -U`'s bitmaps: `(name, granularity, flags)`.
pub fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = run_ok(qemu("qemu-img").args(["info", "-U", "--output=json", "-f", "qcow2"]).arg(path));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| {
                    let flags = b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned());
                    (b["name"].as_str().unwrap().to_owned(), b["granularity"].as_u64().unwrap(), flags.collect())
                })
                .collect()
        })
        .unwrap_or_default()
}
