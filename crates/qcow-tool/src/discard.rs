//! `qcow-tool discard`: find clusters whose data is all zeros and discard them, so that they stop taking space.

use std::path::PathBuf;

use qcow::MappedKind;

use crate::error::Result;
use crate::open;
use crate::progress::{Progress, ProgressArgs};
use crate::rw::print;

/// Bytes read at a time while scanning.
const CHUNK: u64 = 4 << 20;

/// Arguments of `discard`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The qcow2 image.
    file: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let config = qcow::Config { discard: true, ..qcow::Config::default() };
    let image = open::image_with(&args.file, config)?;
    let fail = |e| open::io_error(&args.file, e);
    let cs = image.geometry().cluster_size();
    let extents = image.mapped_extents(true).map_err(fail)?;
    let total: u64 = extents.iter().filter(|e| e.kind == MappedKind::Data).map(|e| e.length).sum();
    let mut progress = Progress::new(&args.progress, total, "bytes")?;
    let (mut scanned, mut discarded) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK.max(cs) as usize];
    for extent in extents.iter().filter(|e| e.kind == MappedKind::Data) {
        // Extents of data start and end on cluster boundaries, except at the end of the disk.
        let mut pos = extent.start;
        let end = extent.start + extent.length;
        while pos < end {
            let len = (end - pos).min(buf.len() as u64);
            let Some(chunk) = buf.get_mut(..len.next_multiple_of(512) as usize) else { break };
            image.read_at(pos, chunk).map_err(fail)?;
            for (i, cluster) in chunk.chunks(cs as usize).enumerate() {
                if qcow::convert::is_zero(cluster) {
                    let at = pos + i as u64 * cs;
                    image.discard(at / 512, cluster.len() as u64 / 512).map_err(fail)?;
                    discarded += cluster.len() as u64;
                }
            }
            pos += len;
            scanned += len;
            progress.set(scanned, total);
        }
    }
    progress.finish(total);
    image.close().map_err(fail)?;
    print(
        format!(
            "{}: {} bytes of zero clusters discarded out of {} bytes scanned\n",
            args.file.display(),
            discarded,
            scanned
        )
        .as_bytes(),
    )
}
