//! `qcow-tool encode RAW QCOW`: the reference's name for `convert -f raw -O qcow2`: a new qcow2 image, with
//! default options, holding the raw file's data (holes and all-zero blocks are not stored).

use std::path::PathBuf;

use qcow::{Config, CreateOptions, Image};

use crate::error::{Context, Result};
use crate::open;
use crate::progress::{Progress, ProgressArgs};

/// Arguments of `encode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The raw file to read.
    raw: PathBuf,
    /// The qcow2 image to create; an existing file is overwritten.
    qcow: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let src = open::file(&args.raw, true)?;
    let size = src.len_bytes();
    crate::open::refuse_same_file(&args.raw, &args.qcow)?;
    let made = (|| {
        let image = Image::create_path(&args.qcow, &CreateOptions::new(size), Config::default())
            .map_err(|e| open::io_error(&args.qcow, e))?;
        let mut progress = Progress::new(&args.progress, size, "bytes")?;
        qcow::convert::convert(&src, &src, size, &image, &mut |done, total| progress.set(done, total))
            .context(|| format!("could not copy '{}' into '{}'", args.raw.display(), args.qcow.display()))?;
        progress.finish(size);
        image.flush().map_err(|e| open::io_error(&args.qcow, e))?;
        image.close().map_err(|e| open::io_error(&args.qcow, e))
    })();
    if made.is_err() {
        // Leave no half-made image behind.
        let _ = std::fs::remove_file(&args.qcow);
    }
    made
}
