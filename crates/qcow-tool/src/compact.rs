//! `qcow-tool compact`: move clusters from the end of the file into holes and truncate it.

use std::path::PathBuf;

use crate::error::Result;
use crate::open;
use crate::progress::{Progress, ProgressArgs};
use crate::rw::print;

/// Arguments of `compact`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The qcow2 image to compact (nothing else may use it meanwhile).
    file: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let image = open::image_with(&args.file, qcow::Config::default())?;
    let mut progress = Progress::new(&args.progress, 0, "clusters")?;
    let summary = image
        .compact(&mut |p| {
            progress.set(p.moved, p.planned);
            true
        })
        .map_err(|e| open::io_error(&args.file, e))?;
    progress.finish(summary.clusters_copied);
    image.close().map_err(|e| open::io_error(&args.file, e))?;
    let saved = summary.old_size.saturating_sub(summary.new_size);
    print(
        format!(
            "{}: {} -> {} bytes ({} bytes smaller); {} clusters moved, {} references updated, {} empty refcount \
             blocks dropped\n",
            args.file.display(),
            summary.old_size,
            summary.new_size,
            saved,
            summary.clusters_copied,
            summary.references_updated,
            summary.refcount_blocks_dropped
        )
        .as_bytes(),
    )
}
