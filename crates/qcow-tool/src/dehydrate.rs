//! `qcow-tool dehydrate FILE PREFIX`: copy an image's metadata, and nothing else, so that a broken image can be
//! shared and rebuilt elsewhere (`rehydrate`) without its data.
//!
//! Every metadata cluster the library's check walk reaches is kept whole: the header cluster with its
//! extensions, the refcount table and blocks, the active and snapshot L1 tables and every L2 table, the
//! snapshot table, the bitmap directory, tables and data. Guest data clusters are left out. `PREFIX.meta`
//! holds the kept clusters back to back, in file order; `PREFIX.map` (JSON) says where each run of them goes
//! and how long the image file was.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use qcow::block::BlockDevice;

use crate::error::{Context, Error, Result};
use crate::open;
use crate::progress::{Progress, ProgressArgs};

/// What `PREFIX.map` says it is.
pub const MAP_FORMAT: &str = "qcow-tool dehydrated image 1";

/// Bytes copied at a time.
const CHUNK: u64 = 1 << 20;

/// Arguments of `dehydrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The qcow2 image to read.
    file: PathBuf,
    /// Where to write: PREFIX.meta and PREFIX.map (existing files are overwritten).
    prefix: String,
    #[command(flatten)]
    progress: ProgressArgs,
}

/// The two files of a dehydrated image.
pub fn paths(prefix: &str) -> (PathBuf, PathBuf) {
    (PathBuf::from(format!("{prefix}.meta")), PathBuf::from(format!("{prefix}.map")))
}

/// Sorted, merged, whole-cluster runs covering `ranges`, clipped to the file.
fn cluster_runs(ranges: impl Iterator<Item = (u64, u64)>, cluster_size: u64, file_len: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = ranges
        .filter(|&(_, len)| len > 0)
        .map(|(offset, len)| {
            let start = offset - offset % cluster_size;
            let end = offset.saturating_add(len).div_ceil(cluster_size).saturating_mul(cluster_size);
            (start.min(file_len), end.min(file_len))
        })
        .filter(|&(start, end)| start < end)
        .collect();
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in runs {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.into_iter().map(|(start, end)| (start, end - start)).collect()
}

/// Copies `len` bytes at `offset` of `from` to the end of `to`.
fn copy_range(from: &File, offset: u64, len: u64, to: &mut impl Write, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        buf.resize(n, 0);
        from.read_exact_at(buf, pos)?;
        to.write_all(buf)?;
        pos += n as u64;
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    if open::probe(path)? != open::Format::Qcow2 {
        return Err(Error::msg(format!("'{}' is not a qcow2 image (no qcow2 magic)", path.display())));
    }
    let dev = open::file(path, true)?;
    let file_len = dev.len_bytes();
    let ranges = qcow::check::metadata_ranges(&dev).map_err(|e| open::open_error(path, e))?;
    // From the header itself: a damaged image, which the check walk still reads, may not open as an image.
    let mut first = vec![0u8; 512];
    dev.read_at(0, &mut first).map_err(|e| open::io_error(path, e))?;
    let cluster_bits = qcow::format::Header::peek_cluster_bits(&first).map_err(|e| open::open_error(path, e.into()))?;
    let cluster_size = 1u64 << cluster_bits;
    let runs = cluster_runs(ranges.iter().map(|r| (r.offset, r.len)), cluster_size, file_len);
    let manifest = Manifest { file_len, cluster_size, runs };
    write_files(path, dev.file(), &manifest, &args.prefix, &args.progress)
}

/// What `PREFIX.map` records.
struct Manifest {
    file_len: u64,
    cluster_size: u64,
    /// `(offset, length)` runs of the image file, sorted and disjoint.
    runs: Vec<(u64, u64)>,
}

fn write_files(path: &Path, image: &File, manifest: &Manifest, prefix: &str, progress: &ProgressArgs) -> Result<()> {
    let (meta_path, map_path) = paths(prefix);
    let total: u64 = manifest.runs.iter().map(|r| r.1).sum();
    let mut progress = Progress::new(progress, total, "bytes")?;
    let meta = File::create(&meta_path).context(|| format!("could not create '{}'", meta_path.display()))?;
    let mut out = std::io::BufWriter::new(meta);
    let mut buf = Vec::new();
    let mut done = 0;
    for &(offset, len) in &manifest.runs {
        copy_range(image, offset, len, &mut out, &mut buf).context(|| {
            format!(
                "could not copy bytes {offset}..{} of '{}' to '{}'",
                offset + len,
                path.display(),
                meta_path.display()
            )
        })?;
        done += len;
        progress.set(done, total);
    }
    out.flush().context(|| format!("could not write '{}'", meta_path.display()))?;
    progress.finish(total);
    let list: Vec<Value> = manifest.runs.iter().map(|&(o, l)| json!([o, l])).collect();
    let map = json!({
        "format": MAP_FORMAT,
        "file-length": manifest.file_len,
        "cluster-size": manifest.cluster_size,
        "ranges": list,
    });
    let text = serde_json::to_string_pretty(&map).context(|| "could not format the map")?;
    std::fs::write(&map_path, format!("{text}\n")).context(|| format!("could not write '{}'", map_path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_whole_clusters_merged_and_clipped() {
        let runs = cluster_runs([(0, 65536), (65536, 8), (196608, 100), (200000, 10)].into_iter(), 65536, 230000);
        assert_eq!(runs, vec![(0, 131072), (196608, 230000 - 196608)]);
    }
}
