//! `qcow-tool pattern`: the reference's test images, written through the library.
//!
//! - Pattern 1 writes one sector at the start of every other cluster: the worst case for structures that
//!   track allocated ranges.
//! - Pattern 2 writes every sector, then discards every other cluster: the worst case for compaction.
//!
//! As in the reference, the image has lazy refcounts, and every sector written starts with its own sector
//! number as a big-endian 64-bit integer, the rest of the sector being zeros.

use std::path::PathBuf;

use qcow::{Config, CreateOptions, Image};

use crate::error::{Error, Result};
use crate::open;
use crate::progress::{Progress, ProgressArgs};

/// Bytes written at a time by pattern 2.
const CHUNK: u64 = 4 << 20;

/// Arguments of `pattern`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Virtual size of the image (K, M, G, T, P suffixes accepted).
    #[arg(long, default_value = "1G")]
    size: String,
    /// Cluster size of the image.
    #[arg(long, default_value = "64K")]
    cluster_size: String,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to create; an existing file is overwritten.
    file: PathBuf,
    /// Which pattern: 1 (a sector in every other cluster) or 2 (everything written, every other cluster
    /// discarded).
    #[arg(value_parser = clap::value_parser!(u8).range(1..=2))]
    number: u8,
}

/// A sector marked with its number.
fn mark(sector: u64, buf: &mut [u8]) {
    if let Some(head) = buf.get_mut(..8) {
        head.copy_from_slice(&sector.to_be_bytes());
    }
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    let mut options = CreateOptions::new(open::size(&args.size)?);
    options.cluster_size = open::size(&args.cluster_size)?;
    options.lazy_refcounts = true;
    options.validate().map_err(|e| Error::wrap("invalid image options", e))?;
    let config = Config { discard: true, ..Config::default() };
    let made = (|| {
        let image = Image::create_path(path, &options, config).map_err(|e| open::io_error(path, e))?;
        let fail = |e| open::io_error(path, e);
        let size = image.virtual_size();
        let cs = image.geometry().cluster_size();
        let mut progress = Progress::new(&args.progress, size, "bytes")?;
        if args.number == 1 {
            let mut sector = [0u8; 512];
            let mut pos = 0;
            while pos < size {
                mark(pos / 512, &mut sector);
                image.write_at(pos, &sector).map_err(fail)?;
                progress.set(pos, size);
                pos = pos.saturating_add(2 * cs);
            }
        } else {
            let mut buf = vec![0u8; CHUNK as usize];
            let mut pos = 0;
            while pos < size {
                let len = (size - pos).min(CHUNK) as usize;
                let chunk = buf.get_mut(..len).unwrap_or_default();
                for (i, sector) in chunk.chunks_mut(512).enumerate() {
                    mark(pos / 512 + i as u64, sector);
                }
                image.write_at(pos, chunk).map_err(fail)?;
                pos += len as u64;
                progress.set(pos / 2, size);
            }
            let mut pos = 0;
            while pos < size {
                let sectors = (size - pos).min(cs) / 512;
                image.discard(pos / 512, sectors).map_err(fail)?;
                progress.set(size / 2 + pos / 2, size);
                pos = pos.saturating_add(2 * cs);
            }
        }
        progress.finish(size);
        image.close().map_err(fail)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}
