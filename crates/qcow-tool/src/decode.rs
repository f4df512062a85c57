//! `qcow-tool decode QCOW RAW`: the reference's name for `convert -f qcow2 -O raw`: a sparse raw file of the
//! image's virtual size holding its guest data (read through the backing chain).

use std::path::PathBuf;

use qcow::block::{BlockDevice, FileDevice, FileOptions, SECTOR_SIZE};

use crate::error::{Context, Result};
use crate::open;
use crate::progress::{Progress, ProgressArgs};

/// Arguments of `decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The qcow2 image to read.
    qcow: PathBuf,
    /// The raw file to write; an existing file is overwritten.
    raw: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
}

pub fn run(args: &Args) -> Result<()> {
    let image = open::image(&args.qcow, true)?;
    let size = image.virtual_size();
    open::refuse_same_file(&args.qcow, &args.raw)?;
    let made = (|| {
        let dst = FileDevice::create(&args.raw, &FileOptions::default())
            .context(|| format!("could not create '{}'", args.raw.display()))?;
        dst.resize(size.div_ceil(SECTOR_SIZE)).context(|| format!("could not resize '{}'", args.raw.display()))?;
        let mut progress = Progress::new(&args.progress, size, "bytes")?;
        qcow::convert::convert(&image, &image, size, &dst, &mut |done, total| progress.set(done, total))
            .context(|| format!("could not copy '{}' into '{}'", args.qcow.display(), args.raw.display()))?;
        progress.finish(size);
        // The copy moved whole sectors; the file keeps the disk's exact length.
        dst.file().set_len(size).context(|| format!("could not resize '{}'", args.raw.display()))?;
        dst.flush().context(|| format!("could not flush '{}'", args.raw.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&args.raw);
    }
    made
}
